"""The result schema: every suite returns Records; JSON is made and read at the edge, here.

A document is the header (suite, device, versions, config, command), then the first result's fields at the
top level (the usual single-backend case reads as `doc["images_per_s"]`), then `results`: every backend's
result, each with its own `backend`, `images_per_s`, `cpu_s_per_image`, `stages` (name -> ms per step).
A result may say what it ran (`settings`) where train.py's model, batch and workers are not it, and which of its
`stage_groups` hold alternatives (`alternative_groups`: one thing under different conditions, shown as ratios to
the group's first stage, since a share of their sum means nothing). A suite's own figures (the profile's
verdict, the peers' ratios, ...) sit beside these in the JSON and in `Record.extra` in memory.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch

from benchmarks.core import host
from engine.config import TrainConfig
from engine.distributed import Runtime
from engine.scalars import peak_device_mb, peak_host_rss_mb

HEADER_FIELDS = ("suite", "device", "versions", "config", "command")
ALWAYS_WRITTEN = ("backend", "images_per_s", "cpu_s_per_image", "stages", "peak_host_rss_mb", "peak_device_mb")


@dataclasses.dataclass
class Record:
    backend: str
    images_per_s: float
    cpu_s_per_image: float | None = None  # host CPU-seconds per image, this process's children included
    stages: dict[str, float] = dataclasses.field(default_factory=dict)
    peak_host_rss_mb: float | None = None
    peak_device_mb: float | None = None  # None on the CPU
    workers_rss_mb: float | None = None
    stage_groups: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    alternative_groups: list[str] = dataclasses.field(default_factory=list)
    totals: dict[str, float] = dataclasses.field(default_factory=dict)
    loader_images_per_s: float | None = None
    step_images_per_s: float | None = None
    data_wait_fraction: float | None = None
    sync_check: dict | None = None
    traces: list[str] = dataclasses.field(default_factory=list)
    settings: str | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    extra: dict = dataclasses.field(default_factory=dict)
    # The document's header: set for printing and charts, written once per document.
    suite: str = ""
    device: str = ""
    versions: dict[str, str] = dataclasses.field(default_factory=dict)
    config: dict = dataclasses.field(default_factory=dict)
    command: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        """The result's fields, unset optional ones left out, the suite's own beside them; no header."""
        fields = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("extra", *HEADER_FIELDS)
        }
        kept = {name: value for name, value in fields.items() if name in ALWAYS_WRITTEN or value not in (None, {}, [])}
        return {**kept, **self.extra}

    @classmethod
    def from_json(cls, result: dict, head: dict) -> Record:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {key: value for key, value in {**result, **head}.items() if key in names}
        return cls(**known, extra={key: value for key, value in result.items() if key not in names})


def peak_memory(device: torch.device) -> dict[str, float | None]:
    """A Record's peak fields, read now: this process's host RSS over its life, torch's device allocator's."""
    return {"peak_host_rss_mb": peak_host_rss_mb(), "peak_device_mb": peak_device_mb(device)}


def header(
    suite: str, runtime: Runtime, cfg: TrainConfig, precision: str, opts: argparse.Namespace, command: list[str]
) -> dict:
    config = {
        **dataclasses.asdict(cfg.data),
        **dataclasses.asdict(cfg.model),
        **dataclasses.asdict(cfg.optim),
        **dataclasses.asdict(cfg.step),
    }
    for key in ("loader", "knn_data"):  # the backend is per result; benchmarks run no kNN monitor
        config.pop(key)
    config.update(
        precision=precision,
        seed=cfg.run.seed,
        world_size=runtime.world_size,
        steps=opts.steps,
        warmup=opts.warmup,
        repeats=opts.repeats,
        threads=torch.get_num_threads(),
    )
    return {
        "suite": suite,
        "device": host.device_name(runtime.device),
        "versions": host.versions(),
        "config": config,
        "command": command,
    }


def document(records: list[Record]) -> dict:
    results = [r.to_json() for r in records]
    return {**{key: getattr(records[0], key) for key in HEADER_FIELDS}, **results[0], "results": results}


def from_document(doc: dict) -> list[Record]:
    """Every result of a document, each with the document's header: what tables and charts work on."""
    head = {key: doc[key] for key in HEADER_FIELDS}
    return [Record.from_json(result, head) for result in doc["results"]]


def write_json(path: Path, records: list[Record]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document(records), indent=2) + "\n")


def read_json(path: Path) -> list[Record]:
    return from_document(json.loads(path.read_text()))
