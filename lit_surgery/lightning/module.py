"""The LightningModule that owns a mutable topology.

It holds a *population*: the branches being trained in parallel (one network each, in an
``nn.ModuleList``). Every training step trains all of them on the same batch (the summed
loss gives each network its own gradient), so parallel branches share one ``fit``, one
optimiser and one DDP wrapper. Surgery itself (:meth:`SurgeryModule.operate`) is called
by :class:`~lit_surgery.lightning.loop.SurgeryFitLoop` at generation boundaries; it steps
the policy's state machine (:meth:`~lit_surgery.core.policy.Surgeon.step`) on rank 0 and
broadcasts the outcome, so every rank holds the same networks.
A branch whose training loss was ever non-finite in a cycle counts as diverged (its metric
is NaN for the policy), like one whose weights are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lit_surgery.core.compiled import CompiledStep, StepCompiler, step_totals, unsupported
from lit_surgery.core.network import SurgeryNet, build
from lit_surgery.core.optim_state import join_state, split_state
from lit_surgery.core.policy import Plan, Surgeon
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.state import Branch
from lit_surgery.core.topology import ConvLayer, Topology
from lit_surgery.core.training import evaluate, train_branch
from lit_surgery.data import random_batches
from lit_surgery.errors import UserError
from lit_surgery.lightning.compat import manual_step_progress

CHECKPOINT_VERSION = 1
DEFAULT_SETTINGS = SurgerySettings()
AUTO_COMPILE_STEPS = {"cpu": 30_000, "cuda": 5_000}
"""``compile="auto"`` compiles a population's step only if it trains this many steps before
the next surgery (or its graphs are cached), by device type (others: the CPU's). A compile
costs 10-40 s on a CPU and saves about 0.4 ms per step of a small network; on an H200 it
costs 3-5 s and saves about 1.2 ms per step (661 eager against 3,937 compiled steps/s for
[10,10,10] at batch 32, ``make bench``)."""


class CheckpointError(UserError):
    """A checkpoint that lit_surgery cannot resume from."""


def _cpu(value: Any) -> Any:
    """A copy of nested plain data with every tensor on the CPU (for broadcasts)."""
    if isinstance(value, Tensor):
        return value.detach().cpu().clone()
    if isinstance(value, dict):
        return {k: _cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu(v) for v in value)
    return value


def _conv_layer(layer: ConvLayer | dict[str, Any]) -> ConvLayer:
    return layer if isinstance(layer, ConvLayer) else ConvLayer(**layer)


class SurgeryModule(pl.LightningModule):
    """Trains a classifier (fully connected, or conv blocks then dense layers) and operates
    on its topology during ``fit``.

    Args:
        hidden: start widths of the hidden (dense) layers.
        activation: activation of the start dense layers.
        surgery: the policy's settings (schedule, thresholds, choices); its ``max_epochs``
            is the run's length (the CLI links it to ``trainer.max_epochs``).
        optimizer: optimiser factory (LightningCLI ``class_path``); default SGD, lr 0.005
            (the paper).
        lr_scheduler: optional scheduler factory; its state survives surgery.
        input_size: flattened input size; default: from the datamodule.
        num_classes: default: from the datamodule.
        seed: seeds the start network, the policy's choices and screening batches.
        compile: train the population with one compiled graph per step
            (:mod:`lit_surgery.core.compiled`): ``"auto"`` where it pays (a population
            that trains long enough, see :data:`AUTO_COMPILE_STEPS`; never a screened
            candidate), ``True`` always (an error where it cannot), ``False`` never.
            Networks with batch norm train eagerly: the compiled step carries parameters,
            not running statistics.
        conv: start conv blocks before the dense layers (e.g. ``{width: 8, kernel_size: 3,
            batch_norm: true, pool: 2}`` in YAML), on the datamodule's image shape
            (channels, height, width); None: a fully connected network. Under DDP each rank
            keeps batch-norm statistics of its own batches, averaged across ranks before
            every validation, test and surgery.
    """

    def __init__(
        self,
        hidden: Sequence[int] = (10, 10, 10),
        activation: str = "relu",
        surgery: SurgerySettings = DEFAULT_SETTINGS,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        input_size: int | None = None,
        num_classes: int | None = None,
        seed: int = 0,
        compile: bool | Literal["auto"] = "auto",
        conv: list[ConvLayer] | None = None,
    ) -> None:
        super().__init__()
        if compile not in (True, False, "auto"):
            raise ValueError(f"model.compile must be true, false or 'auto', got {compile!r}")
        if isinstance(surgery, dict):  # from a checkpoint's hyperparameters
            surgery = SurgerySettings(**surgery)
        self.settings = surgery.replace()  # a private copy
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "surgery"])
        self.hparams["surgery"] = self.settings.to_dict()
        self.start_hidden = [int(w) for w in hidden]
        self.activation = activation
        # bad widths or activation fail here, before the trainer writes anything
        Topology.mlp(1, self.start_hidden, 1, activation)
        # dicts from a checkpoint's hyperparameters, which hold plain data (weights_only)
        self.conv = None if conv is None else [_conv_layer(c) for c in conv]
        self.hparams["conv"] = None if self.conv is None else [asdict(c) for c in self.conv]
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.input_size = input_size
        self.num_classes = num_classes
        self.seed = seed
        self.compile_policy = compile  # not self.compile: nn.Module.compile is a method
        self.step_compiler = StepCompiler()
        self._compiled: CompiledStep | None = None
        self._compiled_for: torch.optim.Optimizer | None = None  # the step was chosen for
        self._compile_allowed = False  # by this fit's settings (setup)
        self.surgeon = Surgeon(
            self.settings, train=None, screen=self.screen, seed=seed, profile=self.profile
        )
        self.population = nn.ModuleList()
        self.epoch_log: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._totals: Tensor | None = None
        """The steps' :func:`~lit_surgery.core.compiled.step_totals`, summed on the device and
        logged once per epoch (a per-step ``self.log`` costs more than a whole step of a small
        network): per branch its losses in this cycle (finite iff all were), then the leading
        branch's loss times samples and its right answers in this epoch."""
        self._train_count = 0  # samples this epoch
        self.val_acc = self.test_acc = None
        if conv is None and input_size is not None and num_classes is not None:
            self._build_root()

    # ------------------------------------------------------------------ network

    def _build_root(self, input_shape: Sequence[int] = ()) -> None:
        """The start network: conv blocks on ``input_shape`` (the data's), if any."""
        torch.manual_seed(self.seed)
        if self.conv is None:
            topo = Topology.mlp(
                self.input_size, self.start_hidden, self.num_classes, self.activation
            )
        else:
            if len(input_shape) != 3:
                raise UserError(
                    f"model.conv needs images, (channels, height, width) per sample; the data "
                    f"has samples of shape {tuple(input_shape)} (use a dataset of images, or "
                    f"model.conv null for a fully connected network)"
                )
            topo = Topology.cnn(
                input_shape, self.conv, self.start_hidden, self.num_classes, self.activation
            )
        self.surgeon.start(build(topo))
        self._install()

    def setup(self, stage: str) -> None:
        chunk = getattr(self.trainer.datamodule, "steps_per_batch", 1)
        if chunk > 1 and getattr(self.trainer.precision_plugin, "scaler", None) is not None:
            raise ValueError(
                f"data.steps_per_batch={chunk} does not support a gradient scaler (precision "
                "16-mixed); use steps_per_batch=1, or precision bf16-mixed or 32"
            )
        if len(self.population) == 0:
            dm = self.trainer.datamodule
            self.input_size = self.input_size or int(torch.tensor(dm.input_shape).prod())
            self.num_classes = self.num_classes or dm.num_classes
            self._build_root(dm.input_shape)
        self._compile_allowed = stage == "fit" and self._may_compile()
        self.automatic_optimization = chunk == 1 and not self._compile_allowed

    def _make_metrics(self) -> None:
        """Accuracy metrics once the number of classes is known."""
        if self.num_classes is not None and self.val_acc is None:
            self.val_acc = MulticlassAccuracy(self.num_classes).to(self.device)
            self.test_acc = MulticlassAccuracy(self.num_classes).to(self.device)

    def _install(self) -> None:
        """Train the surgeon's branches: their networks become the population."""
        self._make_metrics()
        device = self.device
        self.population = nn.ModuleList(b.net.to(device) for b in self.branches)

    @property
    def branches(self) -> list[Branch]:
        """The branches in training, in the population's order (the winner after the end)."""
        return self.surgeon.branches

    @property
    def net(self) -> SurgeryNet:
        """The leading branch: the best one after the last generation."""
        return self.population[0]

    @property
    def topology(self) -> Topology:
        return self.net.topology

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    # ------------------------------------------------------------------ training

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | None:
        x, y = batch
        if self.automatic_optimization:
            return self._loss(x, y)
        # A chunk of consecutive mini-batches (datamodule ``steps_per_batch``): one step each,
        # on the bare optimiser: Lightning's per-step hooks would cost as much as the step.
        # The step counter is Lightning's own, so global_step, logging and checkpoints agree.
        progress = manual_step_progress(self.trainer)
        size = self.trainer.datamodule.batch_size
        optimizer = self.trainer.optimizers[0]
        compiled = self._compiled_step(optimizer)
        for xb, yb in zip(x.split(size), y.split(size), strict=True):
            if compiled is None or not self._compiled_micro_step(compiled, xb, yb):
                self._micro_step(optimizer, xb, yb)
            progress.increment_ready()
            progress.increment_completed()
            self._step_schedulers("step")
        return None

    def _micro_step(self, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> None:
        """One eager optimiser step of manual optimisation on one mini-batch, on every rank."""
        loss = self._loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.trainer.world_size > 1:
            self._average_gradients([p.grad for p in self.population.parameters()])
        optimizer.step()

    def _average_gradients(self, grads: list[Tensor]) -> None:
        """Average the gradients across ranks in one flat all-reduce (manual optimisation
        under DDP). DDP's own reducer stays idle: Lightning runs ``training_step`` inside the
        DDP wrapper's forward and, under manual optimisation, turns backward sync off before
        the wrapper's post-forward, so only ``manual_backward`` would prepare the reducer;
        a bare ``backward()`` is neither reduced nor checked for unused parameters. A sum
        then a division: gloo has no average, and every rank gets the same bits. ``grads``
        (one per parameter) change in place: the compiled step passes its own."""
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat.div_(self.trainer.world_size)
        for g, mean in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            g.copy_(mean.view_as(g))

    def _loss(self, x: Tensor, y: Tensor) -> Tensor:
        logits = [net(x) for net in self.population]
        losses = torch.stack([F.cross_entropy(out, y) for out in logits])
        with torch.no_grad():
            correct = (logits[0].argmax(1) == y).sum()
            self._record(step_totals(losses.detach(), correct, len(y)), len(y))
        return losses.sum()

    def _record(self, totals: Tensor, count: int) -> None:
        """Add a step's :func:`~lit_surgery.core.compiled.step_totals` (``count`` samples)."""
        if self._totals is None:
            self._totals = torch.zeros_like(totals)
        self._totals.add_(totals)
        self._train_count += count

    # ------------------------------------------------------------------ compiled step

    def _compile_blocker(self) -> str | None:
        """What in this fit rules the compiled step out, or None."""
        trainer = self.trainer
        if str(trainer.precision) not in ("32-true", "32"):
            return f"trainer.precision={trainer.precision!r} (it needs 32-true)"
        if trainer.gradient_clip_val:
            return "gradient clipping (trainer.gradient_clip_val)"
        if trainer.accumulate_grad_batches != 1:
            return "trainer.accumulate_grad_batches > 1"
        # surgery never adds a batch norm where the start network has none
        layers = [layer for net in self.population for layer in net.topology.hidden]
        if any(isinstance(layer, ConvLayer) and layer.batch_norm for layer in layers):
            return "batch norm (the compiled step carries parameters, not running statistics)"
        return None

    def _may_compile(self) -> bool:
        """Whether this fit may train by compiled steps (optimisation is then manual)."""
        if self.compile_policy is False:
            return False
        return self._compilable(self._compile_blocker())

    def _compilable(self, reason: str | None) -> bool:
        """True if nothing (``reason``) stands in the compiled step's way; else an error when
        ``compile=true`` asked for it, a note when ``auto`` falls back to eager steps."""
        if reason is not None and self.compile_policy is True:
            raise ValueError(
                f"model.compile=true: cannot compile the training step: {reason}; "
                "use model.compile=false or 'auto'"
            )
        if reason is not None:
            rank_zero_info(f"lit_surgery: eager training steps ({reason})")
        return reason is None

    def _cycle_steps(self) -> float:
        """Training steps from this epoch to the next surgery (or the end of the run)."""
        end = self.surgeon.next_boundary or self.surgeon.planned_epochs
        chunk = getattr(self.trainer.datamodule, "steps_per_batch", 1)
        return (end - self.current_epoch) * self.trainer.num_training_batches * chunk

    def _compiled_step(self, optimizer: torch.optim.Optimizer) -> CompiledStep | None:
        """The compiled step for this population and ``optimizer`` (chosen once per
        optimiser, i.e. per surgery), or None to train eagerly."""
        if optimizer is self._compiled_for:
            return self._compiled
        self._compiled_for, self._compiled = optimizer, None
        if not self._compile_allowed or not self._compilable(unsupported(optimizer)):
            return None
        nets = list(self.population)
        hook = self._average_gradients if self.trainer.world_size > 1 else None
        if (
            self.compile_policy is True
            or self.step_compiler.cached(nets, optimizer, hooked=hook is not None)
            or self._cycle_steps()
            >= AUTO_COMPILE_STEPS.get(self.device.type, AUTO_COMPILE_STEPS["cpu"])
        ):
            self._compiled = self.step_compiler.bind(nets, optimizer, grad_hook=hook)
        return self._compiled

    def _compiled_micro_step(self, step: CompiledStep, x: Tensor, y: Tensor) -> bool:
        """One training step by the compiled graph; False if the caller must take it
        eagerly (a batch that the compiled step cannot take)."""
        with nullcontext() if step.ran else self.profile("compile"):
            totals = step(x, y)
        if totals is None:
            return False
        self._record(totals, len(y))
        return True

    def _step_schedulers(self, interval: str) -> None:
        """Manual optimisation steps the schedulers itself (Lightning does in automatic)."""
        for config in self.trainer.lr_scheduler_configs:
            if config.interval != interval:
                continue
            if config.reduce_on_plateau:
                metric = self.trainer.callback_metrics.get(config.monitor)
                if metric is not None:
                    config.scheduler.step(metric)
            else:
                config.scheduler.step()

    def on_train_epoch_start(self) -> None:
        self._train_count = 0
        if self._totals is not None:  # the cycle's sums go on (from a checkpoint: on the CPU)
            self._totals = self._totals.to(self.device)
            self._totals[-2:] = 0

    def on_fit_start(self) -> None:
        if any(isinstance(m, nn.SyncBatchNorm) for m in self.population.modules()):
            raise ValueError(
                "trainer.sync_batchnorm=true is not supported: surgery screens candidates on "
                "rank 0 alone, where a SyncBatchNorm would wait for the other ranks; leave it "
                "false (each rank's batch-norm statistics are averaged before use)"
            )

    def on_validation_model_eval(self) -> None:
        self._average_norm_stats()
        super().on_validation_model_eval()

    def on_test_model_eval(self) -> None:
        self._average_norm_stats()  # also when no validation ran since the last training
        super().on_test_model_eval()

    def _average_norm_stats(self) -> None:
        """Under DDP each rank normalises by its own batches and updates its own running
        statistics, as plain DDP does (SyncBatchNorm needs a GPU, and would wait for the
        other ranks while rank 0 screens alone). Averaged across ranks before they are used
        (validation, surgery), they are the same on every rank, and in checkpoints. A
        collective: every rank calls it."""
        stats = [
            t
            for m in self.population.modules()
            if isinstance(m, nn.BatchNorm2d)
            for t in (m.running_mean, m.running_var)
        ]
        if self.trainer.world_size == 1 or not stats:
            return
        flat = torch.cat([t.reshape(-1) for t in stats])
        flat = self.trainer.strategy.reduce(flat, reduce_op="mean")
        for t, mean in zip(stats, flat.split([t.numel() for t in stats]), strict=True):
            t.copy_(mean.view_as(t))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        x = batch[0] if isinstance(batch, list | tuple) else batch
        return self.net(x).argmax(1)

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self.net(x)
        metric = self.val_acc if stage == "val" else self.test_acc
        metric(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val")

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization:
            self._step_schedulers("epoch")
        if self._train_count:
            epoch = self._totals[-2:]
            totals = torch.cat([epoch, epoch.new_tensor([self._train_count])])
            loss_sum, correct, count = self.trainer.strategy.reduce(totals, reduce_op="sum")
            self.log("train/loss", loss_sum / count, prog_bar=True)
            self.log("train/acc", correct / count)
        topo = self.topology
        self.log("model/num_params", float(topo.num_params))
        self.log("model/depth", float(topo.depth))
        self.epoch_log.append(
            {
                "epoch": self.current_epoch,
                "topology": topo.describe(),
                "widths": topo.widths,
                "num_params": topo.num_params,
                "branches": len(self.population),
            }
        )

    def configure_optimizers(self) -> Any:
        optimizer = self._new_optimizer(self.population.parameters())
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": self.scheduler_factory(optimizer)}

    def _new_optimizer(self, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
        """The configured optimiser (default: SGD, lr 0.005, the paper's) over ``params``."""
        params = list(params)
        if self.optimizer_factory is None:
            return torch.optim.SGD(params, lr=0.005)
        return self.optimizer_factory(params)

    # ------------------------------------------------------------------ surgery

    def screen(self, branch: Branch, batches: int) -> float:
        """Short re-training of a candidate on random batches, seeded by its id (so a resumed
        run screens alike), then its validation accuracy."""
        dm = self.trainer.datamodule
        s = dm.device_splits()
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + branch.id)
        chosen = random_batches(s.x_train, s.y_train, batches, dm.batch_size, generator)
        branch.net.to(self.device)
        return train_branch(branch, self._new_optimizer, chosen, s.x_val, s.y_val)

    def profile(self, action: str) -> AbstractContextManager[Any]:
        """Time a part of surgery as the trainer's profiler action ``surgery/<action>``
        (``Trainer(profiler="simple")`` shows them; nothing is timed without a trainer)."""
        trainer = self._trainer
        return nullcontext() if trainer is None else trainer.profiler.profile(f"surgery/{action}")

    def _collect_optimizer_states(self) -> None:
        """Give each branch its slice of the trainer's optimiser state."""
        if not self.trainer.optimizers:
            return
        sizes = [len(list(net.parameters())) for net in self.population]
        parts = split_state(self.trainer.optimizers[0].state_dict(), sizes)
        for branch, part in zip(self.branches, parts, strict=True):
            branch.optimizer_state = part

    def operate(self, epoch: int) -> bool:
        """Surgery at a generation boundary (``epoch`` epochs done). True if it changed the
        population (the loop then rebuilds DDP and the optimiser)."""
        if epoch != self.surgeon.next_boundary:
            return False
        self._average_norm_stats()  # also when no validation ran since the last training
        finite_loss = self._finite_losses()
        if self.trainer.is_global_zero:
            self._collect_optimizer_states()
            s = self.trainer.datamodule.device_splits()
            with self.profile("evaluate"):
                metrics = [
                    evaluate(b.net, s.x_val, s.y_val) if finite else math.nan
                    for b, finite in zip(self.branches, finite_loss, strict=True)
                ]
            self._event(epoch, self.surgeon.step(metrics))
        self._totals = None  # a new cycle
        payload = self.surgery_state()
        if self.trainer.world_size > 1:
            payload = self.trainer.strategy.broadcast(payload, src=0)
        self.load_surgery_state(payload)
        return True

    def _finite_losses(self) -> list[bool]:
        """Per branch: were all of this cycle's training losses finite, on every rank? (A
        collective: every rank calls it.)"""
        if self._totals is None:  # no step in this cycle
            return [True] * len(self.branches)
        sums = self.trainer.strategy.reduce(self._totals[:-2], reduce_op="sum")
        return torch.isfinite(sums).tolist()

    def _event(self, epoch: int, plan: Plan) -> None:
        """A surgery point, for logs and plots: what the population became, and the
        policy's ``diverged`` and ``fallbacks`` entries since the previous point."""
        history = self.surgeon.history
        seen = [sum(len(e.get(key, ())) for e in self.events) for key in ("diverged", "fallbacks")]
        self.events.append(
            {
                "epoch": epoch,
                "generation": plan.generation,
                "kind": plan.kind,
                "diverged": history.diverged[seen[0] :],
                "fallbacks": history.fallbacks[seen[1] :],
                "population": [
                    {
                        "branch": b.id,
                        "change": b.change.describe(),
                        "topology": b.net.topology.describe(),
                        "widths": b.net.topology.widths,
                        "num_params": b.net.topology.num_params,
                    }
                    for b in plan.branches
                ],
            }
        )

    # ------------------------------------------------------------------ state

    def surgery_state(self) -> dict[str, Any]:
        """All surgery state as plain CPU data (checkpoints and broadcasts)."""
        return _cpu(
            {
                "version": CHECKPOINT_VERSION,
                **self.surgeon.state_dict(),
                "epoch_log": self.epoch_log,
                "events": self.events,
                "loss_sums": None if self._totals is None else self._totals[:-2],
                "input_size": self.input_size,
                "num_classes": self.num_classes,
            }
        )

    def load_surgery_state(self, state: dict[str, Any]) -> None:
        version = state.get("version") if isinstance(state, dict) else None
        if version != CHECKPOINT_VERSION:
            raise CheckpointError(
                f"surgery state version {version!r} is not supported (this lit_surgery reads "
                f"version {CHECKPOINT_VERSION})"
            )
        self.surgeon.load_state_dict(state)
        self.epoch_log = list(state["epoch_log"])
        self.events = list(state["events"])
        sums = state.get("loss_sums")
        self._totals = None if sums is None else torch.cat([sums, sums.new_zeros(2)])
        self.input_size, self.num_classes = state["input_size"], state["num_classes"]
        self._install()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["surgery"] = self.surgery_state()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "surgery" not in checkpoint:
            raise CheckpointError(
                "this checkpoint has no 'surgery' entry: it was not written by lit_surgery"
            )
        self.load_surgery_state(checkpoint["surgery"])

    # ------------------------------------------------------------------ optimiser rebuild

    def carried_optimizer_state(self, hyper: dict[str, Any]) -> dict[str, Any]:
        sizes = [len(list(net.parameters())) for net in self.population]
        return join_state([b.optimizer_state for b in self.branches], sizes, hyper)
