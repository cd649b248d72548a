"""What the agent can do on a call besides talking (DESIGN.md section 2b): the tools the model is offered,
and the HTTP client that runs a team's own tools.

Two tools are built in and decided by the conversation engine itself: `end_call(reason)` and, when
`TRANSFER_DESTINATIONS` names any, `transfer_call(destination, summary)`, whose `destination` is an enum
of those *names*: the model never sees a number, so no prompt can make the agent dial one. A team's
own tools are declared in `TOOLS_FILE` (a JSON list of `{"name", "description", "parameters", "url",
"timeout"}`), checked at start-up (`load_tools_file`: JSON, names, a valid JSON Schema), and run by
`HttpTools`: a POST of `{"call_sid", "arguments"}` whose JSON answer goes back to the model. Whatever
goes wrong (a refusal, a timeout, garbage, arguments that are not JSON) becomes an error result the
model can talk about; the call goes on. A tool's URL and answers are logged without bodies.

`jsonschema` and `httpx` are imported where they are used: `core.config` imports this module, and the
webhook Lambda, which has neither in its bundle, must still import `core.config`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core import metrics
from core.logs import logger

END_CALL = "end_call"
TRANSFER_CALL = "transfer_call"
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_MAX_ANSWER_CHARS = 4000  # what the model is given of an answer; a tool that returns a page is cut


@dataclasses.dataclass(frozen=True, slots=True)
class ToolSpec:
    """One function the model may call: as OpenAI's `tools` entry, plus where an HTTP tool lives."""

    name: str
    description: str
    parameters: Mapping[str, Any]
    url: str | None = None  # None for the built-in tools, which the engine carries out itself
    timeout_s: float = 5.0

    def wire(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }


def builtin_tools(destinations: Mapping[str, str]) -> tuple[ToolSpec, ...]:
    """`end_call` always; `transfer_call` only when there is somewhere to transfer to."""
    tools = [
        ToolSpec(
            END_CALL,
            "End the call. Say a short goodbye first, in the same answer.",
            {
                "type": "object",
                "properties": {"reason": {"type": "string", "description": "why the call ends, for the record"}},
                "required": ["reason"],
            },
        )
    ]
    if destinations:
        tools.append(
            ToolSpec(
                TRANSFER_CALL,
                "Transfer the caller to a person. Tell the caller first, in the same answer.",
                {
                    "type": "object",
                    "properties": {
                        "destination": {"type": "string", "enum": sorted(destinations)},
                        "summary": {"type": "string", "description": "what the caller wants, for the person"},
                    },
                    "required": ["destination", "summary"],
                },
            )
        )
    return tuple(tools)


def parse_destinations(raw: str) -> dict[str, str]:
    """`name=number` pairs, comma-separated; a number is E.164 (+15551230000) or a `sip:` URI."""
    destinations: dict[str, str] = {}
    for pair in filter(None, (part.strip() for part in raw.split(","))):
        name, sep, number = (item.strip() for item in pair.partition("="))
        if not sep or not _NAME.match(name):
            raise ValueError(f"{pair!r} is not name=number")
        if not (re.fullmatch(r"\+[1-9]\d{6,14}", number) or number.startswith("sip:")):
            raise ValueError(f"{number!r} (for {name}) is neither an E.164 number nor a sip: URI")
        destinations[name] = number
    return destinations


