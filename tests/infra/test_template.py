"""template.yaml: valid for cfn-lint before and after the SAM transform, and wired as DESIGN.md says."""

from __future__ import annotations

import json
import os
import re
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
    assert {"TWILIO_AUTH_TOKEN_SECRET", "MEDIA_STREAM_URL", "PUBLIC_BASE_URL", "CALLS_TABLE"} <= set(
        function["Environment"]["Variables"]
    )
    assert not any(name.endswith("_API_KEY") for name in function["Environment"]["Variables"])  # no provider keys


def test_the_media_service_runs_parley_serve_media_and_drains(template: dict[str, Any]) -> None:
    container = template["Resources"]["TaskDefinition"]["Properties"]["ContainerDefinitions"][0]
    assert container["Command"][:3] == ["parley", "serve", "media"]
    assert container["StopTimeout"] == 120
    names = {e["Name"] for e in container["Environment"]} | {s["Name"] for s in container["Secrets"]}
    assert {
        "TWILIO_AUTH_TOKEN_SECRET",
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


_EMITTING_CALL = re.compile(r"(?:metrics|metric_sink)\.(?:count|milliseconds)\(([^)]*)\)|RecordMetric\(\s*\"(\w+)\"")
_FAILURE_WORDS = re.compile(r"Failure|Error|Rejected|Refused|Malformed|Exhausted|Unknown")


def emitted_metrics() -> set[tuple[str, str]]:
    """(metric, service) for every metric the source emits: core/webhook.py and handlers/webhook.py run
    in the webhook (service parley-webhook), everything else in the media service."""
    found = set()
    for path in [*(ROOT / "core").rglob("*.py"), *(ROOT / "handlers").glob("*.py")]:
        service = "parley-webhook" if path.name == "webhook.py" else "parley-media"
        for call_arguments, engine_name in _EMITTING_CALL.findall(path.read_text()):
            names = re.findall(r"\"([A-Z]\w+)\"", call_arguments) if call_arguments else [engine_name]
            found |= {(name, service) for name in names}
    return found


def _dimensions_service(dimensions: list[dict[str, Any]]) -> str:
    assert [d["Name"] for d in dimensions] == ["service"], "our metrics carry exactly the service dimension"
    return str(dimensions[0]["Value"])


def watched_metrics(template: dict[str, Any]) -> dict[str, set[tuple[str, str]]]:
    """(metric, service) in our namespace, by what watches it: alarms, scaling policies, the dashboard."""
    resources = template["Resources"]
    watched: dict[str, set[tuple[str, str]]] = {"alarm": set(), "scaling": set(), "dashboard": set()}
    for resource in resources.values():
        properties = resource.get("Properties", {})
        if resource["Type"] == "AWS::CloudWatch::Alarm":
            metrics = [properties] + [
                m["MetricStat"]["Metric"] for m in properties.get("Metrics", []) if "MetricStat" in m
            ]
            for metric in metrics:
                namespace = metric.get("Namespace", "")
                if str(namespace.get("Fn::Sub") if isinstance(namespace, dict) else namespace).startswith("Parley/"):
                    watched["alarm"].add((metric["MetricName"], _dimensions_service(metric["Dimensions"])))
        elif resource["Type"] == "AWS::ApplicationAutoScaling::ScalingPolicy":
            custom = properties["TargetTrackingScalingPolicyConfiguration"].get("CustomizedMetricSpecification")
            if custom:
                watched["scaling"].add((custom["MetricName"], _dimensions_service(custom["Dimensions"])))
    body = resources["Dashboard"]["Properties"]["DashboardBody"]["Fn::Sub"]
    for widget in json.loads(re.sub(r"\$\{[^}]+\}", "x", body))["widgets"]:
        for line in widget["properties"].get("metrics", []):
            if line[0].startswith("Parley/"):
                assert line[2] == "service" and (len(line) == 4 or isinstance(line[4], dict)), line
                watched["dashboard"].add((line[1], line[3]))
    return watched


def test_every_watched_metric_is_emitted_by_the_code_with_that_dimension(template: dict[str, Any]) -> None:
    emitted = emitted_metrics()
    assert ("ActiveCalls", "parley-media") in emitted and ("CallsStarted", "parley-webhook") in emitted
    for watcher, metrics in watched_metrics(template).items():
        assert metrics, f"no {watcher} watches any of our metrics"
        assert metrics <= emitted, f"{watcher} watches metrics the code never emits: {sorted(metrics - emitted)}"


def test_every_failure_the_code_emits_has_an_alarm(template: dict[str, Any]) -> None:
    from core.metrics import FAILURES

    emitted = emitted_metrics()
    names = {name for name, _ in emitted}
    assert names >= FAILURES, f"listed as failures but never emitted: {sorted(FAILURES - names)}"
    looks_like_failure = {name for name in names if _FAILURE_WORDS.search(name)}
    assert looks_like_failure <= FAILURES, (
        f"failures missing from core.metrics.FAILURES: {looks_like_failure - FAILURES}"
    )
    alarmed = watched_metrics(template)["alarm"]
    unalarmed = sorted(
        (name, service) for name, service in emitted if name in FAILURES and (name, service) not in alarmed
    )
    assert not unalarmed, f"failure metrics without an alarm: {unalarmed}"


def test_the_reply_latency_alarm_follows_the_silence_threshold(template: dict[str, Any]) -> None:
    alarm = template["Resources"]["ReplyLatencyAlarm"]["Properties"]
    expression = next(m["Expression"] for m in alarm["Metrics"] if "Expression" in m)
    assert "${SilenceThreshold}" in expression["Fn::Sub"]


def test_logs_insights_queries_read_the_call_summary_and_find_one_call(template: dict[str, Any]) -> None:
    slowest = template["Resources"]["SlowestCallsQuery"]["Properties"]["QueryString"]
    assert 'filter message = "call summary"' in slowest and "sort reply_latency_max_ms desc" in slowest
    one_call = template["Resources"]["OneCallQuery"]["Properties"]
    assert "filter CallSid = " in one_call["QueryString"] and len(one_call["LogGroupNames"]) == 2


def test_a_customer_managed_key_on_the_secret_is_granted_to_every_role_that_reads_it(template: dict[str, Any]) -> None:
    text = TEMPLATE.read_text()
    assert text.count("Action: kms:Decrypt, Resource: !Ref SecretsKmsKeyArn") == 3  # webhook, execution, task
    assert text.count("Action: secretsmanager:GetSecretValue") == 3
    assert template["Parameters"]["SecretsArn"]["AllowedPattern"].endswith("-[A-Za-z0-9]{6}")  # the full ARN
