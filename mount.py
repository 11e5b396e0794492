"""Mount a NexFS volume: ``python mount.py`` mounts ./nexfs.img on ./mnt (see nexfs/mount.py)."""

from nexfs.mount import main

raise SystemExit(main())
