"""Training-phase throughput of the Lightning module, eager and compiled, against a plain
PyTorch loop.

Same network, same data tensors, same batch size, SGD; no surgery, validation, logging or
progress bar in any (those are not the training phase). Prints steps per second for each
and their ratios to the plain loop (targets: eager >= 0.95, compiled (``model.compile``)
>= 1.5 for [10,10,10] at batch 32). The compiled run's first epoch holds the compile.
Usage:

    python benchmarks/throughput.py [--dataset fashion_mnist] [--hidden 10 10 10]
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from lit_surgery.core.network import build
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.topology import Topology
from lit_surgery.data import SurgeryDataModule
from lit_surgery.lightning.loop import attach
from lit_surgery.lightning.module import SurgeryModule


class EpochTimer(Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, module) -> None:
        self.times.append(time.perf_counter() - self._start)


def plain(dm: SurgeryDataModule, hidden: list[int], epochs: int, lr: float) -> list[float]:
    s = dm.splits
    torch.manual_seed(0)
    net = build(Topology.mlp(dm_input(dm), hidden, dm.num_classes))
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    x, y, bs = s.x_train, s.y_train, dm.batch_size
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(epochs):
        start = time.perf_counter()
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - bs + 1, bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - start)
    return times


def dm_input(dm: SurgeryDataModule) -> int:
    return int(torch.tensor(dm.input_shape).prod())


def lightning(
    dm: SurgeryDataModule, hidden: list[int], epochs: int, lr: float, compile: bool
) -> list[float]:
    settings = SurgerySettings(max_epochs=epochs, initial_epochs=epochs, epoch_step=1)
    sgd = partial(torch.optim.SGD, lr=lr)
    model = SurgeryModule(hidden=hidden, surgery=settings, optimizer=sgd, compile=compile)
    timer = EpochTimer()
    trainer = pl.Trainer(
        max_epochs=epochs, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[timer],
    )
    attach(trainer).fit(model, dm)
    return timer.times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--hidden", type=int, nargs="+", default=[10, 10, 10])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps-per-batch", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dm = SurgeryDataModule(args.dataset, batch_size=args.batch_size, use_test_as_val=True,
                           steps_per_batch=args.steps_per_batch)
    dm.setup("fit")
    steps = len(dm.splits.y_train) // args.batch_size
    runs = {
        "plain PyTorch loop": plain(dm, args.hidden, args.epochs, 0.005),
        "Lightning eager": lightning(dm, args.hidden, args.epochs, 0.005, compile=False),
        "Lightning compiled": lightning(dm, args.hidden, args.epochs, 0.005, compile=True),
    }
    print(f"dataset={args.dataset} hidden={args.hidden} batch={args.batch_size} "
          f"steps/epoch={steps} steps_per_batch={args.steps_per_batch} "
          f"threads={args.threads} device=cpu")
    # the first epoch warms up (and compiles); the best of the rest is the steady state
    # (this machine is noisy: compare the medians too)
    plain_times = runs["plain PyTorch loop"][1:]
    for name, times in runs.items():
        epochs = ", ".join(f"{t:.2f}s" for t in times)
        best = min(plain_times) / min(times[1:])
        median = statistics.median(plain_times) / statistics.median(times[1:])
        print(f"{name + ':':<20}{steps / min(times[1:]):8.0f} steps/s  x{best:.2f} plain "
              f"(medians x{median:.2f})  (epochs: {epochs})")


if __name__ == "__main__":
    main()
