# vballoon: the two commands that matter are `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: dev test test-host lint demo bench clean

# Virtualenv with vballoon installed editable (builds the C accelerator) and the test tools.
$(STAMP): pyproject.toml setup.py device/_accel_build.py device/_accel/balloon_accel.c \
          device/_accel/balloon_accel.h guest_driver_c/vballoon_report_abi.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

dev: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/vballoon demo

bench: $(STAMP)
	$(VENV)/bin/vballoon bench discard

clean:
	rm -rf $(VENV) build *.egg-info device/_balloon_accel*.so device/_balloon_accel.c
