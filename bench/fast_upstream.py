"""A fast OpenAI-shaped upstream for benchmarks: answers at once, does no model work.

It isolates the gateway's own cost: whatever latency the gateway adds over this
upstream is the gateway's. It is benchmark load, not a stand-in for vLLM in
tests (those use the real engine).

The model name picks the behaviour, so one upstream serves every scenario of
bench/suite and every gateway in front of it can name it the same way:

- any model: answer at once (streams: `max_tokens` chunks, default `--chunks`);
- a model ending in `-slow`: answer after `--slow-delay` seconds (the published
  gateway benchmark's upstream answers after 1.5 s);
- a model ending in `-trickle`: stream one chunk every `--trickle-interval`
  seconds (streams that stay open, for the open-streams scenario).

    .venv/bin/python bench/fast_upstream.py --port 8300 [--chunks 16] [--delay 0] [--unix PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time

import msgspec
from aiohttp import web

USAGE = {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}


class _Request(msgspec.Struct):
    """The only fields the upstream reads."""

    model: str = "bench"
    stream: bool = False
    max_tokens: int | None = None
    stream_options: dict[str, bool] | None = None


_decoder = msgspec.json.Decoder(_Request)


def completion(model: str) -> bytes:
    return msgspec.json.encode(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "ok " * 8}, "finish_reason": "length"}
            ],
            "usage": USAGE,
        }
    )


def event(model: str, i: int) -> bytes:
    chunk = {"id": "c", "object": "chat.completion.chunk", "model": model,
             "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}  # fmt: skip
    return b"data: " + msgspec.json.encode(chunk) + b"\n\n"


def make_app(chunks: int, delay: float, slow_delay: float = 1.5, trickle_interval: float = 1.0) -> web.Application:
    answers: dict[str, bytes] = {}

    async def chat(request: web.Request) -> web.StreamResponse:
        body = _decoder.decode(await request.read())
        model = body.model
        wait = slow_delay if model.endswith("-slow") else delay
        if wait:
            await asyncio.sleep(wait)
        if not body.stream:
            if model not in answers:
                answers[model] = completion(model)
            return web.Response(body=answers[model], content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream; charset=utf-8"})
        await response.prepare(request)
        interval = trickle_interval if model.endswith("-trickle") else 0.0
        for i in range(body.max_tokens or chunks):
            if interval and i:
                await asyncio.sleep(interval)
            await response.write(event(model, i))
        if (body.stream_options or {}).get("include_usage"):
            final = {"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": USAGE}
            await response.write(b"data: " + msgspec.json.encode(final) + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "bench", "object": "model"}]})

    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--chunks", type=int, default=16, help="chunks per stream when max_tokens is not given")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before answering (every model)")
    parser.add_argument("--unix", help="a Unix socket to listen on too")
    parser.add_argument("--slow-delay", type=float, default=1.5, help="seconds before answering a '-slow' model")
    parser.add_argument(
        "--trickle-interval", type=float, default=1.0, help="seconds between a '-trickle' stream's chunks"
    )
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    app = make_app(args.chunks, args.delay, args.slow_delay, args.trickle_interval)
    # As in the gateway (gateway/app.py): no cyclic garbage per call, so the
    # collector runs rarely rather than pausing every request in flight.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    web.run_app(app, host="127.0.0.1", port=args.port, path=args.unix, access_log=None, print=None, backlog=4096)


if __name__ == "__main__":
    main()
