"""Two DDP processes on CPU (gloo): every rank must hold bit-identical networks and
optimiser state after every surgery and after training on different shards."""

import json
import subprocess
import sys
from pathlib import Path


def test_ddp_ranks_stay_identical_through_surgery(tmp_path):
    out = tmp_path / "hashes.json"
    script = Path(__file__).with_name("ddp_check.py")
    subprocess.run([sys.executable, str(script), str(out), str(tmp_path)], check=True,
                   cwd=tmp_path, timeout=600)
    data = json.loads(out.read_text())
    records = data["records"]
    assert [e["kind"] for e in data["events"]][-1] == "end"
    assert len(data["events"]) >= 4  # three generations and the end
    changed = {tuple(r["ranks"][0]["topologies"]) for r in records}
    assert len(changed) > 1, "surgery never changed the population"
    for r in records:
        first, second = r["ranks"]
        assert first == second, f"ranks differ at {r['label']}, epoch {r['epoch']}"
    # surgery then further training: new parameters are synchronised by the new DDP wrapper
    after = [r for r in records if r["label"].startswith("epoch end") and r["surgeries"] > 0]
    assert len(after) >= 4
