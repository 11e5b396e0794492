"""fsck's library: the checking passes and the repairs."""
