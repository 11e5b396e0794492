"""Security through the mount, as other users see it (run with ``setpriv`` as ``nobody`` and
``daemon``): who may enter the mount at all, sticky directories, set-ID clearing, ownership
changes, set-group-ID directories, and exclusive access to the image.

tests/test_mount_tools.py already covers the basic mode checks for another user (read,
write, search, chmod, times); this module adds what it does not.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from mountutil import (  # noqa: F401
    MOUNT_PY,
    PYTHON,
    Mount,
    Mounter,
    child_env,
    fsck,
    is_nexfs_mount,
    mounted_fixture,
    mounter_fixture,
    needs_root,
    sh,
)

pytestmark = [pytest.mark.mount, needs_root]


def test_without_allow_other_other_users_are_refused(mounted: Mount) -> None:
    """Without -o allow_other only the user who mounted may use it (FUSE's own check, before
    any mode bits): nobody cannot even stat the mount point, let alone a 0777 file."""
    mounted.sh("echo open > open && chmod 777 open . && mkdir pub && chmod 777 pub")
    mnt = mounted.mountpoint
    out = sh(f"""
        E=$(mktemp)
        ! stat {mnt} 2>$E >/dev/null && grep -q 'Permission denied' $E
        ! ls {mnt} 2>$E >/dev/null && grep -q 'Permission denied' $E
        ! cat {mnt}/open 2>$E && grep -q 'Permission denied' $E
        ! touch {mnt}/pub/new 2>$E && grep -q 'Permission denied' $E
        rm $E
        echo refused
    """, Path("/"), user="nobody")
    assert out.stdout.strip() == "refused"
    assert mounted.sh("cat open").stdout == "open\n"
    assert not (mnt / "pub" / "new").exists()


def test_sticky_directory(mounter: Mounter) -> None:
    """In a 1777 directory a user may remove and rename only what it owns."""
    m = mounter.mount(options=["allow_other"])
    m.sh("""
        mkdir tmp && chmod 1777 tmp
        echo root > tmp/rootfile && chmod 666 tmp/rootfile
        mkdir tmp/rootdir && chmod 777 tmp/rootdir
    """)
    m.sh("""
        E=$(mktemp)
        echo mine > tmp/mine
        mkdir tmp/mydir
        ! rm -f tmp/rootfile 2>$E && grep -q 'Operation not permitted' $E
        ! mv tmp/rootfile tmp/stolen 2>$E && grep -q 'Operation not permitted' $E
        ! mv tmp/mine tmp/rootfile 2>$E && grep -q 'Operation not permitted' $E
        ! rmdir tmp/rootdir 2>$E && grep -q 'Operation not permitted' $E
        ! mv tmp/rootdir tmp/mydir/ 2>$E && grep -q 'Operation not permitted' $E
        # The file itself is writable (mode 666): the sticky bit guards the name only.
        echo appended >> tmp/rootfile
        # Its own entries: rename and remove are fine.
        mv tmp/mine tmp/mine2 && rm tmp/mine2
        echo again > tmp/mine
        rm $E
    """, user="nobody")
    # Another unprivileged user may not remove nobody's file either; root may.
    m.sh("""
        E=$(mktemp)
        ! rm -f tmp/mine 2>$E && grep -q 'Operation not permitted' $E
        ! rmdir tmp/mydir 2>$E && grep -q 'Operation not permitted' $E
        rm $E
    """, user="daemon")
    m.sh("""
        [ "$(cat tmp/rootfile)" = "$(printf 'root\\nappended')" ]
        [ "$(stat -c %U tmp/mine)" = nobody ] && rm tmp/mine && rmdir tmp/mydir
        [ -z "$(ls tmp | grep -v -e rootfile -e rootdir)" ]
    """)


def test_setid_bits_are_cleared_by_unprivileged_writes(mounter: Mounter) -> None:
    """A write or truncate by a user without CAP_FSETID clears set-user-ID, and set-group-ID
    when group-execute is set (without it, set-group-ID means mandatory locking and stays);
    root keeps them; chown clears them even for root."""
    m = mounter.mount(options=["allow_other"])
    m.sh("""
        mkdir d && chmod 777 d && cd d
        for f in both trunc suid_only sgid_nox rootw chowned plain; do echo x > $f; done
        chmod 6777 both trunc rootw && chmod 4766 suid_only && chmod 2766 sgid_nox
        chmod 6755 chowned && chmod 666 plain
    """)
    m.sh("""
        cd d
        echo more >> both
        truncate -s 1 trunc
        echo more >> suid_only
        echo more >> sgid_nox
        # ftruncate by a writer who is not the owner (was EPERM: the kernel's mtime was
        # checked as an explicit time set by the caller)
        truncate -s 1 plain && [ "$(stat -c %s plain)" = 1 ]
    """, user="nobody")
    m.sh("""
        cd d
        echo more >> rootw
        chown daemon chowned
    """)
    out = m.sh("cd d && stat -c '%n %a' both trunc suid_only sgid_nox rootw chowned").stdout
    modes = dict(line.split() for line in out.splitlines())
    assert modes == {"both": "777", "trunc": "777", "suid_only": "766", "sgid_nox": "2766",
                     "rootw": "6777", "chowned": "755"}, modes
    # The cleared modes are what is on disk, not only what the kernel cached.
    assert m.unmount() == 0
    again = mounter.mount(m.image)
    out = again.sh("cd d && stat -c '%n %a' both suid_only rootw").stdout
    assert out.split() == ["both", "777", "suid_only", "766", "rootw", "6777"]


def test_ownership_and_setgid_directories(mounter: Mounter) -> None:
    """An unprivileged user cannot give files away or join groups it is not in; a
    set-group-ID directory passes its group (and, to subdirectories, the bit) on; mknod of a
    device needs privilege; trusted.* xattrs are root's."""
    m = mounter.mount(options=["allow_other"])
    m.sh("""
        mkdir sg && chgrp daemon sg && chmod 2777 sg
        echo secret > t && chmod 644 t && setfattr -n trusted.k -v root-only t
        setfattr -n user.k -v visible t
        mkdir open && chmod 777 open
    """)
    m.sh("""
        E=$(mktemp)
        cd open
        echo mine > mine
        ! chown root mine 2>$E && grep -q 'Operation not permitted' $E
        ! chgrp daemon mine 2>$E && grep -q 'Operation not permitted' $E
        ! mknod dev c 1 3 2>$E && grep -q 'Operation not permitted' $E
        ! setfattr -n user.x -v 1 ../t 2>$E && grep -q 'Permission denied' $E
        [ "$(getfattr --only-values -n user.k ../t)" = visible ]
        ! getfattr -n trusted.k ../t 2>/dev/null | grep -q root-only
        [ -z "$(getfattr -d -m - ../t 2>/dev/null | grep trusted)" ]
        cd ../sg
        echo f > f && mkdir sub
        [ "$(stat -c %G f)" = daemon ] && [ "$(stat -c %G sub)" = daemon ]
        [ "$(stat -c %a sub)" = 2755 ] || [ "$(stat -c %a sub)" = 2775 ]
        rm $E
    """, user="nobody")


