"""Builds that reproduce: the locks agree with pyproject.toml and hash every file; the image is
pinned and lint-clean; `sam build` builds in place."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
LOCKS = ROOT / "requirements"


def pins(lock: str) -> dict[str, str]:
    """name -> version of every requirement in a lock."""
    found = re.findall(r"^([A-Za-z0-9_.-]+)==([^ ;\\\n]+)", (LOCKS / lock).read_text(), re.MULTILINE)
    return {name.lower().replace("_", "-"): version for name, version in found}


def pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {
        requirement.split("==")[0].strip().lower(): requirement.split("==")[1].split(";")[0].strip()
        for requirement in project["dependencies"]
    }


@pytest.mark.parametrize(("lock", "input_flags"), [("media", ["--all"]), ("lambda", [])])
def test_each_lock_is_made_from_pyprojects_pins_and_hashes_every_file(lock: str, input_flags: list[str]) -> None:
    derived = subprocess.run(
        [sys.executable, str(ROOT / "infra" / "lambda_requirements.py"), *input_flags],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert derived == (LOCKS / f"{lock}.in").read_text(), f"pyproject.toml changed: run `make lock` ({lock})"
    locked, wanted = pins(f"{lock}.txt"), pyproject_pins()
    direct = {name for name in wanted if name in (LOCKS / f"{lock}.in").read_text().lower()}
    assert direct and all(locked[name] == wanted[name] for name in direct), "run `make lock`"
    text = (LOCKS / f"{lock}.txt").read_text()
    requirements = re.split(r"\n(?=[A-Za-z0-9])", text[text.index("\n", text.index("make lock")) + 1 :])
    assert all("--hash=sha256:" in requirement for requirement in requirements if "==" in requirement)


def test_the_lambda_lock_leaves_the_media_services_packages_out_and_agrees_with_the_image() -> None:
    lambda_pins, media_pins = pins("lambda.txt"), pins("media.txt")
    assert {name: media_pins.get(name) for name in lambda_pins} == lambda_pins
    assert not {"numpy", "openai", "websockets", "uvloop", "uvicorn"} & set(pins("lambda.txt"))
    assert {"litestar", "mangum", "boto3", "aws-lambda-powertools"} <= set(pins("lambda.txt"))


def test_the_image_is_pinned_installs_from_the_lock_and_passes_hadolint() -> None:
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.13-slim@sha256:[0-9a-f]{64}$", dockerfile, re.MULTILINE)
    assert "--require-hashes" in dockerfile and "requirements/media.txt" in dockerfile
    assert "HEALTHCHECK" not in dockerfile.replace("No HEALTHCHECK", "")  # ECS ignores it; the ALB checks
    lint = subprocess.run(
        [
            str(Path(sys.executable).parent / "hadolint"),
            "--failure-threshold",
            "info",
            str(ROOT / "infra" / "Dockerfile"),
        ],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_sam_builds_in_place() -> None:
    config = tomllib.loads((ROOT / "samconfig.toml").read_text())
    assert config["default"]["build"]["parameters"]["build_in_source"] is True
    makefile = (ROOT / "Makefile").read_text()
    assert "--require-hashes -r requirements/lambda.txt" in makefile and "manylinux_2_28_aarch64" in makefile


def test_the_pruned_lambda_bundle_answers_alone(tmp_path: Path) -> None:
    """The bundle, built as `sam build` builds it (for this machine), imported without site-packages."""
    import os

    from infra.bench import build_lambda_bundle_here

    bundle = tmp_path / "bundle"
    build_lambda_bundle_here(bundle)
    assert not {"faker", "pygments", "numpy", "openai", "tests", "infra"} & {path.name for path in bundle.iterdir()}
    environment = {
        **os.environ,
        "TWILIO_AUTH_TOKEN": "t",
        "MEDIA_STREAM_URL": "wss://media.example.com/media",
        "CALLS_TABLE": "calls",
    }
    code = f"import sys; sys.path.insert(0, {str(bundle)!r}); import handlers.webhook as w; w.warm(); print('ok')"
    answer = subprocess.run([sys.executable, "-S", "-c", code], env=environment, capture_output=True, text=True)
    assert answer.stdout.strip().endswith("ok"), answer.stderr[-2000:]
