"""SurgeryReport and the plot functions: hand-made inputs, and short real fits on digits with
each kind of logger (none, CSV, W&B offline, TensorBoard where installed)."""

import csv
import glob
import json
import math
import struct
from functools import partial
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from matplotlib.image import imread

from lit_surgery.core.network import build
from lit_surgery.core.policy import CandidateRecord
from lit_surgery.core.settings import SurgerySettings
from lit_surgery.core.topology import Topology
from lit_surgery.data import SurgeryDataModule
from lit_surgery.lightning.callbacks import SurgeryReport
from lit_surgery.lightning.loop import attach
from lit_surgery.lightning.module import SurgeryModule
from lit_surgery.report.figures import plot_spectra, plot_widths
from lit_surgery.report.tables import (
    CANDIDATE_COLUMNS,
    GENEALOGY_COLUMNS,
    candidate_rows,
    genealogy_rows,
    write_csv,
    write_json,
)

torch.set_num_threads(1)

EPOCHS = 6
OUTPUTS = ("candidates.csv", "genealogy.json", "history.json", "widths.png", "spectra.png")


def assert_png(path: Path) -> None:
    """A real, non-blank image, not a stub."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", path
    assert path.stat().st_size > 10_000, path
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert float(pixels.std()) > 0.01  # something is drawn


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.rglob(".*.tmp")]


def fit(root: Path, logger, report: SurgeryReport | None = None) -> tuple[SurgeryModule, Path]:
    settings = SurgerySettings(max_epochs=EPOCHS, initial_epochs=2, epoch_step=2)
    model = SurgeryModule(hidden=[4], surgery=settings, optimizer=partial(torch.optim.SGD, lr=0.05))
    report = report or SurgeryReport()
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        logger=logger,
        default_root_dir=root,
        callbacks=[report],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    attach(trainer)
    trainer.fit(model, SurgeryDataModule("digits", download=False))
    assert trainer.current_epoch == EPOCHS
    return model, report._out_dir(trainer)


def check_outputs(out: Path, model: SurgeryModule) -> None:
    """The files on disk agree with the module's history."""
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    assert_png(out / "widths.png")
    assert_png(out / "spectra.png")
    assert no_temp_files(out)

    records = model.surgeon.history.candidates
    assert records, "the schedule has two generations: there must be candidates"
    with (out / "candidates.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CANDIDATE_COLUMNS
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        assert row["type"] == record.op
        assert int(row["generation"]) == record.generation
        assert row["kept"] == str(record.kept)
    assert {r["generation"] for r in rows} == {"1", "2"}
    assert any(r["kept"] == "True" for r in rows)

    genealogy = json.loads((out / "genealogy.json").read_text())
    assert set(genealogy) == {str(k) for k in model.surgeon.history.genealogy}
    assert genealogy["0"]["parent"] is None

    history = json.loads((out / "history.json").read_text())
    assert len(history["candidates"]) == len(records)
    assert [e["epoch"] for e in history["epoch_log"]] == list(range(EPOCHS))
    assert [e["kind"] for e in history["events"]][-1] == "end"


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    return tmp_path


# ---------------------------------------------------------------------------- plain helpers


def test_plot_widths_on_hand_made_log(tmp_path):
    epoch_log = [
        {"epoch": e, "widths": w, "num_params": n, "branches": b}
        for e, w, n, b in [
            (0, [4], 310, 1),
            (1, [4], 310, 1),
            (2, [6], 460, 2),
            (3, [6], 460, 2),
            (4, [6, 6], 502, 2),
            (5, [6, 6], 502, 2),
            (6, [8], 610, 1),
        ]
    ]
    events = [
        {"epoch": 2, "generation": 1, "kind": "generation", "population": []},
        {"epoch": 4, "generation": 2, "kind": "retry", "population": [{"topology": "x"}]},
        {"epoch": 6, "generation": 2, "kind": "end"},
    ]
    path = plot_widths(epoch_log, events, tmp_path / "sub" / "widths.png")
    assert path == tmp_path / "sub" / "widths.png"
    assert_png(path)
    assert no_temp_files(tmp_path)


def test_plot_widths_without_epochs_still_writes_a_figure(tmp_path):
    path = plot_widths([], [], tmp_path / "w.png")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_plot_spectra_shows_rank_deficient_layers_and_threshold(tmp_path):
    torch.manual_seed(0)
    net = build(Topology.mlp(3, [5, 4], 2))  # layer 0: 5 units from 3 inputs, rank <= 3
    with torch.no_grad():
        net.linear(1).weight[:, 0] = 0.0  # layer 1's incoming matrix loses rank too
    path = plot_spectra(net, tmp_path / "spectra.png", source="incoming", threshold=0.3)
    assert_png(path)
    assert_png(plot_spectra(net, tmp_path / "out.png", source="outgoing"))
    flat = build(Topology.mlp(3, [], 2))
    assert plot_spectra(flat, tmp_path / "flat.png", threshold=0.3).stat().st_size > 0


def test_tables_and_files_are_plain_strict_data(tmp_path):
    record = CandidateRecord(1, 0, "AN", 0, 2, 0.5, 1.4, screen_metric=math.nan, score=-math.inf)
    rows = candidate_rows([record, {**record.__dict__, "op": "B", "layer": None}])
    assert [len(r) for r in rows] == [len(CANDIDATE_COLUMNS)] * 2
    assert rows[0][CANDIDATE_COLUMNS.index("type")] == "AN"
    assert rows[1][CANDIDATE_COLUMNS.index("type")] == "B"

    topo = Topology.mlp(64, [4], 10)
    genealogy = {3: {"parent": 1, "generation": 2, "change": "AN@0 x2"}, 1: {"parent": None}}
    genealogy[3].update(topology=topo.to_dict(), num_params=topo.num_params, metric=0.5)
    table = genealogy_rows(genealogy)
    assert [r[0] for r in table] == [1, 3] and len(table[1]) == len(GENEALOGY_COLUMNS)
    assert table[1][GENEALOGY_COLUMNS.index("topology")] == "64-[4r]-10"

    data = json.loads(
        write_json(tmp_path / "r.json", {"s": -math.inf, "m": [math.nan]}).read_text()
    )
    assert data == {"s": None, "m": [None]}  # strict JSON: no NaN tokens
    write_csv(tmp_path / "r.csv", CANDIDATE_COLUMNS, rows)
    write_csv(tmp_path / "r.csv", CANDIDATE_COLUMNS, rows[:1])  # replaced, not appended
    assert len((tmp_path / "r.csv").read_text().splitlines()) == 2
    assert no_temp_files(tmp_path)


def test_callback_arguments_are_readable_by_lightning_cli():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(SurgeryReport, "report")
    cfg = parser.parse_args(["--report.out_dir=/x", "--report.plots=false"])
    assert cfg.report.out_dir == "/x" and cfg.report.plots is False


# ---------------------------------------------------------------------------- real fits


def test_fit_with_csv_logger(tmp_path):
    model, out = fit(tmp_path, CSVLogger(tmp_path))
    assert out == Path(tmp_path) / "lightning_logs" / "version_0"
    check_outputs(out, model)
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    epoch_rows = [r for r in rows if r.get("model/num_params")]
    assert len(epoch_rows) == EPOCHS
    for row, entry in zip(epoch_rows, model.epoch_log, strict=True):
        assert float(row["model/width_0"]) == entry["widths"][0]
        assert float(row["model/num_branches"]) == entry["branches"]
    final = [r for r in rows if r.get("surgery/final_num_params")]
    assert len(final) == 1
    assert float(final[0]["surgery/final_num_params"]) == model.topology.num_params


def test_fit_without_logger_writes_to_default_root_and_honours_plots(tmp_path):
    model, out = fit(tmp_path, False, SurgeryReport(out_dir=str(tmp_path / "r"), plots=False))
    assert out == tmp_path / "r"
    assert {p.name for p in out.iterdir()} == {"candidates.csv", "genealogy.json", "history.json"}
    assert len(json.loads((out / "history.json").read_text())["candidates"]) == len(
        model.surgeon.history.candidates
    )


def test_fit_with_tensorboard_logger(tmp_path):
    from lightning.fabric.loggers.tensorboard import (
        _TENSORBOARD_AVAILABLE,
        _TENSORBOARDX_AVAILABLE,
    )

    if not (_TENSORBOARD_AVAILABLE or _TENSORBOARDX_AVAILABLE):
        pytest.skip("TensorBoardLogger needs tensorboard or tensorboardX, neither is installed")
    from lightning.pytorch.loggers import TensorBoardLogger

    model, out = fit(tmp_path, TensorBoardLogger(tmp_path))
    check_outputs(out, model)


def _wandb_records(path: Path):
    """The records of an offline run's ``.wandb`` file (a LevelDB-style log of protobuf
    records: 32 KiB blocks of chunks, each with a 7-byte header: crc, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _wandb_summary(run_dir: Path) -> dict:
    """Top-level summary key -> JSON value (from wandb-summary.json, or else the records)."""
    summary_file = run_dir / "files" / "wandb-summary.json"
    if summary_file.is_file():
        return json.loads(summary_file.read_text())
    summary: dict = {}
    for record in _wandb_records(next(run_dir.glob("*.wandb"))):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                if item.key:
                    summary[item.key] = json.loads(item.value_json)
                else:  # nested values come one leaf at a time
                    node = summary
                    for part in item.nested_key[:-1]:
                        node = node.setdefault(part, {})
                    node[item.nested_key[-1]] = json.loads(item.value_json)
    return summary


def test_fit_with_offline_wandb_logger(wandb_env):
    import wandb

    tmp_path = wandb_env
    try:
        model, out = fit(tmp_path, WandbLogger(offline=True, save_dir=str(tmp_path)))
    finally:
        wandb.finish()
    check_outputs(out, model)
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*"))
    assert len(runs) == 1
    run_dir = Path(runs[0])
    summary = _wandb_summary(run_dir)
    for key in ("model/num_params", "model/width_0", "train/loss", "val/acc"):
        assert key in summary, key
    assert summary["surgery/final_num_params"] == model.topology.num_params
    table = summary["surgery/candidates"]
    assert table["_type"] == "table-file"
    assert table["nrows"] == len(model.surgeon.history.candidates)
    assert table["ncols"] == len(CANDIDATE_COLUMNS)
    assert (run_dir / "files" / table["path"]).is_file()
    assert summary["surgery/genealogy"]["nrows"] == len(model.surgeon.history.genealogy)
    for key in ("surgery/widths", "surgery/spectra"):
        (name,) = summary[key]["filenames"]
        assert_png(run_dir / "files" / name)
    media = run_dir / "files" / "media" / "images" / "surgery"
    assert sorted(p.name.split("_")[0] for p in media.glob("*.png")) == ["spectra", "widths"]
