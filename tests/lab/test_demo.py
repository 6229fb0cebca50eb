"""The demo's traffic table against the converged lab: every listener answers, load spreads."""

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = str(REPO / ".venv" / "bin" / "openclb-lab")
pytestmark = pytest.mark.lab


def test_traffic_reaches_every_listener(tmp_path):
    status = subprocess.run([LAB, "status", "--json"], capture_output=True, text=True, check=False)
    if not any(r["state"] == "running" for r in json.loads(status.stdout or "[]")):
        pytest.skip(f"lab {os.environ.get('OPENCLB_LAB_NAME', 'openclb')} is not up")
    out = tmp_path / "demo.json"
    res = subprocess.run([LAB, "traffic", "--count", "30", "--json", str(out)], capture_output=True, text=True,
                         timeout=900, check=False)
    report = json.loads(out.read_text())
    assert report["guests_reachable"] == report["guests"], report["unreachable"]
    assert report["listeners"], "the lab model has listeners: the table must show them"
    for row in report["listeners"]:
        assert row["ok"] == row["sent"], (row, res.stdout)
        if "redirect" not in row["spread"]:
            assert "?" not in row["spread"], f"{row['listener']}: an answer named no backend: {row}"
    assert res.returncode == 0, res.stdout + res.stderr
    tcp = next(r for r in report["listeners"] if r["listener"] == "tcp-web")
    assert len(tcp["spread"]) == 3, f"tcp-web spreads over three backends: {tcp['spread']}"
