"""`make bench`'s surgery-run part on digits: the run is split into the profiler's parts."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_surgery_run_is_split_into_its_parts(tmp_path):
    out = tmp_path / "bench.json"
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "bench.py"),
        "--dataset",
        "digits",
        "--repeats",
        "1",
        "--skip",
        "throughput",
        "ddp",
        "--compile",
        "false",
        "--out",
        str(out),
    ]
    printed = subprocess.run(command, check=True, capture_output=True, text=True, cwd=tmp_path)
    report = json.loads(out.read_text())
    (plain,) = report["surgery"]["plain"]
    (surgery,) = report["surgery"]["surgery"]
    for part in (
        "branch training",
        "validation",
        "screening",
        "SVD and criteria",
        "operators",
        "evaluating branches",
        "re-wrapping and optimiser rebuild",
        "checkpointing",
        "logging",
    ):
        assert surgery["parts"][part] > 0, part
    for part in ("screening", "SVD and criteria", "operators"):
        assert plain["parts"][part] == 0, part  # no surgery, no surgery parts
    assert 0 < surgery["parts"]["other"] < surgery["wall"]
    assert surgery["peak_rss"] > 0 and surgery["topology"] != plain["topology"]
    assert "quick-schedule run: surgery" in printed.stdout


def test_packed_benchmark_prints_a_row_per_population(tmp_path):
    script = str(ROOT / "benchmarks" / "packed.py")
    command = [sys.executable, script, "--steps", "3", "--repeats", "1", "--min-width", "1"]
    printed = subprocess.run(command, check=True, capture_output=True, text=True, cwd=tmp_path)
    rows = [line for line in printed.stdout.splitlines() if line.startswith("| [")]
    ratios = re.compile(r"\| \d+\.\d\dx, \d+\.\d\dx \|$")
    assert len(rows) == 7 and all(ratios.search(row) for row in rows), rows
