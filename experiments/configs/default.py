"""The embedded default: a small spiking CNN on scikit-learn's bundled digits, rate-BP, T=4.

    python experiments/main.py            # this config, workdir runs/default-rate-multi-T4
    python experiments/main.py --config.method=bptt --config.step_mode=single

Runs offline on 2 CPU cores in about a minute and reaches >= 95% test accuracy. Every other
config imports this one and overrides fields.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "default"  # run name; the default workdir is runs/<name>-<method>-<step_mode>-T<T>

    # ---- data
    c.dataset = "digits"  # digits | npz | cifar10 | cifar100 | imagenet | cifar10_dvs | nmnist
    c.data_dir = ""  # where tfds / tonic data lives (datasets that need one)
    c.data_path = ""  # the .npz file of dataset=npz (config.json records its fingerprint)
    c.num_classes = 0  # 0: taken from the dataset
    c.image_size = 0  # 0: the dataset's own (digits 8, CIFAR 32, DVS 48, ImageNet 224)
    # The dataset's training augmentations: CIFAR crop + flip + AutoAugment + Cutout, ImageNet
    # random-resized crop + flip, DVS flip + roll, npz the two fields below. digits has none,
    # so for digits augment does nothing.
    c.augment = True
    c.augment_flip = False  # npz only: random horizontal flip (when augment is true)
    c.augment_crop_padding = 0  # npz only: random crop after zero padding by this many pixels
    c.data_workers = 0  # grain worker processes preparing batches; 0: built in line

    # ---- model and neurons
    c.model = "vgg_small"  # a name in ratebp_jax.models.MODELS, or your own: package.module:Factory
    # The factory's own further arguments, e.g. --config.model_kwargs="{'width': 8}" (a
    # Python dict literal); checked against its signature (models.check_model_kwargs)
    c.model_kwargs = {}
    c.lam = 0.2  # LIF leak, 1 - 1/tau, in [0, 1)
    c.learnable_leak = False  # each LIF layer learns its leak, lam = sigmoid(w), from lam (PLIF)
    c.thresh = 1.0  # firing threshold, > 0
    c.reset = "soft"  # soft | soft_nodetach | hard | hard_detach
    c.v_reset = 0.0  # membrane after a hard reset
    c.surrogate = "sigmoid"  # sigmoid | atan | triangle | rectangle
    c.surrogate_alpha = 4.0  # surrogate sharpness
    c.compute_dtype = "float32"  # float32 | bfloat16: the dtype convolutions and dense layers compute in
    # split | first: the gradient of a max-pooling window with tied maxima (SEW/PreAct stems):
    # split shares it equally among them, first gives it all to the first (XLA, reference)
    c.pool_ties = "split"

    # ---- gradient method
    c.method = "rate"  # rate | bptt (see ratebp_jax.methods.METHODS)
    c.step_mode = "multi"  # multi (time folded into batch) | single (scan over steps)
    c.T = 4  # simulation time steps, >= 1
    c.rate_grad_scale = "exact"  # exact (true rate-graph gradient) | reference (x 1/T, as the paper)

    # ---- optimisation
    c.optimizer = "sgd"  # sgd (with momentum) | adam
    c.learning_rate = 0.25  # peak learning rate; cosine-annealed to 0 over the run, per epoch
    c.momentum = 0.9  # SGD momentum
    c.weight_decay = 5e-4  # on conv/linear kernels only, never on BN or biases
    c.batch_size = 64  # global batch; must be divisible by the number of devices
    c.eval_batch_size = 256  # global evaluation batch
    c.num_epochs = 20  # training length in epochs
    c.num_train_steps = 0  # > 0 overrides num_epochs (for short runs)
    c.seed = 0  # weights, data order and augmentation

    # ---- bookkeeping
    c.checkpoint_every_steps = 0  # > 0: also checkpoint mid-epoch every this many steps
    c.keep_checkpoints = 2  # latest checkpoints kept (the best one is kept separately)
    c.progress_bar = True  # tqdm bar with loss and accuracy; off when output is not a terminal
    # How often, in steps, the host reads the train metrics back from the devices (for the
    # progress bar and the non-finite check); in between the devices run ahead of Python.
    c.log_every_steps = 10
    c.plots = True  # PNG curves and firing rates in the workdir, redrawn at every epoch's end
    c.tensorboard = True  # TensorBoard event files in workdir/tensorboard/ (ratebp_jax.tracking)
    c.nan_policy = "stop"  # stop | skip: what a non-finite loss or gradient does
    # Every this many steps, compare each method of grad_agreement_methods with BPTT on the
    # step's batch (grad_agreement.jsonl and .png, per layer); 0: off. Costs one BPTT and one
    # gradient per method at those steps, outside the train step; the run is unchanged.
    c.grad_agreement_every_steps = 0
    c.grad_agreement_methods = ("rate",)  # names from ratebp_jax.methods.METHODS
    c.grad_agreement_warn_cosine = 0.0  # say once when a logged layer's cosine is below it; 0: off
    # A model of one's own (package.module:Factory) in a rate-BP run is checked against the
    # layer contract before training (ratebp_jax.contract); true: an error there stops the run
    c.contract_errors_fatal = False
    return c
