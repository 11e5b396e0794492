"""Real mounts driven with the ordinary tools: coreutils, tar, rsync, git, sqlite3, fio, attr.

Every test runs against ``python mount.py IMAGE DIR --foreground`` in a subprocess; the
fixtures (tests/mountutil.py) unmount afterwards and require fsck to find the volume clean.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import stat
from pathlib import Path

import pytest
from mountutil import (  # noqa: F401
    Mount,
    Mounter,
    mounted_fixture,
    mounter_fixture,
    needs_root,
    sh,
)

pytestmark = pytest.mark.mount

LONG_NAME = "L" * 251 + ".txt"  # 255 bytes, NAME_MAX


def manifest(root: Path) -> dict[str, tuple[object, ...]]:
    """What a copy must preserve: type, mode, size, content hash, link target, user xattrs,
    mtime (to the second) and which names are hard links of each other."""
    out: dict[str, tuple[object, ...]] = {}
    inodes: dict[int, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            st = path.lstat()
            xattrs: tuple[tuple[str, bytes], ...] = ()
            if not stat.S_ISLNK(st.st_mode):
                xattrs = tuple(sorted((n, os.getxattr(path, n)) for n in os.listxattr(path)
                                      if n.startswith("user.")))
            if stat.S_ISREG(st.st_mode):
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                first = inodes.setdefault(st.st_ino, rel) if st.st_nlink > 1 else rel
                out[rel] = ("f", stat.S_IMODE(st.st_mode), st.st_size, digest, xattrs,
                            int(st.st_mtime), first)
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = ("l", os.readlink(path))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("d", stat.S_IMODE(st.st_mode), xattrs)
            else:
                out[rel] = ("other", stat.S_IFMT(st.st_mode))
    return out


def build_tree(root: Path, nfiles: int) -> Path:
    """A source tree with ``nfiles`` small files over a few levels, symlinks, hard links, a
    sparse file, 255-byte names and user xattrs.  Deterministic."""
    root.mkdir()
    per_dir = 100
    for i in range(nfiles):
        d = root / f"d{i // per_dir:03d}" / f"sub{(i // 10) % 10}"
        d.mkdir(parents=True, exist_ok=True)
        size = (i * 7919) % 20000 if i % 10 else 0
        seed = hashlib.sha256(str(i).encode()).digest()
        data = (seed * (size // len(seed) + 1))[:size]
        f = d / f"file{i:05d}.dat"
        f.write_bytes(data)
        os.utime(f, (1_600_000_000 + i, 1_600_000_000 + i))
        if i % 97 == 0:
            os.setxattr(f, "user.index", str(i).encode())
            os.setxattr(f, "user.blob", seed * 8)
        if i % 211 == 0:
            os.symlink(f.name, d / f"link{i:05d}")
            os.link(f, d / f"hard{i:05d}.dat")
    (root / LONG_NAME).write_bytes(b"long name\n")
    long_dir = root / ("D" * 255)
    long_dir.mkdir()
    (long_dir / ("f" * 255)).write_bytes(b"x" * 5000)
    os.symlink("/" + "t" * 1000, root / "long-target-link")
    with open(root / "sparse.img", "wb") as sparse:
        sparse.truncate(64 << 20)
        sparse.seek(10 << 20)
        sparse.write(b"island" * 1000)
        sparse.seek((64 << 20) - 4096)
        sparse.write(b"end" * 100)
    os.setxattr(root, "user.top", b"directory xattr")
    return root


@needs_root
def test_coreutils(mounted: Mount) -> None:
    mounted.sh("""
        export TZ=UTC
        mkdir -p a/b/c
        printf 'hello\\n' > a/b/c/file
        seq 1 100000 > a/numbers
        cp -a a copy
        diff -r a copy
        [ "$(stat -c %Y a/numbers)" = "$(stat -c %Y copy/numbers)" ]

        # mv: within a directory, across directories, over an existing file
        mv copy/b/c/file copy/b/c/renamed
        mv copy/b/c/renamed copy/
        [ "$(cat copy/renamed)" = hello ] && [ ! -e copy/b/c/renamed ]
        echo new > x; echo old > y
        mv x y
        [ "$(cat y)" = new ] && [ ! -e x ]
        mv y a/b/
        [ "$(cat a/b/y)" = new ]
        mkdir dir2 && mv copy dir2/ && [ -d dir2/copy/b/c ]

        # rm -r
        rm -r dir2/copy
        [ -z "$(ls -A dir2)" ] && rmdir dir2

        # ln, ln -s
        ln a/numbers hard
        [ "$(stat -c %h a/numbers)" = 2 ] && [ "$(stat -c %i a/numbers)" = "$(stat -c %i hard)" ]
        ln -s a/numbers sym
        [ "$(readlink sym)" = a/numbers ] && cmp sym a/numbers
        [ "$(stat -L -c %s sym)" = "$(stat -c %s a/numbers)" ]
        rm hard && [ "$(stat -c %h a/numbers)" = 1 ]

        # chmod, chown, touch -d
        chmod 640 a/numbers && [ "$(stat -c %a a/numbers)" = 640 ]
        chmod u+s,g+s a/numbers && [ "$(stat -c %a a/numbers)" = 6640 ]
        chown 1234:5678 a/numbers && [ "$(stat -c %u:%g a/numbers)" = 1234:5678 ]
        chmod 644 a/numbers
        touch -d '2001-02-03 04:05:06.5' a/numbers
        [ "$(stat -c %Y a/numbers)" = 981173106 ]
        [ "$(stat -c %y a/numbers)" = '2001-02-03 04:05:06.500000000 +0000' ]
        touch -a -d '2002-01-01 00:00:00' a/numbers
        [ "$(stat -c %X a/numbers)" = 1009843200 ] && [ "$(stat -c %Y a/numbers)" = 981173106 ]

        # truncate: grow (a hole), shrink
        truncate -s 1M t && [ "$(stat -c %s t)" = 1048576 ] && [ "$(du -k t | cut -f1)" = 0 ]
        printf abc >> t && [ "$(stat -c %s t)" = 1048579 ]
        truncate -s 2 t && [ "$(cat t | od -An -c | tr -d ' ')" = '\\0\\0' ]
        truncate -s 0 t && [ ! -s t ]

        # du of written data, find
        dd if=/dev/urandom of=blob bs=1M count=3 status=none
        [ "$(du -k blob | cut -f1)" = 3072 ]
        [ "$(find . -type f | wc -l)" = 5 ]
        [ "$(find . -name numbers)" = ./a/numbers ]
        [ "$(find . -type l)" = ./sym ]

        # mkfifo: the kernel carries the data, the filesystem the name
        mkfifo fifo && [ -p fifo ]
        (echo through-the-fifo > fifo &)
        read -r line < fifo && [ "$line" = through-the-fifo ]
        rm fifo

        # the umask is applied exactly once
        (umask 027 && touch um && mkdir umd)
        [ "$(stat -c %a um)" = 640 ] && [ "$(stat -c %a umd)" = 750 ]
        (umask 0 && touch um0 && mkdir umd0)
        [ "$(stat -c %a um0)" = 666 ] && [ "$(stat -c %a umd0)" = 777 ]
    """)


def test_df_matches_statfs(mounted: Mount) -> None:
    mnt = mounted.mountpoint
    (mnt / "data").write_bytes(os.urandom(4 << 20))
    os.sync()
    sv = os.statvfs(mnt)
    out = sh("df -B1 --output=size,used,avail,itotal,iused,iavail . | tail -1", mnt).stdout
    size, used, avail, itotal, iused, iavail = map(int, out.split())
    assert size == sv.f_blocks * sv.f_frsize
    assert avail == sv.f_bavail * sv.f_frsize
    assert used == (sv.f_blocks - sv.f_bfree) * sv.f_frsize
    assert (itotal, iavail) == (sv.f_files, sv.f_favail) and iused == sv.f_files - sv.f_ffree
    assert sv.f_namemax == 255 and sv.f_frsize == 4096
    assert (900 << 20) < size <= (1 << 30)  # a 1 GiB image, less metadata
    assert used >= 4 << 20
    fstype = sh("stat -f -c %T .", mnt).stdout.strip()
    assert fstype in ("fuseblk", "fuse")


def test_rename_flags(mounted: Mount) -> None:
    """renameat2's RENAME_NOREPLACE and RENAME_EXCHANGE reach the core with their flags."""
    libc = ctypes.CDLL(None, use_errno=True)
    mnt = mounted.mountpoint
    (mnt / "a").write_text("A")
    (mnt / "b").write_text("B")
    at_fdcwd = -100

    def renameat2(old: Path, new: Path, flags: int) -> int:
        rc = libc.renameat2(at_fdcwd, os.fsencode(old), at_fdcwd, os.fsencode(new), flags)
        return 0 if rc == 0 else ctypes.get_errno()

    assert renameat2(mnt / "a", mnt / "b", 1) == errno.EEXIST  # RENAME_NOREPLACE
    assert renameat2(mnt / "a", mnt / "b", 2) == 0  # RENAME_EXCHANGE
    assert (mnt / "a").read_text() == "B" and (mnt / "b").read_text() == "A"
    assert renameat2(mnt / "a", mnt / "c", 1) == 0
    assert not (mnt / "a").exists() and (mnt / "c").read_text() == "B"


