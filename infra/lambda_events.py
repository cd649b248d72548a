"""API Gateway HTTP API (payload 2.0) events as the `$default` stage delivers Twilio's form posts:
lower-case headers, the form body in base64. For tests and the benchmark of the webhook Lambda."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import urlencode


def http_api_event(
    path: str, form: dict[str, str], *, host: str, signature: str | None, method: str = "POST"
) -> dict[str, Any]:
    body = urlencode(form)
    headers = {
        "accept": "*/*",
        "content-length": str(len(body)),
        "content-type": "application/x-www-form-urlencoded",
        "host": host,
        "user-agent": "TwilioProxy/1.1",
        "x-forwarded-for": "203.0.113.10",
        "x-forwarded-port": "443",
        "x-forwarded-proto": "https",
    }
    if signature is not None:
        headers["x-twilio-signature"] = signature
    route = f"{method} {path}"
    return {
        "version": "2.0",
        "routeKey": route,
        "rawPath": path,
        "rawQueryString": "",
        "headers": headers,
        "requestContext": {
            "accountId": "123456789012",
            "apiId": host.split(".")[0],
            "domainName": host,
            "domainPrefix": host.split(".")[0],
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "203.0.113.10",
                "userAgent": "TwilioProxy/1.1",
            },
            "requestId": "Ab1CdEfGhIjKlM=",
            "routeKey": route,
            "stage": "$default",
            "time": "24/Nov/2026:00:00:00 +0000",
            "timeEpoch": 1795478400000,
        },
        "body": base64.b64encode(body.encode()).decode(),
        "isBase64Encoded": True,
    }
