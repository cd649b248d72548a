"""A team's HTTP tools, as the demo and the tests need them (`python -m infra.tool_server` serves them
and prints one JSON line with the TOOLS_FILE contents that declare them): `POST /availability` answers whether a
table is free; `/slow` answers the same after `slow_s` (long enough for the agent's filler);
`/garbage` answers something that is not JSON; `/refuse` answers HTTP 500. Every request is kept, so
a test can see what Parley sent (`{"call_sid", "arguments"}`). A bare ASGI app, like the emulators.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from core.server import RunningServer, start_in_loop
from infra.asgi import Receive, Scope, Send, lifespan, read_body, respond

AVAILABILITY_TOOL = {
    "name": "check_availability",
    "description": "Whether a table is free for a number of people on a day and at a time.",
    "parameters": {
        "type": "object",
        "properties": {
            "people": {"type": "integer", "minimum": 1},
            "day": {"type": "string"},
            "time": {"type": "string"},
        },
        "required": ["people"],
    },
}


class ToolServer:
    def __init__(self, slow_s: float = 1.5) -> None:
        self.slow_s = slow_s
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._running: RunningServer | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        self._running = await start_in_loop(self, host, port)
        return self._running.url

    async def stop(self) -> None:
        if self._running is not None:
            await self._running.stop()

    def tools_file(self, base_url: str, path: str = "/availability", timeout: float = 5) -> list[dict[str, Any]]:
        """A TOOLS_FILE's contents declaring the availability tool at `path`."""
        return [{**AVAILABILITY_TOOL, "url": f"{base_url}{path}", "timeout": timeout}]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if await lifespan(scope, receive, send):
            return
        body = await read_body(receive)
        try:
            request = json.loads(body or b"{}")
        except ValueError:
            request = {}
        self.requests.append((scope["path"], request))
        path = scope["path"]
        if path == "/refuse":
            await respond(send, 500, b'{"error": "internal"}')
        elif path == "/garbage":
            await respond(send, 200, b"<html>not json</html>", "text/html")
        elif path in ("/availability", "/slow"):
            if path == "/slow":
                await asyncio.sleep(self.slow_s)  # the tool's own work, which is what is being emulated
            people = request.get("arguments", {}).get("people", 2)
            await respond(send, 200, json.dumps({"available": people <= 6, "time": "19:00"}).encode())
        else:
            await respond(send, 404, b'{"error": "not found"}')


async def _main() -> None:
    import signal

    server = ToolServer()
    url = await server.start()
    print(json.dumps({"TOOL_SERVER_URL": url, "tools": server.tools_file(url)}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()


if __name__ == "__main__":
    asyncio.run(_main())
