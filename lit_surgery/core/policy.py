"""The evolutionary policy (docs/METHOD.md), independent of any training framework.

:class:`Surgeon` runs generations: propose candidates from the SVD criteria, select some
per type (plus a random one), screen each with a short re-training, score them, train the
best ``parallel_branches`` for a cycle, keep those that reach the previous best (else
retry with untried candidates).

It is also the run's state machine, driven by two calls: :meth:`Surgeon.start` and
:meth:`Surgeon.step` each return a :class:`Plan`, the branches to train next and for how
many epochs; the driver trains them and reports their validation metrics to ``step``. The
plain loop (:meth:`Surgeon.run`, :mod:`lit_surgery.plain`) and the LightningModule (at its
generation boundaries) drive the same machine; screening, which happens inside a step, is
delegated to a callable.

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
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch

from lit_surgery.core.criteria import Candidate, best_per_type, propose
from lit_surgery.core.network import SurgeryNet, build
from lit_surgery.core.operators import Mutation, operator, shrink_perturb_
from lit_surgery.core.optim_state import transfer_state
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.state import (
    Branch,
    CandidateRecord,
    Generation,
    History,
    branch_from_state,
    branch_state,
    generation_from_state,
    generation_state,
)
from lit_surgery.core.topology import Topology


def is_finite(net: torch.nn.Module) -> bool:
    """All parameters finite. Needed besides the metric: accuracy is finite-looking even
    when NaN weights make every logit NaN (``argmax`` then picks class 0)."""
    return all(bool(torch.isfinite(p).all()) for p in net.parameters())


class TrainFn(Protocol):
    def __call__(self, branch: Branch, epochs: int) -> float:
        """Train ``branch.net`` in place for ``epochs`` epochs (possibly 0), updating
        ``branch.optimizer_state``, and return the validation metric (NaN if a training loss
        was not finite)."""


class ScreenFn(Protocol):
    def __call__(self, branch: Branch, batches: int) -> float:
        """Re-train ``branch.net`` in place for ``batches`` batches (possibly 0) and return
        the metric."""


PlanKind = Literal["initial", "generation", "retry", "end"]


@dataclass(frozen=True)
class Plan:
    """What the driver does next: train each of ``branches`` for ``epochs`` epochs, then
    report their metrics, in order, to :meth:`Surgeon.step`.

    ``kind`` says why: ``initial`` (the root's first epochs), ``generation`` (generation
    ``generation`` begins), ``retry`` (its untried candidates get a cycle, which lengthens
    the run) or ``end`` (``branches`` is the winner alone; nothing more to train).
    """

    kind: PlanKind
    generation: int
    branches: list[Branch]
    epochs: int


GenerationCallback = Callable[[int, list[CandidateRecord], list[Branch]], None]
Profile = Callable[[str], AbstractContextManager[Any]]


class Surgeon:
    """Runs the generations; owns the randomness (seeded), the history and the run's state:
    the ``branches`` in training, the ``open`` generation, the epoch at which the current
    cycle ends (``next_boundary``, counted from the start; ``None`` before :meth:`start` and
    after the end), the epochs that retries added and the generations done."""

    def __init__(
        self,
        settings: SurgerySettings,
        train: TrainFn | None,
        screen: ScreenFn,
        *,
        seed: int = 0,
        on_generation: GenerationCallback | None = None,
        profile: Profile | None = None,
    ) -> None:
        self.settings = settings
        self.profile: Profile = profile or (lambda action: nullcontext())
        """Times the parts of surgery (``criteria``, ``operators``, ``screening``): e.g.
        a Lightning profiler's ``profile``; by default nothing is timed."""
        self.train = train
        self.screen = screen
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.on_generation = on_generation
        self.history = History()
        self.start_net: dict[str, Any] | None = None
        """Topology and weights of the untrained root, until its initial training is over."""
        self._next_id = 0
        self.branches: list[Branch] = []
        self.open: Generation | None = None
        self.next_boundary: int | None = None
        self.extra_epochs = 0
        self.done_generations = 0

    # ------------------------------------------------------------------ driving

    def run(self, net: SurgeryNet) -> Branch:
        """Train ``net`` and operate on it for the whole schedule; return the winner."""
        if self.train is None:
            raise RuntimeError("this Surgeon has no train callable; drive start/step instead")
        plan = self.start(net)
        while plan.kind != "end":
            plan = self.step([self.train(b, plan.epochs) for b in plan.branches])
        return plan.branches[0]

    def start(self, net: SurgeryNet) -> Plan:
        """Begin a run from ``net`` (the root): the plan trains it for the initial epochs."""
        if self.branches:
            raise RuntimeError("this Surgeon has started its run already")
        root = self.new_root(net)
        return self._plan("initial", 0, [root], self.settings.initial_epochs, at=0)

    def step(self, metrics: Sequence[float]) -> Plan:
        """Conclude the cycle that trained :attr:`branches` (which ended at ``metrics``, in
        order): concludes the initial epochs or the open generation, which may retry, begins
        the next generation or ends the run with the winner. Returns what to train next."""
        if self.next_boundary is None:
            raise RuntimeError("no cycle is planned: call start() first; after the end, none")
        if len(metrics) != len(self.branches):
            raise ValueError(f"expected {len(self.branches)} metrics, got {len(metrics)}")
        at, gen = self.next_boundary, self.open
        if gen is None:  # the root's initial epochs are over
            (root,), (metric,) = self.branches, metrics
            branches = [self.conclude_initial(root, self.settings.initial_epochs, metric)]
        elif not self.conclude(gen, list(metrics)):
            self.extra_epochs += gen.epochs  # another cycle, for the retry's branches
            return self._plan("retry", gen.number, gen.to_train, gen.epochs, at)
        else:
            branches, self.open = gen.survivors, None
            self.done_generations += 1
        if self.done_generations < self.settings.generations:
            gen = self.open = self.begin(branches, self.done_generations + 1)
            return self._plan("generation", gen.number, gen.to_train, gen.epochs, at)
        return self._plan("end", self.done_generations, [self.winner(branches)], 0, None)

    @property
    def planned_epochs(self) -> int:
        """The run's length: the schedule plus the cycles that retries added."""
        return self.settings.max_epochs + self.extra_epochs

    def _plan(
        self, kind: PlanKind, generation: int, branches: list[Branch], epochs: int, at: int | None
    ) -> Plan:
        self.branches = list(branches)
        self.next_boundary = None if at is None else at + epochs
        return Plan(kind, generation, self.branches, epochs)

    def winner(self, branches: list[Branch]) -> Branch:
        """The best branch that has not diverged (the policy always keeps one): by metric, or
        with ``select_by: score`` by the score of its last cycle (:meth:`conclude`)."""
        branches = [b for b in branches if not b.diverged]
        if not branches:
            raise ValueError("no branch left that has not diverged")
        if self.settings.select_by == "score" and all(b.score is not None for b in branches):
            return max(branches, key=lambda b: b.score)
        return max(branches, key=lambda b: -math.inf if b.metric is None else b.metric)

    def begin(self, branches: list[Branch], number: int) -> Generation:
        """Propose, select and screen; ``Generation.to_train`` (never empty) then needs a cycle
        of training (by the caller) before :meth:`conclude`. If every screened candidate
        diverged, unchanged copies of the parents are trained instead."""
        pool: list[tuple[Branch, Candidate]] = []
        for parent in branches:
            proposed = self.propose(parent.net)
            if not (self.settings.widen_only and proposed):
                pool.append((parent, Candidate("B")))
            pool += [(parent, c) for c in proposed]
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
        parents = {p.id: p.metric for p in gen.parents}
        for branch, metric in zip(gen.to_train, metrics, strict=True):
            before = parents[branch.parent] if branch.metric is None else branch.metric
            self.record_training(branch, gen.epochs, metric)
            # as the reference re-scores after every training: what select_by "score" uses
            branch.score = self.score(branch.metric, before, branch.change.param_ratio)
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
        """The whole state as plain data, enough to resume the run: randomness, ids, history
        and the start network under ``surgeon``; beside it the run's state (the layout of
        checkpoint version 1, whose other entries are the LightningModule's)."""
        return {
            "surgeon": {
                "rng": self.rng.getstate(),
                "generator": self.generator.get_state(),
                "next_id": self._next_id,
                "history": self.history.to_dict(),
                "start": self.start_net,
            },
            "generation": None if self.open is None else generation_state(self.open),
            "population": [branch_state(b) for b in self.branches],
            "next_boundary": self.next_boundary,
            "extra_epochs": self.extra_epochs,
            "done_generations": self.done_generations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s data (other entries are ignored); the branches that
        the open generation trains are the population's objects, networks included."""
        own = state["surgeon"]
        version, internal, gauss = own["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.generator.set_state(own["generator"])
        self._next_id = own["next_id"]
        self.history = History.from_dict(own["history"])
        self.start_net = own.get("start")
        population = [branch_from_state(b) for b in state["population"]]
        self.open = None
        if state["generation"] is not None:
            self.open = generation_from_state(
                state["generation"], {b.id: b.net for b in population}
            )
            by_id = {b.id: b for b in self.open.to_train}
            population = [by_id.get(b.id, b) for b in population]
        self.branches = population
        self.next_boundary = state["next_boundary"]
        self.extra_epochs = state["extra_epochs"]
        self.done_generations = state["done_generations"]

    def new_root(self, net: SurgeryNet) -> Branch:
        """The branch that starts the lineage (before the initial epochs). Keeps a copy of
        ``net``: the root trains in place, and if it diverges the run restarts from it."""
        self.start_net = {
            "topology": net.topology.to_dict(),
            "weights": {k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        }
        return self._branch(net)

    def conclude_initial(self, root: Branch, epochs: int, metric: float) -> Branch:
        """Account for the root's initial training (``epochs`` epochs that ended at
        ``metric``) and return the first generation's parent: the root, or, if it diverged,
        a new branch with the untrained start network (evaluated by ``screen(branch, 0)``)."""
        self.record_training(root, epochs, metric)
        start, self.start_net = self.start_net, None
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
        with self.profile("criteria"):
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

    def pick_to_train(self, screened: list[Branch]) -> list[Branch]:
        """The screened branches that get a training cycle: the best ``parallel_branches`` by
        score; with ``explore``, at most one ``B``."""
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
        """Select from the untried candidates, screen them, queue the best; select
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
        gen.to_train = self.pick_to_train(screened)
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
        with self.profile("screening"):
            metric = self.screen(child, batches)
        self._check(child, metric, "screening")
        child.score = self.score(child.metric, parent.metric, candidate.param_ratio)
        self.history.node(child)
        return child

    def _child(self, parent: Branch, candidate: Candidate, generation: int) -> Branch:
        options = dict(candidate.options)
        if candidate.op == "AN":
            options.update(split=self.settings.split, generator=self.generator)
        with self.profile("operators"):
            mutation: Mutation = operator(candidate.op).apply(
                parent.net, candidate.layer, candidate.amount, **options
            )
            s = self.settings
            if candidate.op != "B" and (s.perturb_shrink != 1 or s.perturb_noise != 0):
                shrink_perturb_(mutation.net, s.perturb_shrink, s.perturb_noise, self.generator)
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
