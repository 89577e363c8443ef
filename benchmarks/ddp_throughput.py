"""Training-phase throughput per rank under 2-process DDP against one process.

The Lightning module with ``steps_per_batch`` (manual optimisation: each micro-step's
gradients averaged across ranks in one all-reduce) on CPU with gloo, one thread per
process; no surgery, validation, logging or progress bar. Each rank trains on half the
data, so per-rank steps per second is what DDP must keep (target >= 0.9x one process).
Runs alternate between one and two processes; the figures are medians over the epochs
after the first of every run. Every micro-step waits for one all-reduce: with gloo that
costs 0.1-0.35 ms even with free cores (README, Speed), as much as a step, so CPU runs stay
far below the target; on two cores the ranks also starve each other (gloo keeps each rank's
main thread and its TCP loop thread busy while it waits). ``--compile`` trains by the
compiled step (``compile=True``; under DDP the all-reduce runs between its two graphs), else
eagerly (``compile=False``); a run's first epoch, which compiles, is not counted. Usage:

    python benchmarks/ddp_throughput.py [--dataset fashion_mnist] [--repeats 3] [--compile]
        [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback

from lit_surgery.core.settings import SurgerySettings
from lit_surgery.data import SurgeryDataModule
from lit_surgery.lightning.loop import attach
from lit_surgery.lightning.module import SurgeryModule


class StepRate(Callback):
    """Optimiser steps and seconds of each training epoch on this rank."""

    def __init__(self) -> None:
        self.epochs: list[tuple[int, float]] = []

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start, self._step = time.perf_counter(), trainer.global_step

    def on_train_epoch_end(self, trainer, module) -> None:
        seconds = time.perf_counter() - self._start
        self.epochs.append((trainer.global_step - self._step, seconds))


def worker(args: argparse.Namespace) -> None:
    """One fit on ``args.devices`` processes; rank 0 writes every rank's epochs to ``args.out``."""
    torch.set_num_threads(1)
    settings = SurgerySettings(max_epochs=args.epochs, initial_epochs=args.epochs, epoch_step=1)
    model = SurgeryModule(hidden=args.hidden, surgery=settings, compile=args.compile,
                          optimizer=partial(torch.optim.SGD, lr=0.005))
    rate = StepRate()
    trainer = pl.Trainer(
        accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
        max_epochs=args.epochs, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        num_sanity_val_steps=0, callbacks=[rate], default_root_dir=tempfile.gettempdir(),
    )
    dm = SurgeryDataModule(args.dataset, batch_size=args.batch_size, use_test_as_val=True,
                           steps_per_batch=args.steps_per_batch)
    attach(trainer).fit(model, dm)
    ranks = [rate.epochs]
    if trainer.world_size > 1:
        ranks = [None] * trainer.world_size
        torch.distributed.all_gather_object(ranks, rate.epochs)
    if trainer.is_global_zero:
        Path(args.out).write_text(json.dumps(ranks))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def run(args: argparse.Namespace, devices: int) -> list[float]:
    """Steps per second of each rank (median of its epochs after the first) in a fresh run."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "epochs.json"
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--devices",
                   str(devices), "--out", str(out), "--dataset", args.dataset,
                   "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
                   "--steps-per-batch", str(args.steps_per_batch),
                   "--hidden", *map(str, args.hidden), *["--compile"] * args.compile]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        subprocess.run(command, check=True, env=env, cwd=tmp, stdout=subprocess.DEVNULL)
        ranks = json.loads(out.read_text())
    return [statistics.median(steps / seconds for steps, seconds in epochs[1:])
            for epochs in ranks]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--hidden", type=int, nargs="+", default=[10, 10, 10])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps-per-batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="train by the compiled step")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    one, two = [], []
    for _ in range(args.repeats):  # interleaved: drifts in machine load hit both alike
        one.append(run(args, 1)[0])
        two.append(run(args, 2))
    settings = {"dataset": args.dataset, "hidden": args.hidden, "batch_size": args.batch_size,
                "steps_per_batch": args.steps_per_batch, "compile": args.compile,
                "threads_per_process": 1, "device": "cpu", "cores": os.cpu_count(),
                "epochs": args.epochs, "repeats": args.repeats}
    print(" ".join(f"{k}={v}" for k, v in settings.items()))
    print("1 process:        " + ", ".join(f"{r:6.0f}" for r in one) + "  steps/s")
    for rank in range(2):
        rates = [r[rank] for r in two]
        print(f"2 DDP ranks, #{rank}:  " + ", ".join(f"{r:6.0f}" for r in rates) + "  steps/s")
    per_rank = statistics.median(statistics.mean(r) for r in two)
    single = statistics.median(one)
    print(f"per-rank / one process: {per_rank / single:.3f} (medians; target >= 0.9)")
    if args.json:
        args.json.write_text(json.dumps({
            "settings": settings, "one_process": one, "two_processes_per_rank": two,
            "one_process_median": single, "per_rank_median": per_rank,
            "ratio": per_rank / single}, indent=1))


if __name__ == "__main__":
    main()
