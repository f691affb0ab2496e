"""The benchmark script runs end to end (on tiny sizes; timings are not asserted)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_speed_script_runs(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "speed.py"), "--sizes", "5x12x8x2x2"]
    command += ["--repeats", "1", "--budget", "0", "--out", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = json.loads(out.read_text())["rows"]
    layers = {row["layer"] for row in rows}
    assert {"nn.Linear", "LowRankLinear", "nanomoe full", "reference scalar"} <= layers
    assert all(row["forward_ms"] > 0 for row in rows)
