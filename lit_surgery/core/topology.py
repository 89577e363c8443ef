"""The topology: a network's structure as plain, JSON-able data.

The topology is what survives surgery, checkpoints and logs; weights are built from it
(see :mod:`lit_surgery.core.network`). Layer kinds are looked up in :data:`LAYER_KINDS`, so a
new kind (convolutions) is a new entry, not a new branch in every function.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from torch import nn

from lit_surgery.errors import UserError

FORMAT_VERSION = 1

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "linear": nn.Identity,
}
# phi(a * z) == a * phi(z) for a > 0: splitting a unit's incoming weights keeps the function.
POSITIVELY_HOMOGENEOUS = frozenset({"relu", "leaky_relu", "linear"})
# phi(z) >= 0: a ReLU identity layer after such a layer keeps the function.
NON_NEGATIVE = frozenset({"relu", "sigmoid"})


class TopologyError(UserError):
    """A topology that cannot describe a network."""


@dataclass(frozen=True)
class Layer:
    """One hidden layer: ``width`` units of ``kind`` with an activation and optional bias."""

    width: int
    activation: str = "relu"
    bias: bool = True
    kind: str = "dense"

    def __post_init__(self) -> None:
        if not isinstance(self.width, int) or isinstance(self.width, bool) or self.width < 1:
            raise TopologyError(f"layer width must be a positive integer, got {self.width!r}")
        if self.activation not in ACTIVATIONS:
            raise TopologyError(
                f"unknown activation {self.activation!r}; allowed: {sorted(ACTIVATIONS)}"
            )
        if self.kind not in LAYER_KINDS:
            raise TopologyError(f"unknown layer kind {self.kind!r}; allowed: {sorted(LAYER_KINDS)}")

    @property
    def is_linear(self) -> bool:
        return self.activation == "linear"


@dataclass(frozen=True)
class LayerKind:
    """How a kind of layer is built and counted, given its fan-in."""

    build: Callable[[int, Layer], nn.Module]
    num_params: Callable[[int, Layer], int]


def _dense_params(fan_in: int, layer: Layer) -> int:
    return fan_in * layer.width + (layer.width if layer.bias else 0)


LAYER_KINDS: dict[str, LayerKind] = {
    "dense": LayerKind(
        build=lambda fan_in, layer: nn.Linear(fan_in, layer.width, bias=layer.bias),
        num_params=_dense_params,
    ),
}


@dataclass(frozen=True)
class Topology:
    """Input size, hidden layers, output size. Input and output sizes never change."""

    input_size: int
    hidden: tuple[Layer, ...] = field(default_factory=tuple)
    output_size: int = 10

    def __post_init__(self) -> None:
        for name in ("input_size", "output_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TopologyError(f"{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        for layer in self.hidden:
            if not isinstance(layer, Layer):
                raise TopologyError(f"hidden layers must be Layer objects, got {layer!r}")

    @classmethod
    def mlp(
        cls,
        input_size: int,
        widths: Iterable[int],
        output_size: int,
        activation: str = "relu",
    ) -> Topology:
        """The usual fully connected network: every hidden layer with the same activation."""
        return cls(input_size, tuple(Layer(w, activation) for w in widths), output_size)

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return len(self.hidden)

    @property
    def widths(self) -> list[int]:
        return [layer.width for layer in self.hidden]

    def fan_in(self, index: int) -> int:
        """Inputs of hidden layer ``index`` (``index == depth`` is the output layer)."""
        return self.input_size if index == 0 else self.hidden[index - 1].width

    @property
    def num_params(self) -> int:
        total = sum(
            LAYER_KINDS[layer.kind].num_params(self.fan_in(i), layer)
            for i, layer in enumerate(self.hidden)
        )
        return total + self.fan_in(self.depth) * self.output_size + self.output_size

    def with_hidden(self, hidden: Sequence[Layer]) -> Topology:
        return replace(self, hidden=tuple(hidden))

    def describe(self) -> str:
        """Short human form, e.g. ``64-[32r, 16l]-10`` (r: ReLU, l: linear, *: no bias)."""
        parts = [
            f"{layer.width}{_ACT_CODE.get(layer.activation, layer.activation)}"
            + ("" if layer.bias else "*")
            for layer in self.hidden
        ]
        return f"{self.input_size}-[{', '.join(parts)}]-{self.output_size}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "input_size": self.input_size,
            "hidden": [asdict(layer) for layer in self.hidden],
            "output_size": self.output_size,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        if not isinstance(data, dict):
            raise TopologyError(f"a topology is a dict, got {type(data).__name__}")
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise TopologyError(
                f"topology format version {version!r} is not supported; this lit_surgery "
                f"reads version {FORMAT_VERSION}"
            )
        unknown = set(data) - {"version", "input_size", "hidden", "output_size"}
        if unknown:
            raise TopologyError(f"unknown topology keys {sorted(unknown)}")
        try:
            hidden = tuple(Layer(**layer) for layer in data["hidden"])
            return cls(data["input_size"], hidden, data["output_size"])
        except (KeyError, TypeError) as err:
            raise TopologyError(f"malformed topology {data!r}: {err}") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Topology:
        return cls.from_dict(json.loads(text))


_ACT_CODE = {
    "relu": "r",
    "linear": "l",
    "leaky_relu": "lr",
    "tanh": "t",
    "sigmoid": "s",
    "gelu": "g",
}
