"""Mount a NexFS volume: ``python mount.py`` mounts ./nexfs.img on ./mnt
(see nexfs/tools/mount.py).
"""

from nexfs.tools.mount import main

raise SystemExit(main())
