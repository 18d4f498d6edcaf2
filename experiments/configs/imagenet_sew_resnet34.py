"""SEW-ResNet-34 (ADD) on ImageNet-1k with rate-BP (reference setting).

    python experiments/main.py --config experiments/configs/imagenet_sew_resnet34.py \
        --config.data_dir=$TFDS_DATA      # imagenet2012 prepared as array_record

SGD momentum 0.9, lr 0.2 cosine over 100 epochs, global batch 512, weight decay 2e-5,
T=4, RandomResizedCrop 224 + flip. The batch is split over all visible devices.
"""
from configs import default


def get_config():
    c = default.get_config()
    c.name = "imagenet_sew_resnet34"
    c.dataset = "imagenet"  # tfds imagenet2012 (manual download)
    c.model = "sew_resnet34"  # ImageNet stem, 21.8M parameters
    c.image_size = 224  # RandomResizedCrop size
    c.T = 4  # reference
    c.rate_grad_scale = "reference"  # the reference multiplies rate gradients by 1/T
    c.pool_ties = "first"  # the stem max pool's tie rule, as the reference (pooling of spikes)
    c.learning_rate = 0.2  # reference
    c.batch_size = 512  # reference (global)
    c.eval_batch_size = 500  # 50,000 validation images in 100 batches
    c.weight_decay = 2e-5  # reference
    c.num_epochs = 100  # reference
    c.checkpoint_every_steps = 1000  # also checkpoint mid-epoch
    return c
