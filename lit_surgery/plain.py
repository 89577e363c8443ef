"""Surgery in a plain PyTorch loop: the reference driver for tests and quick runs.

Batches are index slices of tensors that stay on the device; every branch keeps its
optimiser state between cycles (carried across surgery by the policy), except in paper
mode, which re-creates the optimiser for every new network as the reference does.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from functools import partial

import torch
from torch import Tensor

from lit_surgery.core.network import SurgeryNet, build
from lit_surgery.core.packed import packable, train_packed
from lit_surgery.core.policy import Surgeon
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.state import Branch, CandidateRecord
from lit_surgery.core.topology import Topology
from lit_surgery.core.training import train_branch
from lit_surgery.data import TensorBatches, TensorSplits, digits, random_batches

OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
SGD_DEFAULTS = {"default": {"lr": 0.02, "momentum": 0.9}, "paper": {"lr": 0.005, "momentum": 0.0}}
"""``lr`` and ``momentum`` when not given, by paper mode: the reference trains with plain SGD
at 0.005 (the paper's example)."""


class PlainTrainer:
    """``train`` and ``screen`` callables for :class:`~lit_surgery.core.policy.Surgeon`."""

    def __init__(
        self,
        data: TensorSplits,
        *,
        batch_size: int = 32,
        optimizer: str = "sgd",
        lr: float = 0.005,
        momentum: float = 0.0,
        seed: int = 0,
        carry_state: bool = True,
    ) -> None:
        """``carry_state=False``: a branch's optimiser state ends with its cycle, so every new
        network (every candidate) starts with a fresh optimiser, as the reference compiles
        each new network with a new one; screening and the cycle after it share one."""
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.data = data
        self.batch_size = batch_size
        self.carry_state = carry_state
        kwargs = {"lr": lr, "momentum": momentum} if optimizer == "sgd" else {"lr": lr}
        self.optimizer = partial(OPTIMIZERS[optimizer], **kwargs)
        self.generator = torch.Generator(device=data.x_train.device).manual_seed(seed)
        # every epoch a fresh (seed, epoch) permutation, sliced on the device
        self.batches = TensorBatches(
            data.x_train, data.y_train, batch_size, shuffle=True, seed=seed
        )
        self.epoch = 0

    def _next_epoch(self) -> TensorBatches:
        """The batches, set to the run's next epoch."""
        self.batches.set_epoch(self.epoch)
        self.epoch += 1
        return self.batches

    def _epochs(self, epochs: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The batches of the next ``epochs`` epochs of the run."""
        for _ in range(epochs):
            yield from self._next_epoch()

    def train(self, branch: Branch, epochs: int) -> float:
        d = self.data
        metric = train_branch(branch, self.optimizer, self._epochs(epochs), d.x_val, d.y_val)
        if not self.carry_state:
            branch.optimizer_state = None  # its children start afresh
        return metric

    def train_epoch(self, branches: Sequence[Branch]) -> list[float]:
        """One epoch of each branch (the next epochs of the run, in the branches' order),
        as one packed network where :func:`~lit_surgery.core.packed.packable` allows: the
        same steps as :meth:`train` one after the other, at about one branch's overhead."""
        nets = [b.net for b in branches]
        if len(branches) == 1 or packable(nets, self.optimizer) is not None:
            return [self.train(b, 1) for b in branches]
        orders = [self._next_epoch().indices() for _ in branches]
        d = self.data
        rows = torch.stack(orders).to(d.x_train.device).split(self.batch_size, dim=1)
        metrics = train_packed(
            branches, self.optimizer, d.x_train, d.y_train, rows, d.x_val, d.y_val
        )
        if not self.carry_state:
            for b in branches:
                b.optimizer_state = None
        return metrics

    def screen(self, branch: Branch, batches: int) -> float:
        d = self.data
        chosen = random_batches(d.x_train, d.y_train, batches, self.batch_size, self.generator)
        return train_branch(branch, self.optimizer, chosen, d.x_val, d.y_val)


def format_generation(
    generation: int, records: list[CandidateRecord], survivors: list[Branch]
) -> str:
    screened = [r for r in records if r.screen_metric is not None]
    lines = [f"generation {generation}: {len(records)} candidates, {len(screened)} screened"]
    for r in sorted(screened, key=lambda r: r.score, reverse=True):
        change = (
            r.op if r.op == "B" else f"{r.op}@{r.layer}" + (f" x{r.amount}" if r.amount else "")
        )
        trained = f" -> trained {r.metric:.4f}" if r.trained else ""
        lines.append(
            f"  {'*' if r.kept else ' '} {change:<12} from #{r.parent:<3} q={r.param_ratio:5.2f} "
            f"screen={r.screen_metric:.4f} score={r.score:.4f}{trained}"
        )
    for b in survivors:
        lines.append(
            f"  kept #{b.id}: {b.net.topology.describe()} ({b.net.topology.num_params} "
            f"params) val={b.metric:.4f}"
        )
    return "\n".join(lines)


def format_divergence(diverged: list[dict], fallbacks: list[dict]) -> list[str]:
    """Lines for :attr:`History.diverged` and :attr:`History.fallbacks` entries."""
    lines = []
    if diverged:
        lines.append(
            "  diverged: "
            + ", ".join(
                f"#{d['branch']} (generation {d['generation']}, {d['stage']}, "
                f"after {d['epochs']} epochs)"
                for d in diverged
            )
        )
    lines += [f"  kept last good {f['kept']}: {f['reason']}" for f in fallbacks]
    return lines


def run(
    hidden: Sequence[int],
    settings: SurgerySettings,
    *,
    seed: int = 0,
    optimizer: str = "sgd",
    lr: float = 0.02,
    momentum: float = 0.9,
    batch_size: int = 32,
    carry_state: bool = True,
    verbose: bool = True,
) -> tuple[Branch, Surgeon]:
    """Surgery on digits from hidden widths ``hidden``; returns the winner and the surgeon.
    ``carry_state``: see :class:`PlainTrainer`."""
    torch.manual_seed(seed)
    data = digits(seed=seed)
    net: SurgeryNet = build(Topology.mlp(data.input_size, hidden, data.num_classes))
    trainer = PlainTrainer(
        data,
        batch_size=batch_size,
        optimizer=optimizer,
        lr=lr,
        momentum=momentum,
        seed=seed,
        carry_state=carry_state,
    )

    shown = [0, 0]  # history entries already printed: diverged, fallbacks

    def report(generation: int, records: list[CandidateRecord], survivors: list[Branch]) -> None:
        history = surgeon.history
        lines = format_divergence(history.diverged[shown[0] :], history.fallbacks[shown[1] :])
        shown[:] = len(history.diverged), len(history.fallbacks)
        if verbose:
            print(format_generation(generation, records, survivors), *lines, sep="\n", flush=True)

    surgeon = Surgeon(settings, trainer.train, trainer.screen, seed=seed, on_generation=report)
    return surgeon.run(net), surgeon


def main(
    hidden: Sequence[int],
    *,
    max_epochs: int,
    initial_epochs: int,
    epoch_step: int,
    paper: bool,
    random_walk: bool,
    optimizer: str,
    lr: float | None,
    momentum: float | None,
    batch_size: int,
    seed: int,
) -> None:
    """``lit-surgery plain`` (its options and defaults: :func:`lit_surgery.cli.plain_parser`):
    surgery on digits, then the winner and what it cost. ``paper``: the reference's choices
    (:meth:`SurgerySettings.paper`) and optimiser: ``lr`` and ``momentum`` default to
    :data:`SGD_DEFAULTS`'s, and every new network starts a fresh optimiser."""
    schedule = dict(
        max_epochs=max_epochs,
        initial_epochs=initial_epochs,
        epoch_step=epoch_step,
        random_walk=random_walk,
    )
    settings = SurgerySettings.paper(**schedule) if paper else SurgerySettings(**schedule)
    start = time.perf_counter()
    defaults = SGD_DEFAULTS["paper" if paper else "default"]
    best, surgeon = run(
        hidden,
        settings,
        seed=seed,
        optimizer=optimizer,
        lr=defaults["lr"] if lr is None else lr,
        momentum=defaults["momentum"] if momentum is None else momentum,
        batch_size=batch_size,
        carry_state=not paper,
    )
    elapsed = time.perf_counter() - start
    diverged = surgeon.history.diverged
    if diverged:
        ids = ", ".join(f"#{d['branch']}" for d in diverged)
        print(f"{len(diverged)} branches diverged and were dropped: {ids}")
    topo = best.net.topology
    print(f"final topology: {topo.describe()} widths={topo.widths} params={topo.num_params}")
    print(
        f"final validation accuracy: {best.metric:.4f} (branch #{best.id}, "
        f"{best.epochs} epochs in its lineage, {surgeon.history.epochs_trained} epochs "
        f"trained in all, {surgeon.history.batches_screened} screening batches, {elapsed:.1f} s)"
    )
