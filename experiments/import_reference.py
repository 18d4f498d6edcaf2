"""Import a reference PyTorch state_dict into an orbax checkpoint that main.py resumes.

    python experiments/import_reference.py --model resnet18 --state-dict ckpt.npz \
        --workdir runs/imported [--config experiments/configs/cifar10_resnet18.py]
    python experiments/main.py --config experiments/configs/cifar10_resnet18.py \
        --workdir runs/imported      # fine-tunes (or, with num_train_steps=1, evaluates)

The state_dict is a ``.npz`` of name -> array (or a ``.pth`` when torch is installed).
Unknown, missing or mis-shaped keys are reported by name. The checkpoint is written as
step 0 with a fresh optimiser state for the config's optimiser.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

import cli_errors

HERE = os.path.dirname(os.path.abspath(__file__))
config_flags.DEFINE_config_file("config", os.path.join(HERE, "configs", "default.py"),
                                "Training configuration the checkpoint is for.")
flags.DEFINE_string("model", None, "Zoo model name (default: config.model).")
flags.DEFINE_string("state-dict", None, "The reference state_dict (.npz or .pth).",
                    required=True)
flags.DEFINE_string("workdir", None, "Run directory to write checkpoints/0 into.",
                    required=True)
flags.DEFINE_integer("num-classes", 10, "Classes of the reference classifier.")
flags.DEFINE_integer("in-channels", 3, "Input channels (2 for DVS).")
flags.DEFINE_integer("image-size", 32, "Input size (sets the VGG classifier width).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    import orbax.checkpoint as ocp

    from ratebp_jax import interop, train
    config = FLAGS.config
    if FLAGS.model:
        config.model = FLAGS.model
    num_classes, state_dict_path = FLAGS["num-classes"].value, FLAGS["state-dict"].value
    config.num_classes = num_classes
    train.validate_config(config)
    size, channels = FLAGS["image-size"].value, FLAGS["in-channels"].value
    shape = (size, size, channels)
    model = train.create_model(config, shape, num_classes)
    interop.import_state_dict(model, interop.load_state_dict_file(state_dict_path))
    tx = train.create_optimizer(config, lambda step: config.learning_rate)
    _, state = train.create_state(config, shape, num_classes, tx, model=model)
    latest, _ = train.checkpoint_managers(FLAGS.workdir, config.keep_checkpoints)
    if latest.all_steps():
        raise ValueError(f"workdir={FLAGS.workdir!r}: already holds checkpoints; "
                         f"import into an empty workdir")
    latest.save(0, args=ocp.args.StandardSave(state))
    latest.wait_until_finished()
    print(f"imported {state_dict_path} into {config.model}: "
          f"{os.path.join(FLAGS.workdir, 'checkpoints', '0')}")


if __name__ == "__main__":
    try:
        app.run(main)
    except cli_errors.USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
