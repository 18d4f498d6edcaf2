"""VGGSNN on DVS128 Gesture with rate-BP: T=16 frames at 48x48, the CIFAR10-DVS recipe.

    python experiments/main.py --config experiments/configs/dvsgesture_vggsnn.py \
        --config.data_dir=$DATA   # holds tonic's DVSGesture/ folder

Frames: 16 equal time bins per sample, two polarity channels, resized to 48x48, cached in
DVSGesture/; the official split (1,077 / 264 samples in tonic's cut), sorted by file path.
Training frames are shifted circularly by up to 5 pixels but not flipped (a flip turns a
right-hand gesture into a left-hand one, another class). Compare with the published SNN
figures on this benchmark, such as 97.57% for the PLIF network of Fang et al. (ICCV 2021,
T=20, BPTT).
"""
from configs import cifar10dvs_vggsnn


def get_config():
    c = cifar10dvs_vggsnn.get_config()
    c.name = "dvsgesture_vggsnn"
    c.dataset = "dvsgesture"  # tonic DVSGesture in data_dir, converted once to frames
    c.model = "vggsnn_dvs"  # 2 input channels, 48x48
    c.T = 16  # frames per sample
    c.image_size = 48  # frames resized to 48x48
    c.batch_size = 32  # 33 steps per epoch on the 1,077 training samples
    c.eval_batch_size = 88  # 264 test samples in 3 batches
    c.num_epochs = 200
    return c
