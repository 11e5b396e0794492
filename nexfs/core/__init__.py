"""The filesystem core: POSIX rules over the object layer."""
