"""A streamed answer whose client may go away, sent without anyio.

Litestar's `Stream` runs the relay and a wait for the client's disconnect in an
anyio task group. When the client goes away first, anyio's task-done callback
keeps the relay's cancellation error in a local of a frame on that error's own
traceback: a reference cycle of about 90 objects per stream, holding the
relay's frames (the call, its body, the captured answer) until Python's cycle
collector runs, which the gateway makes rare (`gateway.app.GC_THRESHOLDS`;
`tests/test_cyclic_garbage.py`). Here the same two waits are two asyncio tasks,
and nothing outlives the stream.
"""

from __future__ import annotations

import asyncio
from typing import Any

from litestar import response
from litestar.response.base import ASGIResponse
from litestar.response.streaming import ASGIStreamingResponse
from litestar.types import Receive, Send


class Stream(response.Stream):
    """Litestar's `Stream`, its body sent by `_StreamResponse`; used for every
    streamed answer of the gateway."""

    def to_asgi_response(self, *args: Any, **kwargs: Any) -> ASGIResponse:
        response = super().to_asgi_response(*args, **kwargs)
        # Built by Litestar as it always is; only how the body is sent differs
        # (the subclass adds no state, so the instance can take its class).
        response.__class__ = _StreamResponse
        return response


class _StreamResponse(ASGIStreamingResponse):
    __slots__ = ()

    async def send_body(self, send: Send, receive: Receive) -> None:
        relay = asyncio.ensure_future(self._stream(send))  # iterates the body and sends it
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((relay, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not relay.done():
                # The client went away, or this request is being cancelled:
                # closing the relay drops the engine connection and records it.
                relay.cancel()
                await asyncio.wait((relay,))
        if not relay.cancelled():
            relay.result()  # raises what the relay raised


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
