"""The HTTP API's request-body limit, enforced before any parsing (an ASGI middleware).

A body over `ServerConfig.max_body_bytes` gets 413 with an OpenAI error object
naming the size and the limit, and one log line; nothing of it reaches FastAPI,
pydantic or the JSON parser.

- With a Content-Length over the limit, the answer goes out at once, before a
  byte of the body is read.
- A chunked body (no Content-Length) is counted while it is read and refused as
  soon as the count passes the limit; what was read is dropped.

Either way uvicorn then reads and discards the rest of the body on a kept-alive
connection (nothing is buffered), so a client that sends its whole body before
reading the answer, as the `openai` SDK does, gets the 413 rather than a reset.
A body within the limit is handed on whole (FastAPI would read it whole anyway).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from server.openai_schema import ApiError

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
LIMIT_NAME = "--max-body-bytes / $MAX_BODY_BYTES"


class BodyLimit:
    """Wraps an ASGI app: HTTP requests with a body over `limit` bytes get 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            await self._refuse(scope, send, f"is {declared} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: let the app see it
                await self.app(scope, _replay([message], receive), send)
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                chunks.clear()
                await self._refuse(scope, send, f"is at least {size} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, _replay([whole], receive), send)

    async def _refuse(self, scope: Scope, send: Send, size: str) -> None:
        message = f"request body {size}; the limit is {self.limit} bytes ({LIMIT_NAME})"
        log.info("HTTP %s %s refused: %s", scope.get("method"), scope.get("path"), message)
        body = json.dumps(ApiError(413, message).body()).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


def _content_length(scope: Scope) -> int | None:
    """The declared body size; None for a chunked body (uvicorn has already refused a
    malformed Content-Length with 400)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _replay(messages: list[Message], receive: Receive) -> Receive:
    """`receive` that first returns `messages`, then waits on the connection again (for the
    http.disconnect that tells a handler its client went away)."""
    pending = list(messages)

    async def replayed() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed
