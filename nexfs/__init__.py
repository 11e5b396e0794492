"""NexFS: a crash-safe filesystem that reaches its device only through a Block Valve capability."""

__version__ = "0.1.0"
