"""A fast OpenAI-shaped upstream for benchmarks: answers at once, does no model work.

It isolates the gateway's own cost: whatever latency the gateway adds over this
upstream is the gateway's. It is benchmark load, not a stand-in for vLLM in
tests (those use the real engine).

    .venv/bin/python bench/fast_upstream.py --port 8300 [--chunks 16] [--delay 0]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from aiohttp import web

USAGE = {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}


def completion(model: str) -> bytes:
    return json.dumps(
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
    ).encode()


def make_app(chunks: int, delay: float) -> web.Application:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if delay:
            await asyncio.sleep(delay)
        model = body.get("model", "bench")
        if not body.get("stream"):
            return web.Response(body=completion(model), content_type="application/json")
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        await response.prepare(request)
        for i in range(chunks):
            event = {"id": "c", "object": "chat.completion.chunk", "model": model,
                     "choices": [{"index": 0, "delta": {"content": f"t{i} "}, "finish_reason": None}]}  # fmt: skip
            await response.write(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n")
        if (body.get("stream_options") or {}).get("include_usage"):
            final = {"id": "c", "object": "chat.completion.chunk", "model": model, "choices": [], "usage": USAGE}
            await response.write(b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        return response

    async def health(_: web.Request) -> web.Response:
        return web.Response(text="")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/health", health)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=8300)
    parser.add_argument("--chunks", type=int, default=16)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before answering")
    args = parser.parse_args()
    web.run_app(make_app(args.chunks, args.delay), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()