def test_tar_roundtrip_and_remount(mounter: Mounter, tmp_path: Path) -> None:
    src = build_tree(tmp_path / "src", 3000)
    archive = tmp_path / "src.tar"
    tar = "tar --xattrs --xattrs-include='user.*' --sparse"
    sh(f"{tar} -cf {archive} -C {src} .", tmp_path)
    expected = manifest(src)
    m = mounter.mount()
    dest = m.mountpoint / "x"
    m.sh(f"mkdir x && {tar} -xpf {archive} -C x")
    assert manifest(dest) == expected
    sparse = (dest / "sparse.img").stat()
    assert sparse.st_blocks * 512 < 1 << 20, "holes were filled in"
    assert (dest / "d000" / "sub0" / "file00000.dat").stat().st_size == 0

    back = tmp_path / "back"
    back.mkdir()
    sh(f"{tar} -cf {tmp_path}/back.tar -C {dest} . && {tar} -xpf {tmp_path}/back.tar -C {back}",
       tmp_path)
    assert manifest(back) == expected

    # Everything is still there, byte for byte, after unmount and remount.
    assert m.unmount() == 0
    m2 = mounter.mount(m.image)
    assert manifest(m2.mountpoint / "x") == expected


def test_rsync_roundtrip(mounted: Mount, tmp_path: Path) -> None:
    src = build_tree(tmp_path / "src", 600)
    back = tmp_path / "back"
    mnt = mounted.mountpoint
    sh(f"rsync -aHX {src}/ {mnt}/r/ && rsync -aHX {mnt}/r/ {back}/", tmp_path)
    expected = manifest(src)
    assert manifest(mnt / "r") == expected
    assert manifest(back) == expected
    # A second run finds nothing to do.
    out = sh(f"rsync -aHXi --checksum {src}/ {mnt}/r/", tmp_path).stdout
    assert out.strip() == ""


