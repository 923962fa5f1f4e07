# nixeryd: `make serve` runs the registry, `make test` runs the test suite.
# Both start with `make install`, which is idempotent and does everything a
# fresh Debian machine needs.

SHELL := /bin/bash
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_PACKAGES := nix-bin skopeo busybox-static git ca-certificates podman containerd runc umoci systemd zstd procps util-linux docker.io strace chromium openssh-client libwrap0
SSHD := build/sshd/usr/sbin/sshd
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PORT ?= 8080
STORAGE_PATH ?= $(CURDIR)/var

.PHONY: install system-packages nix-settings serve test clean bench-tools image

BOOK := build/docs/index.html
BOOK_SOURCES := mkdocs.yml $(wildcard docs/*.md docs/.theme/* docs/.hooks.py) nixeryd/settings.py nixeryd/http/look.py

install: system-packages nix-settings $(STAMP) $(SSHD) $(BOOK)

system-packages:
	@missing=""; \
	for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing system packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing </dev/null; \
	fi
	@command -v python3 >/dev/null || { echo "python3 is missing"; exit 1; }
	@python3 -c 'import venv, ensurepip' 2>/dev/null || { \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq python3-venv </dev/null; }

# Nix's state directories. The host's own Nix settings (/etc/nix/nix.conf) are never
# written: nixeryd hands its Nix processes etc/nix/nix.conf where the host has none.
nix-settings:
	@$(SUDO) mkdir -p /nix/var/nix/gcroots /nix/var/nix/profiles

# The tests' remote Nix builder is an sshd of their own (in a mount namespace with its own
# /nix): Debian's sshd, unpacked here rather than installed, so that no SSH service is
# set up or started on the host.
$(SSHD):
	@mkdir -p build/sshd/deb
	@cd build/sshd/deb && { apt-get download openssh-server >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -qq && apt-get download openssh-server; }; }
	dpkg-deb -x build/sshd/deb/openssh-server_*.deb build/sshd
	@rm -rf build/sshd/deb

$(STAMP): pyproject.toml
	@[ -x $(PYTHON) ] || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q -e '.[test,docs]' --config-settings editable_mode=compat
	@touch $(STAMP)

# The documentation book, which every instance serves under /docs/.
$(BOOK): $(STAMP) $(BOOK_SOURCES)
	$(VENV)/bin/mkdocs build -q

serve: install
	@mkdir -p $(STORAGE_PATH)
	NIXERY_STORAGE_BACKEND=filesystem STORAGE_PATH=$(STORAGE_PATH) PORT=$(PORT) \
	  $(VENV)/bin/twistd --nodaemon --pidfile= nixeryd

test: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(VENV) var build *.egg-info

# Tools the benchmarks under bench/ compare against; not needed to serve or test.
bench-tools: install
	@for p in wrk docker-registry pigz zstd; do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "ok installed" || \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$p </dev/null; \
	done

# A container image of nixeryd with Nix inside, from Debian's packages (deploy/image/build.py):
# build/nixeryd-image.tar, for `docker load`.
image: install
	@dpkg-query -W -f='$${Status}' mmdebstrap 2>/dev/null | grep -q "ok installed" || \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends mmdebstrap </dev/null
	$(SUDO) $(PYTHON) deploy/image/build.py
