"""The surgery settings: every number and choice of the method, checked on construction.

Each setting is declared once, as a typed field with its default (and, for numbers, its
range): the choices are ``Literal`` types, so LightningCLI lists and checks them, and
:meth:`SurgerySettings.validate` derives its checks and messages from the same declarations.
"""

from __future__ import annotations

import math
from dataclasses import Field, asdict, dataclass, field, fields, replace
from typing import Any, Literal, get_args, get_origin, get_type_hints

from lit_surgery.core.operators import OPERATOR_CODES
from lit_surgery.errors import UserError

SvSource = Literal["incoming", "outgoing"]
Ranking = Literal["modest", "bottleneck", "paper"]
AlActivation = Literal["auto", "linear"]
Split = Literal["asymmetric", "equal", "fresh"]
Score = Literal["paper", "log"]
SelectBy = Literal["accuracy", "score"]
Criterion = Literal["exact", "paper"]
SCREEN_BATCHES = {"B": 1, "AN": 1, "AL": 1, "T": 1, "RL": 10, "OL": 10}


class SettingsError(UserError):
    """An invalid surgery setting; the message names it and what is allowed."""


@dataclass(frozen=True)
class Bounds:
    """The numbers a setting allows: ``low <= x <= high`` (``low < x`` if ``open_low``)."""

    low: float
    high: float = math.inf
    open_low: bool = False

    def admits(self, value: Any, kind: type) -> bool:
        number = (int,) if kind is int else (int, float)
        return (
            isinstance(value, number)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (self.low < value if self.open_low else self.low <= value)
            and value <= self.high
        )

    def describe(self, kind: type) -> str:
        if self.high == math.inf:
            noun = "an integer" if kind is int else "a finite number"
            return f"{noun} {'>' if self.open_low else '>='} {self.low}"
        return f"a number in {'(' if self.open_low else '['}{self.low}, {self.high}]"


def _number(
    default: float | None, low: float, high: float = math.inf, open_low: bool = False
) -> Any:
    return field(default=default, metadata={"bounds": Bounds(low, high, open_low)})


def _rejects(value: Any, hint: Any, spec: Field[Any]) -> str | None:
    """What ``spec``'s setting allows, if ``value`` (of type ``hint``) is not that; else None."""
    if type(None) in get_args(hint):  # optional: None, or what the other type allows
        if value is None:
            return None
        (hint,) = (a for a in get_args(hint) if a is not type(None))
        allowed = _rejects(value, hint, spec)
        return None if allowed is None else f"{allowed}, or null (no limit)"
    if get_origin(hint) is Literal:
        return None if value in get_args(hint) else f"one of {get_args(hint)}"
    if hint is bool:
        return None if isinstance(value, bool) else "true or false"
    bounds: Bounds = spec.metadata["bounds"]
    if get_origin(hint) is not dict:
        return None if bounds.admits(value, hint) else bounds.describe(hint)
    keys, kind = spec.metadata["keys"], get_args(hint)[1]
    if unknown := sorted(set(value) - set(keys)):
        return f"keys among {list(keys)}, not {unknown}"
    if all(bounds.admits(v, kind) for v in value.values()):
        return None
    return f"{bounds.describe(kind)} per operator type"


