"""A fully connected SNN on the Spiking Heidelberg Digits with rate-BP: 700 -> 256 -> 256 ->
20, T=100 bins of 14 ms.

    python experiments/main.py --config experiments/configs/shd_mlp.py \
        --config.data_dir=$DATA   # holds tonic's SHD/ folder
    python experiments/main.py --config experiments/configs/shd_mlp.py --config.method=bptt \
        --config.data_dir=$DATA

SHD is a temporal task: a digit is told by the order in which the cochlea's channels fire,
which the rate pass, working on time means, does not see (README, "Temporal data: SHD").
Compare with the feed-forward SNN of Cramer et al. (IEEE TNNLS 2022, trained with BPTT):
48.1 +- 1.6% (their recurrent SNN: 71.4 +- 1.9%).
"""
from configs import default


def get_config():
    c = default.get_config()
    c.name = "shd_mlp"
    c.dataset = "shd"  # tonic SHD in data_dir: 700 channels, 20 classes
    c.model = "mlp"  # dense -> BN -> LIF, 256 and 256 wide, then a dense classifier
    c.T = 100  # time bins of 1.4 s / 100 = 14 ms
    c.lam = 0.9  # a membrane time constant of 10 steps (140 ms), to integrate over time
    c.optimizer = "adam"
    c.learning_rate = 1e-3
    c.weight_decay = 0.0
    c.batch_size = 128  # 63 steps per epoch on the 8,156 training samples
    c.eval_batch_size = 566  # 2,264 test samples in 4 batches
    c.num_epochs = 100
    return c
