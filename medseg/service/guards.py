"""Who may call the service: a browser page elsewhere must not be able to submit jobs.

* ``POST`` requests need the ``X-Medseg-Client`` header (any value; ``RemotePredictor`` sends its version). A
  web page can post a form to any address without asking, but a request with a custom header needs a CORS
  preflight first, which this service never grants: cross-site form posts and scripted posts from other
  origins are refused with 403.
* With ``api_token`` set, every ``/v1`` (and ``/versions/<name>/v1``) request needs ``Authorization: Bearer <token>`` (401 otherwise);
  ``/health`` and the API schema stay open for health checks.
* The Host header must name this service (``trusted_hosts``, Starlette's ``TrustedHostMiddleware``), so a
  DNS-rebinding page that makes the browser treat the service as its own origin is refused with 400.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

CLIENT_HEADER = "X-Medseg-Client"
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")

Scope = dict[str, Any]


class CallerGuard:
    """Pure ASGI middleware for the client header on POSTs and the optional bearer token."""

    def __init__(self, app: Any, api_token: str | None = None):
        self.app = app
        self.api_token = api_token

    async def _refuse(self, send: Any, status: int, message: str, headers: list[tuple[bytes, bytes]]) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *headers]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        if scope.get("method") == "POST" and not headers.get(CLIENT_HEADER.lower().encode(), b"").strip():
            await self._refuse(send, 403, f"POST requests need the {CLIENT_HEADER} header (cross-site form posts "
                               "are refused); medseg.service.client.RemotePredictor sends it", [])
            return
        # /versions/<name>/v1/... is a fine-tuned version's API (medseg.service.finetune): the same token.
        if self.api_token and str(scope.get("path", "")).startswith(("/v1/", "/versions/")):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_token}".encode()):
                await self._refuse(send, 401, "this service needs an API token: Authorization: Bearer <token>",
                                   [(b"www-authenticate", b"Bearer")])
                return
        await self.app(scope, receive, send)
