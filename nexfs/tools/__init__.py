"""The command-line tools: mkfs.nexfs, fsck.nexfs, mount.nexfs, nexfs info/bench."""
