"""A population's whole training step as one compiled graph.

The networks are small, so an eager step costs framework overhead, not arithmetic. Here the
forward, the cross-entropy loss, the backward (``torch.func.grad`` over ``functional_call``)
and the optimiser update of every branch are traced by ``torch.compile`` into one graph; on
CUDA it is replayed as a CUDA graph (``mode="reduce-overhead"``; torch 2.11 skips the CUDA
graph for an optimiser with state, whose tensors are no static inputs, and runs the fused
kernels). The graph updates the real ``nn.Parameter`` tensors and the ``torch.optim``
optimiser's own state tensors in place, so checkpoints,
:func:`~lit_surgery.core.optim_state.split_state` and surgery see nothing different.
Hyperparameters other than the learning rate are constants of the graph; the learning rate
is a tensor input, so a scheduler takes effect without a recompile.

Graphs are cached by the population's topologies and the optimiser's settings
(:class:`StepCompiler`): a population seen before costs no compile. A ``grad_hook`` (DDP:
average the gradients across ranks) splits the step into two graphs with the hook between.
What a run logs of a step (:func:`step_totals`) comes out of the graph as one tensor, and
Dynamo checks only the inputs' tensor guards before each call (:func:`_input_guards`): a step
of a small network costs microseconds, and either costs as much as its arithmetic.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, grad

from lit_surgery.core.network import SurgeryNet
from lit_surgery.core.topology import Topology

GradHook = Callable[[list[Tensor]], None]
"""Receives the gradients (one per parameter, in order) and changes them in place."""


SUPPORTED = (
    "torch.optim.SGD (momentum, dampening, weight decay, nesterov, maximize), "
    "torch.optim.Adam and AdamW (amsgrad, weight decay, maximize), one parameter group"
)


def step_totals(losses: Tensor, correct: Tensor, batch: int) -> Tensor:
    """What a training step adds to the sums a run logs, in one tensor (one add per step):
    each branch's loss, then the first branch's loss times ``batch`` (the samples) and the
    number of samples it classified right (``correct``)."""
    return torch.cat([losses, losses[:1] * batch, correct.reshape(1).to(losses.dtype)])


_BATCH = ("x", "y")
"""Dynamo's names of the step's batch arguments (``guard_filter_fn`` entries' ``name``)."""


def _input_guards(entries: Sequence[Any]) -> list[bool]:
    """Which of Dynamo's guards a step checks before each call (``guard_filter_fn``): the
    global state's (grad mode, ...) and the batch's tensor guards (a batch of another dtype
    or shape compiles anew). The others, about 690 for a [10,10,10] network, guard what the
    cache key and :meth:`StepCompiler.bind` fix (the template modules, the update rule, the
    parameters, the optimiser's state, the lists' lengths), and checking them cost a third
    of the step."""
    return [
        e.guard_type == "GLOBAL_STATE" or (e.guard_type == "TENSOR_MATCH" and e.name in _BATCH)
        for e in entries
    ]


def _own_code(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with a code object of its own. Dynamo keeps its graphs, and counts recompiles
    against ``recompile_limit`` (8), per code object: all populations' steps come from one
    source function, so without this the ninth population of a run fails to compile
    (``FailOnRecompileLimitHit`` under ``fullgraph``; seen with torch 2.11). What
    ``torch.compile(isolate_recompiles=True)`` does in newer torch, on every version."""
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


# Written without ``alpha=`` arguments: torch 2.13 drops ``alpha`` from ``Tensor.add`` on a
# gradient of ``torch.func.grad`` inside ``torch.compile`` (so torch.optim's functional
# ``sgd``/``adam`` update wrongly there with weight decay).


@dataclass(frozen=True)
class _SGD:
    momentum: float
    dampening: float
    weight_decay: float
    nesterov: bool
    maximize: bool

    @property
    def keys(self) -> tuple[str, ...]:
        return ("momentum_buffer",) if self.momentum else ()

    def update(
        self, params: list[Tensor], grads: list[Tensor], state: list[Tensor], lr: Tensor
    ) -> None:
        """``torch.optim.SGD.step`` after its first step (which creates the buffers)."""
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            d = -g if self.maximize else g
            if self.weight_decay:
                d = d + self.weight_decay * p
            if self.momentum:
                buf = state[i]
                buf.mul_(self.momentum).add_((1 - self.dampening) * d)
                d = d + self.momentum * buf if self.nesterov else buf
            p.sub_(lr * d)


@dataclass(frozen=True)
class _Adam:
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    amsgrad: bool
    maximize: bool
    decoupled_weight_decay: bool

    @property
    def keys(self) -> tuple[str, ...]:
        return ("step", "exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if self.amsgrad else ())

    def update(
        self, params: list[Tensor], grads: list[Tensor], state: list[Tensor], lr: Tensor
    ) -> None:
        """``torch.optim.Adam.step`` (AdamW with ``decoupled_weight_decay``)."""
        n = len(self.keys)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            step, m, v, *v_max = state[i * n : (i + 1) * n]
            d = -g if self.maximize else g
            step.add_(1)
            if self.weight_decay and self.decoupled_weight_decay:
                p.mul_(1 - lr * self.weight_decay)
            elif self.weight_decay:
                d = d + self.weight_decay * p
            m.lerp_(d, 1 - self.beta1)
            v.mul_(self.beta2).add_((1 - self.beta2) * d * d)
            if self.amsgrad:
                v = v_max[0].copy_(torch.maximum(v_max[0], v))
            denom = v.sqrt() / (1 - self.beta2**step).sqrt() + self.eps
            p.sub_(lr / (1 - self.beta1**step) * m / denom)


_Rule = _SGD | _Adam


def _rule(optimizer: torch.optim.Optimizer) -> _Rule | str:
    """The update rule of ``optimizer``, or why it cannot be compiled."""
    name = type(optimizer).__name__
    if len(optimizer.param_groups) != 1:
        return f"{name} has {len(optimizer.param_groups)} parameter groups (supported: one)"
    group = optimizer.param_groups[0]
    if group.get("differentiable"):
        return f"{name} with differentiable=True is not supported"
    if type(optimizer) is torch.optim.SGD:
        return _SGD(
            float(group["momentum"]),
            float(group["dampening"]),
            float(group["weight_decay"]),
            bool(group["nesterov"]),
            bool(group["maximize"]),
        )
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        beta1, beta2 = (float(b) for b in group["betas"])
        decoupled = group.get("decoupled_weight_decay", type(optimizer) is torch.optim.AdamW)
        return _Adam(
            beta1,
            beta2,
            float(group["eps"]),
            float(group["weight_decay"]),
            bool(group["amsgrad"]),
            bool(group["maximize"]),
            bool(decoupled),
        )
    return f"optimizer {name} is not supported (supported: {SUPPORTED})"


def unsupported(optimizer: torch.optim.Optimizer) -> str | None:
    """Why ``optimizer``'s step cannot be compiled, or None if it can."""
    rule = _rule(optimizer)
    return rule if isinstance(rule, str) else None


def _functions(topologies: Sequence[Topology], rule: _Rule) -> dict[str, Callable[..., Any]]:
    """The step's pure functions over (parameters, optimiser state, lr, batch)."""
    # Stand-ins without storage: functional_call swaps in the real parameters.
    templates = [SurgeryNet(t).to("meta") for t in topologies]
    names = [[name for name, _ in t.named_parameters()] for t in templates]

    def loss(params: list[Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        losses, offset, correct = [], 0, None
        for template, keys in zip(templates, names, strict=True):
            mine = dict(zip(keys, params[offset : offset + len(keys)], strict=True))
            offset += len(keys)
            logits = functional_call(template, mine, (x,))
            losses.append(F.cross_entropy(logits, y))
            if correct is None:
                correct = (logits.argmax(1) == y).sum()
        stacked = torch.stack(losses)
        return stacked.sum(), step_totals(stacked.detach(), correct, len(y))

    def grads(params: list[Tensor], x: Tensor, y: Tensor) -> tuple[list[Tensor], Tensor]:
        return grad(loss, has_aux=True)(params, x, y)

    def update(params: list[Tensor], g: list[Tensor], state: list[Tensor], lr: Tensor) -> None:
        rule.update(params, g, state, lr)

    def whole(
        params: list[Tensor], state: list[Tensor], lr: Tensor, x: Tensor, y: Tensor
    ) -> Tensor:
        g, totals = grads(params, x, y)
        rule.update(params, g, state, lr)
        return totals

    return {"grads": grads, "update": update, "whole": whole}


class CompiledStep:
    """One training step of ``nets`` (each on its own cross-entropy loss, summed) on a batch,
    by compiled graphs from a :class:`StepCompiler`. Call it with ``(x, y)``; it returns the
    step's :func:`step_totals`, or None when it cannot take this step (the optimiser has no
    state yet for some parameter, which its first eager step creates, or the batch has a
    size other than the first one's: a partial last batch), and the caller then takes the
    step eagerly. The optimiser's state tensors are looked up once, and again after its
    ``load_state_dict`` (which replaces them); its steps update them in place."""

    def __init__(
        self,
        graphs: dict[str, Callable[..., Any]],
        params: list[Tensor],
        optimizer: torch.optim.Optimizer,
        keys: tuple[str, ...],
        grad_hook: GradHook | None,
        cuda_graphs: bool,
    ) -> None:
        self.optimizer = optimizer
        self._graphs, self._params, self._keys = graphs, params, keys
        self._hook, self._cuda_graphs = grad_hook, cuda_graphs
        self._group = optimizer.param_groups[0]
        self._lr_value = float(self._group["lr"])
        self._lr = torch.tensor(self._lr_value, dtype=params[0].dtype, device=params[0].device)
        self._batch_size: int | None = None
        self._state_tensors: list[Tensor] | None = None
        self._state_of: dict[Any, Any] | None = None  # the optimiser's state they were for
        self.ran = False
        """Whether a graph has run: the first run compiles (unless the graphs were cached)."""
        if cuda_graphs:
            for t in [*params, self._lr]:
                torch._dynamo.mark_static_address(t)

    def _state(self) -> list[Tensor] | None:
        """The optimiser's state tensors in the graph's order, on the parameters' device
        (Adam keeps its step counts on the CPU); None while some are missing."""
        if self.optimizer.state is self._state_of:
            return self._state_tensors
        tensors = []
        for p in self._params:
            entry = self.optimizer.state.get(p, {})  # SGD without momentum keeps none
            for key in self._keys:
                value = entry.get(key)
                if value is None:
                    return None
                if value.device != p.device:
                    value = entry[key] = value.to(p.device)
                tensors.append(value)
        self._state_tensors, self._state_of = tensors, self.optimizer.state
        return tensors

    def __call__(self, x: Tensor, y: Tensor) -> Tensor | None:
        if self._batch_size is None:
            self._batch_size = len(y)
        state = self._state()
        if state is None or len(y) != self._batch_size:
            return None
        lr = float(self._group["lr"])
        if lr != self._lr_value:  # a scheduler stepped: new value, same graph
            self._lr.fill_(lr)
            self._lr_value = lr
        if self._cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():  # the graph writes to the leaf parameters
            if self._hook is None:
                totals = self._graphs["whole"](self._params, state, self._lr, x, y)
            else:
                g, totals = self._graphs["grads"](self._params, x, y)
                self._hook(g)
                self._graphs["update"](self._params, g, state, self._lr)
        self.ran = True
        return totals


class StepCompiler:
    """Compiled training steps, cached by the population's topologies and the optimiser's
    settings (its type and every hyperparameter but the learning rate). ``backend`` is
    ``torch.compile``'s: ``"aot_eager"`` traces the same graphs without generating code (a
    fraction of the compile time; for tests and debugging), and a callable one can count
    the graphs (``torch._dynamo.testing.CompileCounterWithBackend``)."""

    def __init__(self, backend: str | Callable[..., Any] = "inductor") -> None:
        self.backend = backend
        self._cache: dict[tuple[Any, ...], dict[str, Callable[..., Any]]] = {}

    def _key(
        self, nets: Sequence[SurgeryNet], optimizer: torch.optim.Optimizer, hooked: bool
    ) -> tuple[Any, ...]:
        rule = _rule(optimizer)
        if isinstance(rule, str):
            raise ValueError(f"cannot compile the training step: {rule}")
        ref = next(nets[0].parameters())
        return (tuple(net.topology for net in nets), rule, hooked, ref.device.type, ref.dtype)

    def cached(
        self, nets: Sequence[SurgeryNet], optimizer: torch.optim.Optimizer, hooked: bool = False
    ) -> bool:
        """Whether binding these would reuse graphs compiled before (no compile cost)."""
        return self._key(nets, optimizer, hooked) in self._cache

    def bind(
        self,
        nets: Sequence[SurgeryNet],
        optimizer: torch.optim.Optimizer,
        grad_hook: GradHook | None = None,
    ) -> CompiledStep:
        """The compiled step of ``nets``, trained by ``optimizer`` over exactly their
        parameters (in order). Graphs compile on their first call."""
        key = self._key(nets, optimizer, grad_hook is not None)
        params = [p for net in nets for p in net.parameters()]
        if [id(p) for p in optimizer.param_groups[0]["params"]] != [id(p) for p in params]:
            raise ValueError("the optimiser must hold exactly the networks' parameters, in order")
        cuda_graphs = params[0].device.type == "cuda" and self.backend == "inductor"
        if key not in self._cache:
            # torch.compile takes a mode or options (and pops guard_filter_fn from them)
            mode = torch._inductor.list_mode_options("reduce-overhead") if cuda_graphs else {}
            self._cache[key] = {
                name: torch.compile(
                    _own_code(fn),
                    fullgraph=True,
                    dynamic=False,
                    backend=self.backend,
                    options={**mode, "guard_filter_fn": _input_guards},
                )
                for name, fn in _functions(key[0], key[1]).items()
            }
        rule = key[1]
        return CompiledStep(self._cache[key], params, optimizer, rule.keys, grad_hook, cuda_graphs)
