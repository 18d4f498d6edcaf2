r"""Import a reference PyTorch state_dict into an orbax checkpoint that main.py resumes.

    python experiments/import_reference.py --model resnet18 --state-dict model_weights.pth \
        --workdir runs/imported [--config experiments/configs/cifar10_resnet18.py]
    python experiments/main.py --config experiments/configs/cifar10_resnet18.py \
        --workdir runs/imported      # fine-tunes (or, with num_train_steps=1, evaluates)

The state_dict is a ``.npz`` of name -> array (or a ``.pth`` when torch is installed): a bare
state_dict or the reference training script's own checkpoint (``best_net``, with the
``module.`` prefix of DDP runs), whose recorded best accuracy and epoch are printed.
Unknown, missing or mis-shaped keys are reported by name. The checkpoint is written as
step 0 with a fresh optimiser state for the config's optimiser. Every flag is checked
before anything is written: a refused run leaves no files behind.
"""
from __future__ import annotations

import os

from absl import app, flags, logging

from ratebp_jax import cli

FLAGS = flags.FLAGS
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CONFIG = os.path.join(HERE, "configs", "default.py")
cli.define_config_flag(DEFAULT_CONFIG, "Training configuration the checkpoint is for.")
flags.DEFINE_string("model", None, "Zoo model name (default: config.model).")
flags.DEFINE_string("state-dict", None, "The reference state_dict (.npz, or .pth/.pt with "
                    "torch installed).", required=True)
flags.DEFINE_string("workdir", None, "New or empty run directory to write checkpoints/0 "
                    "into.", required=True)
flags.DEFINE_integer("num-classes", 10, "Classes of the reference classifier.")
flags.DEFINE_integer("in-channels", 3, "Input channels (2 for DVS).")
flags.DEFINE_integer("image-size", 32, "Input size (sets the VGG classifier width).")


# --------------------------------------------------------------------------- checks
def check_flags() -> None:
    """The plain flags, before anything is loaded."""
    from ratebp_jax import models
    if FLAGS.model is not None:
        cli.check_choices("--model", [FLAGS.model], models.MODELS)
    for name in ("num-classes", "in-channels", "image-size"):
        cli.check_int(f"--{name}", FLAGS[name].value)


def check_workdir(workdir: str) -> None:
    """A directory (or one to be made) whose checkpoints would not be overwritten or mixed
    with the imported one."""
    from ratebp_jax import workdir as wd
    wd.check_path(workdir)
    for sub in ("checkpoints", "best"):
        folder = os.path.join(workdir, sub)
        if os.path.isdir(folder) and os.listdir(folder):
            raise cli.UsageError(f"--workdir={workdir!r}: already holds checkpoints "
                                        f"({sub}/); import into a new or empty workdir")


def checked_config():
    """FLAGS.config with --model and --num-classes applied, validated."""
    from ratebp_jax import train
    config = FLAGS.config
    config.model = FLAGS.model or config.model
    config.num_classes = FLAGS["num-classes"].value
    try:
        train.validate_config(config)
    except ValueError as e:
        raise cli.UsageError(f"config.{e}") from None
    return config


# --------------------------------------------------------------------------- main
def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    check_flags()
    check_workdir(FLAGS.workdir)
    config = checked_config()
    import orbax.checkpoint as ocp

    from ratebp_jax import interop, train
    from ratebp_jax import workdir as wd
    state_dict, recorded = interop.load_reference_file(FLAGS["state-dict"].value,
                                                       label="--state-dict")
    size, channels, num_classes = (FLAGS["image-size"].value, FLAGS["in-channels"].value,
                                   config.num_classes)
    shape = (size, size, channels)
    model = train.create_model(config, shape, num_classes)
    interop.import_state_dict(model, state_dict)
    tx = train.create_optimizer(config, lambda step: config.learning_rate)
    _, state = train.create_state(config, shape, num_classes, tx, model=model)
    # Everything is checked: only now is anything written.
    latest, _ = wd.checkpoint_managers(FLAGS.workdir, config.keep_checkpoints)
    latest.save(0, args=ocp.args.StandardSave(state))
    latest.wait_until_finished()
    if recorded:
        print("the reference recorded " + ", ".join(f"{k}={v}" for k, v in recorded.items()))
    print(f"imported {FLAGS['state-dict'].value} into {config.model}: "
          f"{os.path.join(FLAGS.workdir, 'checkpoints', '0')}")


def run(argv=None) -> None:
    """The command line (``sys.argv`` when ``argv`` is None): a user error is one line on
    stderr and exit status 2."""
    parser = cli.absl_flags_parser(DEFAULT_CONFIG)
    cli.run(lambda args: app.run(main, argv=args, flags_parser=parser), argv)


if __name__ == "__main__":
    run()
