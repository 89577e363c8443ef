"""A surgery run as plain data: the candidate table, the genealogy, and files written
atomically (a temporary name first, then renamed, so a reader or a crash never sees half a
file). Strict JSON: non-finite numbers become ``null``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lit_surgery.core.topology import Topology

CANDIDATE_COLUMNS = (
    "generation",
    "parent",
    "type",
    "layer",
    "amount",
    "weight",
    "param_ratio",
    "screen_metric",
    "score",
    "kept",
    "attempt",
    "trained",
    "metric",
    "branch",
    "activation",
)
"""Columns of the candidate table; ``type`` is the operator code (``CandidateRecord.op``)."""

GENEALOGY_COLUMNS = ("id", "parent", "generation", "change", "topology", "num_params", "metric")





def json_safe(value: Any) -> Any:
    """Non-finite floats as ``None``, recursively: strict JSON has no NaN or infinity (a
    discarded candidate's score is ``-inf``, its metric NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def candidate_rows(records: Iterable[Any]) -> list[list[Any]]:
    """One row per ``CandidateRecord`` (or its dict), in :data:`CANDIDATE_COLUMNS` order."""
    rows = []
    for record in records:
        data = dict(record) if isinstance(record, Mapping) else asdict(record)
        data["type"] = data.pop("op")
        rows.append([data.get(column) for column in CANDIDATE_COLUMNS])
    return rows


def genealogy_rows(genealogy: Mapping[Any, Mapping[str, Any]]) -> list[list[Any]]:
    """One row per branch of ``History.genealogy``, topology in its short form."""
    rows = []
    for branch_id, node in sorted(genealogy.items(), key=lambda item: int(item[0])):
        topology = node.get("topology")
        if isinstance(topology, Mapping):
            topology = Topology.from_dict(dict(topology)).describe()
        rows.append(
            [
                int(branch_id),
                node.get("parent"),
                node.get("generation"),
                node.get("change"),
                topology,
                node.get("num_params"),
                node.get("metric"),
            ]
        )
    return rows





def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it into place (an
    atomic replace on POSIX and Windows), so ``path`` is always either old or complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], data: Any) -> Path:
    """Strict JSON (non-finite floats as ``null``), written atomically."""
    path = Path(path)
    text = json.dumps(json_safe(data), indent=2, allow_nan=False, default=str)
    write_atomic(path, (text + "\n").encode())
    return path


def write_csv(
    path: str | os.PathLike[str], columns: Sequence[str], rows: Iterable[Sequence[Any]]
) -> Path:
    """A CSV with a header row, written atomically (the whole table each time: it is small,
    and a rewrite stays correct after a resume, where appending would duplicate rows)."""
    path = Path(path)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    write_atomic(path, buffer.getvalue().encode())
    return path
