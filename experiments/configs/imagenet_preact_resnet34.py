"""Pre-activation spiking ResNet-34 on ImageNet-1k with rate-BP (reference setting).

    python experiments/main.py --config experiments/configs/imagenet_preact_resnet34.py \
        --config.data_dir=$TFDS_DATA
"""
from configs import imagenet_sew_resnet34


def get_config():
    c = imagenet_sew_resnet34.get_config()
    c.name = "imagenet_preact_resnet34"
    c.model = "preact_resnet34"  # real-valued residual stream, no LIF in the stem
    return c
