"""The PNG: where each run's time goes (one stacked bar per stage group), and below it images/s of every run.

matplotlib is imported here only, with the Agg backend, so measuring needs neither it nor a display.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.core import report
from engine.config import ConfigError


def write_chart(records: list[dict], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars = [(f"{report.label(r)} | {group}", {name: r["stages"][name] for name in names})
            for r in records for group, names in r.get("stage_groups", {}).items()]
    stage_names = list(dict.fromkeys(name for _, stages in bars for name in stages))
    colours = dict(zip(stage_names, plt.get_cmap("tab20").colors * (len(stage_names) // 20 + 1)))

    fig, (stacked, throughput) = plt.subplots(
        2, 1, figsize=(13, 1.5 + 0.45 * (len(bars) + len(records))),
        gridspec_kw={"height_ratios": [len(bars) + 1, len(records) + 1]})
    for y, (_, stages) in enumerate(bars):
        left = 0.0
        for name, ms in stages.items():
            stacked.barh(y, ms, left=left, color=colours[name], label=name)
            left += ms
    handles, names = stacked.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    stacked.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    stacked.set_yticks(range(len(bars)), [name for name, _ in bars], fontsize=7)
    stacked.invert_yaxis()
    stacked.set_xlabel("ms per step (loader pieces: per batch, on one core)")
    stacked.set_title("where the time goes")

    rates = [r["images_per_s"] for r in records]
    throughput.barh(range(len(records)), rates, color="tab:blue")
    for y, rate in enumerate(rates):
        throughput.annotate(f" {rate:,.0f}", (rate, y), va="center", fontsize=7)
    if max(rates) > 100 * min(rates):
        throughput.set_xscale("log")
    throughput.set_yticks(range(len(records)), [report.label(r) for r in records], fontsize=7)
    throughput.invert_yaxis()
    throughput.set_xlabel("images/s")
    throughput.set_title("throughput")
    fig.suptitle(" / ".join(sorted({r["device"] for r in records})), fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def load_records(paths: list[Path]) -> list[dict]:
    """Every record of the given result files; a folder stands for every JSON below it."""
    files = [f for path in paths for f in (sorted(path.rglob("*.json")) if path.is_dir() else [path])]
    records = []
    for path in files:
        try:
            records += report.records(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{path} is not a benchmark result ({type(e).__name__}: {e})") from None
    if not records:
        raise ConfigError(f"no benchmark results in {', '.join(map(str, paths))}")
    return records
