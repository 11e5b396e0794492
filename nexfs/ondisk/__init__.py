"""The on-disk format: the layout, the record codecs and the on-disk trees."""
