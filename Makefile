# NexFS: two commands on a fresh Debian machine.
#   make run   install what is needed, create ./nexfs.img if absent, mount it on ./mnt
#   make test  install what is needed, run every test (and the linters)

PYTHON  ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
DEB_PKGS := python3 python3-venv python3-dev gcc pkg-config fuse3 libfuse3-dev liburing-dev util-linux \
            e2fsprogs fuse2fs fio rsync sqlite3 attr acl git tar \
            nfs-ganesha nfs-ganesha-vfs libnfs-utils libnbd-dev nbdkit qemu-utils
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: run test long deps venv lint bench bench-quick clean

deps:
	@missing=""; for p in $(DEB_PKGS); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

$(VENV)/.installed: pyproject.toml setup.py native/build.py native/nexfs_core.c native/nexfs_core.h \
                    native/nbd_backend.c native/nbd_backend.h
	@[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	@touch $@

venv: deps $(VENV)/.installed

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy nexfs valve native tests mount.py bench

test: venv lint
	$(VENV)/bin/pytest -q

run: venv
	$(PY) mount.py

# The long reliability run (docs/RELIABILITY.md): >50,000 crash states, >20,000 double-crash
# states, 6,000 hostile images, then 10 minutes of fuzzing the valve.
long: venv
	NEXFS_LONG=1 $(VENV)/bin/pytest -q -s tests/test_crash_explore.py tests/test_crash_double.py \
	  tests/test_writebehind_faults.py tests/test_full_disk_grid.py \
	  tests/test_hostile.py tests/test_scale.py tests/test_mount_posix.py \
	  tests/test_mount_export.py tests/test_mount_acl.py \
	  tests/test_mount_dio.py tests/test_mount_nbd.py tests/test_mmp.py
	$(PY) -m pip install -q atheris
	mkdir -p /tmp/nexfs-fuzz-corpus
	$(PY) fuzz/fuzz_valve.py -max_total_time=600 /tmp/nexfs-fuzz-corpus fuzz/regressions

bench-quick: venv
	$(PY) -m nexfs.tools.cli bench --quick

bench: venv
	$(PY) -m nexfs.tools.cli bench

clean:
	rm -rf $(VENV) build *.egg-info native/_core*.so native/_core.c
