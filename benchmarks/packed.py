"""Packed branches against one after the other: steps per second of k MLP branches.

The plain trainer (and so the results grid) trains a cycle's branches as one packed network
(:mod:`lit_surgery.core.packed`). This prints what that saves: for each population, the
steps per second of one branch alone, of the k branches one after the other
(:func:`~lit_surgery.core.training.train_branch`), and packed
(:func:`~lit_surgery.core.packed.train_packed`), as the cost of k branches in units of one
branch's step. Eager SGD, one CPU thread, 784 inputs and 10 classes (Fashion-MNIST's
shapes, random data), batch 32; medians of interleaved repeats.

    python benchmarks/packed.py [--steps 1500] [--repeats 3] [--min-width 16]

``--min-width 1`` packs without :data:`~lit_surgery.core.packed.MIN_WIDTH`'s padding: run
both to see what it does on your machine's BLAS.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch

from lit_surgery.core.network import build
from lit_surgery.core.packed import MIN_WIDTH, packable, train_packed
from lit_surgery.core.state import Branch
from lit_surgery.core.topology import Topology
from lit_surgery.core.training import train_branch

POPULATIONS = {
    "[4,4,4] x2": ([4, 4, 4], [4, 4, 4]),
    "[10,10,10] x2": ([10, 10, 10], [10, 10, 10]),
    "[10,10,10] + [14,10,10,10]": ([10, 10, 10], [14, 10, 10, 10]),
    "[35,30,10] x2": ([35, 30, 10], [35, 30, 10]),
    "[132,132,132] x2": ([132, 132, 132], [132, 132, 132]),
    "[256,256] x2": ([256, 256], [256, 256]),
    "[10,10,10] x4": ([10, 10, 10],) * 4,
}


def rate(
    population: tuple[list[int], ...], how: str, steps: int, batch: int, min_width: int
) -> float:
    """Steps per second (one step: every branch of the population steps once)."""
    torch.manual_seed(0)
    x, y = torch.randn(4096, 784), torch.randint(0, 10, (4096,))
    nets = [build(Topology.mlp(784, h, 10)) for h in population]
    branches = [Branch(i, n) for i, n in enumerate(nets)]
    sgd = partial(torch.optim.SGD, lr=0.01)
    assert packable(nets, sgd) is None
    g = torch.Generator().manual_seed(0)
    orders = [torch.randint(0, len(x), (len(nets), batch), generator=g) for _ in range(steps)]
    start = time.perf_counter()
    if how == "packed":
        train_packed(branches, sgd, x, y, orders, x[:32], y[:32], min_width)
    else:
        for j, b in enumerate(branches[: 1 if how == "one" else None]):
            train_branch(b, sgd, ((x[o[j]], y[o[j]]) for o in orders), x[:32], y[:32])
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--min-width", type=int, default=MIN_WIDTH)
    args = parser.parse_args()
    if args.min_width < 1:
        parser.error(f"--min-width must be >= 1, got {args.min_width}")
    torch.set_num_threads(1)
    print(
        "| population | one branch (steps/s) | one after the other | packed "
        "| cost of the population in one branch's steps: one after the other, packed |"
    )
    print("| --- | --- | --- | --- | --- |")
    for name, population in POPULATIONS.items():
        runs: dict[str, list[float]] = {"one": [], "sequential": [], "packed": []}
        for _ in range(args.repeats):  # interleaved, so drifting load hits all three alike
            for how in runs:
                runs[how].append(rate(population, how, args.steps, args.batch, args.min_width))
        one, seq, packed = (statistics.median(runs[h]) for h in runs)
        print(
            f"| {name} | {one:,.0f} | {seq:,.0f} | {packed:,.0f} "
            f"| {one / seq:.2f}x, {one / packed:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
