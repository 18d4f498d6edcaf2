"""Train a spiking network with rate-BP or BPTT.

    python experiments/main.py                                    # the embedded default
    python experiments/main.py --config experiments/configs/cifar10_resnet18.py \
        --workdir runs/c10 --config.method=bptt --config.T=2

``--config`` is a Python file with ``get_config()`` (default: configs/default.py); any field
can be overridden with ``--config.FIELD=VALUE``. The default workdir is ``runs/<name>``.
Rerunning the same command resumes from the workdir's latest checkpoint. On a multi-host
TPU/GPU cluster pass ``--distributed`` so that ``jax.distributed.initialize()`` runs first.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import cli_errors

HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(HERE, "configs", "default.py"),
                                "Training configuration file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (default: runs/<config.name>).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-host).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    import jax
    if FLAGS.distributed:
        jax.distributed.initialize()
    from ratebp_jax import train
    config = FLAGS.config
    workdir = FLAGS.workdir or os.path.join("runs", config.name)
    summary = train.train_and_evaluate(config, workdir)
    if summary["interrupted"]:
        return  # checkpointed; rerunning the same command resumes
    print(f"final test accuracy {summary['final_test_accuracy']:.4f} "
          f"(best {summary['best_test_accuracy']:.4f}) in {summary['wall_time_s']:.1f}s; "
          f"records in {workdir}")


def run():
    from ratebp_jax.train import NonFiniteError
    try:
        app.run(main)
    except cli_errors.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    run()
