"""GPU validation through the gateway: the `openai` SDK end to end, then load.

Run on the GPU machine by bench/gpu/run.sh, against a gateway started with
`bastion up` (engines on the GPU from the config's engine spec):

    python bench/gpu/validate.py --config DIR/bastion.toml --key KEY --model llama-1b \\
        [--vision-model tiny-vision] [--concurrency 1 32 256] [--json OUT.json]

1. End to end with the `openai` SDK: /v1/models, chat and completions,
   streamed and not; each call's audit record must carry the usage the engine
   reported, and the audit chain must verify.
2. With --vision-model: a PNG and a JPEG as `data:` URLs through the gateway
   to the vision engine; the image's SHA-256 must be in the audit record and
   the prompt must grow by the image's tokens; a corrupt image is refused.
3. Load: the same chat body to the engine directly and through the gateway,
   alternating rounds, at each concurrency (bench/gateway_overhead.py's load).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import io
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

from openai import BadRequestError, OpenAI

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from bench.gateway_overhead import Result, load, merge  # noqa: E402


def bastion(config: Path, *args: str) -> Any:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", *args, "--config", str(config), "--json"],
                         check=True, capture_output=True, text=True)  # fmt: skip
    return json.loads(out.stdout)


def final_record(config: Path, request_id: str) -> dict[str, Any]:
    for _ in range(50):
        events = bastion(config, "audit", "query", "--request-id", request_id, "--phase", "final")["data"]
        if events:
            return events[0]
        asyncio.run(asyncio.sleep(0.1))
    raise AssertionError(f"no final audit record for {request_id}")


def check(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)
    print(f"  ok  {what}")


def end_to_end(client: OpenAI, config: Path, model: str) -> None:
    print(f"end to end, model {model}:")
    check(model in [m.id for m in client.models.list().data], "/v1/models lists the model")

    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Hello, how are you?"}], max_tokens=32
    )
    chat = raw.parse()
    record = final_record(config, raw.headers["x-request-id"])
    check(chat.usage.completion_tokens > 0, f"chat answered ({chat.usage.completion_tokens} tokens)")
    check((record["prompt_tokens"], record["completion_tokens"]) == (chat.usage.prompt_tokens,
          chat.usage.completion_tokens), "chat usage audited as the engine reported it")  # fmt: skip

    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "Tell me a story."}], max_tokens=64,
        stream=True, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(raw.parse())
    usage = chunks[-1].usage
    record = final_record(config, raw.headers["x-request-id"])
    check(len(chunks) > 2 and usage is not None, f"chat streamed ({len(chunks)} chunks)")
    check(record["completion_tokens"] == usage.completion_tokens, "streamed usage audited")

    raw = client.completions.with_raw_response.create(model=model, prompt="The gateway", max_tokens=16)
    done = raw.parse()
    record = final_record(config, raw.headers["x-request-id"])
    check(record["completion_tokens"] == done.usage.completion_tokens, "completion usage audited")
    stream = list(client.completions.create(model=model, prompt="The gateway", max_tokens=16, stream=True))
    check(len(stream) >= 2, f"completion streamed ({len(stream)} chunks)")

    verified = subprocess.run([sys.executable, "-m", "gateway.cli", "audit", "verify", "--config", str(config)],
                              capture_output=True, text=True)  # fmt: skip
    check(verified.returncode == 0, "audit chain verifies")


def image_url(fmt: str) -> tuple[str, str]:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (320, 240), (200, 30, 90)).save(buf, format=fmt)
    data = buf.getvalue()
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}", hashlib.sha256(data).hexdigest()


def images(client: OpenAI, config: Path, model: str) -> None:
    print(f"images end to end, model {model}:")
    text_only = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"}]}],
        max_tokens=8,
    )  # fmt: skip
    for fmt in ("PNG", "JPEG"):
        url, digest = image_url(fmt)
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is this?"}]
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": content}], max_tokens=8
        )
        chat = raw.parse()
        record = final_record(config, raw.headers["x-request-id"])
        grown = chat.usage.prompt_tokens - text_only.usage.prompt_tokens
        check(grown > 1, f"{fmt} reached the vision tower (prompt grew by {grown} tokens)")
        detail = record["detail"]
        media = (json.loads(detail) if isinstance(detail, str) else detail)["media"]
        check(any(m.get("sha256") == digest for m in media), f"{fmt} sha256 in the audit record")
        check(record["prompt_tokens"] == chat.usage.prompt_tokens, f"{fmt} usage audited")
    url, _ = image_url("PNG")
    png = base64.b64decode(url.split(",", 1)[1])
    broken = "data:image/png;base64," + base64.b64encode(png[: len(png) // 2]).decode()  # valid base64, cut PNG
    try:
        client.chat.completions.create(
            model=model, max_tokens=8,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": broken}}]}],
        )  # fmt: skip
        check(False, "a corrupt image is refused")
    except BadRequestError as exc:
        check(exc.status_code == 400, f"a corrupt image is refused: {exc.message[:80]}")


def bench(args: argparse.Namespace, key: str, engine_url: str, engine_key: str) -> list[dict[str, Any]]:
    body = {"model": args.model, "messages": [{"role": "user", "content": "Write about the sea."}],
            "max_tokens": args.max_tokens, "ignore_eos": True}  # fmt: skip
    print(f"load: {args.max_tokens} tokens per answer, {args.rounds} alternating rounds per side")
    print(f"{'conc':>5} {'direct p50':>11} {'gw p50':>9} {'direct p99':>11} {'gw p99':>9} "
          f"{'direct rps':>11} {'gw rps':>9} {'ratio':>7}")  # fmt: skip
    rows = []
    for conc in args.concurrency:
        requests = max(conc * args.waves, args.min_requests)
        per_round = max(1, requests // args.rounds)
        direct: list[Result] = []
        through: list[Result] = []
        failed = ""
        for _ in range(args.rounds):
            try:
                direct.append(asyncio.run(load(engine_url, engine_key, per_round, conc, body)))
                through.append(asyncio.run(load(args.gateway, key, per_round, conc, body)))
            except Exception as exc:  # recorded whole; then the next concurrency
                failed = _chain(exc)
                break
        if failed:
            side = "gateway" if len(direct) > len(through) else "direct"
            print(f"{conc:>5} {side} failed after {len(through)} whole rounds: {failed}", flush=True)
            rows.append({"concurrency": conc, "failed": side, "error": failed})
            continue
        d, g = merge(direct), merge(through)
        row = {"concurrency": conc, "requests_per_side": len(d.latencies), "direct_p50_ms": d.pct(.5),
               "gateway_p50_ms": g.pct(.5), "direct_p99_ms": d.pct(.99), "gateway_p99_ms": g.pct(.99),
               "direct_rps": d.rps, "gateway_rps": g.rps, "ratio": g.rps / d.rps}  # fmt: skip
        rows.append(row)
        print(f"{conc:>5} {d.pct(.5):>9.1f}ms {g.pct(.5):>7.1f}ms {d.pct(.99):>9.1f}ms {g.pct(.99):>7.1f}ms "
              f"{d.rps:>11.1f} {g.rps:>9.1f} {g.rps / d.rps:>7.3f}", flush=True)  # fmt: skip
    return rows


def _chain(exc: BaseException) -> str:
    """An error with its causes (httpx wraps the socket's own error)."""
    parts = []
    seen: BaseException | None = exc
    while seen is not None:
        parts.append(f"{type(seen).__name__}: {seen}")
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--key", required=True, help="a gateway API key (role user)")
    parser.add_argument("--model", default="llama-1b")
    parser.add_argument("--vision-model", default="")
    parser.add_argument("--concurrency", type=int, nargs="*", default=[1, 32, 256])
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--waves", type=int, default=4, help="requests per side = concurrency x waves ...")
    parser.add_argument("--min-requests", type=int, default=64, help="... but at least this many")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()

    settings = tomllib.loads(args.config.read_text())
    gw = settings.get("gateway", {})
    args.gateway = f"http://{gw.get('host', '127.0.0.1')}:{gw.get('port', 8000)}"
    deployment = next(d for d in settings["deployments"] if d["name"] == args.model)
    state = args.config.parent / settings.get("state_dir", "state")
    engine_key = (state / "secrets" / f"engine-{args.model}.key").read_text().strip()

    client = OpenAI(base_url=args.gateway + "/v1", api_key=args.key, timeout=120)
    end_to_end(client, args.config, args.model)
    if args.vision_model:
        images(client, args.config, args.vision_model)
    rows = bench(args, args.key, deployment["engine_url"], engine_key) if args.concurrency else []
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens, "load": rows}, indent=2))


if __name__ == "__main__":
    main()
