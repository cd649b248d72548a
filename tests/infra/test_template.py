"""template.yaml: valid for cfn-lint before and after the SAM transform, and wired as DESIGN.md says."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from samtranslator.yaml_helper import yaml_parse

from infra.sam_transform import transform_template

ROOT = Path(__file__).parents[2]
TEMPLATE = ROOT / "template.yaml"


def cfn_lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(Path(sys.executable).parent / "cfn-lint"), str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, "AWS_DEFAULT_REGION": "us-east-1"},
    )


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    parsed: dict[str, Any] = yaml_parse(TEMPLATE.read_text())
    return parsed


def test_cfn_lint_passes_on_the_source() -> None:
    result = cfn_lint(TEMPLATE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_cfn_lint_passes_on_the_transformed_template(tmp_path: Path) -> None:
    transformed = transform_template(TEMPLATE)
    output = tmp_path / "template.cfn.json"
    output.write_text(json.dumps(transformed))
    result = cfn_lint(output)
    assert result.returncode == 0, result.stdout + result.stderr
    stage = next(r for r in transformed["Resources"].values() if r["Type"] == "AWS::ApiGatewayV2::Stage")
    assert stage["Properties"]["StageName"] == "$default"  # rawPath carries no stage prefix


def test_the_calls_table_is_as_designed(template: dict[str, Any]) -> None:
    table = template["Resources"]["CallsTable"]["Properties"]
    assert table["KeySchema"] == [{"AttributeName": "CallSid", "KeyType": "HASH"}]
    assert table["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}


def test_the_webhook_routes_and_settings(template: dict[str, Any]) -> None:
    function = template["Resources"]["WebhookFunction"]["Properties"]
    assert function["Handler"] == "handlers.webhook.handler"
    routes = {(e["Properties"]["Method"], e["Properties"]["Path"]) for e in function["Events"].values()}
    posts = ("/voice", "/status", "/stream-status", "/after-stream", "/after-dial", "/whisper")
    assert routes == {*(("POST", path) for path in posts), ("GET", "/healthz")}
    assert {"TWILIO_AUTH_TOKEN", "MEDIA_STREAM_URL", "PUBLIC_BASE_URL", "CALLS_TABLE"} <= set(
        function["Environment"]["Variables"]
    )
    assert not any(name.endswith("_API_KEY") for name in function["Environment"]["Variables"])  # no provider keys


def test_the_media_service_runs_parley_serve_media_and_drains(template: dict[str, Any]) -> None:
    container = template["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    assert container["Command"][:3] == ["parley", "serve", "media"]
    assert container["StopTimeout"] == 120
    names = {e["Name"] for e in container["Environment"]} | {s["Name"] for s in container["Secrets"]}
    assert {
        "TWILIO_AUTH_TOKEN",
        "MEDIA_STREAM_URL",
        "CALLS_TABLE",
        "DEEPGRAM_API_KEY",
        "OPENAI_API_KEY",
        "ELEVENLABS_API_KEY",
    } <= names
    assert "PUBLIC_BASE_URL" not in names  # the media service does not need the webhook's URL
    drain = next(e["Value"] for e in container["Environment"] if e["Name"] == "DRAIN_SECONDS")
    assert drain == {"Ref": "DrainSeconds"}
    assert template["Parameters"]["DrainSeconds"]["MaxValue"] < container["StopTimeout"]
    assert "DesiredCount" not in template["Resources"]["Service"]["Properties"]  # the scaling target owns it
    assert template["Resources"]["TargetGroup"]["Properties"]["HealthCheckPath"] == "/healthz"


def test_the_media_image_leaves_the_stand_ins_out() -> None:
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    copied = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ") and "--from" not in line]
    assert "core" in " ".join(copied) and "handlers" in " ".join(copied)
    assert not any(part.startswith(("infra", "tests", ".")) for part in copied)
    assert 'CMD ["parley", "serve", "media"' in dockerfile
