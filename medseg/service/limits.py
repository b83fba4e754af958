"""Request body limits as pure ASGI middleware: size and time.

* Size: a declared Content-Length over the cap is refused before the body is read; a chunked body is counted as
  it streams and refused once it passes the cap (413).
* Time: while a body is still arriving, each read may wait at most ``read_timeout_s`` and the whole body may
  take at most ``upload_timeout_s``; a half-sent upload gets 408 and its connection is closed, instead of
  holding a connection (and an upload slot) forever. Once the body is complete, reads are not timed (a long
  download listens for the client going away).
Both answer JSON ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


class RequestBodyLimits:
    def __init__(self, app: Any, max_bytes: int, read_timeout_s: float = math.inf,
                 upload_timeout_s: float = math.inf):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.upload_timeout_s = upload_timeout_s

    async def _refuse(self, send: Any, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    def _too_large(self) -> str:
        return f"request body larger than the service's limit of {self.max_bytes} bytes"

    def _too_slow(self) -> str:
        return (f"request body incomplete: no data for {self.read_timeout_s:g} s, or not all of it within "
                f"{self.upload_timeout_s:g} s (read_timeout_s / upload_timeout_s)")

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, 413, self._too_large())
            return

        seen = 0
        refusal: tuple[int, str] | None = None
        body_done = False
        replaced = False
        deadline = time.monotonic() + self.upload_timeout_s

        async def limited_receive() -> Message:
            nonlocal seen, refusal, body_done
            if body_done or refusal is not None:
                return await receive() if refusal is None else {"type": "http.disconnect"}
            wait = min(self.read_timeout_s, max(0.0, deadline - time.monotonic()))
            try:
                message = await (asyncio.wait_for(receive(), wait) if math.isfinite(wait) else receive())
            except TimeoutError:
                refusal = (408, self._too_slow())
                return {"type": "http.disconnect"}  # the app stops reading; the answer becomes 408
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.max_bytes:
                    refusal = (413, self._too_large())
                    # Stop the stream here: whatever the app does with a cut body, the answer becomes 413.
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal replaced
            if refusal is not None:
                if message["type"] == "http.response.start" and not replaced:
                    replaced = True
                    await self._refuse(send, *refusal)
                return
            if message["type"] == "http.response.start" and not body_done:
                # Answered before the body was all there (a parse error, say): close the connection rather than
                # wait, untimed, for the rest of a body nobody reads.
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if refusal is None:
                raise
            # The cut body made the app raise (e.g. ClientDisconnect while parsing the form): still refused.
        if refusal is not None and not replaced:
            await self._refuse(send, *refusal)
