"""Draws a run's PNG chart from its results JSON; runs in the bench-only matplotlib env (bench/.envs/plot).

    bench/.envs/plot/bin/python bench/chart.py bench/results/<date>.json bench/results/<date>.png
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"direct": "#7f7f7f", "bare": "#1f77b4", "meterline": "#d62728", "meterline-w2": "#ff7f0e", "litellm": "#2ca02c", "portkey": "#9467bd"}


def _bars(ax: Any, names: list[str], values: list[float], title: str, unit: str, fmt: str) -> None:
    bars = ax.bar(names, values, color=[COLORS.get(n, "#333333") for n in names])
    for bar, value in zip(bars, values):
        if value == value:  # not NaN
            ax.annotate(fmt.format(value), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_ylabel(unit)
    ax.tick_params(axis="x", labelsize=8)


def draw(results: dict[str, Any], out: Path) -> None:
    summary = results["summary"]
    rows = summary["rows"]
    names = summary["systems"]
    proxies = [n for n in names if n != "direct"]
    fig, axes = plt.subplots(2, 3, figsize=(15, 8))
    _bars(axes[0][0], names, [rows[n]["rps_32"] for n in names], "throughput, 32 connections", "req/s", "{:,.0f}")
    _bars(axes[0][1], names, [rows[n]["rps_128"] for n in names], "throughput, 128 connections", "req/s", "{:,.0f}")
    _bars(axes[0][2], proxies, [rows[n]["added_p50_1"] for n in proxies],
          "added p50 latency vs direct, 1 connection", "ms", "{:.3f}")
    _bars(axes[1][0], proxies, [rows[n]["added_ttfc_ms"] for n in proxies],
          "added time to first chunk vs direct", "ms", "{:.2f}")
    _bars(axes[1][1], proxies, [rows[n]["added_chunk_us"] for n in proxies],
          "added per-chunk delay vs direct", "us", "{:.0f}")
    ax = axes[1][2]
    timeline = (results.get("memory") or {}).get("timeline", [])
    if timeline:
        ax.plot([t for t, _ in timeline], [m for _, m in timeline], color=COLORS["meterline"], label="all processes")
        roles = results["memory"].get("timeline_roles") or []  # (s, {role: MiB}): forwarder, sinks, supervisor
        for role, style in (("forwarder", "--"), ("sinks", ":")):
            if any(role in r for _, r in roles):
                ax.plot([t for t, _ in roles], [r.get(role, float("nan")) for _, r in roles], style,
                        color=COLORS["meterline"], label=role)
        if roles:
            ax.legend(fontsize=8)
        ax.set_title(f"meterline RSS, {results['memory'].get('calls', 0):,} calls then rest", fontsize=10)
        ax.set_xlabel("s since start of the memory phase")
        ax.set_ylabel("MiB")
    else:
        ax.set_axis_off()
    fig.suptitle(f"meterline benchmark {results['meta']['started']} ({results['meta']['mode']})")
    fig.tight_layout()
    fig.savefig(out, dpi=100)


def main() -> None:
    source, out = Path(sys.argv[1]), Path(sys.argv[2])
    draw(json.loads(source.read_text()), out)


if __name__ == "__main__":
    main()
