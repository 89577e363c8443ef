"""`make bench`: what lit-surgery's training costs against a hand-written PyTorch loop.

(a) Training-phase throughput (steps per second; no surgery, validation, logging or
    checkpoints): a hand-written eager loop, the Lightning module eager and compiled
    (``model.compile``), for [10,10,10] and [256,256] at batch 32 and 256, on one process;
    per rank under 2-process DDP (CPU, gloo) by ``benchmarks/ddp_throughput.py``.
    Runs alternate (hand, eager, compiled, hand, ...) in this one process; each figure is
    the median over repeats of a run's steady state (its epochs after the first).
(b) A quick-schedule surgery run (Fashion-MNIST, 30 epochs, a generation every 5, with a
    checkpoint per epoch and an offline W&B logger) against plain training of its start
    topology for the same epochs, the run split into its parts by Lightning's
    ``SimpleProfiler`` (the ``surgery/*`` actions of the module and the loop).
(c) Peak memory of each run of (b): resident set size (sampled) and, on CUDA, the peak of
    allocated GPU memory.

Prints a table and writes ``bench.json``. Usage:

    python benchmarks/bench.py [--device cpu|cuda] [--repeats 3] [--out bench.json]

(``--skip ddp surgery --networks 10,10,10 --batches 32``: the throughput of one case.)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from ddp_throughput import StepRate  # this folder is on sys.path when run as a script
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.profilers import SimpleProfiler

from lit_surgery.core.network import build
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.topology import Topology
from lit_surgery.data import SurgeryDataModule
from lit_surgery.lightning.loop import attach
from lit_surgery.lightning.module import SurgeryModule

HERE = Path(__file__).parent
LR = 0.005
PARTS = {
    "branch training": ("run_training_batch",),
    "validation": (
        "[Strategy]SingleDeviceStrategy.validation_step",
        "[Strategy]DDPStrategy.validation_step",
    ),
    "screening": ("surgery/screening",),
    "SVD and criteria": ("surgery/criteria",),
    "operators": ("surgery/operators",),
    "evaluating branches": ("surgery/evaluate",),
    "re-wrapping and optimiser rebuild": ("surgery/rebuild",),
    "compilation": ("surgery/compile",),
    "checkpointing": ("save_checkpoint",),
    "logging": ("logging",),
}
"""The parts of a run: profiler actions whose durations add up to each."""


def steady_rate(epochs: list[tuple[int, float]]) -> float:
    """Steps per second over the epochs after the first (warm-up, compilation)."""
    steps = sum(s for s, _ in epochs[1:])
    return steps / sum(t for _, t in epochs[1:])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hand_loop(dm: SurgeryDataModule, hidden: list[int], epochs: int, device: torch.device) -> float:
    """Steps per second of the loop a user would write: SGD on index slices of device
    tensors, one shuffle per epoch."""
    s = dm.splits.to(device)
    torch.manual_seed(0)
    net = build(Topology.mlp(s.input_size, hidden, s.num_classes)).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    x, y, bs = s.x_train, s.y_train, dm.batch_size
    g = torch.Generator(device=device).manual_seed(0)
    timed: list[tuple[int, float]] = []
    for _ in range(epochs):
        _sync(device)
        start = time.perf_counter()
        perm = torch.randperm(len(y), generator=g, device=device)
        steps = 0
        for i in range(0, len(y) - bs + 1, bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        _sync(device)
        timed.append((steps, time.perf_counter() - start))
    return steady_rate(timed)


def _trainer(device: torch.device, epochs: int, root: str, **kwargs: Any) -> pl.Trainer:
    options: dict[str, Any] = dict(
        accelerator=device.type,
        devices=1,
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=root,
    )
    return attach(pl.Trainer(**{**options, **kwargs}))


def lightning_rate(
    dm: SurgeryDataModule, hidden: list[int], epochs: int, device: torch.device, compile: bool
) -> float:
    """Steps per second of the module's training phase (no surgery, validation or logs)."""
    settings = SurgerySettings(max_epochs=epochs, initial_epochs=epochs, epoch_step=1)
    model = SurgeryModule(
        hidden=hidden, surgery=settings, optimizer=partial(torch.optim.SGD, lr=LR), compile=compile
    )
    timer = StepRate()
    with tempfile.TemporaryDirectory() as root:
        _trainer(device, epochs, root, limit_val_batches=0, callbacks=[timer]).fit(model, dm)
    return steady_rate(timer.epochs)


