"""The Twilio webhook: `app` (Litestar) for uvicorn, `handler` (the same app behind Mangum) for Lambda.

Settings and the DynamoDB client are made once at import, which in Lambda is the INIT phase;
Mangum runs with `lifespan="off"` because it would otherwise run start-up and shut-down on every
invocation. The routes only translate HTTP to `core.webhook` and back.
"""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, Response, get, post
from mangum import Mangum

from core import metrics as metric_sink
from core.config import WebhookSettings, load_settings, secret_values
from core.logs import logger, redact_secrets
from core.store import CallStore, dynamodb_client
from core.webhook import IncomingRequest, WebhookReply, WebhookService


async def _incoming(request: Request[Any, Any, Any]) -> IncomingRequest:
    event = request.scope.get("aws.event") or {}
    return IncomingRequest(
        path=request.url.path,
        query=request.scope.get("query_string", b"").decode("latin-1"),
        headers={k.lower(): v for k, v in request.headers.items()},
        body=await request.body(),
        public_path=event.get("rawPath") if isinstance(event, dict) else None,
    )


def _response(reply: WebhookReply) -> Response[str]:
    return Response(content=reply.body, status_code=reply.status, media_type=reply.media_type)


def make_app(service: WebhookService) -> Litestar:
    @post("/voice", status_code=200)
    async def voice(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.voice(await _incoming(request)))

    @post("/status", status_code=200)
    async def status(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.status(await _incoming(request)))

    @post("/stream-status", status_code=200)
    async def stream_status(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.stream_status(await _incoming(request)))

    @post("/after-stream", status_code=200)
    async def after_stream(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.after_stream(await _incoming(request)))

    @post("/after-dial", status_code=200)
    async def after_dial(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.after_dial(await _incoming(request)))

    @post("/whisper", status_code=200)
    async def whisper(request: Request[Any, Any, Any]) -> Response[str]:
        return _response(service.whisper(await _incoming(request)))

    @get("/healthz", sync_to_thread=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    routes = [voice, status, stream_status, after_stream, after_dial, whisper, healthz]
    # logging_config=None: our JSON logger is the only one; Litestar's default would add a second, plain one.
    return Litestar(route_handlers=routes, openapi_config=None, logging_config=None)


def service_from_env() -> WebhookService:
    settings: WebhookSettings
    (settings,) = load_settings(WebhookSettings, aws_region=True)
    redact_secrets(secret_values(settings))
    store = CallStore(dynamodb_client(), settings.calls_table, ttl_days=settings.call_ttl_days)
    return WebhookService(settings, store)


service = service_from_env()
app = make_app(service)
# Litestar types its ASGI callable more narrowly than Mangum's protocol; they are the same at runtime.
_asgi = Mangum(app, lifespan="off")  # type: ignore[arg-type]


# GET /healthz as API Gateway's HTTP API (payload 2.0) delivers it.
_HEALTH_REQUEST = {
    "version": "2.0",
    "routeKey": "GET /healthz",
    "rawPath": "/healthz",
    "rawQueryString": "",
    "headers": {"host": "snapshot.invalid", "x-forwarded-proto": "https", "x-forwarded-port": "443"},
    "requestContext": {
        "domainName": "snapshot.invalid",
        "http": {"method": "GET", "path": "/healthz", "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1"},
        "routeKey": "GET /healthz",
        "stage": "$default",
    },
    "isBase64Encoded": False,
}


def warm() -> None:
    """What the first request would otherwise pay for, done before Lambda's SnapStart snapshot: a
    request through Mangum and Litestar, and a DynamoDB write through botocore (endpoint rules,
    serializers, validation) answered by a stub, so nothing leaves the process and no metric is
    emitted. The Secrets Manager client is made, but the secret is not read: it must not be in the snapshot."""
    from botocore.stub import Stubber

    service.auth_token.prepare()  # its client, not the secret
    _asgi(_HEALTH_REQUEST, None)  # type: ignore[arg-type]  # Mangum reads no context for HTTP
    with Stubber(service.store.client) as stub:
        stub.add_response("update_item", {})
        service.store.record_call({"CallSid": "CA" + "0" * 32, "From": "", "To": "", "Direction": "inbound"})


try:  # on Lambda's managed Python runtimes only; elsewhere there is no snapshot to prepare
    from snapshot_restore_py import register_before_snapshot
except ImportError:
    pass
else:
    register_before_snapshot(warm)


@logger.inject_lambda_context(clear_state=True)
@metric_sink.metrics.log_metrics(capture_cold_start_metric=True)
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    return _asgi(event, context)
