"""Results in the terminal: a rich table per Record, and one row per run when result files are compared."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from benchmarks.core.record import Record


def label(record: Record) -> str:
    """A short name for a run: suite, backend, size, precision, and where it departs from train.py's settings."""
    c = record.config
    departures = (
        ("no-channels-last", not c.get("channels_last", True)),
        ("compile", c.get("compile", False)),
        ("foreach-sgd", not c.get("fused_sgd", True)),
        ("cudnn-benchmark", c.get("cudnn_benchmark", False)),
        ("cuda-graphs", c.get("cuda_graphs", False)),
        # results written before the fused loss existed used the concatenated logits
        ("concat-logits-loss", record.suite == "step" and not c.get("fused_loss", False)),
    )
    model = f" {c['arch']}" if record.suite in ("step", "e2e", "stages", "train", "checkpoint") else ""
    return " ".join(
        [
            f"{record.suite}:{record.backend}{model} b{c['batch_size']} {c['image_size']}px",
            c["precision"],
            *(name for name, departs in departures if departs),
        ]
    )


def plural(count: int, noun: str) -> str:
    """'1 step', '2 steps'."""
    return f"{count} {noun}" + "s" * (count != 1)


def cpu_ms(record: Record) -> str:
    return "n/a" if record.cpu_s_per_image is None else f"{1e3 * record.cpu_s_per_image:.3f}"


def run_summary(record: Record) -> str:
    """What was run: the suite's own settings where it has them, else train.py's model, batch and workers."""
    if record.settings:
        return record.settings
    c = record.config
    model = "" if record.suite == "loader" else f"{c['arch']}, K {c['moco_k']}, "
    return f"{model}batch {c['batch_size']}, {c['image_size']} px, {c['precision']}, {plural(c['workers'], 'worker')}"


def figures(record: Record) -> list[tuple[str, str]]:
    rows = [
        ("device", f"{record.device} x{record.config['world_size']}"),
        ("run", run_summary(record)),
        ("images/s", f"{record.images_per_s:,.1f}"),
        ("host CPU ms per image", cpu_ms(record)),
    ]
    for value, name in (
        (record.loader_images_per_s, "loader alone, images/s"),
        (record.step_images_per_s, "step alone, images/s"),
    ):
        if value is not None:
            rows.append((name, f"{value:,.1f}"))
    if "checkpoint_mb" in record.extra:
        rows.append(("checkpoint size", f"{record.extra['checkpoint_mb']:,.0f} MB"))
    if record.data_wait_fraction is not None:
        rows.append(("time blocked on the loader", f"{100 * record.data_wait_fraction:.1f}%"))
    if record.peak_host_rss_mb is not None:
        rows.append(("peak host RSS (main process, whole run)", f"{record.peak_host_rss_mb:,.0f} MB"))
    if record.workers_rss_mb:
        rows.append(("loader workers' RSS", f"{record.workers_rss_mb:,.0f} MB"))
    device_peak = record.peak_device_mb
    rows.append(("peak device memory", "n/a (CPU)" if device_peak is None else f"{device_peak:,.0f} MB"))
    for peer, ratio in record.extra.get("ratios", {}).items():
        rows.append((f"{record.backend} {peer}", f"{ratio:.2f}x"))
    if record.sync_check:
        rows.append(("host syncs in the step", f"{record.sync_check['status']}: {record.sync_check['note']}"))
    return rows


def print_record(record: Record, console: Console) -> None:
    table = Table(title=f"{record.suite} suite, {record.backend} loader", title_justify="left")
    table.add_column("group")
    table.add_column("stage")
    table.add_column("ms per step", justify="right")
    table.add_column("of group", justify="right")
    for group, names in record.stage_groups.items():
        shares = (ratios_to_first if group in record.alternative_groups else shares_of_sum)(record.stages, names)
        for i, name in enumerate(names):
            table.add_row(group if i == 0 else "", name, f"{record.stages[name]:.3f}", shares[i])
        table.add_section()
    for name, ms in record.totals.items():
        table.add_row("totals", name, f"{ms:.3f}", "")
    console.print(table)
    summary = Table(show_header=False, box=None)
    for name, value in figures(record):
        summary.add_row(name, value)
    console.print(summary)
    if "copy_check" in record.extra:
        print_copies(record.extra["copy_check"], console)
    for note in record.notes:
        console.print(f"[dim]note: {note}[/dim]")


def shares_of_sum(stages: dict[str, float], names: list[str]) -> list[str]:
    """Each stage's share of the group's time: the group's stages are its parts."""
    total = sum(stages[n] for n in names)
    return [f"{100 * stages[n] / total:.1f}%" if total > 0 else "" for n in names]


def ratios_to_first(stages: dict[str, float], names: list[str]) -> list[str]:
    """Each stage against the group's first, the baseline: the group's stages are alternatives."""
    baseline = stages[names[0]]
    return ["baseline", *(f"{stages[n] / baseline:.2f}x {names[0]}" if baseline > 0 else "" for n in names[1:])]


def print_copies(check: dict, console: Console) -> None:
    table = Table(
        title=f"copies in one step: {check['mb_per_step']:,.1f} MB written, {check['layout_changes']:g} layout changes",
        title_justify="left",
    )
    for column in ("stage", "op", "issued at", "layout change", "count", "MB"):
        table.add_column(column, justify="right" if column in ("count", "MB") else "left", overflow="fold")
    for row in check["copies"]:
        table.add_row(
            row["stage"],
            row["op"],
            row["where"],
            "yes" if row["layout_change"] else "",
            f"{row['count']:g}",
            f"{row['mb']:,.2f}",
        )
    console.print(table)


def print_comparison(records: list[Record], console: Console) -> None:
    devices = " / ".join(sorted({r.device for r in records}))
    table = Table(title=f"runs compared on {devices}", title_justify="left")
    table.add_column("run")
    table.add_column("images/s", justify="right")
    table.add_column("host CPU ms/image", justify="right")
    for r in records:
        table.add_row(label(r), f"{r.images_per_s:,.1f}", cpu_ms(r))
    console.print(table)
