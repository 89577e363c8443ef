"""The topology: a network's structure as plain, JSON-able data.

The topology is what survives surgery, checkpoints and logs; weights are built from it
(see :mod:`lit_surgery.core.network`). Layer kinds are looked up in :data:`LAYER_KINDS`, so a
kind is an entry (its layer class, block and parameter count), not a branch in every function.

A convolutional network is convolutional blocks (:class:`ConvLayer`) followed by dense layers,
on an input of shape ``input_shape`` (C, H, W). Layer indices run over the conv blocks, then
the dense layers, so criteria, policy and operators address both alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

from torch import nn

from lit_surgery.errors import UserError

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 1 had no ``input_shape`` and no conv layers; its files read unchanged."""

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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Layer:
    """One hidden layer: ``width`` units of ``kind`` with an activation and optional bias."""

    width: int
    activation: str = "relu"
    bias: bool = True
    kind: str = "dense"

    def __post_init__(self) -> None:
        if not _is_int(self.width) or self.width < 1:
            raise TopologyError(f"layer width must be a positive integer, got {self.width!r}")
        if self.activation not in ACTIVATIONS:
            raise TopologyError(
                f"unknown activation {self.activation!r}; allowed: {sorted(ACTIVATIONS)}"
            )
        if self.kind not in LAYER_KINDS:
            raise TopologyError(f"unknown layer kind {self.kind!r}; allowed: {sorted(LAYER_KINDS)}")
        # A Layer(kind="conv") would silently lose the conv fields: the kind fixes the class.
        cls = LAYER_KINDS[self.kind].layer
        if type(self) is not cls:
            raise TopologyError(
                f"a {self.kind!r} layer must be a {cls.__name__}, got a {type(self).__name__}"
            )

    @property
    def is_linear(self) -> bool:
        return self.activation == "linear"

    def describe(self) -> str:
        """``32r``: width, activation code, ``*`` without bias."""
        return f"{self.width}{_ACT_CODE[self.activation]}{'' if self.bias else '*'}"


