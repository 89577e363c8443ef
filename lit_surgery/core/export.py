"""The winner as files that load without running code: ``model.safetensors`` and
``topology.json``.

A pickled module (``torch.save(model)``) needs ``torch.load(weights_only=False)``, which
executes whatever the file contains. safetensors holds only tensors and a JSON header, and
the topology is JSON, so loading an export never unpickles anything. The tensors are the
state dict of the plain ``nn.Sequential`` (``Flatten``, then per hidden layer ``Linear``
and its activation unless linear, then the output ``Linear``; a CNN has ``Unflatten`` and
its conv blocks' modules before a second ``Flatten``) that
:meth:`~lit_surgery.core.network.SurgeryNet.to_sequential` builds, so the README's recipe needs
only torch and safetensors. The safetensors header repeats the topology, which makes the
weights file self-describing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lit_surgery.core.network import SurgeryNet, build
from lit_surgery.core.topology import Topology, TopologyError
from lit_surgery.errors import UserError

WEIGHTS = "model.safetensors"
TOPOLOGY = "topology.json"


class ExportError(UserError):
    """A folder that does not hold a readable lit-surgery export."""


def export(net: SurgeryNet, directory: str | Path) -> Path:
    """Write ``net`` to ``directory`` as ``model.safetensors`` and ``topology.json``;
    returns the weights' path. Each file goes to a temporary name first, so a crash never
    leaves half a file under the final name."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    topology = net.topology.to_dict()
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in net.to_sequential().state_dict().items()
    }
    weights, topo = directory / WEIGHTS, directory / TOPOLOGY
    save_file(
        tensors,
        weights.with_name(WEIGHTS + ".tmp"),
        metadata={"format": "lit-surgery", "topology": json.dumps(topology)},
    )
    topo.with_name(TOPOLOGY + ".tmp").write_text(json.dumps(topology, indent=2))
    os.replace(weights.with_name(WEIGHTS + ".tmp"), weights)
    os.replace(topo.with_name(TOPOLOGY + ".tmp"), topo)
    return weights


def load_exported(directory: str | Path) -> nn.Module:
    """The exported network of ``directory`` as a plain ``nn.Sequential`` in eval mode, on
    the CPU. Reads only JSON and safetensors: no pickle, no code from the files."""
    directory = Path(directory)
    weights, topo = directory / WEIGHTS, directory / TOPOLOGY
    for path in (weights, topo):
        if not path.is_file():
            raise ExportError(
                f"{path}: no such file; an export folder holds {WEIGHTS} and {TOPOLOGY}"
            )
    try:
        topology = Topology.from_dict(json.loads(topo.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError, TopologyError) as err:
        raise ExportError(f"{topo}: not a lit-surgery topology ({err})") from err
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError) as err:
        raise ExportError(f"{weights}: not a readable safetensors file ({err})") from err
    model = build(topology).to_sequential()
    try:
        model.load_state_dict(tensors)
    except RuntimeError as err:
        raise ExportError(
            f"{weights} does not match {topo} ({' '.join(str(err).split())})"
        ) from err
    return model.eval()

