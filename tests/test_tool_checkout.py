"""The commands a test runs are this checkout's, not the installed package's.

The venv's console scripts (``mkfs.nexfs``, ``fsck.nexfs``, ``mount.nexfs``, ``nexfs``) import
``nexfs`` from wherever the venv was installed from (an editable install points at one
checkout).  A test run from another checkout (a git worktree) that starts them without this
checkout first on ``PYTHONPATH`` silently tests the other tree's code.  Every way the suite
starts our commands is checked here, for every console script in pyproject.toml: Python's
verbose import log names the file ``nexfs`` was loaded from.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
from imagekit import tool
from mountutil import REPO, child_env

SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def trees(verbose_log: str) -> set[str]:
    """The directories ``nexfs/__init__.py`` was imported from."""
    return set(re.findall(r"code object from '?(/\S+?)/nexfs/__init__\.py", verbose_log))


@pytest.mark.parametrize("script", SCRIPTS)
def test_imagekit_tool_runs_this_checkout(script: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONVERBOSE", "1")
    result = tool(script, "--help")
    assert trees(result.stderr) == {str(REPO)}, (script, trees(result.stderr))


@pytest.mark.parametrize("script", SCRIPTS)
def test_child_env_runs_this_checkout(script: str) -> None:
    """What mount tests and the bench test use for the venv's scripts."""
    bin_dir = f"{sys.executable.rsplit('/', 1)[0]}"
    result = subprocess.run([f"{bin_dir}/{script}", "--help"], capture_output=True, text=True,
                            timeout=60, env=child_env({"PYTHONVERBOSE": "1"}), check=False)
    assert trees(result.stderr) == {str(REPO)}, (script, trees(result.stderr))
