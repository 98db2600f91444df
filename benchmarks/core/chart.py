"""The PNG: a profile's loader scaling under its step's ceiling (when a record has a sweep), where each run's
time goes (one stacked bar per stage group), and images/s of every run.

matplotlib is imported here only, with the Agg backend, so measuring needs neither it nor a display.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.core import report
from benchmarks.core.record import Record, read_json
from engine.config import ConfigError


def write_chart(records: list[Record], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    profiles = [r for r in records if "sweep" in r.extra]
    bars = [
        (f"{report.label(r)} | {group}", {name: r.stages[name] for name in names})
        for r in records
        for group, names in r.stage_groups.items()
    ]
    heights = [8] * len(profiles) + [len(bars) + 1, len(records) + 1]
    fig, axes = plt.subplots(
        len(heights), 1, figsize=(13, 1.5 + 0.45 * sum(heights)), gridspec_kw={"height_ratios": heights}
    )
    for axis, profile in zip(axes, profiles):
        draw_scaling(axis, profile)
    draw_stages(axes[-2], bars, plt.get_cmap("tab20").colors)
    draw_throughput(axes[-1], records)
    fig.suptitle(" / ".join(sorted({r.device for r in records})), fontsize=9)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110, bbox_inches="tight")
    plt.close(fig)


def draw_scaling(axis, profile: Record) -> None:
    """The profile's loaders over worker counts (other loader options as crosses), the step alone as the ceiling
    and end to end as lines: how far each loader is from feeding the step."""
    sweep = profile.extra["sweep"]
    for backend in dict.fromkeys(s["backend"] for s in sweep):
        points = sorted(
            (s["workers"], s["images_per_s"]) for s in sweep if s["backend"] == backend and not s["options"]
        )
        axis.plot(*zip(*points), marker="o", label=f"{backend} alone")
        for s in sweep:
            if s["backend"] == backend and s["options"]:
                axis.scatter(
                    s["workers"],
                    s["images_per_s"],
                    marker="x",
                    label=f"{backend} {' '.join(f'{k}={v}' for k, v in s['options'].items())}",
                )
    axis.axhline(profile.step_images_per_s, color="black", linestyle="--", label="step alone (ceiling)")
    axis.axhline(profile.images_per_s, color="tab:red", linestyle=":", label="end to end")
    axis.set_xlabel("loader workers / threads")
    axis.xaxis.get_major_locator().set_params(integer=True)
    axis.set_ylabel("images/s")
    axis.set_title(
        f"verdict: {profile.extra['verdict']['bound']}-bound; run: {' '.join(profile.extra['recommended_command'])}",
        fontsize=8,
    )
    axis.legend(fontsize=7)


def draw_stages(axis, bars: list[tuple[str, dict[str, float]]], palette) -> None:
    stage_names = list(dict.fromkeys(name for _, stages in bars for name in stages))
    colours = dict(zip(stage_names, palette * (len(stage_names) // len(palette) + 1)))
    for y, (_, stages) in enumerate(bars):
        left = 0.0
        for name, ms in stages.items():
            axis.barh(y, ms, left=left, color=colours[name], label=name)
            left += ms
    handles, names = axis.get_legend_handles_labels()
    unique = dict(zip(names, handles))
    axis.legend(unique.values(), unique.keys(), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axis.set_yticks(range(len(bars)), [name for name, _ in bars], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("ms per step (loader pieces: per batch, on one core)")
    axis.set_title("where the time goes")


def draw_throughput(axis, records: list[Record]) -> None:
    rates = [r.images_per_s for r in records]
    axis.barh(range(len(records)), rates, color="tab:blue")
    for y, rate in enumerate(rates):
        axis.annotate(f" {rate:,.0f}", (rate, y), va="center", fontsize=7)
    if max(rates) > 100 * min(rates):
        axis.set_xscale("log")
    axis.set_yticks(range(len(records)), [report.label(r) for r in records], fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("images/s")
    axis.set_title("throughput")


def load_records(paths: list[Path]) -> list[Record]:
    """Every record of the given result files; a folder stands for every JSON below it."""
    files = [f for path in paths for f in (sorted(path.rglob("*.json")) if path.is_dir() else [path])]
    records = []
    for path in files:
        try:
            records += read_json(path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{path} is not a benchmark result ({type(e).__name__}: {e})") from None
    if not records:
        raise ConfigError(f"no benchmark results in {', '.join(map(str, paths))}")
    return records
