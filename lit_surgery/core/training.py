"""Training and measuring one branch on tensors: what both drivers run to screen candidates
(and the plain driver to train), so that every branch is measured the same way."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lit_surgery.core.state import Branch

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


@torch.no_grad()
def evaluate(net: nn.Module, x: Tensor, y: Tensor, chunk: int = 4096) -> float:
    """Accuracy of ``net`` on ``(x, y)`` in eval mode, ``chunk`` samples at a time (memory);
    leaves the mode as it was."""
    was_training = net.training
    net.eval()
    correct = sum(
        int((net(xb).argmax(1) == yb).sum())
        for xb, yb in zip(x.split(chunk), y.split(chunk), strict=True)
    )
    net.train(was_training)
    return correct / len(y)


def train_branch(
    branch: Branch,
    optimizer: OptimizerFactory,
    batches: Iterable[tuple[Tensor, Tensor]],
    x_val: Tensor,
    y_val: Tensor,
) -> float:
    """One cross-entropy step per batch on ``branch.net``, by a new ``optimizer`` that
    continues ``branch.optimizer_state`` (left updated on the branch). Returns the
    validation accuracy, or NaN (diverged) if a training loss was not finite."""
    net = branch.net
    opt = optimizer(net.parameters())
    if branch.optimizer_state is not None:
        opt.load_state_dict(branch.optimizer_state)
    net.train()
    # summed on the device: no step waits for a host sync; finite iff every loss was
    total = torch.zeros((), device=x_val.device)
    for x, y in batches:
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.detach()
    branch.optimizer_state = opt.state_dict()
    return evaluate(net, x_val, y_val) if bool(torch.isfinite(total)) else math.nan