def test_image_is_exclusive_while_mounted(mounted: Mount) -> None:
    """While mounted nothing else may open the image: not a second mount (read-write or
    read-only), not fsck (checking or repairing), not mkfs; the mount is unharmed."""
    mounted.sh("mkdir keep && seq 1 1000 > keep/numbers")
    image = mounted.image
    other = Path(mounted.mountpoint.parent, mounted.mountpoint.name + "-second")
    other.mkdir()
    try:
        for options in ([], ["-o", "ro"]):
            result = subprocess.run([PYTHON, str(MOUNT_PY), str(image), str(other), *options],
                                    capture_output=True, text=True, env=child_env(),
                                    timeout=60, check=False)
            assert result.returncode == 1 and "in use" in result.stderr, result
            assert not is_nexfs_mount(other)
    finally:
        other.rmdir()
    for args in (["-n", "-f"], ["-y", "-f"]):
        code, output = fsck(image, *args)
        assert code == 8 and "in use" in output, (args, code, output)
    venv_bin = Path(PYTHON).parent
    result = subprocess.run([str(venv_bin / "mkfs.nexfs"), "--force", "--size", "64M",
                             str(image)], capture_output=True, text=True, env=child_env(),
                            timeout=60, check=False)
    assert result.returncode != 0 and "in use" in result.stdout + result.stderr, result
    mounted.sh("seq 1 1000 | cmp - keep/numbers && echo more > keep/more")
