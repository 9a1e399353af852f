"""The suite's output: one table, the issue's targets checked against it, a
JSON file of everything measured, and a chart."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.suite.load import Measured

Results = dict[str, dict[str, Measured]]  # scenario -> target -> measured


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(results: Results) -> str:
    lines = ["| scenario | target | answered | errors | req/s | p50 ms | p90 ms | p99 ms | other |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for scenario, by_target in results.items():
        for target, m in by_target.items():
            other = ", ".join(f"{k} {v:,.1f}" for k, v in m.extra.items())
            lines.append(f"| {scenario} | {target} | {m.requests:,} | {m.errors:,} | {m.rps:,.1f} | "
                         f"{_ms(m.p50_ms)} | {_ms(m.p90_ms)} | {_ms(m.p99_ms)} | {other} |")  # fmt: skip
    return "\n".join(lines)


@dataclass(frozen=True)
class Check:
    name: str
    measured: str
    goal: str
    met: bool | None  # None: not measured in this run


def _get(results: Results, scenario: str, target: str) -> Measured | None:
    return results.get(scenario, {}).get(target)


def checks(results: Results, leak_growth: float | None) -> list[Check]:
    out: list[Check] = []

    def check(name: str, goal: str, fn: Callable[[], tuple[str, bool]], *needed: Measured | None) -> None:
        if any(m is None for m in needed):
            out.append(Check(name, "not measured", goal, None))
            return
        measured, met = fn()
        out.append(Check(name, measured, goal, met))

    pub = _get(results, "published: 1.5 s upstream, fixed rate", "bastion")
    if pub is not None:
        rss = pub.extra.get("peak_rss_mb", 0.0)
        check("published benchmark: sustained", ">= 495 req/s", lambda: (f"{pub.rps:.1f} req/s", pub.rps >= 495), pub)
        check(
            "published benchmark: p99", "<= 1600 ms", lambda: (f"{pub.p99_ms:.0f} ms", (pub.p99_ms or 1e9) <= 1600), pub
        )
        check("published benchmark: every request answered", "0 failed",
              lambda: (f"{pub.errors} failed", pub.errors == 0), pub)  # fmt: skip
        check("published benchmark: resident memory", "< 150 MB", lambda: (f"{rss:.0f} MB", rss < 150), pub)
    d1, b1 = _get(results, "chat c=1", "direct"), _get(results, "chat c=1", "bastion")
    check("added p50 at c=1, fast upstream", "<= 1 ms",
          lambda: (f"{b1.p50_ms - d1.p50_ms:.2f} ms", b1.p50_ms - d1.p50_ms <= 1), d1, b1)  # type: ignore[union-attr,operator] # fmt: skip
    check("added p99 at c=1, fast upstream", "<= 3 ms",
          lambda: (f"{b1.p99_ms - d1.p99_ms:.2f} ms", b1.p99_ms - d1.p99_ms <= 3), d1, b1)  # type: ignore[union-attr,operator] # fmt: skip
    b256, l256 = _get(results, "chat c=256", "bastion"), _get(results, "chat c=256", "litellm")
    check("throughput at c=256 over LiteLLM", ">= 3x",
          lambda: (f"{b256.rps / max(l256.rps, 1e-9):.1f}x", b256.rps >= 3 * l256.rps), b256, l256)  # type: ignore[union-attr] # fmt: skip
    for conc in (1, 32):
        dv, bv = _get(results, f"vLLM chat c={conc}", "direct"), _get(results, f"vLLM chat c={conc}", "bastion")
        check(f"vLLM throughput through Bastion at c={conc}", ">= 95% of direct",
              lambda dv=dv, bv=bv: (f"{100 * bv.rps / dv.rps:.1f}%", bv.rps >= 0.95 * dv.rps), dv, bv)  # type: ignore[union-attr] # fmt: skip
    st = _get(results, "stream 256 chunks c=8", "bastion")
    if st is not None:
        per_core = st.extra.get("chunks_per_cpu_s", 0.0)
        check("stream relay per gateway core", ">= 20,000 chunks/s",
              lambda: (f"{per_core:,.0f} chunks/s", per_core >= 20_000), st)  # fmt: skip
    op = _get(results, "open streams", "bastion")
    if op is not None:
        rss = op.extra.get("peak_rss_mb", 0.0)
        check("resident memory with the open streams", "< 200 MB", lambda: (f"{rss:.0f} MB", rss < 200), op)
        check("every open stream completed", "0 failed", lambda: (f"{op.errors} failed", op.errors == 0), op)
    if leak_growth is None:
        out.append(Check("memory growth over 100,000 requests", "not measured", "< 5%", None))
    else:
        out.append(
            Check("memory growth over 100,000 requests", f"{100 * leak_growth:.1f}%", "< 5%", leak_growth < 0.05)
        )
    return out


def checks_table(found: list[Check]) -> str:
    mark = {True: "met", False: "**missed**", None: "-"}
    lines = ["| target | goal | measured | |", "| --- | --- | ---: | --- |"]
    lines += [f"| {c.name} | {c.goal} | {c.measured} | {mark[c.met]} |" for c in found]
    return "\n".join(lines)


def as_json(results: Results) -> dict[str, dict[str, dict[str, object]]]:
    return {s: {t: {**asdict(m), "rps": m.rps} for t, m in by.items()} for s, by in results.items()}


def chart(results: Results, leak: list[tuple[int, float]], path: Path) -> None:
    """Throughput and latency (p50, p90, p99) per scenario and target, and the leak run's memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(results)
    order = ["direct", "bastion", "litellm", "portkey"]
    # Variants of a target (e.g. "bastion x2") sort after it.
    targets = sorted({t for by in results.values() for t in by}, key=lambda t: (order.index(t.split()[0]), t))
    base = {"direct": "#888888", "bastion": "#1f6feb", "litellm": "#d9822b", "portkey": "#2da44e"}
    colours = base | {t: "#0a3069" for t in targets if t not in base}
    fig, axes = plt.subplots(3, 1, figsize=(13, 14))
    width = 0.8 / max(1, len(targets))
    xs = range(len(scenarios))
    ax = axes[0]
    for i, t in enumerate(targets):
        ax.bar([x + i * width for x in xs], [results[s][t].rps if t in results[s] else 0 for s in scenarios],
               width, label=t, color=colours[t])  # fmt: skip
    ticks = [x + width * (len(targets) - 1) / 2 for x in xs]

    def per_scenario(ax: Any, title: str, ylabel: str) -> None:
        ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_xticks(ticks, scenarios, rotation=20, ha="right", fontsize=8)
        ax.legend()

    per_scenario(ax, "Throughput per scenario (same machine, same upstream, one run)", "answered requests/s (log)")
    ax = axes[1]
    for i, t in enumerate(targets):
        for s_i, s in enumerate(scenarios):
            m = results[s].get(t)
            if m is None or m.p50_ms is None:
                continue
            x = s_i + i * width
            ax.vlines(x, m.p50_ms, m.p99_ms, color=colours[t], linewidth=6, alpha=0.35)
            ax.plot([x], [m.p50_ms], "o", color=colours[t], label=t if s_i == 0 else None)
            ax.plot([x], [m.p90_ms], "_", color=colours[t], markersize=12)
            ax.plot([x], [m.p99_ms], "^", color=colours[t])
    per_scenario(ax, "Latency distribution per scenario", "latency ms (log): o p50, - p90, ^ p99")
    ax = axes[2]
    if leak:
        ax.plot([n for n, _ in leak], [mb for _, mb in leak], "o-", color=colours["bastion"])
    ax.set_xlabel("requests answered by Bastion in the leak run (the first quarter is the warm-up)")
    ax.set_ylabel("resident memory MB")
    ax.set_title("Bastion's resident memory over the leak run")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
