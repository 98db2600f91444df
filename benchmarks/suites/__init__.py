"""The suites: name -> (module, what it measures). Each module has `run(cfg, runtime, precision, opts)` returning
Records, and may have `add_flags(parser)` for flags of its own. Design studies are not here: benchmarks/studies/."""

SUITES = {
    "loader": (
        "benchmarks.suites.loader",
        "a loader alone: images/s, host CPU-seconds per image, peak host and device memory",
    ),
    "step": ("benchmarks.suites.step", "the MoCo step alone on synthetic on-device batches: images/s, ms per stage"),
    "e2e": (
        "benchmarks.suites.e2e",
        "loader plus step through the trainer's epoch loop: images/s, time waiting for data",
    ),
    "stages": (
        "benchmarks.suites.stages",
        "one table: the loader's pieces, every step stage, step and end-to-end totals",
    ),
    "profile": (
        "benchmarks.suites.profile",
        "step ceiling, every loader over a worker sweep, end to end with the "
        "best: a verdict and the train.py command to run",
    ),
    "checkpoint": (
        "benchmarks.suites.checkpoint",
        "what a checkpoint costs the run: size, the loop's pause, the background write, slower steps",
    ),
    "train": (
        "benchmarks.suites.train",
        "a whole training run as train.py runs it: images/s, data wait, loss and "
        "kNN per epoch, optionally the linear probe",
    ),
    "peers": (
        "benchmarks.suites.peers",
        "our step beside the official MoCo step and lightly's MoCo v2, same model, "
        "batch, K and threads, interleaved: images/s and ratios",
    ),
}