@dataclass(frozen=True)
class ConvLayer(Layer):
    """A convolutional block: 2-D conv with ``width`` output channels, optional batch norm,
    the activation, then max pooling (kernel = stride = ``pool``; 1 = none)."""

    kind: str = "conv"
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    batch_norm: bool = False
    pool: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, minimum in (("kernel_size", 1), ("stride", 1), ("padding", 0), ("pool", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise TopologyError(f"conv {name} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.batch_norm, bool):
            raise TopologyError(f"conv batch_norm must be true or false, got {self.batch_norm!r}")

    def output_shape(self, shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) after this block on a (C_in, H, W) input, by PyTorch's floor rules for
        the conv and the pool; a side below 1 means the block does not fit the input."""

        def side(n: int) -> int:
            return ((n + 2 * self.padding - self.kernel_size) // self.stride + 1) // self.pool

        return (self.width, side(shape[1]), side(shape[2]))

    def describe(self) -> str:
        """``c8k3s2p0t*+bn+mp2``: channels, kernel, stride if not 1, padding if not
        ``kernel // 2``, activation code unless ReLU, ``*`` without bias, batch norm, pool."""
        return (
            f"c{self.width}k{self.kernel_size}"
            + (f"s{self.stride}" if self.stride != 1 else "")
            + (f"p{self.padding}" if self.padding != self.kernel_size // 2 else "")
            + ("" if self.activation == "relu" else _ACT_CODE[self.activation])
            + ("" if self.bias else "*")
            + ("+bn" if self.batch_norm else "")
            + (f"+mp{self.pool}" if self.pool > 1 else "")
        )


@dataclass(frozen=True)
class LayerKind:
    """A kind of hidden layer: its class, its block's modules (the affine map first, then
    the activation and any extras) and its parameter count, given its fan-in
    (:meth:`Topology.fan_in`)."""

    layer: type[Layer]
    block: Callable[[int, Any], list[nn.Module]]
    num_params: Callable[[int, Any], int]


def _dense_block(fan_in: int, layer: Layer) -> list[nn.Module]:
    return [nn.Linear(fan_in, layer.width, bias=layer.bias), ACTIVATIONS[layer.activation]()]


def _dense_params(fan_in: int, layer: Layer) -> int:
    return fan_in * layer.width + (layer.width if layer.bias else 0)


def _conv_block(fan_in: int, layer: ConvLayer) -> list[nn.Module]:
    conv = nn.Conv2d(
        fan_in, layer.width, layer.kernel_size, layer.stride, layer.padding, bias=layer.bias
    )
    return [
        conv,
        *([nn.BatchNorm2d(layer.width)] if layer.batch_norm else []),
        ACTIVATIONS[layer.activation](),
        *([nn.MaxPool2d(layer.pool)] if layer.pool > 1 else []),
    ]


def _conv_params(fan_in: int, layer: ConvLayer) -> int:
    """Kernel, bias and the batch norm's affine pair per channel (its running statistics
    are buffers, not parameters)."""
    return (
        fan_in * layer.width * layer.kernel_size**2
        + (layer.width if layer.bias else 0)
        + (2 * layer.width if layer.batch_norm else 0)
    )


LAYER_KINDS: dict[str, LayerKind] = {
    "dense": LayerKind(Layer, _dense_block, _dense_params),
    "conv": LayerKind(ConvLayer, _conv_block, _conv_params),
}


def _input_shape(shape: object) -> tuple[int, int, int]:
    if (
        not isinstance(shape, (list, tuple))
        or len(shape) != 3
        or not all(_is_int(n) and n >= 1 for n in shape)
    ):
        raise TopologyError(
            f"input_shape must be (channels, height, width), three positive integers, got {shape!r}"
        )
    return (shape[0], shape[1], shape[2])


@dataclass(frozen=True)
class Topology:
    """Input size, hidden layers, output size, and for images the input's (C, H, W) shape.
    Input and output never change under surgery."""

    input_size: int
    hidden: tuple[Layer, ...] = field(default_factory=tuple)
    output_size: int = 10
    input_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        for name in ("input_size", "output_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise TopologyError(f"{name} must be a positive integer, got {value!r}")
        object.__setattr__(self, "hidden", tuple(self.hidden))
        for layer in self.hidden:
            if not isinstance(layer, Layer):
                raise TopologyError(f"hidden layers must be Layer objects, got {layer!r}")
        if self.input_shape is not None:
            shape = _input_shape(self.input_shape)
            if math.prod(shape) != self.input_size:
                raise TopologyError(
                    f"input_shape {shape} holds {math.prod(shape)} values, but input_size is "
                    f"{self.input_size}"
                )
            object.__setattr__(self, "input_shape", shape)
        for i, layer in enumerate(self.hidden[self.num_conv :], self.num_conv):
            if isinstance(layer, ConvLayer):
                raise TopologyError(
                    f"conv layer {i} ({layer.describe()}) follows a dense layer; conv blocks "
                    f"must all come before the dense layers"
                )
        if self.num_conv and self.input_shape is None:
            raise TopologyError(
                "a topology with conv layers needs input_shape (channels, height, width)"
            )
        self.shapes  # noqa: B018  (validates every conv block's output size)

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

    @classmethod
    def cnn(
        cls,
        input_shape: Sequence[int],
        conv: Iterable[ConvLayer],
        dense: Iterable[int],
        output_size: int,
        activation: str = "relu",
    ) -> Topology:
        """Conv blocks as given, then dense layers of the given widths, all with
        ``activation``, on images of ``input_shape`` (C, H, W)."""
        shape = _input_shape(tuple(input_shape))
        hidden = (*conv, *(Layer(w, activation) for w in dense))
        return cls(math.prod(shape), hidden, output_size, shape)

    @property
    def depth(self) -> int:
        """Number of hidden layers."""
        return len(self.hidden)

    @property
    def widths(self) -> list[int]:
        return [layer.width for layer in self.hidden]

    @cached_property
    def num_conv(self) -> int:
        """Number of conv blocks: they are hidden layers ``0 .. num_conv - 1``."""
        return next(
            (i for i, layer in enumerate(self.hidden) if not isinstance(layer, ConvLayer)),
            self.depth,
        )

    @cached_property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        """Per-sample tensor shapes: ``shapes[i]`` enters layer ``i`` (``i == depth``: the
        output layer), ``shapes[i + 1]`` leaves it. Computed once; raises if a conv block's
        output would be empty."""
        shapes: list[tuple[int, ...]] = [self.input_shape or (self.input_size,)]
        for i, layer in enumerate(self.hidden):
            if isinstance(layer, ConvLayer):
                shape = layer.output_shape(shapes[-1])
                if min(shape[1:]) < 1:
                    raise TopologyError(
                        f"conv layer {i} ({layer.describe()}) turns its input of shape "
                        f"{shapes[-1]} into {shape}: height and width must stay >= 1 (use a "
                        f"smaller kernel, stride or pool, or more padding)"
                    )
            else:
                shape = (layer.width,)
            shapes.append(shape)
        shapes.append((self.output_size,))
        return tuple(shapes)

    def output_shape(self, index: int) -> tuple[int, ...]:
        """Per-sample shape after layer ``index`` (after its pool, before any flatten)."""
        return self.shapes[index + 1]

    def fan_in(self, index: int) -> int:
        """Inputs of layer ``index``'s affine map (``index == depth`` is the output layer) as
        the incoming tensor gives them: in-channels for a conv layer, C*H*W of the flattened
        conv output for the first layer after the conv blocks."""
        shape = self.shapes[index]
        if index < self.depth and isinstance(self.hidden[index], ConvLayer):
            return shape[0]
        return math.prod(shape)

    def matrix_shape(self, index: int) -> tuple[int, int]:
        """The shape of layer ``index``'s weight as a matrix, which the SVD criteria see:
        (out, in * kh * kw) for a conv, (out, in) otherwise."""
        if index == self.depth:
            return (self.output_size, self.fan_in(index))
        layer = self.hidden[index]
        kernel = layer.kernel_size**2 if isinstance(layer, ConvLayer) else 1
        return (layer.width, self.fan_in(index) * kernel)

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
        """Short human form, e.g. ``64-[32r, 16l]-10`` (r: ReLU, l: linear, *: no bias) or
        ``1x28x28-[c8k3+bn+mp2, c16k3s2p0, 64r]-10`` (see :meth:`ConvLayer.describe`)."""
        source = "x".join(map(str, self.input_shape)) if self.input_shape else self.input_size
        parts = ", ".join(layer.describe() for layer in self.hidden)
        return f"{source}-[{parts}]-{self.output_size}"

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "version": FORMAT_VERSION,
            "input_size": self.input_size,
            "hidden": [asdict(layer) for layer in self.hidden],
            "output_size": self.output_size,
        }
        if self.input_shape is not None:
            data["input_shape"] = list(self.input_shape)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Topology:
        if not isinstance(data, dict):
            raise TopologyError(f"a topology is a dict, got {type(data).__name__}")
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise TopologyError(
                f"topology format version {version!r} is not supported; this lit_surgery "
                f"reads versions {', '.join(map(str, READABLE_VERSIONS))}"
            )
        unknown = set(data) - {"version", "input_size", "hidden", "output_size", "input_shape"}
        if unknown:
            raise TopologyError(f"unknown topology keys {sorted(unknown)}")
        try:
            hidden = tuple(_layer_from_dict(layer) for layer in data["hidden"])
            return cls(data["input_size"], hidden, data["output_size"], data.get("input_shape"))
        except (KeyError, TypeError, AttributeError) as err:
            raise TopologyError(f"malformed topology {data!r}: {err}") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Topology:
        return cls.from_dict(json.loads(text))


def _layer_from_dict(data: dict[str, Any]) -> Layer:
    """The layer class comes from ``kind``; an unknown kind reaches :class:`Layer`, which
    names the allowed ones."""
    kind = LAYER_KINDS.get(data.get("kind", "dense"))
    return (kind.layer if kind else Layer)(**data)


_ACT_CODE = {
    "relu": "r",
    "linear": "l",
    "leaky_relu": "lr",
    "tanh": "t",
    "sigmoid": "s",
    "gelu": "g",
}
