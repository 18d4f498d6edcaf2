"""Our spike inference against a plain PyTorch ResNet-18 forward on the same convolutions.

    python experiments/backend/against_torch.py --torch-python /path/to/venv-with-torch/bin/python \
        [--batch 16] [--T 8] [--rounds 3] [--repeats 3] [--json PATH]

The comparison users make first: how fast does this backend run the network's
convolutions? Multi step mode folds time into the batch, so ResNet-18's spike inference at
(B, T) convolves T*B images per layer. PyTorch here is the same network (CIFAR ResNet-18:
3x3 stem, no max pool, BasicBlocks [2, 2, 2, 2]) with ReLU for the LIF neurons, in eval mode
under ``torch.inference_mode``, on T*B images, in NCHW and in channels-last memory format.
It is the lower bound of the reference code's inference (which adds its LIF loops).

Each side runs in its own subprocess, alternately for ``--rounds`` rounds, so that neither
keeps the other's thread pools warm or its memory; a side reports the median of its
``--repeats`` timed calls after one warm-up call. The project does not depend on torch:
give ``--torch-python`` an interpreter that has it (a scratch venv).

Results: docs/RESULTS.md, "Against PyTorch on the same machine".
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time

from ratebp_jax import cli

HERE = os.path.abspath(__file__)


def _median_call_s(fn, repeats: int) -> float:
    """For the torch side, whose interpreter has no JAX (ours uses ``profiling.median_time``,
    which times the same way: one warm-up call, then the median of ``repeats``)."""
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def torch_side(images: int, repeats: int) -> dict:
    """A plain CIFAR ResNet-18 forward in PyTorch, eval mode, NCHW and channels-last."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.short = (nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

        def forward(self, x):
            y = torch.relu(self.bn1(self.conv1(x)))
            return torch.relu(self.bn2(self.conv2(y)) + self.short(x))

    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    net = nn.Sequential(*layers).eval()
    x = torch.randn(images, 3, 32, 32)
    out = {"torch_version": torch.__version__, "torch_threads": torch.get_num_threads()}
    with torch.inference_mode():
        out["torch_nchw_s"] = _median_call_s(lambda: net(x), repeats)
        net_cl, x_cl = net.to(memory_format=torch.channels_last), x.to(
            memory_format=torch.channels_last)
        out["torch_channels_last_s"] = _median_call_s(lambda: net_cl(x_cl), repeats)
    return out


def ours_side(batch: int, T: int, repeats: int) -> dict:
    """Our ResNet-18 spike inference at (batch, T), multi step mode."""
    import jax

    from ratebp_jax import analysis, methods, models, profiling
    net, params, stats = methods.split_model(models.create_model("resnet18"))
    images = analysis.random_batch(jax.random.key(0), batch, 32, 3, 10)["image"]
    fn, args = profiling.inference_program(net, params, stats, images, T=T, step_mode="multi")
    compiled = jax.jit(fn).lower(*args).compile()
    return {"jax_version": jax.__version__,
            "ours_infer_s": profiling.median_time(compiled, *args, repeats=repeats)}


def run_side(python: str, side: str, args) -> dict:
    proc = subprocess.run([python, HERE, "--side", side, "--batch", str(args.batch),
                           "--T", str(args.T), "--repeats", str(args.repeats)],
                          capture_output=True, text=True, check=False)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        who = f"--torch-python={python}" if side == "torch" else "our side"
        raise ValueError(f"{who}: the {side} side failed: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--torch-python", default=sys.executable,
                   help="an interpreter with torch installed (default: this one)")
    p.add_argument("--batch", type=int, default=16, help="B (default 16)")
    p.add_argument("--T", type=int, default=8, help="time steps (default 8)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--repeats", type=int, default=3,
                   help="timed calls per side and round (default 3)")
    p.add_argument("--json", default=None, help="write the figures here (default: none)")
    p.add_argument("--side", choices=["torch", "ours"], default=None,
                   help="internal: run one side and print its JSON")
    args = p.parse_args(argv)
    for name in ("batch", "T", "rounds", "repeats"):
        cli.check_int(f"--{name}", getattr(args, name), 1)
    cli.check_output_path("--json", args.json)
    if shutil.which(args.torch_python) is None:
        raise ValueError(f"--torch-python={args.torch_python}: no such executable; give the "
                         f"python of an environment that has torch")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.side == "torch":
        print(json.dumps(torch_side(args.batch * args.T, args.repeats)))
        return
    if args.side == "ours":
        print(json.dumps(ours_side(args.batch, args.T, args.repeats)))
        return
    rounds = []
    for r in range(args.rounds):
        row = {**run_side(sys.executable, "ours", args),
               **run_side(args.torch_python, "torch", args)}
        row["ours_over_torch_nchw"] = row["ours_infer_s"] / row["torch_nchw_s"]
        row["ours_over_torch_channels_last"] = (row["ours_infer_s"]
                                                / row["torch_channels_last_s"])
        rounds.append(row)
        print(f"round {r}: ours (spike inference, B={args.batch}, T={args.T}) "
              f"{row['ours_infer_s']:.3f} s; torch ResNet-18 forward on "
              f"{args.batch * args.T} images: NCHW {row['torch_nchw_s']:.3f} s, channels-last "
              f"{row['torch_channels_last_s']:.3f} s; ours / torch "
              f"{row['ours_over_torch_nchw']:.2f} / {row['ours_over_torch_channels_last']:.2f}",
              flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch": args.batch, "T": args.T, "rounds": rounds}, f, indent=1)


if __name__ == "__main__":
    cli.run(main)
