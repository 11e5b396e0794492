"""The block store: cache, transactions, journal policy, allocators and the data path."""
