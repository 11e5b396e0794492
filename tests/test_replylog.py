"""pyfuse3's line for a reply to a request the kernel dropped (ENOENT) is DEBUG, not ERROR;
every other reply failure stays an ERROR (nexfs/fuse/replylog.py)."""

from __future__ import annotations

import logging

import pytest

from nexfs.fuse import replylog


@pytest.fixture(name="pyfuse3_log")
def pyfuse3_log_fixture(caplog: pytest.LogCaptureFixture) -> logging.Logger:
    logger = logging.getLogger("pyfuse3")
    replylog.install()
    replylog.install()  # idempotent
    assert sum(isinstance(f, replylog.VanishedReplyFilter) for f in logger.filters) == 1
    caplog.set_level(logging.DEBUG, logger="pyfuse3")
    return logger


def test_a_reply_the_kernel_no_longer_waits_for_is_debug(
        pyfuse3_log: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    pyfuse3_log.error("fuse_release(): fuse_reply_* failed with %s", "No such file or directory")
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", "fuse_release(): fuse_reply_* failed with No such file or directory")]


def test_other_reply_failures_stay_errors(
        pyfuse3_log: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    pyfuse3_log.error("fuse_read(): fuse_reply_* failed with %s", "Invalid argument")
    pyfuse3_log.error("fuse_setattr(): clock_gettime(CLOCK_REALTIME) failed with %s",
                      "No such file or directory")
    assert [r.levelname for r in caplog.records] == ["ERROR", "ERROR"]


def test_hidden_when_the_logger_is_not_debugging(
        pyfuse3_log: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pyfuse3")
    pyfuse3_log.error("fuse_lookup(): fuse_reply_* failed with %s", "No such file or directory")
    assert caplog.records == []
