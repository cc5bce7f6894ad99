# sealvm: live re-exec of QEMU with sealed memfd guest RAM.
#
#   make demo    build what is missing, then run the main job
#   make test    build what is missing, then run the test suite
#   make check   ruff + mypy --strict (+ the series' own checks once present)
#
# Heavy artefacts live in a content-addressed cache outside the repo:
# $(SEALVM_CACHE) (default ~/.cache/sealvm); see scripts/lib.sh.

SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export SEALVM_CACHE ?= $(HOME)/.cache/sealvm

QEMU = $(shell scripts/build-qemu --print 2>/dev/null)
QEMU_UPSTREAM = $(shell scripts/build-qemu --upstream --print 2>/dev/null)
GUEST = $(shell scripts/build-guest --print 2>/dev/null)
HOST_KERNEL = $(shell scripts/build-kernel --print 2>/dev/null)
LINUX_GUEST = $(shell scripts/build-linux-guest --print 2>/dev/null)

.PHONY: all deps venv qemu qemu-upstream print-qemu print-qemu-upstream guest print-guest \
	host-kernel print-host-kernel linux-guest print-linux-guest check test test-unit faults fleet \
	soak demo bench bench-compare bench-endpoint bench-confine bench-change-process bench-nested bench-linux \
	series-check clean-venv

all: deps qemu guest

deps: venv
	@scripts/install-deps

$(VENV)/.installed: pyproject.toml
	@scripts/install-deps
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

venv: $(VENV)/.installed

qemu: deps
	@scripts/build-qemu

qemu-upstream: deps
	@scripts/build-qemu --upstream

print-qemu:
	@scripts/build-qemu --print

print-qemu-upstream:
	@scripts/build-qemu --upstream --print

guest:
	@scripts/build-guest

print-guest:
	@scripts/build-guest --print

# The L1 kernel of the nested VFIO test bed (images/host).
host-kernel: deps
	@scripts/build-kernel

print-host-kernel:
	@scripts/build-kernel --print

# The Linux test guest: the L1 kernel above (virtio-net/blk built in) and an
# initramfs (busybox-static + images/linux-guest's workload), cached by content.
linux-guest: deps host-kernel
	@scripts/build-linux-guest

print-linux-guest:
	@scripts/build-linux-guest --print

# Apply the series patch by patch to pristine 10.2.2, build every prefix
# incrementally, run checkpatch on every patch, run the series' qtest.
series-check: deps qemu-upstream
	scripts/series-check -t cpr-memory-test

check: venv
	$(VENV)/bin/ruff check control tests docs/examples
	$(VENV)/bin/mypy

# Everything the tests need is built first, and a build that fails (the L1
# kernel too) fails `make test`; pytest gets the paths in env.
# SEALVM_STRICT_SKIPS=1: a skip for anything but a host fact (the allow-list
# in tests/conftest.py, printed at the end), or no test at all, fails the run.
test: deps qemu qemu-upstream guest host-kernel linux-guest
	SEALVM_STRICT_SKIPS=1 SEALVM_QEMU=$(QEMU) SEALVM_QEMU_UPSTREAM=$(QEMU_UPSTREAM) \
		SEALVM_GUEST=$(GUEST) SEALVM_HOST_KERNEL=$(HOST_KERNEL) \
		SEALVM_LINUX_GUEST=$(LINUX_GUEST) \
		$(PY) -m pytest -ra --durations=25 $(PYTEST_ARGS)

test-unit: venv
	$(PY) -m pytest -ra tests/unit

# The fault matrix alone (it is part of `make test` too); prints its table:
# case, outcome of the update, of `sealvm recover`, guest verified, leftovers.
faults: deps qemu guest
	SEALVM_STRICT_SKIPS=1 SEALVM_QEMU=$(QEMU) SEALVM_GUEST=$(GUEST) \
		$(PY) -m pytest -q tests/faults $(PYTEST_ARGS)

# The Ansible collection's tests alone (part of `make test` too): the module
# docs against their argument specs, and the 3 x 2 rolling update on real VMs
# (PYTEST_ARGS=-s shows the roll as ansible-playbook prints it).
fleet: deps qemu guest
	SEALVM_STRICT_SKIPS=1 SEALVM_QEMU=$(QEMU) SEALVM_GUEST=$(GUEST) \
		$(PY) -m pytest -q -ra tests/test_fleet.py $(PYTEST_ARGS)

