"""The valve fuzz harness (fuzz/fuzz_valve.py) in the test suite: every saved regression
input replays cleanly, and a short hypothesis run drives the same harness with random bytes
(the long atheris run is documented in docs/RELIABILITY.md)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "fuzz"))

from fuzz_valve import one_input  # noqa: E402

REGRESSIONS = sorted((ROOT / "fuzz" / "regressions").glob("*"))


@pytest.mark.parametrize("case", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_regression_inputs(case: Path) -> None:
    one_input(case.read_bytes())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_random_programs(data: bytes) -> None:
    one_input(data)