def test_git(mounted: Mount) -> None:
    mounted.sh("""
        git init -q repo && cd repo
        git config user.email test@example.org && git config user.name Test
        for i in $(seq 1 200); do echo "line $i" > "file$i.txt"; done
        mkdir -p src/deep && echo 'print(1)' > src/deep/x.py
        git add -A && git commit -qm first
        sed -i s/line/LINE/ file7.txt && git rm -q file9.txt && git mv file8.txt moved.txt
        git commit -qam second
        [ "$(git log --oneline | wc -l)" = 2 ]
        [ -z "$(git status --porcelain)" ]
        git fsck --no-progress --strict 2>&1
        git gc -q --aggressive
        [ "$(git show HEAD:file7.txt)" = "LINE 7" ]
        [ "$(git log -p | grep -c 'rename to moved.txt')" = 1 ]
    """)


def test_sqlite(mounted: Mount) -> None:
    """3000 transactions: 1000 in the default rollback-journal mode (each one creates,
    fsyncs and deletes a journal file), 2000 in WAL mode (a shared mmap of the -shm file)."""

    def script(journal_mode: str, count: int) -> str:
        lines = [f"PRAGMA journal_mode={journal_mode};",
                 "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT, n INTEGER);"]
        for i in range(count):
            lines.append(f"BEGIN; INSERT INTO t(v, n) VALUES ('row {i}', {i}); "
                         f"UPDATE t SET n = n + 1 WHERE id = {i // 2 + 1}; COMMIT;")
        lines.append("CREATE INDEX t_n ON t(n); DELETE FROM t WHERE id % 3 = 0;")
        return "\n".join(lines)

    mnt = mounted.mountpoint
    (mnt / "rollback.sql").write_text(script("delete", 1000))
    (mnt / "wal.sql").write_text(script("wal", 2000))
    mounted.sh("sqlite3 rollback.db < rollback.sql > /dev/null && "
               "sqlite3 wal.db < wal.sql > /dev/null && sqlite3 rollback.db VACUUM")
    check = "PRAGMA integrity_check; SELECT count(*), sum(n) FROM t;"
    rollback = mounted.sh(f"sqlite3 rollback.db '{check}'").stdout.split()
    wal = mounted.sh(f"sqlite3 wal.db '{check}'").stdout.split()
    assert rollback[0] == "ok" and rollback[1].startswith("667|")
    assert wal[0] == "ok" and wal[1].startswith("1334|")


