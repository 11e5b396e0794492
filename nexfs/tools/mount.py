"""mount.nexfs: mount a NexFS volume through FUSE and serve it from a trio task.

    mount.nexfs [-o OPTIONS] [-f] [-d] TARGET MOUNTPOINT
    python mount.py              # the default: ./nexfs.img (created, 4 GiB) on ./mnt

Without ``--foreground`` the process forks; the child opens the volume, mounts it and tells
the parent over a pipe ("ok" or a one-line reason), and the parent exits only then, so
``mount -t fuse.nexfs`` and ``/etc/fstab`` see a mount that is ready, or a clear failure.
The fork happens before any trio loop, thread or FUSE session exists.

Unmounting (umount, ``fusermount3 -u``, SIGINT, SIGTERM) lets the kernel write back what it
holds while the loop still serves it, then closes the volume: everything committed, journal
checkpointed, volume marked clean, image lock released.

Exit status: 0 mounted (or, in the foreground, unmounted cleanly); 1 could not mount (the
reason is printed as one line); 2 bad command line or mount option; 3 unmounted, but the
volume was marked as needing fsck during the session; 4 internal error (traceback logged).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import logging.handlers
import os
import shutil
import signal
import stat
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

log = logging.getLogger(__name__)

PROG = "mount.nexfs"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_NEEDS_FSCK = 3
EXIT_INTERNAL = 4

DEFAULT_IMAGE = "nexfs.img"
DEFAULT_MOUNTPOINT = "mnt"
DEFAULT_SIZE = "4G"

# Options mount(8), mount.fuse3 and fstab pass that mean nothing to a FUSE filesystem.
IGNORED_OPTIONS = frozenset({
    "rw", "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group",
    "nofail", "_netdev", "default_permissions", "loud", "silent",
})
# Options libfuse turns into mount flags; passed on as they are.
KERNEL_OPTIONS = frozenset({
    "dev", "nodev", "suid", "nosuid", "exec", "noexec", "sync", "async", "dirsync",
    "allow_root",
})
ATIME_OPTIONS = {"noatime": "noatime", "relatime": "relatime", "strictatime": "strictatime",
                 "atime": "relatime"}

DESCRIPTION = """\
Mount the NexFS volume in TARGET (an image file, a block device, or an NBD export:
nbd://host[:port]/export, nbd+unix:///export?socket=PATH) on MOUNTPOINT.
With no arguments, mount ./nexfs.img on ./mnt in the foreground, creating and formatting a
sparse 4 GiB image and the directory if they do not exist."""

EPILOG = """\
mount options (-o, comma-separated):
  ro                 read-only: the volume is opened through a read-only capability
  allow_other        let users other than the one who mounted access the files
  noatime, relatime, strictatime
                     when to update access times (default relatime)
  cache_size=SIZE    the daemon's metadata cache limit, e.g. 64M (default 64M)
  data_cache=SIZE    the daemon's file data cache (small writes are acknowledged from it
                     and written at the next commit), e.g. 64M (default 64M; 0: none)
  commit=SECONDS     commit the running transaction this often (default 5)
  acl, noacl         POSIX access control lists (setfacl/getfacl) on or off (default acl)
  nbd_timeout=SECONDS
                     an NBD export's request timeout: past it the connection is dropped,
                     the request fails (EIO) and the volume goes read-only (default 30)
  dev, nodev, suid, nosuid, exec, noexec, sync, async, dirsync
                     passed to the kernel as mount flags
  rw, defaults, auto, noauto, user, nofail, _netdev, x-*, comment=...
                     accepted and ignored (fstab/mount(8) pass them)

logging: stderr in the foreground; in the background the system log (/dev/log), or if
there is none /var/log/nexfs.log (root) or $XDG_STATE_HOME/nexfs/nexfs.log.

