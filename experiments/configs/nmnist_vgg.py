"""A small spiking CNN on N-MNIST event files (npz), T=8 frames at 34x34.

    python experiments/main.py --config experiments/configs/nmnist_vgg.py \
        --config.data_path=path/to/nmnist   # a folder with *train*.npz and *test*.npz

Each npz holds concatenated events (x, y, p, t_us, offsets, label, sensor_size).
"""
from configs import default


def get_config():
    c = default.get_config()
    c.name = "nmnist_vgg"
    c.dataset = "nmnist"  # npz event files in data_path
    c.model = "vgg_small"  # 32-64-128 conv widths, average pooling
    c.T = 8  # frames per sample
    c.image_size = 34  # the N-MNIST sensor
    c.batch_size = 50  # divides the 1,000-sample smoke set
    c.eval_batch_size = 100
    c.num_epochs = 10
    return c
