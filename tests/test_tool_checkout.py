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
from pathlib import Path

import pytest
from imagekit import tool
from mountutil import REPO, child_env
from test_mount_lifecycle import fuse_helper  # noqa: F401  (fixture)

SCRIPTS = sorted(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"])


def trees(verbose_log: str) -> set[str]:
    """The directories ``nexfs/__init__.py`` was imported from."""
    # "code object from /x/nexfs/__init__.py" (compiled) or ".../nexfs/__pycache__/__init__
    # .cpython-311.pyc matches /x/nexfs/__init__.py" (cached): either names the directory.
    return set(re.findall(r"(/[^\s']+?)/nexfs/(?:__init__\.py|__pycache__/__init__\.)",
                          verbose_log))


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


def test_mount_t_helper_runs_this_checkout(fuse_helper: Path) -> None:  # noqa: F811
    """The ``nexfs`` that ``mount -t fuse.nexfs`` finds, run with mount(8)'s fixed PATH and
    nothing else in its environment.  (An nexfs installed in /usr/local/sbin fails this
    too, rightly: the mount -t tests would test that one.)"""
    result = subprocess.run([str(fuse_helper), "--help"], capture_output=True, text=True,
                            timeout=60, check=False,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONVERBOSE": "1"})
    assert trees(result.stderr) == {str(REPO)}, trees(result.stderr)