exit status: 0 mounted / unmounted cleanly, 1 could not mount, 2 bad arguments,
3 unmounted but the volume needs fsck, 4 internal error."""


class MountError(Exception):
    """A reason not to mount that is the user's to fix: printed as one line, no traceback."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Seams:
    """Parts a program embedding the mount may put around the product's own, through
    :func:`main`.  The mount command never sets them: the fault-injecting launcher of the
    test suite (tests/faultmount.py) does, so that no test machinery lives in the product.

    ``device(capability, read_only)`` returns what the filesystem is opened on: the valve
    capability itself or an object with the same interface around it.
    ``adapter(filesystem, debug)`` returns the pyfuse3 operations object (by default a
    :class:`nexfs.fuse.adapter.FuseAdapter`).
    ``open_device(target, read_only)`` opens the target in place of ``valve.Valve.open``
    (an object with ``grant(rights)`` and ``close()``): the tests' unlocked image, which
    stands for a network export in the multi-mount protection tests."""

    device: Callable[[Any, bool], Any] | None = None
    adapter: Callable[[Any, bool], Any] | None = None
    open_device: Callable[[str, bool], Any] | None = None


NO_SEAMS = Seams()


@dataclass
class MountConfig:
    """Everything the command line and ``-o`` decided."""

    image: str
    mountpoint: str
    foreground: bool = False
    debug: bool = False
    read_only: bool = False
    allow_other: bool = False
    atime: str = "relatime"
    cache_blocks: int | None = None
    data_cache_blocks: int | None = None
    commit_interval: float | None = None
    nbd_timeout: float | None = None
    acl: bool = True
    kernel_options: list[str] = field(default_factory=list)
    log_file: str | None = None
    default_mode: bool = False


def parse_options(texts: list[str], config: MountConfig) -> None:
    """Apply ``-o`` option strings to ``config``; MountError(EXIT_USAGE) for an unknown one."""
    from nexfs.tools.common import parse_size

    for text in texts:
        for option in text.split(","):
            option = option.strip()
            name, _, value = option.partition("=")
            if not option or option in IGNORED_OPTIONS or name.startswith("x-") or name in (
                "comment", "context", "fscontext", "defcontext", "rootcontext"
            ):
                continue
            if option == "ro":
                config.read_only = True
            elif option == "allow_other":
                config.allow_other = True
            elif option in ATIME_OPTIONS:
                config.atime = ATIME_OPTIONS[option]
            elif option == "debug":
                config.debug = True
            elif option in ("acl", "noacl"):
                config.acl = option == "acl"
            elif name in ("cache_size", "data_cache"):
                try:
                    size = parse_size(value)
                except ValueError as exc:
                    raise MountError(f"{name}: {exc}", EXIT_USAGE) from None
                from nexfs.ondisk.metablock import BLOCK_SIZE

                if name == "cache_size":
                    config.cache_blocks = max(1, size // BLOCK_SIZE)
                else:
                    config.data_cache_blocks = size // BLOCK_SIZE
            elif name == "commit":
                try:
                    seconds = float(value)
                except ValueError:
                    seconds = -1
                if not 0 <= seconds <= 3600:
                    raise MountError(f"commit={value}: give seconds between 0 and 3600",
                                     EXIT_USAGE)
                config.commit_interval = seconds or None  # 0: the default, as for ext4
            elif name == "nbd_timeout":
                try:
                    seconds = float(value)
                except ValueError:
                    seconds = -1
                if not 0 < seconds <= 86400:
                    raise MountError(f"nbd_timeout={value}: give seconds between 0 and 86400",
                                     EXIT_USAGE)
                config.nbd_timeout = seconds
            elif option in KERNEL_OPTIONS:
                config.kernel_options.append(option)
            else:
                raise MountError(f"unknown mount option {option!r} (see {PROG} --help)",
                                 EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", nargs="?", metavar="TARGET",
                        help="image file, block device or NBD URI")
    parser.add_argument("mountpoint", nargs="?", metavar="MOUNTPOINT", help="an existing directory")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="comma-separated mount options (below)")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground and log to stderr")
    parser.add_argument("-d", "--debug", action="store_true",
                        help="log every request (much output)")
    parser.add_argument("--log-file", metavar="FILE",
                        help="log to FILE instead of stderr or the system log")
    return parser