def throughput(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    rows = []
    for hidden in args.networks:
        for batch in args.batches:
            dm = _datamodule(args, batch, steps_per_batch=32)
            rates: dict[str, list[float]] = {"hand": [], "eager": [], "compiled": []}
            measures = {
                "hand": partial(hand_loop, dm, hidden, args.epochs, device),
                "eager": partial(lightning_rate, dm, hidden, args.epochs, device, False),
                "compiled": partial(lightning_rate, dm, hidden, args.epochs, device, True),
            }
            errors = {}
            for _ in range(args.repeats):
                for name, measure in measures.items():
                    try:
                        rates[name].append(measure())
                    except Exception:  # one failing mode leaves the others' figures
                        errors[name] = traceback.format_exc()
                        rates[name].append(math.nan)
            median = {k: statistics.median(v) for k, v in rates.items()}
            row = {
                "hidden": hidden,
                "batch": batch,
                "steps_per_second": median,
                "eager/hand": median["eager"] / median["hand"],
                "compiled/hand": median["compiled"] / median["hand"],
                "repeats": rates,
                "errors": errors,
            }
            print(
                f"  {hidden} batch {batch}: hand {median['hand']:.0f}, eager "
                f"{median['eager']:.0f}, compiled {median['compiled']:.0f} steps/s",
                flush=True,
            )
            rows.append(row)
    return rows


def ddp_throughput(args: argparse.Namespace) -> dict[str, Any]:
    """Per-rank steps per second with 2 processes against 1 (CPU, gloo), via the script."""
    out = {}
    for compiled in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "ddp.json"
            command = [
                sys.executable,
                str(HERE / "ddp_throughput.py"),
                "--repeats",
                str(args.repeats),
                "--json",
                str(path),
            ]
            if compiled:
                command.append("--compile")
            subprocess.run(command, check=True)
            out["compiled" if compiled else "eager"] = json.loads(path.read_text())
    return out


# --------------------------------------------------------------------------- (b), (c)


class PeakMemory:
    """Peak resident set size while the block runs (sampled from /proc every 5 ms) and,
    on CUDA, the peak of allocated GPU memory."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rss = 0
        self.cuda = 0

    @staticmethod
    def _rss() -> int:
        with contextlib.suppress(OSError):
            pages = int(Path("/proc/self/statm").read_text().split()[1])
            return pages * 4096
        return 0

    @contextlib.contextmanager
    def measure(self) -> Iterator[PeakMemory]:
        stop = threading.Event()

        def sample() -> None:
            while not stop.wait(0.005):
                self.rss = max(self.rss, self._rss())

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            stop.set()
            thread.join()
            if self.device.type == "cuda":
                self.cuda = torch.cuda.max_memory_allocated(self.device)


def time_logging(logger: Any, profiler: SimpleProfiler) -> None:
    """Time ``logger``'s writes as the profiler action ``logging``."""
    for name in ("log_metrics", "log_table", "log_image"):
        original = getattr(logger, name, None)
        if original is None:  # e.g. CSVLogger has no tables or images
            continue

        def timed(*args: Any, _original: Any = original, **kwargs: Any) -> None:
            with profiler.profile("logging"):
                _original(*args, **kwargs)

        setattr(logger, name, timed)


def surgery_run(
    args: argparse.Namespace, device: torch.device, surgery: bool, epochs: int = 30
) -> dict[str, Any]:
    """A quick-schedule fit as a user runs it (checkpoint per epoch, W&B offline), with or
    without surgery (plain training of the start for the same epochs)."""
    schedule = (
        dict(max_epochs=epochs, initial_epochs=5, epoch_step=5)
        if surgery
        else dict(max_epochs=epochs, initial_epochs=epochs, epoch_step=1)
    )
    dm = _datamodule(args, 32, steps_per_batch=32)
    model = SurgeryModule(
        hidden=[10, 10, 10],
        surgery=SurgerySettings(**schedule),
        optimizer=partial(torch.optim.SGD, lr=LR),
        compile=args.compile,
    )
    memory = PeakMemory(device)
    with tempfile.TemporaryDirectory() as root:
        profiler = SimpleProfiler(dirpath=root, filename="profile")  # its report: a file
        logger = _logger(root)
        time_logging(logger, profiler)
        trainer = _trainer(
            device,
            epochs,
            root,
            logger=logger,
            profiler=profiler,
            callbacks=[ModelCheckpoint(dirpath=root, save_last=True)],
            enable_checkpointing=True,
        )
        start = time.perf_counter()
        with memory.measure():
            trainer.fit(model, dm)
        wall = time.perf_counter() - start
        if hasattr(logger.experiment, "finish"):
            logger.experiment.finish()
    durations = profiler.recorded_durations
    parts = {
        name: sum(sum(durations.get(a, [])) for a in actions) for name, actions in PARTS.items()
    }
    parts["branch training"] -= parts["compilation"]  # a step's first run compiles it
    parts["other"] = wall - sum(parts.values())
    return {
        "wall": wall,
        "parts": parts,
        "peak_rss": memory.rss,
        "peak_cuda": memory.cuda,
        "topology": model.topology.describe(),
        "epochs": trainer.current_epoch,
        "logger": type(trainer.logger).__name__,
    }


def surgery_runs(args: argparse.Namespace, device: torch.device) -> dict[str, list]:
    runs: dict[str, list] = {"plain": [], "surgery": []}
    surgery_run(args, device, False, epochs=1)  # warm-up: the logger's service, caches
    for _ in range(max(1, args.repeats // 2)):
        for kind in runs:
            runs[kind].append(surgery_run(args, device, kind == "surgery"))
    return runs


def _logger(root: str) -> Any:
    """W&B offline, as the CLI logs; a CSV logger where wandb is not installed."""
    try:
        import wandb  # noqa: F401
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(root)
    return WandbLogger(save_dir=root, offline=True, project="bench")


def _datamodule(args: argparse.Namespace, batch: int, steps_per_batch: int) -> SurgeryDataModule:
    dm = SurgeryDataModule(
        args.dataset, batch_size=batch, use_test_as_val=False, steps_per_batch=steps_per_batch
    )
    dm.setup("fit")
    return dm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--epochs", type=int, default=3, help="per throughput run (1 warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compile", default="auto", help="model.compile of the surgery run")
    parser.add_argument("--out", type=Path, default=Path("bench.json"))
    parser.add_argument("--skip", nargs="*", default=[], choices=["throughput", "ddp", "surgery"])
    parser.add_argument(
        "--networks",
        nargs="+",
        type=lambda widths: [int(w) for w in widths.split(",")],
        default=[[10, 10, 10], [256, 256]],
        help="hidden widths of the throughput runs' networks, e.g. 10,10,10 256,256",
    )
    parser.add_argument("--batches", nargs="+", type=int, default=[32, 256])
    args = parser.parse_args()
    args.compile = {"true": True, "false": False}.get(str(args.compile).lower(), args.compile)
    torch.set_num_threads(1)
    device = torch.device(args.device)
    report: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": 1,
    }
    sections = {
        "throughput": (
            "(a) training-phase throughput, one process",
            lambda: throughput(args, device),
        ),
        "ddp": ("(a) per rank under 2-process DDP (CPU, gloo)", lambda: ddp_throughput(args)),
        "surgery": (
            "(b) a quick-schedule run against plain training of its start",
            lambda: surgery_runs(args, device),
        ),
    }
    for name, (title, measure) in sections.items():
        if name in args.skip:
            continue
        print(title, flush=True)
        try:
            report[name] = measure()
        except Exception:  # keep the other sections' figures (a device run may not be repeatable)
            report.setdefault("errors", {})[name] = traceback.format_exc()
            print(report["errors"][name], file=sys.stderr, flush=True)
        args.out.write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"wrote {args.out}")


def print_table(report: dict[str, Any]) -> None:
    print(f"\ndevice: {report['device']}, torch {report['torch']}, one thread")
    for section, error in report.get("errors", {}).items():
        print(f"\n{section}: failed ({error.strip().splitlines()[-1]})")
    if "throughput" in report:
        print(
            "\n| network | batch | hand loop | Lightning eager | Lightning compiled "
            "| eager/hand | compiled/hand |"
        )
        print("|---|---|---|---|---|---|---|")
        for r in report["throughput"]:
            m = r["steps_per_second"]
            print(
                f"| {r['hidden']} | {r['batch']} | {m['hand']:.0f} | {m['eager']:.0f} | "
                f"{m['compiled']:.0f} | {r['eager/hand']:.2f} | {r['compiled/hand']:.2f} |"
            )
    if "ddp" in report:
        for kind, d in report["ddp"].items():
            print(f"\nDDP, {kind}: {json.dumps(d)}")
    if "surgery" in report:
        runs = report["surgery"]
        plain = statistics.median(r["wall"] for r in runs["plain"])
        surgery = statistics.median(r["wall"] for r in runs["surgery"])
        print(
            f"\nquick-schedule run: surgery {surgery:.1f} s, plain training of the start "
            f"{plain:.1f} s: {surgery / plain:.2f}x"
        )
        run = min(runs["surgery"], key=lambda r: abs(r["wall"] - surgery))
        print("| part | seconds | share |\n|---|---|---|")
        for name, seconds in run["parts"].items():
            print(f"| {name} | {seconds:.2f} | {seconds / run['wall']:.1%} |")
        machinery = run["wall"] - run["parts"]["branch training"] - run["parts"]["validation"]
        print(f"machinery beyond training and validation: {machinery / run['wall']:.1%}")
        for kind, rs in runs.items():
            print(
                f"peak memory, {kind}: {max(r['peak_rss'] for r in rs) / 2**20:.0f} MiB RSS"
                + (
                    f", {max(r['peak_cuda'] for r in rs) / 2**20:.0f} MiB CUDA"
                    if rs[0]["peak_cuda"]
                    else ""
                )
            )


if __name__ == "__main__":
    main()
