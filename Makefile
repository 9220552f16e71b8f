# vballoon: the two commands that matter are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
#: The Python packages of the distribution (what ruff, mypy and the wheel cover).
PACKAGES := device vfio_user vhost_user virtio_pci vballoon vm_harness

.PHONY: dev check test test-host lint demo bench clean

# Virtualenv with vballoon installed editable (builds the C accelerator) and the test tools.
# pip runs with -qq: this machine's pip configuration and setuptools' notice about editable
# installs are noise; the build's own warnings are checked by tests/unit/test_package.py.
$(STAMP): pyproject.toml setup.py MANIFEST.in device/_accel_build.py device/_accel/balloon_accel.c \
          device/_accel/balloon_accel.h guest_driver_c/vballoon_report_abi.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq -e '.[test,plot]'
	touch $@

dev: $(STAMP)

# Lint, format and types: zero findings, or the build stops here.
check: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy --strict $(PACKAGES)

lint: check

# Everything: the checks, host tests, protocol tests and the VM tests (real QEMU + Linux).
test: check
	$(PY) -m pytest -q

# The same without booting guests (no QEMU or root needed).
test-host: check
	$(PY) -m pytest -q -m "not vm"

demo: $(STAMP)
	$(VENV)/bin/vballoon demo

bench: $(STAMP)
	$(VENV)/bin/vballoon bench discard

clean:
	rm -rf $(VENV) build dist *.egg-info device/_balloon_accel*.so device/_balloon_accel.c
