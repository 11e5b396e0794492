"""The file-system benchmark behind ``nexfs bench``: NexFS side by side with fuse2fs,
kernel ext4 on a loop device, and the raw image file (fio ``--direct=1``, the device limit).

Modules: :mod:`.systems` (fresh images, mounting and unmounting each contender, always
cleaned up), :mod:`.workloads` (the fio jobs of ``bench/fio/`` and the metadata workloads),
:mod:`.report` (medians, ratios, targets; JSON, Markdown and the PNG chart) and
:mod:`.runner` (the command line and the order of things).  The method is in
docs/BENCHMARKS.md.
"""
