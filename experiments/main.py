"""Train a spiking network with rate-BP or BPTT.

    python experiments/main.py                                    # the embedded default
    python experiments/main.py --config experiments/configs/cifar10_resnet18.py \
        --workdir runs/c10 --config.method=bptt --config.T=2
    python path/to/experiments/main.py --config.model=mypkg.mymodel:Net   # your own model

``--config.model`` is a zoo name or the import path ``package.module:Factory`` of one's own
model (README "Your own model", docs/DESIGN.md section 4); the working directory is added to
the import path (after the installed packages), so run from the folder that holds ``mypkg/``
or put that folder on PYTHONPATH.

``--config`` is a Python file with ``get_config()`` (default: configs/default.py); any field
can be overridden with ``--config.FIELD=VALUE``. The default workdir is
``runs/<name>-<method>-<step_mode>-T<T>``. A workdir belongs to one run: rerunning the same
command resumes from its latest checkpoint, a finished run says so and changes nothing, and
a different config is refused (see ``ratebp_jax.workdir.RERUN_FIELDS``).

Several processes (hosts) pass ``--distributed``: ``jax.distributed.initialize()`` then runs
first, with ``--coordinator_address``, ``--num_processes`` and ``--process_id`` when given,
otherwise reading the cluster's environment (SLURM, Cloud TPU). On CPU, cross-process
collectives use gloo.
"""
from __future__ import annotations

import os
import signal
import sys


def _stop_before_start(signum, frame):
    """Ctrl-C while modules load: one line and no traceback; nothing was written yet."""
    del signum, frame
    sys.stderr.write("error: stopped by Ctrl-C before the run started; nothing was written\n")
    os._exit(130)


signal.signal(signal.SIGINT, _stop_before_start)  # until run() starts the run

from absl import app, flags, logging  # noqa: E402

from ratebp_jax import cli as cli_errors  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "default.py")
cli_errors.define_config_flag(DEFAULT_CONFIG, "Training configuration file (a Python file "
                              "with get_config()); override fields with --config.FIELD=VALUE.")
flags.DEFINE_string("workdir", None,
                    "Run directory (default: runs/<name>-<method>-<step_mode>-T<T>).")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() (multi-process).")
flags.DEFINE_string("coordinator_address", None,
                    "With --distributed: host:port of process 0's coordinator "
                    "(default: from the cluster environment).")
flags.DEFINE_integer("num_processes", None,
                     "With --distributed: the number of processes (default: from the "
                     "cluster environment).")
flags.DEFINE_integer("process_id", None,
                     "With --distributed: this process's index in [0, num_processes) "
                     "(default: from the cluster environment).")
FLAGS = flags.FLAGS


def default_workdir(config) -> str:
    """Runs that differ in method, step mode or T get their own directory by default."""
    return os.path.join("runs", f"{config.name}-{config.method}-{config.step_mode}-T{config.T}")


def add_working_directory_to_path():
    """Make ``--config.model=mypkg.mymodel:Net`` importable from the working directory.

    ``python experiments/main.py`` puts experiments/ on ``sys.path``, not the working
    directory. It goes last, so a folder there never shadows an installed package."""
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.append(cwd)


def check_distributed_flags():
    given = {name: FLAGS[name].value for name in ("coordinator_address", "num_processes",
                                                  "process_id")}
    if not FLAGS.distributed:
        extra = [name for name, value in given.items() if value is not None]
        if extra:
            raise cli_errors.UsageError(f"--{extra[0]}={given[extra[0]]!r}: needs --distributed")
        return
    if FLAGS.num_processes is not None:
        cli_errors.check_int("--num_processes", FLAGS.num_processes, 1)
    if FLAGS.process_id is not None:
        high = FLAGS.num_processes - 1 if FLAGS.num_processes else None
        cli_errors.check_int("--process_id", FLAGS.process_id, 0, high)
    address = FLAGS.coordinator_address
    if address is not None and (":" not in address or not address.rsplit(":", 1)[1].isdigit()):
        raise cli_errors.UsageError(f"--coordinator_address={address!r}: must be host:port")


def start_distributed():
    """``jax.distributed.initialize()``; gloo carries CPU collectives across processes
    (XLA:CPU has none by default), which is harmless on GPU and TPU."""
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=FLAGS.coordinator_address,
                               num_processes=FLAGS.num_processes,
                               process_id=FLAGS.process_id)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    check_distributed_flags()
    config = FLAGS.config
    workdir = FLAGS.workdir or default_workdir(config)
    from ratebp_jax import train, workdir as wd
    add_working_directory_to_path()
    # Everything that needs no devices is checked before a distributed start, which waits
    # for the other processes.
    train.validate_config(config, devices=False)
    wd.check_path(workdir)
    wd.check_same_run(os.path.abspath(workdir), config)
    if FLAGS.distributed:
        start_distributed()
    from ratebp_jax import contract
    contract.check_config_model(config)  # a model of one's own; before anything is written
    RUNNING["workdir"] = os.path.abspath(workdir)
    summary = train.train_and_evaluate(config, workdir)
    if summary["interrupted"]:
        return  # checkpointed; rerunning the same command resumes
    if summary.get("already_complete"):
        return  # said so in one line
    import jax
    where = (f"records in {workdir}" if jax.process_index() == 0
             else f"process {jax.process_index()}; process 0 writes the records")
    print(f"final test accuracy {summary['final_test_accuracy']:.4f} "
          f"(best {summary['best_test_accuracy']:.4f}) in {summary['wall_time_s']:.1f}s; "
          f"{where}")


RUNNING = {"workdir": None}  # set once the run may write, for the Ctrl-C message


def run(argv=None):
    from ratebp_jax.data import DataWorkerError
    from ratebp_jax.train import NonFiniteError
    from ratebp_jax.workdir import rerun_hint
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a KeyboardInterrupt from here on
    cli_errors.keep_ctrl_c()
    try:
        app.run(main, argv=argv, flags_parser=cli_errors.absl_flags_parser(DEFAULT_CONFIG))
    except cli_errors.USER_ERRORS as e:
        cli_errors.fail(str(e))
    except NonFiniteError as e:
        cli_errors.fail(str(e), code=3)
    except DataWorkerError as e:
        cli_errors.fail(str(e).splitlines()[0], code=1)
    except KeyboardInterrupt:
        workdir = RUNNING["workdir"]
        cli_errors.fail("stopped by Ctrl-C; " + (rerun_hint(workdir) if workdir else
                                                 "nothing was written"), code=130)


if __name__ == "__main__":
    run()
