"""The surgery settings: every number and choice of the method, checked on construction.

Torch-free plain data, so configs, sweep files and checkpoints can name and validate them
without importing the policy.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lit_surgery.core.criteria import AL_ACTIVATIONS, RANKINGS, SV_SOURCES
from lit_surgery.core.operators import OPERATOR_CODES
from lit_surgery.errors import UserError

SCORES = ("paper", "log")
SELECT_BY = ("accuracy", "score")
SPLITS = ("asymmetric", "equal")
SCREEN_BATCHES = {"B": 1, "AN": 1, "AL": 1, "T": 1, "RL": 10, "OL": 10}


class SettingsError(UserError):
    """An invalid surgery setting; the message names it and what is allowed."""


@dataclass
class SurgerySettings:
    """Every number and choice of the method. Defaults: the reference's numbers, our fixes.

    Args:
        epoch_step: epochs per cycle (a generation every ``epoch_step`` epochs).
        initial_epochs: plain training before the first generation.
        max_epochs: total epochs of the resulting network's lineage.
        parallel_branches: branches trained and kept per generation.
        max_retries: re-selections from untried candidates when no survivor reaches the
            previous best.
        include_random: also screen one candidate drawn uniformly from the unselected.
        sv_threshold_abs: singular values below this count as removable units.
        sv_threshold_rel: ... or below this times the largest singular value.
        add_fraction: AN adds ``max(2, width * add_fraction)`` units ...
        add_multiplier: ... and, as a second candidate, this many times that.
        screen_batches: re-training batches per operator type before screening.
        type_weights: multipliers of each operator type's ranking weight.
        sv_source: singular values of the matrix entering the layer (``incoming``, the one
            OL and T decompose) or leaving it (``outgoing``, the reference).
        ranking: ``bottleneck`` breaks weight ties towards widening the layer with the most
            inputs per unit, then towards the smaller change; ``modest`` only towards the
            smaller change; ``paper`` towards the larger network.
        al_activation: ``auto`` inserts a ReLU identity layer after ReLU/sigmoid layers
            (real depth, still exact), else linear; ``linear`` always (the reference).
        split: AN's split of units: ``asymmetric`` shares (copies differ) or ``equal``
            (copies stay identical forever, the reference).
        score: ``paper``: ``v + exp(v - v_parent) exp(-q)``; ``log``:
            ``v - size_penalty * ln q``, where a doubling costs ``0.69 * size_penalty``.
        size_penalty: weight of the size term of the ``log`` score.
        explore: at most one unchanged (``B``) branch survives a generation, so every
            generation trains at least one real change. The reference lets both slots go
            to copies.
        select_by: the final winner by validation ``accuracy`` or by ``score`` (reference).
        random_walk: the ablation baseline: one random candidate per generation, no
            screening.
    """

    epoch_step: int = 10
    initial_epochs: int = 10
    max_epochs: int = 100
    parallel_branches: int = 2
    max_retries: int = 3
    include_random: bool = True
    sv_threshold_abs: float = 0.3
    sv_threshold_rel: float = 5e-3
    add_fraction: float = 0.1
    add_multiplier: int = 10
    screen_batches: dict[str, int] = field(default_factory=lambda: dict(SCREEN_BATCHES))
    type_weights: dict[str, float] = field(default_factory=dict)
    sv_source: str = "incoming"
    ranking: str = "bottleneck"
    al_activation: str = "auto"
    split: str = "asymmetric"
    score: str = "log"
    size_penalty: float = 0.003
    explore: bool = True
    select_by: str = "accuracy"
    random_walk: bool = False

    def __post_init__(self) -> None:
        self.screen_batches = {**SCREEN_BATCHES, **dict(self.screen_batches)}
        self.type_weights = dict(self.type_weights)
        self.validate()

    @classmethod
    def paper(cls, **overrides: Any) -> SurgerySettings:
        """The reference's choices wherever they change outcomes."""
        choices = dict(
            sv_source="outgoing",
            ranking="paper",
            al_activation="linear",
            split="equal",
            score="paper",
            explore=False,
            select_by="score",
        )
        return cls(**{**choices, **overrides})

    def replace(self, **changes: Any) -> SurgerySettings:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def validate(self) -> None:
        def need(ok: bool, name: str, allowed: str) -> None:
            if not ok:
                raise SettingsError(f"{name}={getattr(self, name)!r} is invalid: {allowed}")

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        need(is_int(self.epoch_step) and self.epoch_step >= 1, "epoch_step", "an integer >= 1")
        need(
            is_int(self.initial_epochs) and self.initial_epochs >= 0,
            "initial_epochs",
            "an integer >= 0",
        )
        need(
            is_int(self.max_epochs) and self.max_epochs >= self.initial_epochs,
            "max_epochs",
            f"an integer >= initial_epochs ({self.initial_epochs})",
        )
        need(
            is_int(self.parallel_branches) and self.parallel_branches >= 1,
            "parallel_branches",
            "an integer >= 1",
        )
        need(is_int(self.max_retries) and self.max_retries >= 0, "max_retries", "an integer >= 0")
        need(isinstance(self.include_random, bool), "include_random", "true or false")
        need(
            is_num(self.sv_threshold_abs) and self.sv_threshold_abs >= 0,
            "sv_threshold_abs",
            "a finite number >= 0",
        )
        need(
            is_num(self.sv_threshold_rel) and 0 <= self.sv_threshold_rel <= 1,
            "sv_threshold_rel",
            "a number in [0, 1]",
        )
        need(
            is_num(self.add_fraction) and 0 < self.add_fraction <= 10,
            "add_fraction",
            "a number in (0, 10]",
        )
        need(
            is_int(self.add_multiplier) and self.add_multiplier >= 1,
            "add_multiplier",
            "an integer >= 1",
        )
        unknown = set(self.screen_batches) - set(OPERATOR_CODES)
        need(
            not unknown,
            "screen_batches",
            f"keys among {list(OPERATOR_CODES)}, not {sorted(unknown)}",
        )
        need(
            all(is_int(v) and v >= 0 for v in self.screen_batches.values()),
            "screen_batches",
            "integers >= 0 per operator type",
        )
        unknown = set(self.type_weights) - set(OPERATOR_CODES[1:])
        need(
            not unknown,
            "type_weights",
            f"keys among {list(OPERATOR_CODES[1:])}, not {sorted(unknown)}",
        )
        need(
            all(is_num(v) and v >= 0 for v in self.type_weights.values()),
            "type_weights",
            "finite numbers >= 0 per operator type",
        )
        need(self.sv_source in SV_SOURCES, "sv_source", f"one of {SV_SOURCES}")
        need(self.ranking in RANKINGS, "ranking", f"one of {RANKINGS}")
        need(self.al_activation in AL_ACTIVATIONS, "al_activation", f"one of {AL_ACTIVATIONS}")
        need(self.split in SPLITS, "split", f"one of {SPLITS}")
        need(self.score in SCORES, "score", f"one of {SCORES}")
        need(
            is_num(self.size_penalty) and self.size_penalty >= 0,
            "size_penalty",
            "a finite number >= 0",
        )
        need(isinstance(self.explore, bool), "explore", "true or false")
        need(self.select_by in SELECT_BY, "select_by", f"one of {SELECT_BY}")
        need(isinstance(self.random_walk, bool), "random_walk", "true or false")

    @property
    def generations(self) -> int:
        """Number of generations in the schedule (the last cycle may be shorter)."""
        return math.ceil((self.max_epochs - self.initial_epochs) / self.epoch_step)

    def cycle_epochs(self, generation: int) -> int:
        """Epochs trained after generation ``generation`` (1-based)."""
        start = self.initial_epochs + (generation - 1) * self.epoch_step
        return min(self.epoch_step, self.max_epochs - start)