def parse_args(argv: list[str] | None) -> MountConfig:
    args = build_parser().parse_args(argv)
    if (args.target is None) != (args.mountpoint is None):
        raise MountError("give both TARGET and MOUNTPOINT, or neither for the default "
                         f"(./{DEFAULT_IMAGE} on ./{DEFAULT_MOUNTPOINT})", EXIT_USAGE)
    default_mode = args.target is None
    from valve.nbd import is_nbd_uri

    target = args.target or DEFAULT_IMAGE
    config = MountConfig(
        image=target if is_nbd_uri(target) else os.path.abspath(target),
        mountpoint=os.path.abspath(args.mountpoint or DEFAULT_MOUNTPOINT),
        foreground=args.foreground or default_mode,
        debug=args.debug,
        log_file=os.path.abspath(args.log_file) if args.log_file else None,
        default_mode=default_mode,
    )
    parse_options(args.options, config)
    return config


# -- checks before anything is opened ----------------------------------------------------


def prepare_default(config: MountConfig) -> None:
    """The no-argument mode: create and format ./nexfs.img and create ./mnt if missing."""
    if not os.path.exists(config.image):
        from nexfs.tools import mkfs

        print(f"{PROG}: creating {config.image} (sparse, {DEFAULT_SIZE[:-1]} GiB)", flush=True)
        code = mkfs.main(["--size", DEFAULT_SIZE, "--label", "nexfs", "--quiet", config.image])
        if code != 0:
            raise MountError(f"could not create {config.image} (mkfs.nexfs exit {code})")
    if not os.path.exists(config.mountpoint):
        os.mkdir(config.mountpoint, 0o755)


