"""The FUSE side: the pyfuse3 adapter, its request loop and kernel-cache helpers."""
