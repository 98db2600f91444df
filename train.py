"""MoCo v1/v2 pretraining: the command line over `engine.trainer.Trainer`.

    python train.py                                   # MoCo v2 on Fashion-MNIST, CPU, a few minutes
    python train.py --preset imagenet --data /imagenet --loader dali
    torchrun --nproc_per_node 8 train.py --preset imagenet --data /imagenet --loader dali --resume auto

Writes OUT/metrics.jsonl (one row per epoch; epoch 0 is the random init) and OUT/checkpoint_*.pth.tar
in the official layout. `--help` lists every flag. Exit status: 0 done, 2 a setting, file or checkpoint
that cannot work (one line on stderr), 130 stopped by a signal after writing a checkpoint (0 under torchrun).
"""

from __future__ import annotations

import re
import sys

from engine.checkpoint import NothingLeft
from engine.cli import parse_config
from engine.config import ConfigError
from engine.trainer import Interrupted, Trainer, TrainingDiverged
from model.checkpoint import CheckpointError
from pipeline.errors import DataError

USER_ERRORS = (ConfigError, DataError, CheckpointError, TrainingDiverged)


def report_user_error(error: Exception) -> int:
    """One line on stderr for a problem the user can fix; the exit status for it. An error re-raised from a
    DataLoader worker ends in 'pipeline.errors.DataError: <what>': the worker's name for it is dropped."""
    line = re.sub(r"^([A-Za-z_][\w.]*\.)?[A-Z]\w*(Error|Exception): ", "", str(error).strip().splitlines()[-1])
    print(f"error: {line}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    trainer = None
    try:
        trainer = Trainer(parse_config(argv))
        trainer.build()
        trainer.run()
    except NothingLeft as e:
        print(str(e), file=sys.stderr)
    except USER_ERRORS as e:
        return report_user_error(e)
    except Interrupted as e:
        if trainer.runtime.is_main:
            print(str(e), file=sys.stderr)
        # Under torchrun a stopped run ends with 0, or --max-restarts would start it again.
        return 130 if trainer.runtime.world_size == 1 else 0
    except KeyboardInterrupt:  # a second signal: at once, keeping the last checkpoint on disk
        print(trainer.interrupted_message() if trainer else "interrupted before the run began", file=sys.stderr)
        return 130
    finally:
        if trainer is not None:
            trainer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