def check_paths(config: MountConfig) -> None:
    """Refuse the common mistakes before forking, with one line each."""
    from valve.nbd import is_nbd_uri

    # An NBD export is checked by connecting to it, in the daemon (open_volume).
    if not is_nbd_uri(config.image):
        try:
            st = os.stat(config.image)
        except FileNotFoundError:
            raise MountError(f"{config.image}: no such file or device") from None
        except OSError as exc:
            raise MountError(f"{config.image}: {exc.strerror}") from None
        if stat.S_ISDIR(st.st_mode):
            raise MountError(f"{config.image} is a directory, not an image file or device")
    try:
        st = os.stat(config.mountpoint)
    except FileNotFoundError:
        raise MountError(f"mount point {config.mountpoint} does not exist") from None
    except OSError as exc:
        raise MountError(f"mount point {config.mountpoint}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise MountError(f"mount point {config.mountpoint} is not a directory")


# -- logging -----------------------------------------------------------------------------


def background_log_file() -> str:
    if os.geteuid() == 0:
        return "/var/log/nexfs.log"
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(state, "nexfs", "nexfs.log")


def setup_logging(config: MountConfig, *, background: bool) -> str:
    """Point the root logger at stderr, the system log or a file; returns where."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    if config.log_file:
        os.makedirs(os.path.dirname(config.log_file), exist_ok=True)
        handler = logging.FileHandler(config.log_file)
        where = config.log_file
    elif not background:
        handler = logging.StreamHandler(sys.stderr)
        where = "stderr"
    elif _is_socket("/dev/log"):
        handler = logging.handlers.SysLogHandler(
            address="/dev/log", facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        fmt = f"{PROG}[%(process)d]: %(levelname)s %(name)s: %(message)s"
        where = "the system log"
    else:
        path = background_log_file()
        os.makedirs(os.path.dirname(path), exist_ok=True)
        handler = logging.FileHandler(path)
        where = path
    if isinstance(handler, logging.FileHandler):
        fmt = "%(asctime)s " + PROG + "[%(process)d] %(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if config.debug else logging.INFO)
    # pyfuse3's own debug lines (session setup) are noise unless debugging.
    logging.getLogger("pyfuse3").setLevel(logging.DEBUG if config.debug else logging.WARNING)
    from nexfs.fuse import replylog

    replylog.install()  # a reply to a request the kernel dropped is not an error
    return where


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


# -- signals -----------------------------------------------------------------------------


class StopRequest:
    """Remembers SIGINT/SIGTERM that arrive before the trio loop listens (while the journal
    is replayed, say), so they unmount cleanly instead of raising KeyboardInterrupt."""

    def __init__(self, signals: tuple[int, ...]) -> None:
        self.signals = signals
        self.received: int | None = None

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.received = signum

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopRequest]:
        previous = {sig: signal.signal(sig, self._note) for sig in self.signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def _unmount_command(mountpoint: str, *, lazy: bool) -> list[str]:
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool:
        return [tool, "-u", *(["-z"] if lazy else []), mountpoint]
    return ["umount", *(["-l"] if lazy else []), mountpoint]


async def unmount(mountpoint: str) -> None:
    """Unmount from inside the daemon while the loop keeps serving, so the kernel can write
    back its dirty pages first.  A busy mount point is detached lazily: it disappears now
    and the session ends once the last user lets go."""
    import trio

    try:
        result = await trio.run_process(_unmount_command(mountpoint, lazy=False),
                                        check=False, capture_stdout=True, capture_stderr=True)
        if result.returncode == 0:
            return
        reason = result.stderr.decode(errors="replace").strip()
        log.warning("could not unmount %s (%s); detaching it lazily: NexFS stops when the "
                    "last file on it is closed", mountpoint,
                    reason or f"exit {result.returncode}")
        await trio.run_process(_unmount_command(mountpoint, lazy=True), check=False,
                               capture_stdout=True, capture_stderr=True)
    except OSError as exc:
        # Never let this end the loop: the mount would stay, with nobody serving it.
        log.error("cannot run the unmount helper (%s); unmount %s by hand", exc, mountpoint)


async def watch_signals(mountpoint: str, stop: StopRequest) -> None:
    """First SIGINT/SIGTERM: unmount cleanly.  A second one: stop serving at once (pages
    the kernel still holds are lost, the volume itself stays consistent)."""
    import pyfuse3
    import trio

    with trio.open_signal_receiver(*stop.signals) as signals:
        async with trio.open_nursery() as nursery:
            if stop.received is not None:
                log.info("%s received during start-up: unmounting %s",
                         signal.Signals(stop.received).name, mountpoint)
                nursery.start_soon(unmount, mountpoint)
            count = 0 if stop.received is None else 1
            async for signum in signals:
                count += 1
                if count == 1:
                    log.info("%s: unmounting %s", signal.Signals(signum).name, mountpoint)
                    nursery.start_soon(unmount, mountpoint)
                else:
                    log.warning("%s again: stopping without waiting for the kernel",
                                signal.Signals(signum).name)
                    pyfuse3.terminate()


# -- serving -----------------------------------------------------------------------------


def fuse_options(config: MountConfig, *, read_only: bool) -> set[str]:
    """libfuse options.  max_write is not among them: libfuse 3.14 refuses the option, and
    its default (1 MiB, what the kernel's max_pages=256 allows) already lets 1 MiB writes
    arrive whole."""
    import pyfuse3

    fsname = config.image.replace("\\", "\\\\").replace(",", "\\,")
    options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    options |= {f"fsname={fsname}", "subtype=nexfs", *config.kernel_options}
    if read_only:
        options.add("ro")
    if config.allow_other:
        options.add("allow_other")
    if config.atime == "noatime":
        options.add("noatime")
    return options


def open_volume(config: MountConfig, seams: Seams = NO_SEAMS) -> tuple[Any, Any, Any]:
    """Open the image through the valve and the filesystem on it (replaying the journal if
    the volume was not unmounted cleanly), on ``seams.device``'s wrapper of the capability
    if there is one.  A writable open first claims the volume's multi-mount protection
    block (nexfs/store/mmp.py), which may wait.  Returns (valve, filesystem, the claimed
    :class:`~nexfs.store.mmp.Mmp` or None)."""
    from nexfs.core.fs import FileSystem
    from nexfs.ondisk.layout import NotNexfsError
    from nexfs.store.mmp import MmpBusy, Unprotected, open_claim
    from nexfs.tools.common import describe_os_error
    from nexfs.types import CorruptionError, FsError
    from valve import Capability, DeviceBusyError, DeviceError, Rights, Valve

    try:
        if seams.open_device is not None:
            valve = seams.open_device(config.image, config.read_only)
        else:
            valve = Valve.open(config.image, read_only=config.read_only,
                               nbd_timeout=config.nbd_timeout)
    except DeviceBusyError as exc:
        raise MountError(f"{exc}; is it already mounted? (see /proc/mounts)") from None
    except OSError as exc:
        raise MountError(describe_os_error(config.image, exc)) from None
    try:
        rights = Rights.READ if config.read_only else Rights.READ | Rights.WRITE
        cap = valve.grant(rights)
        if seams.device is not None:
            cap = seams.device(cap, config.read_only)
        mmp = None if config.read_only else open_claim(cap, device=config.image)
        try:
            with mmp.keeping() if mmp is not None else contextlib.nullcontext():
                fs = FileSystem.open(cap, read_only=config.read_only,
                                     cache_blocks=config.cache_blocks,
                                     data_cache_blocks=config.data_cache_blocks,
                                     atime=config.atime, acl=config.acl)
        except BaseException:
            if mmp is not None:  # not mounted after all: the next mount need not wait
                with contextlib.suppress(OSError):
                    mmp.release()
            raise
        if isinstance(valve, Valve) and isinstance(cap, Capability):
            # Data reads in flight on a valve ring (nexfs/store/inflight.py), on an image as
            # on an NBD export; a device that is not the valve's (test seams, wrappers) or
            # whose ring cannot open keeps the blocking reads.
            from nexfs.store.inflight import DEPTH

            try:
                fs.store.data.attach_ring(valve.ring(DEPTH))
            except DeviceError as exc:
                log.info("%s: reads block (%s)", config.image, exc.strerror)
            # And the data cache's flushes: their scattered writes in flight together.
            from nexfs.store.datacache import FLUSH_DEPTH

            try:
                fs.store.data.attach_flush_ring(valve.ring(FLUSH_DEPTH))
            except DeviceError as exc:
                log.info("%s: flushes write one block run at a time (%s)", config.image,
                         exc.strerror)
        if mmp is not None and mmp.seq is None:
            # Lost while the journal was replayed: stop writing before anything else runs.
            fs.failures.enter("multi-mount protection: the volume was claimed by another "
                              "node while it was being opened")
    except (MmpBusy, Unprotected) as exc:
        valve.close()
        raise MountError(f"{config.image}: {exc}") from None
    except NotNexfsError:
        valve.close()
        raise MountError(f"{config.image} is not a NexFS volume (mkfs.nexfs makes one)") from None
    except CorruptionError as exc:
        valve.close()
        raise MountError(f"{config.image}: {exc}; run fsck.nexfs {config.image}") from None
    except FsError as exc:
        valve.close()
        raise MountError(f"{config.image}: cannot open the volume: {exc}") from None
    except OSError as exc:
        valve.close()
        raise MountError(describe_os_error(config.image, exc)) from None
    except ValueError as exc:  # a value refused on the way (a device factory's, say)
        valve.close()
        raise MountError(str(exc), EXIT_USAGE) from None
    except BaseException:
        valve.close()
        raise
    return valve, fs, mmp


async def _serve_loop(ops: Any, config: MountConfig, stop: StopRequest, mmp: Any,
                      on_lost: Callable[[str], None]) -> None:
    import trio

    from nexfs.fuse import loop as fuseloop

    async with trio.open_nursery() as nursery:
        if mmp is not None:
            nursery.start_soon(mmp.keep, on_lost)
        if config.commit_interval is None:
            nursery.start_soon(ops.commit_periodically)
        else:
            nursery.start_soon(ops.commit_periodically, config.commit_interval)
        nursery.start_soon(watch_signals, config.mountpoint, stop)
        reads = ops.fs.store.data.reads
        if reads is not None:
            nursery.start_soon(reads.reaper)
            fuseloop.watch(reads.fileno(), reads.dispatch)
        try:
            await fuseloop.serve()
        finally:
            fuseloop.watch(-1)
        nursery.cancel_scope.cancel()


def serve(config: MountConfig, ready: Callable[[str | None], None],
          seams: Seams = NO_SEAMS) -> int:
    """Open, mount and serve until unmounted.  ``ready(note)`` is called once the mount is
    up (``note`` is a warning for the user, or None); a MountError before that is raised to
    the caller."""
    import pyfuse3
    import trio

    from nexfs.fuse.adapter import FuseAdapter
    from nexfs.fuse.stats import valve_counters

    signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)
    if config.foreground:
        signals += (signal.SIGHUP,)  # the terminal went away
    else:
        # A daemon has no terminal to lose; a stray SIGHUP must not kill it and leave the
        # mount point dangling.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    stop = StopRequest(signals)
    with stop.installed():
        valve, fs, mmp = open_volume(config, seams)
        code = EXIT_OK
        try:
            if seams.adapter is not None:
                ops = seams.adapter(fs, config.debug)
            else:
                ops = FuseAdapter(fs, debug=config.debug)
            stats = getattr(ops, "stats", None)
            if stats is not None:  # the valve's counters for ``nexfs stats``
                stats.sources.append(functools.partial(
                    valve_counters, valve, fs.store.bdev.sector_size))
            if stop.received is not None:
                log.info("interrupted before mounting")
                return EXIT_OK
            note = None
            if fs.error and not config.read_only:
                # The store opens a volume marked as needing fsck read-only; say so where
                # the user sees it, and let the kernel refuse writes up front.
                note = (f"warning: {config.image} needs fsck ({fs.error}); "
                        "mounted read-only")
            try:
                pyfuse3.init(ops, config.mountpoint,
                             fuse_options(config, read_only=config.read_only or fs.read_only))
            except RuntimeError:
                raise MountError(f"could not mount on {config.mountpoint} "
                                 "(the kernel or fusermount3 refused; see above)") from None
            if config.acl:
                # The umask is the core's to apply under a default ACL (nexfs/fuse/caps.py).
                from nexfs.fuse.caps import request_dont_mask

                request_dont_mask()
            log.info("mounted %s on %s%s", config.image, config.mountpoint,
                     " (read-only)" if fs.read_only else "")
            ready(note)
            try:
                trio.run(_serve_loop, ops, config, stop, mmp, fs.failures.enter)
            except Exception:
                log.exception("the FUSE main loop failed")
                code = EXIT_INTERNAL
            finally:
                # Already unmounted in the normal case (libfuse then only cleans up);
                # after a failure this detaches the mount so it does not hang.
                pyfuse3.close(unmount=True)
                ops.release_all()
        finally:
            try:
                fs.close()
            except Exception:
                log.exception("closing the volume failed")
                code = EXIT_INTERNAL
            finally:
                try:
                    if mmp is not None:
                        mmp.release()  # nothing more is written: others may claim it
                except OSError as exc:
                    log.error("could not mark the multi-mount protection block clean: %s "
                              "(the next mount waits for it)", exc)
                finally:
                    valve.close()
        if code == EXIT_OK and fs.error:
            log.error("unmounted %s; the volume needs fsck: %s", config.image, fs.error)
            return EXIT_NEEDS_FSCK
        if code == EXIT_OK:
            log.info("unmounted %s cleanly", config.image)
        return code


def daemonize(config: MountConfig, seams: Seams = NO_SEAMS) -> int:
    """Fork; the child mounts and reports over a pipe; the parent returns only then."""
    read_fd, write_fd = os.pipe()  # not inherited by helpers the child spawns (O_CLOEXEC)
    pid = os.fork()
    if pid:
        os.close(write_fd)
        return _wait_for_child(pid, read_fd)
    os.close(read_fd)
    code = EXIT_INTERNAL
    try:
        os.setsid()
        os.chdir("/")  # do not keep the caller's directory busy
        code = _child(config, write_fd, seams)
    finally:
        logging.shutdown()
        os._exit(code)


def _wait_for_child(pid: int, read_fd: int) -> int:
    data = b""
    try:
        with os.fdopen(read_fd, "rb") as pipe:
            while not data.endswith(b"\n"):
                chunk = pipe.read1(4096)
                if not chunk:
                    break
                data += chunk
    except KeyboardInterrupt:
        # Ctrl-C while the volume is being opened (a long journal replay, say): the child
        # stops at its next chance, unmounting cleanly if it got that far.
        os.kill(pid, signal.SIGTERM)
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_FAILED
    message = data.decode(errors="replace").strip()
    if message.startswith("ok"):
        note = message[2:].strip()
        if note:
            print(f"{PROG}: {note}", file=sys.stderr)
        return EXIT_OK
    _, status = os.waitpid(pid, 0)
    if not message:
        message = ("the filesystem process ended before the mount was ready "
                   f"(status {os.waitstatus_to_exitcode(status)}); see the log")
    print(f"{PROG}: {message}", file=sys.stderr)
    return EXIT_FAILED


def _child(config: MountConfig, write_fd: int, seams: Seams) -> int:
    reported = False

    def tell(message: str) -> None:
        nonlocal reported
        if not reported:
            reported = True
            try:
                os.write(write_fd, message.encode() + b"\n")
            finally:
                os.close(write_fd)

    def ready(note: str | None) -> None:
        tell(f"ok {note}" if note else "ok")
        # Detach from the terminal only now: until the mount is up, libfuse's own
        # complaints still reach the user.
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)

    try:
        where = setup_logging(config, background=True)
    except OSError as exc:
        tell(f"cannot open the log: {exc}")
        return EXIT_FAILED
    try:
        return serve(config, ready, seams)
    except MountError as exc:
        log.error("%s", exc)
        tell(str(exc))
        return exc.code
    except Exception as exc:
        log.exception("could not mount %s", config.image)
        tell(f"internal error: {type(exc).__name__}: {exc} (details in {where})")
        return EXIT_INTERNAL


def main(argv: list[str] | None = None, seams: Seams = NO_SEAMS) -> int:
    """The mount.nexfs command (also ``python mount.py`` and ``nexfs SOURCE DIR -o ...``);
    ``seams`` as :class:`Seams` says (none for the command itself)."""
    try:
        config = parse_args(argv)
        if config.default_mode:
            prepare_default(config)
        check_paths(config)
    except SystemExit as exc:  # argparse: --help, or a usage error it already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    except MountError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return EXIT_FAILED
    if not config.foreground:
        return daemonize(config, seams)
    setup_logging(config, background=False)

    def ready(note: str | None) -> None:
        if note:
            print(f"{PROG}: {note}", file=sys.stderr, flush=True)
        if config.default_mode:
            print(f"NexFS: {config.image} is mounted on {config.mountpoint}\n"
                  f"Press Ctrl-C to unmount (or run: fusermount3 -u {config.mountpoint}).",
                  flush=True)

    try:
        return serve(config, ready, seams)
    except MountError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return exc.code
    except Exception:
        log.exception("internal error")
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
