"""The exported winner: safetensors plus JSON, loaded with no pickle at all."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lit_surgery import load_exported
from lit_surgery.core.export import ExportError, export
from lit_surgery.core.network import build
from lit_surgery.core.topology import Layer, Topology

ROOT = Path(__file__).resolve().parents[1]

# Run first in the child process: any unpickling, and lit_surgery itself, fail loudly.
NO_PICKLE = """
import pickle, sys
def refuse(*args, **kwargs):
    raise AssertionError("something tried to unpickle")
pickle.load = pickle.loads = refuse
pickle.Unpickler = refuse
import torch
torch.load = refuse
"""


def _net() -> torch.nn.Module:
    """Every activation, a linear layer and one without bias, as surgery leaves them."""
    torch.manual_seed(0)
    hidden = (
        Layer(7, "relu"),
        Layer(5, "linear", bias=False),
        Layer(6, "tanh"),
        Layer(4, "leaky_relu"),
        Layer(3, "sigmoid"),
        Layer(5, "gelu"),
    )
    return build(Topology(12, hidden, 4))


def _readme_recipe() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- recipe: load an export.*?-->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its loading recipe"
    return match.group(1)


def _run_child(code: str, tmp_path: Path) -> torch.Tensor:
    """``code`` defines ``model``; the child saves ``model(x)`` (as safetensors)."""
    script = (
        NO_PICKLE
        + code
        + "\nfrom safetensors.torch import load_file, save_file\n"
        + f"x = load_file({str(tmp_path / 'x.safetensors')!r})['x']\n"
        + f"save_file({{'y': model(x).detach()}}, {str(tmp_path / 'y.safetensors')!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    return load_file(tmp_path / "y.safetensors")["y"]


@pytest.fixture
def exported(tmp_path):
    net = _net()
    path = export(net, tmp_path / "run")
    x = torch.randn(9, 12)
    save_file({"x": x}, tmp_path / "x.safetensors")
    return net, path.parent, x


def test_export_writes_safetensors_and_topology_only(exported):
    net, folder, _ = exported
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "topology.json"]
    assert Topology.from_dict(json.loads((folder / "topology.json").read_text())) == net.topology


def test_load_exported_gives_the_same_outputs(exported):
    net, folder, x = exported
    model = load_exported(folder)
    assert not model.training
    assert torch.equal(model(x), net(x))


def test_load_exported_unpickles_nothing(exported, tmp_path):
    net, folder, x = exported
    code = f"import lit_surgery\nmodel = lit_surgery.load_exported({str(folder)!r})\n"
    assert torch.equal(_run_child(code, tmp_path), net(x))


def test_readme_recipe_needs_only_torch_and_safetensors(exported, tmp_path):
    net, folder, x = exported
    code = "sys.modules['lit_surgery'] = None  # importing it would fail\n" + _readme_recipe()
    code = code.replace("runs/lit-surgery/<run id>", str(folder))
    assert torch.equal(_run_child(code, tmp_path), net(x))


def test_export_replaces_an_older_one_whole(exported):
    _, folder, x = exported
    smaller = build(Topology.mlp(12, [2], 4))
    export(smaller, folder)
    assert torch.equal(load_exported(folder)(x), smaller(x))
    assert not list(folder.glob("*.tmp"))


def test_load_exported_errors_name_the_file(exported, tmp_path):
    _, folder, _ = exported
    with pytest.raises(ExportError, match=r"no-such/model.safetensors: no such file"):
        load_exported(tmp_path / "no-such")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "topology.json").write_text("{not json")
    (bad / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ExportError, match=r"bad/topology.json: not a lit-surgery topology"):
        load_exported(bad)
    (bad / "topology.json").write_text((folder / "topology.json").read_text())
    (bad / "model.safetensors").write_bytes(b"garbage, not tensors")
    with pytest.raises(ExportError, match=r"model.safetensors: not a readable safetensors"):
        load_exported(bad)
    export(build(Topology.mlp(12, [3], 4)), bad)
    (bad / "topology.json").write_text((folder / "topology.json").read_text())
    with pytest.raises(ExportError, match=r"model.safetensors does not match .*topology.json"):
        load_exported(bad)
