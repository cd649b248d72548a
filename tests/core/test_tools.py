"""Tools: the declarations a team writes in TOOLS_FILE, checked at start-up, and the HTTP client that
runs them, against a real local tool server (`infra/tool_server.py`) with its faults."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from core.config import ConfigError, ConversationSettings
from core.tools import HttpTools, builtin_tools, load_tools_file, parse_destinations
from infra.tool_server import AVAILABILITY_TOOL, ToolServer


def write(tmp_path: Path, content: str) -> str:
    path = tmp_path / "tools.json"
    path.write_text(content)
    return str(path)


def test_a_valid_tools_file_declares_its_tools(tmp_path: Path) -> None:
    path = write(tmp_path, json.dumps([{**AVAILABILITY_TOOL, "url": "http://tools.local/availability", "timeout": 2}]))
    [tool] = load_tools_file(path)
    assert (tool.name, tool.url, tool.timeout_s) == ("check_availability", "http://tools.local/availability", 2.0)
    assert tool.wire()["function"]["parameters"]["required"] == ["people"]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("[{not json", "is not valid JSON"),
        ('{"name": "x"}', "must hold a JSON list"),
        ('[{"name": "x", "description": "d", "parameters": {"type": "object"}}]', "lacks url"),
        (
            '[{"name": "x", "description": "d", "url": "http://a/b", "parameters": {"type": "object",'
            ' "properties": {"n": {"type": "integr"}}}}]',
            "is not a valid JSON Schema",
        ),
        (
            '[{"name": "x", "description": "d", "url": "http://a/b", "parameters": {"type": "array"}}]',
            '"type": "object"',
        ),
        (
            '[{"name": "end_call", "description": "d", "url": "http://a/b", "parameters": {"type": "object"}}]',
            "built-in",
        ),
        ('[{"name": "x", "description": "d", "url": "ftp://a/b", "parameters": {"type": "object"}}]', "http(s)://"),
        (
            '[{"name": "x", "description": "d", "url": "http://a/b", "timeout": 0, "parameters": {"type": "object"}}]',
            "timeout",
        ),
    ],
)
def test_a_bad_tools_file_stops_start_up_naming_the_file_and_the_problem(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as error:
        ConversationSettings.from_env({"TOOLS_FILE": path})
    assert str(error.value).startswith("TOOLS_FILE: ") and path in str(error.value) and problem in str(error.value)


def test_a_missing_tools_file_is_named() -> None:
    with pytest.raises(ConfigError, match=r"TOOLS_FILE: /no/such/tools.json cannot be read"):
        ConversationSettings.from_env({"TOOLS_FILE": "/no/such/tools.json"})


def test_destinations_are_names_for_numbers_and_only_names_reach_the_model() -> None:
    destinations = parse_destinations("support=+15551230000, billing=sip:billing@pbx.example.com")
    assert destinations == {"support": "+15551230000", "billing": "sip:billing@pbx.example.com"}
    transfer = builtin_tools(destinations)[1].wire()["function"]
    assert transfer["parameters"]["properties"]["destination"]["enum"] == ["billing", "support"]
    assert "+1555" not in json.dumps(transfer)
    with pytest.raises(ConfigError, match=r"TRANSFER_DESTINATIONS: '5551230000' .* neither an E\.164"):
        ConversationSettings.from_env({"TRANSFER_DESTINATIONS": "support=5551230000"})


@pytest.fixture
async def server() -> AsyncIterator[tuple[ToolServer, str]]:
    tools = ToolServer(slow_s=1.0)
    url = await tools.start()
    yield tools, url
    await tools.stop()


def http_tools(tmp_path: Path, url: str, path: str, timeout: float = 5) -> HttpTools:
    """The tools a TOOLS_FILE declaring the availability tool at `path` gives."""
    return HttpTools(load_tools_file(write(tmp_path, json.dumps(ToolServer().tools_file(url, path, timeout)))))


async def test_a_tool_is_posted_the_call_sid_and_its_arguments_and_its_answer_comes_back(
    server: tuple[ToolServer, str], tmp_path: Path
) -> None:
    tools_server, url = server
    tools = http_tools(tmp_path, url, "/availability")
    result = await tools.run("CA123", "check_availability", '{"people": 4, "day": "friday"}')
    assert json.loads(result) == {"available": True, "time": "19:00"}
    assert tools_server.requests == [
        ("/availability", {"call_sid": "CA123", "arguments": {"people": 4, "day": "friday"}})
    ]
    await tools.aclose()


@pytest.mark.parametrize(
    ("path", "timeout_s", "arguments", "error"),
    [
        ("/refuse", 5, '{"people": 2}', "failed with HTTP 500"),
        ("/garbage", 5, '{"people": 2}', "not JSON"),
        ("/slow", 0.2, '{"people": 2}', "did not answer within 0.2 s"),
        ("/availability", 5, "{people: 2", "not valid JSON"),
        ("/availability", 5, '{"people": "two"}', "do not match the tool's schema"),
    ],
)
async def test_whatever_goes_wrong_is_an_error_result_for_the_model(
    server: tuple[ToolServer, str], tmp_path: Path, path: str, timeout_s: float, arguments: str, error: str
) -> None:
    from core import metrics

    _, url = server
    tools = http_tools(tmp_path, url, path, timeout_s)
    metrics.metrics.clear_metrics()
    result = json.loads(await tools.run("CA123", "check_availability", arguments))
    assert error in result["error"]
    # The tool's own failures are counted for their alarm; the model's bad arguments are the model's.
    assert ("ToolFailures" in metrics.metrics.metric_set) == (path != "/availability")
    await tools.aclose()


async def test_a_tool_that_cannot_be_reached_is_an_error_result(tmp_path: Path) -> None:
    tools = http_tools(tmp_path, "http://127.0.0.1:9", "/availability")  # nothing listens on the discard port
    result = json.loads(await tools.run("CA123", "check_availability", '{"people": 2}'))
    assert "could not be reached" in result["error"]
    await tools.aclose()