def load_tools_file(raw: str) -> tuple[ToolSpec, ...]:
    """The tools declared in the file named by `raw` (empty: none). Raises ValueError naming the file
    and what is wrong with it, so the media service stops at start-up rather than mid-call."""
    if not raw.strip():
        return ()
    import jsonschema

    path = Path(raw)
    try:
        declared = json.loads(path.read_text())
    except OSError as error:
        raise ValueError(f"{path} cannot be read ({error.strerror})") from None
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(declared, list):
        raise ValueError(f"{path} must hold a JSON list of tools")
    tools: list[ToolSpec] = []
    for index, entry in enumerate(declared):
        where = f"{path}, tool {index + 1}"
        if not isinstance(entry, dict):
            raise ValueError(f"{where} is not an object")
        missing = [key for key in ("name", "description", "parameters", "url") if key not in entry]
        if missing:
            raise ValueError(f"{where} lacks {', '.join(missing)}")
        name, url, timeout = entry["name"], entry["url"], entry.get("timeout", 5)
        if not isinstance(name, str) or not _NAME.match(name) or name in (END_CALL, TRANSFER_CALL):
            raise ValueError(f"{where}: name {name!r} must be 1-64 letters, digits, _ or -, and not a built-in")
        if name in {tool.name for tool in tools}:
            raise ValueError(f"{where}: name {name!r} is declared twice")
        if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url):
            raise ValueError(f"{where} ({name}): url {url!r} is not an http(s):// URL")
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not 0 < timeout <= 30:
            raise ValueError(f"{where} ({name}): timeout {timeout!r} must be seconds, more than 0 and at most 30")
        parameters = entry["parameters"]
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            raise ValueError(f'{where} ({name}): parameters must be a JSON Schema object with "type": "object"')
        try:
            jsonschema.Draft202012Validator.check_schema(parameters)
        except jsonschema.SchemaError as error:
            raise ValueError(f"{where} ({name}): parameters is not a valid JSON Schema: {error.message}") from None
        tools.append(ToolSpec(name, str(entry["description"]), parameters, url, float(timeout)))
    return tuple(tools)


def error_result(message: str) -> str:
    """A tool result saying what went wrong, in the form the model is told to expect."""
    return json.dumps({"error": message})


class HttpTools:
    """Runs a team's HTTP tools for every call of a process (one connection pool)."""

    def __init__(self, tools: tuple[ToolSpec, ...]) -> None:
        import httpx

        self._tools = {tool.name: tool for tool in tools if tool.url is not None}
        self._client = httpx.AsyncClient(follow_redirects=False)

    async def run(self, call_sid: str, name: str, arguments: str) -> str:
        """The tool's JSON answer as text, or an error result; never raises."""
        import httpx
        import jsonschema

        tool = self._tools.get(name)
        if tool is None or tool.url is None:
            return error_result(f"there is no tool named {name!r}")
        try:
            parsed = json.loads(arguments or "{}")
            jsonschema.validate(parsed, dict(tool.parameters))
        except ValueError:
            return error_result("the arguments were not valid JSON; call the tool again with JSON arguments")
        except jsonschema.ValidationError as error:
            return error_result(f"the arguments do not match the tool's schema: {error.message}")
        log = {"tool": name, "url": tool.url}
        try:
            async with asyncio.timeout(tool.timeout_s):
                response = await self._client.post(tool.url, json={"call_sid": call_sid, "arguments": parsed})
        except TimeoutError:
            logger.warning("a tool timed out", extra={**log, "timeout_s": tool.timeout_s})
            metrics.count("ToolFailures")
            return error_result(f"{name} did not answer within {tool.timeout_s:g} s")
        except httpx.HTTPError as error:
            logger.warning("a tool could not be reached", extra={**log, "error": type(error).__name__})
            metrics.count("ToolFailures")
            return error_result(f"{name} could not be reached")
        if response.status_code >= 400:
            logger.warning("a tool refused", extra={**log, "status": response.status_code})
            metrics.count("ToolFailures")
            return error_result(f"{name} failed with HTTP {response.status_code}")
        try:
            answer = response.json()
        except ValueError:
            logger.warning("a tool answered something that is not JSON", extra={**log, "length": len(response.content)})
            metrics.count("ToolFailures")
            return error_result(f"{name} gave an answer that is not JSON")
        logger.info("a tool answered", extra={**log, "status": response.status_code})
        text = json.dumps(answer)
        return text if len(text) <= _MAX_ANSWER_CHARS else text[:_MAX_ANSWER_CHARS] + " (cut)"

    async def aclose(self) -> None:
        await self._client.aclose()
