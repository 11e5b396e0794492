"""bench/scale_bench.py still runs (quick mode) and reports every figure docs/BENCHMARKS.md
("Scale") quotes.  No performance assertion: this only keeps the benchmark from rotting."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_scale_bench_produces_every_figure(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/scale_bench.py"), "--quick", "--dir", str(tmp_path),
         "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    result = json.loads(out.read_text())
    assert set(result["allocation"]) == {"64 GiB", "1 TiB"}
    for figures in result["allocation"].values():
        for key in ("data_us", "meta_us", "inode_us", "first_data_us"):
            assert figures[key] > 0
    assert set(result["orphans"]) == {"1000", "5000"}
    for figures in result["orphans"].values():
        assert figures["release_s"] > 0 and figures["per_release_us"] > 0
    assert "| 64 GiB |" in proc.stdout and "| 5,000 |" in proc.stdout
    assert list(tmp_path.iterdir()) == [out]  # the images are cleaned up
