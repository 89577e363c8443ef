"""What the policy keeps between its steps, and its plain-data form.

A :class:`Branch` is a network in training; a :class:`Generation` holds one generation
between its phases; :class:`CandidateRecord` and :class:`History` are what the policy
decided, for logs and tables. The ``*_state`` functions turn branches and an open generation
into plain data (dicts, lists, numbers, strings, tensors) for checkpoints and DDP
broadcasts: it loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lit_surgery.core.criteria import Candidate
from lit_surgery.core.network import SurgeryNet, build
from lit_surgery.core.topology import Topology


@dataclass
class Branch:
    """A network being trained, with what the training callables need to continue it."""

    id: int
    net: SurgeryNet
    parent: int | None = None
    generation: int = 0
    change: Candidate = field(default_factory=lambda: Candidate("B"))
    optimizer_state: dict[str, Any] | None = None
    metric: float | None = None
    score: float | None = None
    epochs: int = 0

    @property
    def diverged(self) -> bool:
        """Its last metric is NaN: set so by the policy for non-finite weights or metrics."""
        return self.metric is not None and math.isnan(self.metric)


@dataclass
class CandidateRecord:
    """One proposed candidate and what became of it (plain data, for logs and tables)."""

    generation: int
    parent: int
    op: str
    layer: int | None
    amount: int
    weight: float
    param_ratio: float
    activation: str | None = None
    attempt: int | None = None
    """Selection round that screened it (0, then retries); ``None``: not screened."""
    branch: int | None = None
    screen_metric: float | None = None
    score: float | None = None
    trained: bool = False
    metric: float | None = None
    kept: bool = False


@dataclass
class History:
    """Everything the policy decided, as plain data."""

    candidates: list[CandidateRecord] = field(default_factory=list)
    genealogy: dict[int, dict[str, Any]] = field(default_factory=dict)
    epochs_trained: int = 0
    batches_screened: int = 0
    diverged: list[dict[str, Any]] = field(default_factory=list)
    """One entry per branch that diverged: ``branch``, ``parent``, ``generation``, ``epochs``
    (its lineage's, when found) and ``stage`` (``training`` or ``screening``)."""
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    """Each time the last good networks were kept instead: ``generation``, ``kept`` (ids)
    and ``reason``."""

    def node(self, branch: Branch) -> None:
        self.genealogy[branch.id] = {
            "parent": branch.parent,
            "generation": branch.generation,
            "change": branch.change.describe(),
            "topology": branch.net.topology.to_dict(),
            "num_params": branch.net.topology.num_params,
            "metric": branch.metric,
            "epochs": branch.epochs,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> History:
        return cls(
            [CandidateRecord(**c) for c in data["candidates"]],
            {int(k): v for k, v in data["genealogy"].items()},
            data["epochs_trained"],
            data["batches_screened"],
            list(data.get("diverged", [])),
            list(data.get("fallbacks", [])),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "candidates": [asdict(c) for c in self.candidates],
            "genealogy": {str(k): v for k, v in self.genealogy.items()},
            "epochs_trained": self.epochs_trained,
            "batches_screened": self.batches_screened,
            "diverged": list(self.diverged),
            "fallbacks": list(self.fallbacks),
        }


@dataclass
class Generation:
    """The state of one generation between its phases (begin, train, conclude)."""

    number: int
    epochs: int
    parents: list[Branch]
    pool: list[tuple[Branch, Candidate]]
    records: list[CandidateRecord]
    untried: list[int]
    previous_best: float
    attempt: int = -1
    to_train: list[Branch] = field(default_factory=list)
    trained: list[Branch] = field(default_factory=list)
    survivors: list[Branch] = field(default_factory=list)

    def record_of(self, branch: Branch) -> CandidateRecord:
        return next(r for r in self.records if r.branch == branch.id)


def branch_state(branch: Branch) -> dict[str, Any]:
    return {
        "id": branch.id,
        "parent": branch.parent,
        "generation": branch.generation,
        "change": branch.change.to_dict(),
        "topology": branch.net.topology.to_dict(),
        "weights": {k: v.detach().clone() for k, v in branch.net.state_dict().items()},
        "optimizer_state": branch.optimizer_state,
        "metric": branch.metric,
        "score": branch.score,
        "epochs": branch.epochs,
    }


def branch_from_state(state: dict[str, Any]) -> Branch:
    net = build(Topology.from_dict(state["topology"]))
    net.load_state_dict(state["weights"])
    return Branch(
        state["id"],
        net,
        state["parent"],
        state["generation"],
        Candidate(**state["change"]),
        state["optimizer_state"],
        state["metric"],
        state["score"],
        state["epochs"],
    )


def generation_state(gen: Generation) -> dict[str, Any]:
    branches = {b.id: b for b in [*gen.parents, *gen.to_train, *gen.trained]}
    return {
        "number": gen.number,
        "epochs": gen.epochs,
        "attempt": gen.attempt,
        "previous_best": gen.previous_best,
        "untried": list(gen.untried),
        "branches": [branch_state(b) for b in branches.values()],
        "parents": [b.id for b in gen.parents],
        "pool": [[p.id, c.to_dict()] for p, c in gen.pool],
        "records": [asdict(r) for r in gen.records],
        "to_train": [b.id for b in gen.to_train],
        "trained": [b.id for b in gen.trained],
    }


def generation_from_state(
    state: dict[str, Any], nets: dict[int, SurgeryNet] | None = None
) -> Generation:
    """Rebuild a generation; ``nets`` (by branch id) replaces the stored networks of branches
    that live elsewhere, e.g. the population being trained."""
    branches = {s["id"]: branch_from_state(s) for s in state["branches"]}
    for i, net in (nets or {}).items():
        branches[i].net = net
    return Generation(
        number=state["number"],
        epochs=state["epochs"],
        parents=[branches[i] for i in state["parents"]],
        pool=[(branches[i], Candidate(**c)) for i, c in state["pool"]],
        records=[CandidateRecord(**r) for r in state["records"]],
        untried=list(state["untried"]),
        previous_best=state["previous_best"],
        attempt=state["attempt"],
        to_train=[branches[i] for i in state["to_train"]],
        trained=[branches[i] for i in state["trained"]],
    )
