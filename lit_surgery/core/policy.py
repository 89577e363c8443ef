"""The evolutionary policy (docs/METHOD.md), independent of any training framework.

:class:`Surgeon` runs generations: propose candidates from the SVD criteria, select some
per type (plus a random one), screen each with a short re-training, score them, train the
best ``parallel_branches`` for a cycle, keep those that reach the previous best (else
retry with untried candidates). Training itself is delegated to two callables, so the
same policy runs in a plain loop (:mod:`lit_surgery.plain`) and in Lightning.

A branch that diverges (non-finite weights, or a non-finite metric, which the drivers
report for a non-finite training loss) is never kept and never wins: the generation falls
back to its parents, which no cycle trains (children are new networks), and a root that
diverges in its initial epochs to a snapshot of the untrained start network. Both are
recorded in :class:`History` (``diverged``, ``fallbacks``).

:meth:`SurgerySettings.paper` gives the reference's choices; the defaults keep the
reference's numbers but fix its known defects (see the field docs).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from lit_surgery.core.criteria import Candidate, best_per_type, propose
from lit_surgery.core.network import SurgeryNet, build
from lit_surgery.core.operators import Mutation, operator
from lit_surgery.core.optim_state import transfer_state
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.topology import Topology


def is_finite(net: torch.nn.Module) -> bool:
    """All parameters finite. Needed besides the metric: accuracy is finite-looking even
    when NaN weights make every logit NaN (``argmax`` then picks class 0)."""
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())


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


class TrainFn(Protocol):
    def __call__(self, branch: Branch, epochs: int) -> float:
        """Train ``branch.net`` in place for ``epochs`` epochs (possibly 0), updating
        ``branch.optimizer_state``, and return the validation metric (NaN if a training loss
        was not finite)."""


class ScreenFn(Protocol):
    def __call__(self, branch: Branch, batches: int) -> float:
        """Re-train ``branch.net`` in place for ``batches`` batches (possibly 0) and return
        the metric."""


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


GenerationCallback = Callable[[int, list[CandidateRecord], list[Branch]], None]


class Surgeon:
    """Runs the generations; owns the randomness (seeded) and the history."""

    def __init__(
        self,
        settings: SurgerySettings,
        train: TrainFn | None,
        screen: ScreenFn,
        *,
        seed: int = 0,
        on_generation: GenerationCallback | None = None,
    ) -> None:
        self.settings = settings
        self.train = train
        self.screen = screen
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.on_generation = on_generation
        self.history = History()
        self.start: dict[str, Any] | None = None
        """Topology and weights of the untrained root, until its initial training is over."""
        self._next_id = 0

    # ------------------------------------------------------------------ driving

    def run(self, net: SurgeryNet) -> Branch:
        """Train ``net`` and operate on it for the whole schedule; return the winner."""
        if self.train is None:
            raise RuntimeError("this Surgeon has no train callable; drive begin/conclude instead")
        s = self.settings
        root = self.new_root(net)
        root = self.conclude_initial(root, s.initial_epochs, self.train(root, s.initial_epochs))
        branches = [root]
        for generation in range(1, s.generations + 1):
            branches = self.generation(branches, generation)
        return self.winner(branches)

    def winner(self, branches: list[Branch]) -> Branch:
        """The best branch that has not diverged (the policy always keeps one)."""
        branches = [b for b in branches if not b.diverged]
        if not branches:
            raise ValueError("no branch left that has not diverged")
        if self.settings.select_by == "score" and all(b.score is not None for b in branches):
            return max(branches, key=lambda b: b.score)
        return max(branches, key=lambda b: -math.inf if b.metric is None else b.metric)

    def generation(self, branches: list[Branch], number: int) -> list[Branch]:
        """One whole generation from the surviving ``branches``; returns the new survivors."""
        if self.train is None:
            raise RuntimeError("this Surgeon has no train callable; drive begin/conclude instead")
        gen = self.begin(branches, number)
        while True:
            metrics = [self.train(b, gen.epochs) for b in gen.to_train]
            if self.conclude(gen, metrics):
                return gen.survivors

    def begin(self, branches: list[Branch], number: int) -> Generation:
        """Propose, select and screen; ``Generation.to_train`` (never empty) then needs a cycle
        of training (by the caller) before :meth:`conclude`. If every screened candidate
        diverged, unchanged copies of the parents are trained instead."""
        pool: list[tuple[Branch, Candidate]] = []
        for parent in branches:
            pool.append((parent, Candidate("B")))
            pool += [(parent, c) for c in self.propose(parent.net)]
        gen = Generation(
            number=number,
            epochs=self.settings.cycle_epochs(number),
            parents=list(branches),
            pool=pool,
            records=[self._record(number, parent, c) for parent, c in pool],
            untried=list(range(len(pool))),
            previous_best=max(b.metric for b in branches),
        )
        self._attempt(gen)
        if not gen.to_train:
            gen.to_train = [self._copy(gen, parent) for parent in gen.parents]
            self._fallback(
                gen,
                gen.parents,
                "every screened candidate diverged: the parents go on unchanged as "
                + ", ".join(f"#{b.id}" for b in gen.to_train),
            )
        return gen

    def conclude(self, gen: Generation, metrics: list[float]) -> bool:
        """Record the cycle's results for ``gen.to_train``. True when the generation is over
        (``gen.survivors`` set); False when a retry put new branches in ``gen.to_train``."""
        if len(metrics) != len(gen.to_train):
            raise ValueError(f"expected {len(gen.to_train)} metrics, got {len(metrics)}")
        for branch, metric in zip(gen.to_train, metrics, strict=True):
            self.record_training(branch, gen.epochs, metric)
            record = gen.record_of(branch)
            record.trained, record.metric = True, metric
        gen.trained += gen.to_train
        gen.to_train = []
        finite = [b for b in gen.trained if not b.diverged]
        kept = [b for b in finite if b.metric >= gen.previous_best]
        s = self.settings
        if not kept and self._can_retry(gen):
            self._attempt(gen)
            if gen.to_train:
                return False
        if s.random_walk:
            kept = finite
        if not kept and finite:
            kept = [max(finite, key=lambda b: b.metric)]
        if not kept:
            kept = list(gen.parents)
            self._fallback(gen, kept, "every trained branch diverged: the parents are kept")
        kept.sort(key=lambda b: b.metric, reverse=True)
        gen.survivors = kept[: s.parallel_branches]
        ids = {b.id for b in gen.survivors}
        for record in gen.records:
            record.kept = record.branch in ids
        self.history.candidates += gen.records
        if self.on_generation is not None:
            self.on_generation(gen.number, gen.records, gen.survivors)
        return True

    def state_dict(self) -> dict[str, Any]:
        """Randomness, ids and history: with the open generation's state, enough to resume."""
        return {
            "rng": self.rng.getstate(),
            "generator": self.generator.get_state(),
            "next_id": self._next_id,
            "history": self.history.to_dict(),
            "start": self.start,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.generator.set_state(state["generator"])
        self._next_id = state["next_id"]
        self.history = History.from_dict(state["history"])
        self.start = state.get("start")

    def new_root(self, net: SurgeryNet) -> Branch:
        """The branch that starts the lineage (before the initial epochs). Keeps a copy of
        ``net``: the root trains in place, and if it diverges the run restarts from it."""
        self.start = {
            "topology": net.topology.to_dict(),
            "weights": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        }
        return self._branch(net)

    def conclude_initial(self, root: Branch, epochs: int, metric: float) -> Branch:
        """Account for the root's initial training (``epochs`` epochs that ended at
        ``metric``) and return the first generation's parent: the root, or, if it diverged,
        a new branch with the untrained start network (evaluated by ``screen(branch, 0)``)."""
        self.record_training(root, epochs, metric)
        start, self.start = self.start, None
        if not root.diverged:
            return root
        if start is None:
            raise RuntimeError(f"root #{root.id} diverged and no start network was kept")
        net = build(Topology.from_dict(start["topology"]), like=root.net)
        net.load_state_dict(start["weights"])
        restored = self._branch(net)
        restored.metric = self.screen(restored, 0)
        self.history.node(restored)
        self.history.fallbacks.append(
            {
                "generation": 0,
                "kept": [restored.id],
                "reason": f"root #{root.id} diverged in its initial epochs: the untrained start "
                f"network goes on as #{restored.id}",
            }
        )
        return restored

    def propose(self, net: SurgeryNet) -> list[Candidate]:
        return propose(net, self.settings)

    # ------------------------------------------------------------------ steps

    def select(self, pool: list[tuple[Branch, Candidate]], untried: list[int]) -> list[int]:
        """Indices into ``pool``: every ``B``, the best of each other type, one random."""
        chosen = [i for i in untried if pool[i][1].op == "B"]
        by_type: dict[str, list[int]] = {}
        for i in untried:
            if pool[i][1].op != "B":
                by_type.setdefault(pool[i][1].op, []).append(i)
        for indices in by_type.values():
            best = best_per_type([pool[i][1] for i in indices], self.settings.ranking)[0]
            chosen.append(next(i for i in indices if pool[i][1] is best))
        rest = [i for i in untried if i not in chosen]
        if self.settings.include_random and rest:
            chosen.append(self.rng.choice(rest))
        return chosen

    def score(self, metric: float, parent_metric: float, param_ratio: float) -> float:
        if not math.isfinite(metric):
            return -math.inf
        if self.settings.score == "paper":
            return metric + math.exp(metric - parent_metric) * math.exp(-param_ratio)
        return metric - self.settings.size_penalty * math.log(param_ratio)

    def survivors(self, screened: list[Branch]) -> list[Branch]:
        """The best ``parallel_branches`` by score; with ``explore``, at most one ``B``."""
        ranked = sorted(
            (b for b in screened if math.isfinite(b.score)), key=lambda b: b.score, reverse=True
        )
        chosen: list[Branch] = []
        has_base = False
        for b in ranked:
            if len(chosen) == self.settings.parallel_branches:
                break
            if self.settings.explore and b.change.op == "B" and has_base:
                continue
            has_base |= b.change.op == "B"
            chosen.append(b)
        return chosen

    # ------------------------------------------------------------------ internals

    def _can_retry(self, gen: Generation) -> bool:
        s = self.settings
        return not s.random_walk and bool(gen.untried) and gen.attempt < s.max_retries

    def _attempt(self, gen: Generation) -> None:
        """Select from the untried candidates, screen them, queue the survivors; select
        again while every screened candidate diverged and retries are left."""
        gen.attempt += 1
        if self.settings.random_walk:
            i = self.rng.randrange(len(gen.pool))
            gen.untried.remove(i)
            parent, candidate = gen.pool[i]
            child = self._child(parent, candidate, gen.number)
            gen.records[i].attempt, gen.records[i].branch = gen.attempt, child.id
            gen.to_train = [child]
            return
        chosen = self.select(gen.pool, gen.untried)
        gen.untried = [i for i in gen.untried if i not in chosen]
        screened = []
        for i in chosen:
            parent, candidate = gen.pool[i]
            child = self._screen(parent, candidate, gen.number)
            record = gen.records[i]
            record.attempt, record.branch = gen.attempt, child.id
            record.screen_metric, record.score = child.metric, child.score
            screened.append(child)
        gen.to_train = self.survivors(screened)
        if not gen.to_train and self._can_retry(gen):
            self._attempt(gen)

    def _copy(self, gen: Generation, parent: Branch) -> Branch:
        """An unscreened ``B`` copy of ``parent``, recorded as a candidate of ``gen``."""
        candidate = Candidate("B")
        child = self._child(parent, candidate, gen.number)
        record = self._record(gen.number, parent, candidate)
        record.attempt, record.branch = gen.attempt, child.id
        gen.pool.append((parent, candidate))
        gen.records.append(record)
        self.history.node(child)
        return child

    def _fallback(self, gen: Generation, kept: list[Branch], reason: str) -> None:
        self.history.fallbacks.append(
            {"generation": gen.number, "kept": [b.id for b in kept], "reason": reason}
        )

    def _screen(self, parent: Branch, candidate: Candidate, generation: int) -> Branch:
        child = self._child(parent, candidate, generation)
        batches = self.settings.screen_batches[candidate.op]
        self.history.batches_screened += batches
        self._check(child, self.screen(child, batches), "screening")
        child.score = self.score(child.metric, parent.metric, candidate.param_ratio)
        self.history.node(child)
        return child

    def _child(self, parent: Branch, candidate: Candidate, generation: int) -> Branch:
        options = dict(candidate.options)
        if candidate.op == "AN":
            options.update(split=self.settings.split, generator=self.generator)
        mutation: Mutation = operator(candidate.op).apply(
            parent.net, candidate.layer, candidate.amount, **options
        )
        state = None
        if parent.optimizer_state is not None:
            shapes = [p.shape for p in parent.net.parameters()]
            state = transfer_state(parent.optimizer_state, mutation.param_map, shapes)
        return self._branch(
            mutation.net,
            parent=parent,
            generation=generation,
            change=candidate,
            optimizer_state=state,
        )

    def _branch(self, net: SurgeryNet, parent: Branch | None = None, **kw: Any) -> Branch:
        branch = Branch(
            self._next_id,
            net,
            None if parent is None else parent.id,
            epochs=0 if parent is None else parent.epochs,
            **kw,
        )
        self._next_id += 1
        return branch

    def record_training(self, branch: Branch, epochs: int, metric: float) -> None:
        """Account for ``epochs`` of training of ``branch`` that ended at ``metric``."""
        branch.epochs += epochs
        self.history.epochs_trained += epochs
        self._check(branch, metric, "training")
        self.history.node(branch)

    def _check(self, branch: Branch, metric: float, stage: str) -> None:
        """Set ``branch.metric``: NaN, and a ``diverged`` entry, if it or the weights are not
        finite."""
        branch.metric = metric
        if math.isfinite(metric) and is_finite(branch.net):
            return
        branch.metric = math.nan
        self.history.diverged.append(
            {
                "branch": branch.id,
                "parent": branch.parent,
                "generation": branch.generation,
                "epochs": branch.epochs,
                "stage": stage,
            }
        )

    def _record(self, generation: int, parent: Branch, c: Candidate) -> CandidateRecord:
        return CandidateRecord(
            generation, parent.id, c.op, c.layer, c.amount, c.weight, c.param_ratio, c.activation
        )


# ---------------------------------------------------------------------------- checkpoints
# Plain data (dicts, lists, numbers, strings, tensors): loads with torch.load(weights_only=True).


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
    from lit_surgery.core.network import build
    from lit_surgery.core.topology import Topology

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
    that live elsewhere, e.g. the Lightning module's population."""
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
