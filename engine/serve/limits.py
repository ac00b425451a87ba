"""What stands in front of every route: the API key, compared in constant
time, and the request body read whole before the app sees it — at most
``max_bytes`` whether the client declared a length or sent it chunked, and
within ``timeout_s`` — so that a huge, slow or half-sent body costs the
server nothing but the bytes it was allowed."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cmiguard.serve.protocol import ApiError

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# reachable without the key: a load balancer's liveness probe
OPEN_PATHS = ("/health",)


async def send_error(send: Send, error: ApiError) -> None:
    """An OpenAI-shaped JSON error straight onto the ASGI channel."""
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: 401 without the key, 413 past ``max_bytes``, 408 when
    the body does not arrive within ``timeout_s``; the app then reads the
    buffered body, and the client's disconnect is still passed through."""

    def __init__(
        self,
        app: Any,
        api_key: str | None,
        max_bytes: int,
        timeout_s: float = 30.0,
        observe: Callable[[str, int, float], None] | None = None,
    ) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s
        self.key = f"Bearer {api_key}".encode() if api_key else None
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Guard the request; with ``observe``, report its path, status and time
        (a stream's time is to its first byte)."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.observe is None:
            await self._guard(scope, receive, send)
            return
        start = time.perf_counter()

        async def watched(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.observe(scope.get("path", ""), message["status"], time.perf_counter() - start)
            await send(message)

        await self._guard(scope, receive, watched)

    async def _guard(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope.get("headers", []))
        if self.key is not None and scope.get("path") not in OPEN_PATHS:
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.key):
                await send_error(
                    send,
                    ApiError(401, "missing or wrong API key", "invalid_api_key", "auth_error"),
                )
                return
        too_large = ApiError(413, f"request body over {self.max_bytes} bytes", "body_too_large")
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await send_error(send, too_large)
            return
        body = bytearray()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout_s
        while True:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                await send_error(
                    send,
                    ApiError(
                        408,
                        f"request body not received within {self.timeout_s:g} s",
                        "body_timeout",
                    ),  # fmt: skip
                )
                return
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                await send_error(send, too_large)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the client's disconnect

        await self.app(scope, replay, send)
