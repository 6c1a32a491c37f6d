# hastpy: the README's two commands are `make demo` and `make test`. Both install what they need
# (Debian packages when run as root, Python packages into .venv) so they work on a fresh machine.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Debian packages the tests and the demo run for real: NBD clients and nbdkit (baseline and
# cross-checks), FUSE and loop tools for /dev/hast, fio, the VIP daemons, sshd for the lab.
APT_PACKAGES := nbdkit libnbd-bin fuse3 fio qemu-utils e2fsprogs xfsprogs iproute2 psmisc \
                ucarp keepalived openssh-server iputils-ping arping iptables util-linux \
                qemu-system-x86 debootstrap vagrant python3-venv python3-setuptools
# The pure modules whose branch coverage the test command enforces (issue: >= 95 %).
PURE_MODULES := hastpy/config.py,hastpy/nv.py,hastpy/metadata.py,hastpy/activemap.py,\
hastpy/syncdecide.py,hastpy/rangelock.py,hastpy/proto/*.py,hastpy/nbd/codec.py,\
hastpy/attach/netlink.py
PURE_COVERAGE_MIN := 95

.PHONY: test demo deps venv unit clean

test: deps venv
	$(BIN)/python -m pytest --cov=hastpy --cov-branch --cov-report= $(PYTEST_ARGS)
	$(BIN)/python -m coverage report --include='$(PURE_MODULES)' --fail-under=$(PURE_COVERAGE_MIN)

unit: venv
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

demo: deps venv
	$(BIN)/python -m hastpy.demo

deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null \
	    | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages (run as root to install): $$missing" >&2; exit 69; fi; \
	    echo "installing Debian packages: $$missing"; \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
	fi

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

clean:
	rm -rf $(VENV) .coverage .pytest_cache .hypothesis build *.egg-info
