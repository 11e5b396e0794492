"""POSIX ACLs on a real mount, with setfacl/getfacl as a user runs them.

The reference is ext4: :func:`test_acl_explorer_against_ext4` runs the same random setfacl,
chmod, umask, mkdir and create sequence on a NexFS mount and on an ext4 loop mount and
requires the same ``getfacl`` and ``stat`` output from both, so any rule NexFS gets wrong
(mode and mask sync, chmod, inheritance, the umask under a default ACL) shows up as a diff.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mountutil import (  # noqa: F401
    Mounter,
    mounter_fixture,
    needs_root,
    sh,
)

pytestmark = [pytest.mark.mount, needs_root]

LONG = os.environ.get("NEXFS_LONG") == "1"
"""``NEXFS_LONG=1``: the explorer runs more seeds and longer sequences."""
SEEDS = int(os.environ.get("NEXFS_ACL_SEEDS", "30" if LONG else "4"))
STEPS = int(os.environ.get("NEXFS_ACL_STEPS", "150" if LONG else "60"))


def test_setfacl_getfacl_and_enforcement(mounter: Mounter) -> None:
    """Access ACLs are enforced by the kernel for another user; chmod moves the mask; a
    default ACL is inherited by what that user creates, whatever their umask."""
    m = mounter.mount(options=["allow_other"])
    m.sh("""
        echo secret > secret && chmod 600 secret
        setfacl -m u:nobody:r secret
        [ "$(stat -c %a secret)" = 640 ]
        getfacl -p secret | grep -qx 'user:nobody:r--'
        mkdir shared && chmod 700 shared
        setfacl -m u:nobody:rwx -m d:u:nobody:rwx -m d:g::r-x -m d:o::- shared
        getfacl -p shared | grep -qx 'default:user:nobody:rwx'
    """)
    m.sh("""
        E=$(mktemp)
        [ "$(cat secret)" = secret ]
        ! (echo x >> secret) 2>$E && grep -q 'Permission denied' $E
        umask 077
        echo mine > shared/mine
        mkdir shared/subdir
        rm $E
    """, user="nobody")
    m.sh("""
        # Inherited, and the umask (077) did not apply under the default ACL.
        [ "$(stat -c %a shared/mine)" = 660 ]
        getfacl -p shared/mine | grep -qx 'user:nobody:rwx.*#effective:rw-'
        [ "$(stat -c %a shared/subdir)" = 770 ]
        getfacl -p shared/subdir | grep -qx 'default:user:nobody:rwx'
        # chmod sets the mask: nobody loses read on secret.
        chmod 600 secret
        getfacl -p secret | grep -qx 'mask::---'
    """)
    m.sh("""
        E=$(mktemp)
        ! cat secret 2>$E && grep -q 'Permission denied' $E
        rm $E
    """, user="nobody")
    m.sh("setfacl -b secret && [ -z \"$(getfattr -m - -d secret)\" ]")


def test_noacl_option(mounter: Mounter) -> None:
    m = mounter.mount(options=["noacl"])
    result = m.sh("touch f && setfacl -m u:nobody:r f", check=False)
    assert result.returncode != 0 and "Operation not supported" in result.stderr
    # The kernel applies the umask itself as before.
    m.sh("(umask 027 && touch um && mkdir umd) && [ $(stat -c %a um) = 640 ] "
         "&& [ $(stat -c %a umd) = 750 ]")


@pytest.fixture
def ext4_dir(tmp_path: Path) -> Iterator[Path]:
    """An empty ext4 filesystem (acl on, its default) on a loop device."""
    image = tmp_path / "ext4.img"
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image), "64M"], check=True)
    mnt = tmp_path / "ext4"
    mnt.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(mnt)], check=True)
    try:
        shutil.rmtree(mnt / "lost+found")
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


PERMS = ["---", "r--", "rw-", "r-x", "rwx", "-wx", "--x"]
USERS = ["nobody", "daemon", "bin"]
GROUPS = ["nogroup", "daemon", "bin"]


def random_script(rng: random.Random, steps: int) -> str:
    """A shell script of random ACL operations on d0..d2 and the files made inside them."""
    lines = ["mkdir d0 d1 d2"]
    made = ["d0", "d1", "d2"]
    for i in range(steps):
        target = rng.choice(made)
        kind = rng.randrange(9)
        if kind == 0:
            lines.append(f"chmod {rng.randrange(0o10000):o} {target}")
        elif kind in (1, 2):
            who = rng.choice([f"u:{rng.choice(USERS)}", f"g:{rng.choice(GROUPS)}", "u:",
                              "g:", "o:", "m:"])
            default = "d:" if rng.random() < 0.5 and target.count("/") == 0 else ""
            lines.append(f"setfacl -m {default}{who}:{rng.choice(PERMS)} {target}")
        elif kind == 3:
            who = rng.choice([f"u:{rng.choice(USERS)}", f"g:{rng.choice(GROUPS)}"])
            lines.append(f"setfacl -x {who} {target}")
        elif kind == 4:
            lines.append(f"setfacl -{rng.choice('bk')} {target}")
        else:
            parent = rng.choice(["d0", "d1", "d2"])
            name = f"{parent}/n{i}"
            umask = rng.choice(["000", "022", "027", "077", "002"])
            if rng.random() < 0.4:
                lines.append(f"(umask {umask} && mkdir -m {rng.randrange(0o1000):o} {name})"
                             if rng.random() < 0.5 else f"(umask {umask} && mkdir {name})")
            else:
                lines.append(f"(umask {umask} && touch {name})")
            made.append(name)
    # A step may fail (an ordinary user loses access to what they chmod): the failure is
    # part of the result, and must happen on both filesystems.
    return "".join(f"{line} 2>/dev/null || echo 'step {i} failed'\n"
                   for i, line in enumerate(lines))


def snapshot(root: Path) -> str:
    # lost+found: NexFS has one, the ext4 fixture removed its own.
    files = "find . -mindepth 1 -path ./lost+found -prune -o -printf '%p %m\\n' | sort"
    out = subprocess.run(f"{files} | cut -d' ' -f1 | xargs -d '\\n' getfacl -p && {files}",
                         shell=True,
                         cwd=root, capture_output=True, text=True, check=True)
    return out.stdout


@pytest.mark.parametrize("user", ["root", "nobody"])
@pytest.mark.parametrize("seed", range(SEEDS))
def test_acl_explorer_against_ext4(mounter: Mounter, ext4_dir: Path, seed: int,
                                   user: str) -> None:
    """The same random script on ext4 and NexFS, run by root or by an ordinary user (who
    owns what they create, is not in the groups the ACLs name, and loses set-group-ID)."""
    m = mounter.mount(options=["allow_other"])
    script = random_script(random.Random(seed), STEPS)
    outputs = []
    for root in (ext4_dir, m.mountpoint):
        if user != "root":
            root.chmod(0o1777)
        outputs.append(sh(script, root, user=None if user == "root" else user).stdout)
    assert outputs[1] == outputs[0], f"seed {seed}: different steps failed\n{script}"
    expected, got = snapshot(ext4_dir), snapshot(m.mountpoint)
    if got != expected:
        import difflib

        diff = "\n".join(difflib.unified_diff(expected.splitlines(), got.splitlines(),
                                              "ext4", "nexfs", lineterm=""))
        pytest.fail(f"seed {seed}: NexFS differs from ext4\n{diff}\n--- script\n{script}")


def test_dont_mask_request_changes_nothing_when_it_cannot_be_made(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """Without a FUSE session (or with an unexpected pyfuse3 build) nothing is written and
    the mount goes on with the kernel applying the umask."""
    import logging

    from nexfs.fuse import caps as fusecaps

    with caplog.at_level(logging.WARNING):
        assert fusecaps.request_dont_mask() is False
    assert "no FUSE session" in caplog.text
    for record in caplog.records:
        record.expected = True
    junk = tmp_path / "junk.so"
    junk.write_bytes(b"not an ELF file")
    with pytest.raises(ValueError):
        fusecaps.elf_symbols(junk, {b"x"})