@pytest.mark.parametrize("direct", [0, 1], ids=["buffered", "direct"])
def test_fio_verify(mounted: Mount, direct: int) -> None:
    common = (f"--ioengine=psync --direct={direct} --verify=crc32c --do_verify=1 "
              "--verify_fatal=1 --group_reporting --output-format=terse")
    mounted.sh(f"""
        fio --name=seq --filename=seq.dat --size=32M --rw=write --bs=1M {common}
        fio --name=rand --filename=rand.dat --size=16M --rw=randwrite --bs=4k {common}
    """, timeout=300)


def test_xattrs(mounted: Mount) -> None:
    mounted.sh("""
        touch f && mkdir d
        setfattr -n user.color -v blue f
        setfattr -n user.empty f
        setfattr -n user.big -v "0x$(head -c 3000 /dev/zero | od -v -An -tx1 | tr -d ' \\n')" f
        setfattr -n user.dir -v yes d
        setfattr -n trusted.secret -v root-only f
        [ "$(getfattr --only-values -n user.color f)" = blue ]
        [ "$(getfattr --only-values -n user.dir d)" = yes ]
        [ "$(getfattr --only-values -n user.big f | wc -c)" = 3000 ]
        getfattr -d f | grep -q 'user.empty'
        [ "$(getfattr -d -m - f | grep -c '^[a-z]')" = 4 ]
        setfattr -n user.color -v red f && [ "$(getfattr --only-values -n user.color f)" = red ]
        setfattr -x user.color f
        ! getfattr -n user.color f 2>err && grep -q 'No such attribute' err
        ! setfattr -x user.missing f 2>err && grep -q 'No such attribute' err
        ! setfattr -n bogus.name -v 1 f 2>err && grep -q 'Operation not supported' err
        ln -s f link && ! setfattr -h -n user.x -v 1 link 2>/dev/null
        rm err
    """)


def test_open_after_unlink(mounted: Mount) -> None:
    mnt = mounted.mountpoint
    data = os.urandom(8 << 20)
    free_before = os.statvfs(mnt).f_bfree
    fd = os.open(mnt / "doomed", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
        os.unlink(mnt / "doomed")
        assert not (mnt / "doomed").exists()
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, len(data), 0) == data
        os.pwrite(fd, b"still writable", 100)
        assert os.pread(fd, 14, 100) == b"still writable"
        assert os.statvfs(mnt).f_bfree < free_before - 1000
    finally:
        os.close(fd)
    # The space comes back when the kernel forgets the inode (FORGET has no reply: poll).
    import time

    deadline = time.monotonic() + 10
    while os.statvfs(mnt).f_bfree < free_before - 16:
        assert time.monotonic() < deadline, "space of the unlinked file was not freed"
        time.sleep(0.05)


@needs_root
def test_permissions_for_other_users(mounter: Mounter) -> None:
    """default_permissions: the kernel enforces modes for a non-root user (allow_other lets
    them in at all)."""
    m = mounter.mount(options=["allow_other"])
    m.sh("""
        echo secret > secret && chmod 600 secret
        echo public > public && chmod 644 public
        mkdir private && chmod 700 private && touch private/inside
        mkdir shared && chmod 1777 shared
        echo writable > shared/rootfile && chmod 666 shared/rootfile
        touch -d '2001-01-01 00:00:00 UTC' shared/rootfile
    """)
    m.sh("""
        E=$(mktemp)
        ! cat secret 2>$E && grep -q 'Permission denied' $E
        [ "$(cat public)" = public ]
        ! echo more >> public 2>$E && grep -q 'Permission denied' $E
        ! ls private 2>$E && grep -q 'Permission denied' $E
        ! touch mine 2>$E && grep -q 'Permission denied' $E
        echo mine > shared/mine && [ "$(stat -c %U shared/mine)" = nobody ]
        ! chmod 777 public 2>$E && grep -q 'Operation not permitted' $E
        # Writing to someone else's writable file: the kernel keeps the mtime (writeback
        # cache) and must be able to store it; "touch" (now) is allowed, explicit times not.
        echo appended >> shared/rootfile
        [ "$(stat -c %Y shared/rootfile)" -gt 978307200 ]
        touch -m -d '2002-01-01 00:00:00 UTC' shared/mine
        ! touch -d '2001-01-01 00:00:00 UTC' shared/rootfile 2>$E
        grep -q 'Operation not permitted' $E
        touch shared/rootfile
        [ "$(stat -c %Y shared/rootfile)" -gt 978307200 ]
        rm $E
    """, user="nobody")
    assert m.sh("cat secret").stdout == "secret\n"
