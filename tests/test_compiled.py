"""The compiled training step (lit_surgery/core/compiled.py) against eager torch.optim.

Most graphs here compile with ``aot_eager`` (the same traced graph, no code generation:
about a second each); one test generates code with inductor, as training does (tens of
seconds on a busy 2-core machine)."""

import copy
from functools import partial

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch._dynamo.testing import CompileCounterWithBackend

from lit_surgery.core.compiled import StepCompiler, unsupported
from lit_surgery.core.network import build
from lit_surgery.core.operators import add_neurons, remove_neurons
from lit_surgery.core.optim_state import join_state, split_state, transfer_state
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.topology import ConvLayer, Topology
from lit_surgery.data import SurgeryDataModule
from lit_surgery.lightning.loop import attach
from lit_surgery.lightning.module import SurgeryModule

PLAIN_SGD = partial(torch.optim.SGD, lr=0.1)  # keeps no state
SGD = partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
ADAM = partial(torch.optim.Adam, lr=0.01, weight_decay=0.01, amsgrad=True)


def _params(nets):
    return [p for net in nets for p in net.parameters()]


def _eager_step(nets, optimizer, x, y):
    losses = torch.stack([F.cross_entropy(net(x), y) for net in nets])
    optimizer.zero_grad(set_to_none=True)
    losses.sum().backward()
    optimizer.step()
    return losses.detach()


def _train_alike(nets, make_optimizer, compiler, state=None, steps=50, batch=8):
    """``steps`` steps of ``nets`` by the compiled step and of a copy by eager torch.optim,
    both optimisers from ``state`` if given, a scheduler halving lr every 10 steps on both:
    the same losses, right answers and weights. Returns the compiled side's optimiser."""
    twins = copy.deepcopy(nets)
    opt, twin_opt = make_optimizer(_params(nets)), make_optimizer(_params(twins))
    if state is not None:  # loading keeps the tensors: each gets its own
        opt.load_state_dict(copy.deepcopy(state))
        twin_opt.load_state_dict(copy.deepcopy(state))
    scheds = [torch.optim.lr_scheduler.StepLR(o, 10, 0.5) for o in (opt, twin_opt)]
    step = compiler.bind(nets, opt)
    gen = torch.Generator().manual_seed(1)
    compiled = 0
    for _ in range(steps):
        x = torch.randn(batch, nets[0].topology.input_size, generator=gen)
        y = torch.randint(0, nets[0].topology.output_size, (batch,), generator=gen)
        totals = step(x, y)
        if totals is None:  # a fresh optimiser's first step creates its state eagerly
            _eager_step(nets, opt, x, y)
        with torch.no_grad():
            correct = (twins[0](x).argmax(1) == y).sum()
        losses = _eager_step(twins, twin_opt, x, y)
        if totals is not None:  # per-branch losses, leading loss * samples, right answers
            compiled += 1
            torch.testing.assert_close(totals[:-2], losses)
            torch.testing.assert_close(totals[-2], losses[0] * batch)
            assert totals[-1] == correct
        for sched in scheds:
            sched.step()
    assert compiled >= steps - 1  # the first of a fresh optimiser may be eager
    assert opt.param_groups[0]["lr"] == twin_opt.param_groups[0]["lr"] < 0.1 * 0.5**4
    for a, b in zip(_params(nets), _params(twins), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    return opt


def _net(hidden, seed=0):
    torch.manual_seed(seed)
    return build(Topology.mlp(6, hidden, 3))


@pytest.mark.parametrize("make_optimizer", [PLAIN_SGD, SGD, ADAM],
                         ids=["sgd", "sgd-momentum", "adam"])
def test_compiled_steps_match_eager_before_and_after_surgery(make_optimizer):
    counter = CompileCounterWithBackend("aot_eager")
    compiler = StepCompiler(backend=counter)
    nets = [_net([5, 4]), _net([3], seed=1)]
    opt = _train_alike(nets, make_optimizer, compiler)
    assert counter.frame_count == 1  # the scheduler's new lr did not recompile

    # surgery on the first branch: a new topology, its optimiser state carried over
    sizes = [len(list(net.parameters())) for net in nets]
    state = opt.state_dict()
    first, second = split_state(state, sizes)
    mutation = remove_neurons(nets[0], 0, 2)
    first = transfer_state(first, mutation.param_map, [p.shape for p in nets[0].parameters()])
    survivors = [mutation.net, nets[1]]
    carried = join_state([first, second], sizes, state["param_groups"][0])
    assert not compiler.cached(survivors, make_optimizer(_params(survivors)))
    _train_alike(survivors, make_optimizer, compiler, state=carried)
    assert counter.frame_count == 2  # the new population's graph
    assert compiler.cached(survivors, opt)


def test_compiled_cnn_steps_match_eager_before_and_after_conv_surgery():
    """Conv blocks without batch norm take the compiled step too (with batch norm the module
    trains eagerly): the same losses and weights as eager, also after widening a conv."""
    torch.manual_seed(0)
    conv = [ConvLayer(3, pool=2), ConvLayer(4, stride=2)]
    nets = [build(Topology.cnn((1, 6, 6), conv, [5], 3))]  # 1x6x6 -> 3x3x3 -> 4x2x2 -> 5
    compiler = StepCompiler(backend="aot_eager")
    opt = _train_alike(nets, SGD, compiler)
    size = len(list(nets[0].parameters()))
    mutation = add_neurons(nets[0], 0, 2, generator=torch.Generator().manual_seed(0))
    (state,) = split_state(opt.state_dict(), [size])
    state = transfer_state(state, mutation.param_map, [p.shape for p in nets[0].parameters()])
    carried = join_state([state], [size], opt.state_dict()["param_groups"][0])
    _train_alike([mutation.net], SGD, compiler, state=carried)


def test_compiled_step_trains_on_a_loaded_optimiser_state():
    """The step keeps its list of the optimiser's state tensors between calls, but
    ``load_state_dict`` (resuming) replaces them: the step must then update the new ones."""
    nets = [_net([4])]
    twins = copy.deepcopy(nets)
    opt, twin_opt = SGD(_params(nets)), SGD(_params(twins))
    step = StepCompiler(backend="aot_eager").bind(nets, opt)
    gen = torch.Generator().manual_seed(1)
    for i in range(6):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        if i == 2:
            saved = copy.deepcopy(twin_opt.state_dict())
        if i == 4:  # back to the momentum of two steps ago, on both
            opt.load_state_dict(copy.deepcopy(saved))
            twin_opt.load_state_dict(copy.deepcopy(saved))
        if step(x, y) is None:
            assert i == 0  # the first step creates the momentum buffers
            _eager_step(nets, opt, x, y)
        _eager_step(twins, twin_opt, x, y)
    for a, b in zip(_params(nets), _params(twins), strict=True):
        torch.testing.assert_close(a, b)


def test_compiled_step_checks_the_batchs_guards():
    """Dynamo checks only the batch's guards before a step (the others guard what ``bind``
    fixes, and cost a third of a small network's step): a batch laid out otherwise (same
    shape, other strides) compiles anew, where the step would otherwise misread it."""
    counter = CompileCounterWithBackend("aot_eager")
    net = _net([4])
    step = StepCompiler(backend=counter).bind([net], PLAIN_SGD(net.parameters()))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    step(x, y)
    step(x.clone(), y.clone())
    assert counter.frame_count == 1
    step(torch.randn(6, 8).t(), y)
    assert counter.frame_count == 2


def test_inductor_step_matches_eager():
    """The code inductor generates (once per graph: the costly part) trains like eager."""
    _train_alike([_net([4])], SGD, StepCompiler())


def test_unsupported_optimisers_are_named():
    params = _params([_net([4])])
    assert unsupported(torch.optim.SGD(params, lr=0.1)) is None
    assert unsupported(torch.optim.AdamW(params)) is None
    reason = unsupported(torch.optim.RMSprop(params))
    assert "RMSprop" in reason and "SGD" in reason and "Adam" in reason
    with pytest.raises(ValueError, match="RMSprop is not supported"):
        StepCompiler().bind([_net([4])], torch.optim.RMSprop(params))


def _module(compile, optimizer=SGD, **kw):
    settings = SurgerySettings(max_epochs=4, initial_epochs=2, epoch_step=2)
    model = SurgeryModule(hidden=[4], surgery=settings, optimizer=optimizer, compile=compile,
                          **kw)
    model.step_compiler = StepCompiler(backend="aot_eager")
    return model


class StopAt(Callback):
    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = trainer.current_epoch + 1 == self.epochs


def _fit(tmp_path, model, callbacks=(), ckpt_path=None, **kw):
    trainer = attach(pl.Trainer(
        default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
        enable_model_summary=False, max_epochs=4, callbacks=list(callbacks),
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks), **kw))
    trainer.fit(model, SurgeryDataModule("digits", steps_per_batch=4), ckpt_path=ckpt_path)
    return trainer