@dataclass
class SurgerySettings:
    """Every number and choice of the method. Defaults: the reference's numbers, our fixes.

    Args:
        epoch_step: epochs per cycle (a generation every ``epoch_step`` epochs).
        initial_epochs: plain training before the first generation.
        max_epochs: total epochs of the resulting network's lineage.
        parallel_branches: branches trained and kept per generation.
        max_retries: re-selections from untried candidates when no survivor reaches the
            previous best (so at most ``max_retries + 1`` selection rounds; the reference's
            ``max_retries_per_epoch`` counts the rounds, the first included: ``paper()`` sets
            2 for its 3). Each retry is another cycle of training; the default allows one:
            on Fashion-MNIST's quick schedule, 1 ended every run where 3 did (or higher)
            at 4-25% less CPU time, 0 lost 0.011 from [4,4,4] (docs/METHOD.md).
        include_random: also screen one candidate drawn uniformly from the unselected.
        sv_threshold_abs: singular values below this count as removable units.
        sv_threshold_rel: ... or below this times the largest singular value.
        add_fraction: AN adds ``max(add_min, width * add_fraction)`` units ...
        add_multiplier: ... and, as a second candidate, this many times that.
        add_min: the fewest units AN adds (so a narrow layer can grow by more than a few).
        screen_batches: re-training batches per operator type before screening.
        type_weights: multipliers of each operator type's ranking weight.
        sv_source: singular values of the matrix entering the layer (``incoming``, the one
            OL and T decompose) or leaving it (``outgoing``, the reference).
        ranking: ``bottleneck`` breaks weight ties towards widening the layer with the most
            inputs per unit, then towards the smaller change; ``modest`` only towards the
            smaller change; ``paper`` towards the larger network.
        al_activation: ``auto`` inserts a ReLU identity layer after ReLU/sigmoid layers
            (real depth, still exact), else linear; ``linear`` always (the reference).
        split: AN's split of units: ``asymmetric`` shares (copies differ), ``equal``
            (copies stay identical forever, the reference), or ``fresh`` (each unit split at
            most once, the other new units with default initial incoming weights and zero
            outgoing weights: no unit moves many times as fast as before, ``grow()``).
        criterion: ``exact``: singular values padded with zeros to the layer's width (a layer
            wider than its matrix's rank has that many exactly removable directions), ``q``
            the exact parameter ratio, and ``T`` only where it saves parameters; ``paper``
            (the reference): at most ``min(n_i, n_(i+1))`` singular values, ``q`` as the
            reference estimates it (it breaks ranking ties and enters the score), and ``T``
            also where it saves none.
        score: ``paper``: ``v + exp(v - v_parent) exp(-q)``; ``log``:
            ``v - size_penalty * ln q``, where a doubling costs ``0.69 * size_penalty``.
        size_penalty: weight of the size term of the ``log`` score.
        explore: at most one unchanged (``B``) branch survives a generation, so every
            generation trains at least one real change. The reference lets both slots go
            to copies.
        select_by: the final winner by validation ``accuracy`` or by ``score`` (reference), the
            score of its last cycle: ``v_parent`` is its metric before the cycle.
        random_walk: the ablation baseline: one random candidate per generation, no
            screening.
        widen_only: only AN is proposed, on layers narrower than ``add_min``, and an unchanged
            copy (``B``) competes only where no AN is: every generation widens a narrow layer
            until none is left. For a start too small to learn, where screening prefers the
            cheap AL or no change (``grow()``).
        perturb_shrink: after every change (not ``B``), each weight and bias becomes
            ``perturb_shrink * theta + perturb_noise * theta0``, ``theta0`` a fresh default
            initialisation ("shrink and perturb"): a widened network then generalises more
            like one trained from the start; 1 and 0 (the defaults): off, changes stay exact.
        perturb_noise: see ``perturb_shrink``.
        max_params: a size budget: no candidate with more parameters is proposed (except
            shrinking ones, so a start above the budget can come down to it); ``None``: no
            limit.
    """

    epoch_step: int = _number(10, 1)
    initial_epochs: int = _number(10, 0)
    max_epochs: int = _number(100, 0)  # and >= initial_epochs
    parallel_branches: int = _number(2, 1)
    max_retries: int = _number(1, 0)
    include_random: bool = True
    sv_threshold_abs: float = _number(0.3, 0)
    sv_threshold_rel: float = _number(5e-3, 0, 1)
    add_fraction: float = _number(0.1, 0, 10, open_low=True)
    add_multiplier: int = _number(10, 1)
    add_min: int = _number(2, 1)
    screen_batches: dict[str, int] = field(
        default_factory=SCREEN_BATCHES.copy, metadata={"bounds": Bounds(0), "keys": OPERATOR_CODES}
    )
    type_weights: dict[str, float] = field(
        default_factory=dict, metadata={"bounds": Bounds(0), "keys": OPERATOR_CODES[1:]}
    )
    sv_source: SvSource = "incoming"
    ranking: Ranking = "bottleneck"
    criterion: Criterion = "exact"
    al_activation: AlActivation = "auto"
    split: Split = "asymmetric"
    score: Score = "log"
    size_penalty: float = _number(0.003, 0)
    explore: bool = True
    select_by: SelectBy = "accuracy"
    random_walk: bool = False
    widen_only: bool = False
    perturb_shrink: float = _number(1.0, 0, 1, open_low=True)
    perturb_noise: float = _number(0.0, 0)
    max_params: int | None = _number(None, 1)

    def __post_init__(self) -> None:
        self.screen_batches = {**SCREEN_BATCHES, **dict(self.screen_batches)}
        self.type_weights = dict(self.type_weights)
        self.validate()

    @classmethod
    def paper(cls, **overrides: Any) -> SurgerySettings:
        """The reference's choices wherever they change outcomes, except where it is broken
        (docs/METHOD.md, "Paper mode and the reference")."""
        choices = dict(
            max_retries=2,
            sv_source="outgoing",
            criterion="paper",
            ranking="paper",
            al_activation="linear",
            split="equal",
            score="paper",
            explore=False,
            select_by="score",
        )
        return cls(**{**choices, **overrides})

    @classmethod
    def shrink(cls, **overrides: Any) -> SurgerySettings:
        """For a start that is larger than it needs to be: a singular value below 40% of its
        layer's largest counts as removable (so OL, T and RL are proposed after a few
        epochs, when the defaults' thresholds still see none), every halving of the size is
        worth 0.014 accuracy in the score, and the winner is picked by that score. Give
        ``max_params`` the start's size so that no branch grows past it (docs/RESULTS.md)."""
        choices = dict(sv_threshold_rel=0.4, size_penalty=0.02, select_by="score")
        return cls(**{**choices, **overrides})

    @classmethod
    def grow(cls, **overrides: Any) -> SurgerySettings:
        """For a start that is too small: each generation widens one layer narrower than 128
        units by 128 (the defaults add 2 to a layer of 4), until none is that narrow: the
        layer with the most inputs per unit first, as no unit counts as removable (thresholds
        0) and no random candidate competes; one branch and no retries, so a run trains the
        schedule's epochs once. ``split="fresh"``: splitting 4 units into 132 (33 copies each)
        collapsed training on 2 of 3 seeds. A generation every epoch from the first, so the
        final width trains almost as long as a network built at that width, and shrink and
        perturb (0.5, 0.5) after each widening: grown networks ended 0.007-0.008 below
        their topology trained from scratch without both. The perturbation slows the
        network for a while: with a small learning rate on little data (digits, 0.01) it did
        not recover; ``perturb_shrink=1, perturb_noise=0`` turns it off (docs/METHOD.md,
        "Growing a start that is too small")."""
        choices = dict(
            initial_epochs=1,
            epoch_step=1,
            perturb_shrink=0.5,
            perturb_noise=0.5,
            parallel_branches=1,
            max_retries=0,
            include_random=False,
            sv_threshold_abs=0.0,
            sv_threshold_rel=0.0,
            add_min=128,
            add_multiplier=2,
            split="fresh",
            widen_only=True,
        )
        return cls(**{**choices, **overrides})

    def replace(self, **changes: Any) -> SurgerySettings:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        """Raise :class:`SettingsError` naming the first setting its declaration rejects."""
        hints = get_type_hints(type(self))
        for spec in fields(self):
            value = getattr(self, spec.name)
            if (allowed := _rejects(value, hints[spec.name], spec)) is not None:
                raise SettingsError(f"{spec.name}={value!r} is invalid: {allowed}")
        if self.max_epochs < self.initial_epochs:
            raise SettingsError(
                f"max_epochs={self.max_epochs!r} is invalid: "
                f"an integer >= initial_epochs ({self.initial_epochs})"
            )

    @property
    def generations(self) -> int:
        """Number of generations in the schedule (the last cycle may be shorter)."""
        return math.ceil((self.max_epochs - self.initial_epochs) / self.epoch_step)

    def cycle_epochs(self, generation: int) -> int:
        """Epochs trained after generation ``generation`` (1-based)."""
        start = self.initial_epochs + (generation - 1) * self.epoch_step
        return min(self.epoch_step, self.max_epochs - start)
