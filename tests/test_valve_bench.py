"""The valve benchmark still runs (quick mode) and reports what docs/BENCHMARKS.md quotes.

No performance assertion: a shared CI machine's figures say nothing.  This only keeps
bench/valve_bench.py from rotting.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_bench_produces_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/valve_bench.py"), "--quick", "--runs", "1",
         "--dir", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    result = json.loads(out.read_text())
    assert set(result) == {"command", "config", "environment", "workloads"}
    assert set(result["workloads"]) == {
        "seq_read_1m", "seq_write_1m", "rand_read_4k", "rand_write_4k"
    }
    for name, figures in result["workloads"].items():
        assert {"unit", "valve", "fio", "ratio", "target", "meets_target", "valve_runs",
                "fio_runs"} <= set(figures), name
        assert figures["valve"] > 0 and figures["fio"] > 0, name
        assert len(figures["valve_runs"]) == len(figures["fio_runs"]) == 1
    assert "| seq_read_1m |" in proc.stdout
    assert list(tmp_path.iterdir()) == [out]  # the image is cleaned up
