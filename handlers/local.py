"""Both apps on one port, for testing with a real phone from a laptop: `parley serve both`.

A tunnel the user brings (ngrok, cloudflared, ...) gives one public https host. Twilio posts the
webhooks to it and opens the media WebSocket on it, so both apps listen behind one port here: every
WebSocket (the media stream at `/media`) and `GET /healthz` (503 while draining) go to the media app,
every other request to the webhook app. `PUBLIC_BASE_URL` and `MEDIA_STREAM_URL` are derived from the
tunnel's URL when not set, so the signatures are checked against what Twilio really signs.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from core.config import ConfigError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Asgi = Callable[[Scope, Receive, Send], Awaitable[None]]


def public_urls(tunnel_url: str) -> dict[str, str]:
    """`PUBLIC_BASE_URL` and `MEDIA_STREAM_URL` for a tunnel's public URL (https://host[:port])."""
    parts = urlsplit(tunnel_url.strip())
    if parts.scheme != "https" or not parts.hostname or parts.path not in ("", "/") or parts.query:
        raise ConfigError(
            "--public-url",
            f"{tunnel_url!r} is not an https://host URL",
            "the https URL your tunnel gives, e.g. https://abc123.ngrok.app (Twilio requires https and wss)",
        )
    return {"PUBLIC_BASE_URL": f"https://{parts.netloc}", "MEDIA_STREAM_URL": f"wss://{parts.netloc}/media"}


def one_port(webhook: Any, media: Any) -> Asgi:  # Litestar apps (ASGI, typed more narrowly)
    """One ASGI app: WebSockets, `/healthz` and the lifespan to the media app; the rest to the webhook."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        to_media = scope["type"] in ("websocket", "lifespan") or scope.get("path") == "/healthz"
        await (media if to_media else webhook)(scope, receive, send)

    return app


def from_env(tunnel_url: str | None) -> tuple[Asgi, Any]:
    """The combined app and the media app's drain. The tunnel's URLs fill what is not set."""
    if tunnel_url:
        for variable, value in public_urls(tunnel_url).items():
            os.environ.setdefault(variable, value)
    from handlers.media import app as media_app
    from handlers.media import drain
    from handlers.webhook import app as webhook_app

    return one_port(webhook_app, media_app), drain
