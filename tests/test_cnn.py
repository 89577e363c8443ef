"""Convolutional networks through the criteria, the policy and Lightning: conv blocks are
read, proposed, operated on and trained like dense layers (issue 11)."""

from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from images import fashion_like  # pytest puts tests/ on sys.path

from lit_surgery.cli import main
from lit_surgery.core.criteria import (
    Candidate,
    paper_ratio,
    propose,
    singular_values,
    topology_after,
)
from lit_surgery.core.network import build
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.topology import ConvLayer, Topology
from lit_surgery.data import SurgeryDataModule
from lit_surgery.errors import UserError
from lit_surgery.lightning.loop import attach
from lit_surgery.lightning.module import SurgeryModule

ROOT = Path(__file__).resolve().parents[1]
CONV = [ConvLayer(4, batch_norm=True, pool=2), ConvLayer(6, pool=2)]


def _cnn():
    """1x12x12 -> c4 (bn, pool 2) -> 4x6x6 -> c6 (pool 2) -> 6x3x3 -> 8 -> 10."""
    torch.manual_seed(0)
    return build(Topology.cnn((1, 12, 12), CONV, [8], 10))


# --------------------------------------------------------------------------------------
# criteria


def test_singular_values_of_conv_blocks_read_one_row_per_channel():
    net = _cnn()
    with torch.no_grad():
        # channel 1 of block 0 computes twice channel 0: one removable incoming direction
        net.linear(0).weight[1] = 2 * net.linear(0).weight[0]
        # block 1's channel 2 reaches the next conv, and channel 5 the dense layer, as
        # three times channel 0 does: one removable outgoing direction each
        net.linear(1).weight[:, 2] = 3 * net.linear(1).weight[:, 0]
        dense = net.linear(2).weight.view(8, 6, 9)  # (out, channel, H * W) of the flatten
        dense[:, 5] = 3 * dense[:, 0]
    w0 = net.linear(0).weight.detach()
    incoming = singular_values(net, 0, "incoming")
    torch.testing.assert_close(incoming, torch.linalg.svdvals(w0.reshape(4, 9)))
    assert incoming[-1] < 1e-6 < incoming[-2]
    for layer in (0, 1):
        outgoing = singular_values(net, layer, "outgoing")
        assert outgoing.shape == (CONV[layer].width,)
        assert outgoing[-1] < 1e-5 < outgoing[-2], outgoing
    # the grouping: rows are channels (a next conv's in-channel, the flatten's H*W columns)
    w1, w2 = net.linear(1).weight.detach(), net.linear(2).weight.detach()
    assert torch.equal(net.outgoing_matrix(0)[3], w1[:, 3].reshape(-1))
    assert torch.equal(net.outgoing_matrix(1)[4], w2[:, 36:45].T.reshape(-1))


def test_proposals_treat_conv_blocks_like_dense_layers():
    net = _cnn()
    topo = net.topology
    cands = propose(net, SurgerySettings())
    conv_ops = {c.op for c in cands if c.layer is not None and c.layer < topo.num_conv}
    assert {"AN", "AL"} <= conv_ops
    for c in cands:
        after = topology_after(topo, c)
        assert c.param_ratio == pytest.approx(after.num_params / topo.num_params)
        if c.op == "AN":
            # inputs per unit of the matrix the criteria read: a conv's in * kh * kw
            assert c.compression == topo.matrix_shape(c.layer)[1] / topo.hidden[c.layer].width
    (an1,) = [c for c in cands if (c.op, c.layer, c.amount) == ("AN", 1, 2)]
    assert an1.compression == 4 * 9 / 6
    # the reference's estimate with m = in * kh * kw (36 for block 1): (m + 1) k added
    total = topo.num_params
    assert paper_ratio(topo, an1) == pytest.approx((total + 37 * 2) / total)
    al0 = Candidate("AL", 0, 0)  # exact: a conv identity block of 4 channels, 3x3
    assert paper_ratio(topo, al0) == pytest.approx((total + 4 * 4 * 9 + 4) / total)
    # the size budget counts conv parameters: no growth above it
    budget = SurgerySettings(max_params=total + 100)
    for c in propose(net, budget):
        assert c.param_ratio < 1 or topology_after(topo, c).num_params <= total + 100


# --------------------------------------------------------------------------------------
# Lightning


