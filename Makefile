# Everything a fresh machine needs: `make demo` and `make test` create the virtual environment, install the
# package with its dependencies, and (as root, with apt) the Debian packages the demo and the tests use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# curl: WebDataset reads http(s) shards through it; g++ and python3-dev: DeepSpeed compiles its CPU
# communication op the first time a DeepSpeed engine starts
DEBIAN_PACKAGES := dataset-fashion-mnist curl g++ python3-dev
PYTEST_ARGS ?=

# the SLURM cluster of the SLURM tests (tests/test_slurm.py, tests/test_multinode.py; tools/slurm_cluster.sh):
# node1..node3 in network namespaces on this machine, slurmctld on the host
# (iproute2: the nodes' namespaces and bridge)
SLURM_PACKAGES := slurmctld slurmd slurm-client munge iproute2
SLURM_NODES ?= 3

.PHONY: all install system-packages slurm-cluster slurm-stop demo test test-fast gpu-wheels clean

all: test

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "swav_scale needs Python >= 3.11, found " + sys.version'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) system-packages

# $(call apt_install,PACKAGES,NOTE): install the missing PACKAGES, only where we may (root + apt); elsewhere
# print NOTE.
define apt_install
missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
if [ -z "$$missing" ]; then :; \
elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	echo "installing Debian packages:$$missing"; \
	apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$missing; \
else \
	echo "note: Debian packages$$missing not installed (not root or no apt); $(2)"; \
fi
endef

# Elsewhere the demo reads Fashion-MNIST from $$FASHION_MNIST_DIR (see README.md).
system-packages:
	@$(call apt_install,$(DEBIAN_PACKAGES),set FASHION_MNIST_DIR)

# As root: install SLURM and start (or keep) the local test cluster. Elsewhere the SLURM tests skip and say why.
slurm-cluster:
	@$(call apt_install,$(SLURM_PACKAGES),the SLURM tests will skip) && \
	if [ "$$(id -u)" = 0 ] && dpkg -s slurmctld >/dev/null 2>&1; then \
		bash tools/slurm_cluster.sh start --nodes $(SLURM_NODES); \
	else echo "note: no local SLURM cluster started (it needs root); the SLURM tests skip unless one answers"; fi

slurm-stop:
	bash tools/slurm_cluster.sh stop

demo: install
	$(VENV)/bin/swav-scale demo

test: install slurm-cluster
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# the wheels a GPU machine without PyPI needs to run benchmarks/gpu_suite.py, into .whl/: pure Python, DeepSpeed
# built with its ops off, and pydantic-core for CPython 3.12; the script checks that the set imports
gpu-wheels: $(STAMP)
	bash tools/gpu_wheels.sh

clean:
	rm -rf runs data .pytest_cache
