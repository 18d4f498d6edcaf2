"""Spiking ResNet-18 on CIFAR-10 with rate-BP, the paper's reference setting.

    python experiments/main.py --config experiments/configs/cifar10_resnet18.py \
        --config.data_dir=$TFDS_DATA

SGD momentum 0.9, lr 0.1 cosine to 0 over 300 epochs, batch 128, weight decay 5e-4 (not on
BN or biases), T=4, crop + flip + AutoAugment + Cutout, gradient scale 1/T as the reference.
Other CIFAR configs import this one and change a few fields.
"""
from configs import default


def get_config():
    c = default.get_config()
    c.name = "cifar10_resnet18"
    c.dataset = "cifar10"  # tfds cifar10, prepared as array_record in data_dir
    c.model = "resnet18"  # CIFAR stem, 11.2M parameters
    c.T = 4  # time steps (reference)
    c.rate_grad_scale = "reference"  # the reference multiplies rate gradients by 1/T
    c.pool_ties = "first"  # the reference's max-pool tie rule (for a model with a max pool)
    c.learning_rate = 0.1  # reference
    c.batch_size = 128  # reference
    c.eval_batch_size = 500  # 10,000 test images in 20 batches
    c.weight_decay = 5e-4  # reference
    c.num_epochs = 300  # reference
    c.checkpoint_every_steps = 1000  # also checkpoint mid-epoch
    return c
