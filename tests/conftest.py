"""Shared fixtures: a formatted image file and the filesystem opened on it in-process."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def image(tmp_path: Path) -> Path:
    from fsutil import make_image

    return make_image(tmp_path / "vol.img")


@pytest.fixture
def fs(image: Path, caplog: pytest.LogCaptureFixture) -> Iterator[object]:
    """The filesystem on a fresh 64 MiB image; fsck must find it clean afterwards, and the
    test must not have logged a warning or error it did not expect."""
    from fsutil import fsck_clean, mounted

    with caplog.at_level(logging.WARNING), mounted(image) as filesystem:
        yield filesystem
    unexpected = [r for r in caplog.records if r.levelno >= logging.WARNING
                  and not getattr(r, "expected", False)]
    code, output = fsck_clean(image)
    assert code == 0, f"fsck after the test: exit {code}\n{output}"
    assert not unexpected, [r.getMessage() for r in unexpected]
