# Two promises: `make serve` and `make test` work on a fresh machine (Python 3.11+), and a failed
# step is simply tried again by the next make: no `make clean` needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENV_OK := $(VENV)/.venv-ok
SERVE_STAMP := $(VENV)/.installed-serve
TEST_STAMP := $(VENV)/.installed-test

.PHONY: serve test bench install clean FORCE
.DELETE_ON_ERROR:

# Checked on every make: a venv whose pip does not run (python missing, an interrupted `venv` or
# pip upgrade, a deleted pip) is made again. VENV_OK is touched only once the venv and its pip
# upgrade succeeded, and only then, so the stamps below see a remade venv as new.
$(VENV_OK): FORCE
	@if ! $(BIN)/python -m pip --version >/dev/null 2>&1; then \
	    echo "making $(VENV) (none, or not usable)"; rm -rf $(VENV) && $(PY) -m venv $(VENV); fi
	@[ -f $@ ] || { $(BIN)/python -m pip install --quiet --upgrade pip && touch $@; }

# Stamps are touched only after their install succeeded, so a failed one is retried next time.
# Both installs are editable, so edits to the source need no reinstall.
$(SERVE_STAMP): pyproject.toml $(VENV_OK)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# The test extras include everything serving needs, so this stamp covers serve's as well.
$(TEST_STAMP): pyproject.toml $(VENV_OK)
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@ $(SERVE_STAMP)

install: $(SERVE_STAMP)

serve: $(SERVE_STAMP)
	$(BIN)/meterline serve $(ARGS)

test: $(TEST_STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(TEST_STAMP)
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) *.egg-info build dist