def test_module_compiled_fit_matches_eager_and_resumes_exactly(tmp_path):
    runs = {}
    for compile in (False, True):
        pl.seed_everything(0)
        runs[compile] = model = _module(compile)
        _fit(tmp_path / str(compile), model)
    eager, compiled = runs[False], runs[True]
    assert compiled._compiled is not None and eager._compiled is None
    assert compiled.events == eager.events and compiled.topology == eager.topology
    for a, b in zip(_params(compiled.population), _params(eager.population), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    # stopped after epoch 3 (mid-cycle, after a surgery), resumed: the same as whole
    pl.seed_everything(0)
    first = _module(True)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    _fit(tmp_path / "a", first, [ckpt, StopAt(3)])
    assert first.current_epoch == 3
    resumed = _module(True)
    _fit(tmp_path / "b", resumed, [ModelCheckpoint(dirpath=tmp_path / "ckpt2")],
         ckpt_path=tmp_path / "ckpt" / "last.ckpt")
    assert resumed.events == compiled.events
    for a, b in zip(_params(resumed.population), _params(compiled.population), strict=True):
        assert torch.equal(a, b)


def test_module_compile_errors_name_what_is_unsupported(tmp_path):
    with pytest.raises(ValueError, match=r"model.compile must be true, false or 'auto'"):
        SurgeryModule(compile="yes")
    with pytest.raises(ValueError, match=r"RMSprop is not supported.*SGD"):
        _fit(tmp_path, _module(True, optimizer=partial(torch.optim.RMSprop, lr=0.01)))
    with pytest.raises(ValueError, match="gradient clipping"):
        _fit(tmp_path, _module(True), gradient_clip_val=1.0)
    # auto falls back to eager steps
    model = _module("auto", optimizer=partial(torch.optim.RMSprop, lr=0.01))
    _fit(tmp_path / "auto", model, [StopAt(1)])
    assert model._compiled is None


def test_a_run_compiles_more_populations_than_dynamos_recompile_limit():
    """Every population's step has its own code object: a run that meets more populations
    than ``recompile_limit`` (8 per code object) still compiles each (torch 2.11 failed the
    ninth with ``FailOnRecompileLimitHit``)."""
    limit = torch._dynamo.config.recompile_limit
    compiler = StepCompiler(backend="eager")
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    for width in range(1, limit + 3):
        net = build(Topology.mlp(3, [width], 2))
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        assert compiler.bind([net], opt)(x, y) is not None, width