def _model(**kw):
    settings = SurgerySettings(**{**dict(max_epochs=4, initial_epochs=1, epoch_step=1), **kw})
    return SurgeryModule(hidden=[16], conv=CONV, surgery=settings,
                         optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def _trainer(tmp_path, **kw):
    return attach(pl.Trainer(
        max_epochs=4, default_root_dir=tmp_path, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, **kw))


def test_cnn_fit_with_surgery_operates_on_conv_blocks(tmp_path):
    """Three generations on Fashion-MNIST-shaped data: conv candidates are screened and
    trained, batch-norm statistics are learnt, and the logs show channels like widths."""
    pl.seed_everything(0)
    model = _model()
    data = SurgeryDataModule("npz", npz_path=str(fashion_like(tmp_path / "d.npz")))
    _trainer(tmp_path).fit(model, data)
    assert model.automatic_optimization  # batch norm: eager steps (no compiled step)
    history = model.surgeon.history
    assert model.surgeon.done_generations == 3
    on_conv = [r for r in history.candidates if r.op != "B" and r.layer < 2]
    assert any(r.branch is not None for r in on_conv), "no conv candidate was applied"
    assert any(r.trained for r in on_conv), "no conv candidate was trained"
    assert model.branches[0].metric > 0.5  # 10 classes
    for entry in model.epoch_log:
        assert entry["topology"].startswith("1x28x28-[c")
        assert entry["widths"][0] == int(entry["topology"].split("[c")[1].split("k")[0])
    bn = model.net.norm(0)
    assert bn is not None and bn.num_batches_tracked > 0 and bn.running_mean.abs().sum() > 0


def test_conv_needs_image_data_and_batch_norm_is_not_compiled(tmp_path):
    with pytest.raises(UserError, match=r"model.conv needs images.*shape \(64,\)"):
        _trainer(tmp_path).fit(_model(), SurgeryDataModule("digits"))
    model = _model()
    model.compile_policy = True
    data = SurgeryDataModule("npz", npz_path=str(fashion_like(tmp_path / "d.npz", 64, 16)))
    with pytest.raises(ValueError, match=r"model.compile=true.*batch norm"):
        _trainer(tmp_path).fit(model, data)


# --------------------------------------------------------------------------------------
# configs


@pytest.mark.parametrize("name", ["fashion_mnist_cnn", "cifar10_cnn", "svhn_cnn"])
def test_cnn_configs_parse(name, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(ROOT / "configs" / f"{name}.yaml"), "--print_config"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "conv:" in out and "batch_norm: true" in out and "pool: 2" in out


def test_fashion_cnn_config_fits_end_to_end(tmp_path, capsys, monkeypatch):
    if not Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist not installed (bash .ci/fashion-mnist.sh)")
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", str(ROOT / "configs/fashion_mnist_cnn.yaml"),
          "--model.surgery.max_epochs=2", "--model.surgery.initial_epochs=1",
          "--model.surgery.epoch_step=1", "--trainer.limit_train_batches=2",
          "--data.val_fraction=0.01", "--trainer.limit_test_batches=1",
          "--trainer.enable_progress_bar=false", "--trainer.logger=false"])
    out = capsys.readouterr().out
    assert "final topology: 1x28x28-[c" in out and "test accuracy: " in out


def test_optuna_sweep_over_a_cnn_config(tmp_path):
    """Two trials of the CNN config on Fashion-MNIST-shaped data, the conv blocks among the
    searched parameters."""
    from test_tuning import SHORT, states, tune, write_sweep

    path = fashion_like(tmp_path / "d.npz", n_train=128, n_val=32)
    conv = [[{"width": 4, "pool": 2}], [{"width": 6, "batch_norm": True, "pool": 4}]]
    sweep = write_sweep(
        tmp_path / "cnn.yaml",
        base=str(ROOT / "configs" / "fashion_mnist_cnn.yaml"),
        overrides={**SHORT, "data.dataset": "npz", "data.npz_path": str(path)},
        params={"model.conv": {"type": "categorical", "choices": conv}},
        n_trials=2,
        sampler={"name": "GridSampler"},
    )
    study = tune(str(sweep), "--storage", "memory", "--out-dir", str(tmp_path))
    assert states(study) == ["COMPLETE"] * 2
    topologies = sorted(t.user_attrs["topology"] for t in study.trials)
    assert topologies[0].startswith("1x28x28-[c4k3+mp2") and "+bn+mp4" in topologies[1]
