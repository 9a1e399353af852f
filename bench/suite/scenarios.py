"""The scenarios of the suite: what load, against which upstream, measured how."""

from __future__ import annotations

import base64
import io
import random
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from bench.suite import load, procs
from bench.suite.load import Measured
from bench.suite.targets import Target, Upstream


@dataclass(frozen=True)
class Options:
    seconds: float  # per closed-loop scenario and target
    open_streams: int
    rate: float  # the published benchmark's offered load
    rate_seconds: float


@dataclass(frozen=True)
class Scenario:
    name: str
    upstream: str  # the Upstream.kind it runs against
    run: Callable[[Target, Upstream, Options], Measured]
    # Rounds per target, the targets taking turns: vLLM CPU's own speed drifts
    # by tens of percent over a minute, so one cell per target would measure
    # the drift as much as the gateway.
    rounds: int = 1


def chat(model: str, *, max_tokens: int = 8, stream: bool = False, content: object = "Hello, how are you?") -> bytes:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    if stream:
        body["stream"] = True
    return msgspec.json.encode(body)


def image_body(model: str, size: int = 200_000) -> bytes:
    """A chat call carrying one PNG of random pixels (incompressible: the file is
    about `size` bytes) as a data: URL, as the issue's 200 KB image request."""
    from PIL import Image

    side = int((size / 3) ** 0.5)
    rng = random.Random(7)
    image = Image.frombytes("RGB", (side, side), bytes(rng.getrandbits(8) for _ in range(side * side * 3)))
    out = io.BytesIO()
    image.save(out, format="PNG", compress_level=1)
    url = "data:image/png;base64," + base64.b64encode(out.getvalue()).decode()
    content = [{"type": "text", "text": "What is in this picture?"}, {"type": "image_url", "image_url": {"url": url}}]
    return chat(model, content=content)


def _cpu(target: Target) -> Callable[[], float] | None:
    proc = target.proc
    return None if proc is None else (lambda: procs.cpu_seconds(proc.pid))


def _rss(target: Target) -> Callable[[], int] | None:
    proc = target.proc
    return None if proc is None else (lambda: procs.rss_bytes(proc.pid))


def _wrk(
    model: str, connections: int, body: Callable[[str], bytes] = chat
) -> Callable[[Target, Upstream, Options], Measured]:
    def run(target: Target, upstream: Upstream, opts: Options) -> Measured:
        return load.wrk(target.endpoint(upstream), body(model), connections, opts.seconds)

    return run


def _streams(model: str, chunks: int, concurrency: int) -> Callable[[Target, Upstream, Options], Measured]:
    def run(target: Target, upstream: Upstream, opts: Options) -> Measured:
        body = chat(model, max_tokens=chunks, stream=True)
        return load.streams(target.endpoint(upstream), body, concurrency, opts.seconds, _cpu(target))

    return run


def _open_streams(target: Target, upstream: Upstream, opts: Options) -> Measured:
    body = chat("bench-trickle", max_tokens=20, stream=True)  # 20 chunks, one a second
    return load.open_streams(target.endpoint(upstream), body, opts.open_streams, _rss(target))


def _published(target: Target, upstream: Upstream, opts: Options) -> Measured:
    body = chat("bench-slow")
    return load.fixed_rate(target.endpoint(upstream), body, opts.rate, opts.rate_seconds, _rss(target), _cpu(target))


SCENARIOS = [
    Scenario("chat c=1", "fast", _wrk("bench", 1)),
    Scenario("chat c=32", "fast", _wrk("bench", 32)),
    Scenario("chat c=256", "fast", _wrk("bench", 256)),
    Scenario("stream 256 chunks c=8", "fast", _streams("bench", 256, 8)),
    Scenario("image 200 KB c=8", "fast", _wrk("bench", 8, image_body)),
    # Before the open streams: a target's resident memory is its peak so far
    # (one process serves every scenario), and 1,000 open streams take it
    # higher than the published benchmark's 750 calls in flight do.
    Scenario("published: 1.5 s upstream, fixed rate", "fast", _published),
    Scenario("open streams", "fast", _open_streams),
    Scenario("vLLM chat c=1", "vllm", _wrk("tiny", 1), rounds=4),
    Scenario("vLLM chat c=32", "vllm", _wrk("tiny", 32), rounds=4),
    Scenario("vLLM stream c=1", "vllm", _streams("tiny", 32, 1), rounds=4),
]
