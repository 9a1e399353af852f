"""How long `policy.decide()` takes for a realistic policy.

The policy has 20 teams with 75 rules between them (model lists, caps, size
limits, client networks, rate limits, key overrides) and five content
detectors. The prompt is 4 KB of chat text. Two cases, the same caller and
prompt: a team without content rules, and a team whose five detectors scan
the prompt.

Baseline, measured in the same run: `gateway.summary.summarize()` of the same
request body, the parse every call already pays before policy. The ratio is
the number that survives a noisy machine.

    .venv/bin/python bench/policy_decide.py [--rounds 20000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

from gateway.summary import summarize
from policy import Caller, decide, parse_policy

DETECTORS = ["email", "phone", "card", "iban", "employee_id"]


def policy_text() -> tuple[str, int]:
    teams: dict[str, dict[str, object]] = {}
    rules = 0
    for i in range(20):
        team: dict[str, object] = {
            "models": [f"model-{i}", "glm-*", "tiny"],
            "inputs": ["text", "image"],
            "max_tokens": 512 + i,
            "max_input_chars": 200_000,
            "images": {"max_count": 4, "max_bytes": 5_000_000},
            "clients": ["127.0.0.0/8", f"10.{i}.0.0/16"],
            "limits": {"per_key": {"requests_per_minute": 600}, "per_team": {"concurrent": 64}},
        }
        rules += 2  # models, clients (plus the caps and limits below)
        if i % 2 == 0:
            team["keys"] = {f"key{i:08d}": {"models": ["tiny"], "max_tokens": 128}}
            rules += 1
        if i == 19:
            team["content"] = [
                {"detector": d, "action": a}
                for d, a in zip(DETECTORS, ["redact", "flag", "deny", "deny", "flag"], strict=True)
            ]
            rules += len(DETECTORS)
        teams[f"team-{i:02d}"] = team
    rules += 20  # each team's caps and limits counted once
    doc = {"version": 1, "detectors": {"employee_id": {"pattern": "EMP-[0-9]{6}"}}, "teams": teams}
    return json.dumps(doc), rules


def prompt_body() -> bytes:
    sentence = (
        "Please summarise the quarterly risk report for the credit committee, listing exposures by sector, "
        "the largest counterparties and any covenant breaches since the last review. "
    )
    text = (sentence * 30)[:4000] + " Contact risk-desk@bank.example or +44 20 7946 0958."
    body = {
        "model": "tiny",
        "messages": [{"role": "system", "content": "You are careful."}, {"role": "user", "content": text}],
    }
    return json.dumps({**body, "max_tokens": 256}).encode()


def timed(fn: Callable[[], object], rounds: int) -> list[float]:
    for _ in range(min(1000, rounds)):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - t0) / 1000)
    return out


def describe(name: str, samples: list[float]) -> dict[str, float]:
    samples = sorted(samples)
    p50, p99 = statistics.median(samples), samples[int(len(samples) * 0.99)]
    print(f"{name:<34} p50 {p50:8.1f} µs   p99 {p99:8.1f} µs")
    return {"p50": p50, "p99": p99}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    text, rules = policy_text()
    policy = parse_policy(text.encode(), "bench.yaml")
    body = prompt_body()
    summary = summarize("chat", body)
    prompt = summary.prompt()
    plain, scanned = Caller("key00000001", "team-03", "127.0.0.1"), Caller("key00000019", "team-19", "127.0.0.1")
    assert decide(policy, plain, prompt).allowed and decide(policy, scanned, prompt).fired
    print(f"policy: {len(policy.teams)} teams, {rules} rules, {len(DETECTORS)} detectors; prompt {len(body)} bytes")
    base = describe("baseline: summarize(body)", timed(lambda: summarize("chat", body), args.rounds))
    no_content = describe("decide(), no content rules", timed(lambda: decide(policy, plain, prompt), args.rounds))
    content = describe("decide(), 5 detectors over 4 KB", timed(lambda: decide(policy, scanned, prompt), args.rounds))
    print(
        f"ratio to baseline (p50): no content {no_content['p50'] / base['p50']:.2f}x, "
        f"content {content['p50'] / base['p50']:.2f}x; targets: p50 < 50 µs and < 300 µs"
    )


if __name__ == "__main__":
    main()