# Not a test: 1,000 consecutive live updates alternating cpr-exec and
# cpr-transfer, the guest writing its pattern all along (`make test` runs 50).
SOAK_ARGS ?= --updates 1000 --size 512M
soak: deps qemu guest
	cd tests && SEALVM_QEMU=$(QEMU) SEALVM_GUEST=$(GUEST) ../$(PY) -m soak.soak $(SOAK_ARGS)

# What the QMP endpoint for scripts costs the pause (tests/bench/endpoint_ab.py).
ENDPOINT_AB_ARGS ?=
bench-endpoint: deps qemu guest
	cd tests && SEALVM_QEMU=$(QEMU) SEALVM_GUEST=$(GUEST) ../$(PY) -m bench.endpoint_ab $(ENDPOINT_AB_ARGS)

# IOMMU_IOAS_CHANGE_PROCESS time against the size mapped by file, in the
# nested L1 (tests/bench/change_process.py; about 10 min at the default sizes).
bench-change-process: deps qemu host-kernel
	cd tests && SEALVM_QEMU=$(QEMU) SEALVM_HOST_KERNEL=$(HOST_KERNEL) \
		../$(PY) -m bench.change_process $(CHANGE_PROCESS_ARGS)

# Live updates of an L2 VM with an assigned device (edu, mdma), per mode, in
# the nested L1 (tests/bench/nested_vfio.py).
NESTED_BENCH_ARGS ?=
bench-nested: deps qemu guest host-kernel
	cd tests && SEALVM_QEMU=$(QEMU) SEALVM_GUEST=$(GUEST) SEALVM_HOST_KERNEL=$(HOST_KERNEL) \
		../$(PY) -m bench.nested_vfio $(NESTED_BENCH_ARGS)

# What a live update costs an operator's VM's network: the Linux guest with
# TCP and UDP, per mode against classic migration (tests/bench/linux_tcp.py).
LINUX_BENCH_ARGS ?=
bench-linux: deps qemu host-kernel linux-guest
	cd tests && SEALVM_QEMU=$(QEMU) SEALVM_HOST_KERNEL=$(HOST_KERNEL) \
		SEALVM_LINUX_GUEST=$(LINUX_GUEST) ../$(PY) -m bench.linux_tcp $(LINUX_BENCH_ARGS)

# What QEMU's confinement costs the pause (tests/bench/confine_ab.py).
CONFINE_AB_ARGS ?=
bench-confine: deps qemu guest
	cd tests && SEALVM_QEMU=$(QEMU) SEALVM_GUEST=$(GUEST) ../$(PY) -m bench.confine_ab $(CONFINE_AB_ARGS)

# Benchmarks are not tests: one run, side by side, ratios printed last.  Each
# run writes its dated table to $(BENCH_OUT) and appends to its history.jsonl.
BENCH_ARGS ?=
BENCH_OUT ?= bench-results
bench: deps qemu qemu-upstream guest
	$(VENV)/bin/pip install -q -e '.[dev,bench]'
	SEALVM_QEMU=$(QEMU) SEALVM_QEMU_UPSTREAM=$(QEMU_UPSTREAM) SEALVM_GUEST=$(GUEST) \
		$(PY) -m sealvm.bench --out $(BENCH_OUT) $(BENCH_ARGS)

# Each p50/p95 of the last `make bench` against the run before it, or, after
# a clone's first run, against the published one (no VM runs).
bench-compare: venv
	$(PY) -m sealvm.bench --compare --out $(BENCH_OUT) --baseline docs/bench-history.jsonl

# Part 1: the test guest, RAM and seals through updates; part 2: an operator's
# VM, the Linux guest with TCP, UDP and its disk writer (tests/linux/demo.py).
demo: deps qemu guest host-kernel linux-guest
	SEALVM_QEMU=$(QEMU) SEALVM_GUEST=$(GUEST) $(PY) -m sealvm.demo
	cd tests && SEALVM_QEMU=$(QEMU) SEALVM_HOST_KERNEL=$(HOST_KERNEL) \
		SEALVM_LINUX_GUEST=$(LINUX_GUEST) ../$(PY) -m linux.demo

clean-venv:
	rm -rf $(VENV)
