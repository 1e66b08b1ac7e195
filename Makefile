# Two commands on a fresh machine: `make run` (dashboard on the demo workspace) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
RUNTIME := $(VENV)/.runtime-installed
TESTDEPS := $(VENV)/.test-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PORT ?= 8501

.PHONY: run demo test system-deps lint format bench clean-demo

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(RUNTIME): requirements.txt | $(PY)
	$(PY) -m pip install --quiet -r requirements.txt
	touch $@

$(TESTDEPS): requirements-test.txt $(RUNTIME)
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

demo: $(RUNTIME)
	$(PY) -m core demo --if-missing

# Serves at once; on a first start the demo workspace is built by background jobs (progress on the home page).
run: $(RUNTIME)
	@echo "Dashboard: http://localhost:$(PORT)  (demo sign-in: pi / demo-pi, clinician / demo-clinician, reader / demo-reader)"
	IOAI_DEMO=1 $(PY) -m streamlit run app/main.py --server.port $(PORT)

# Debian packages the tests drive: Chromium for browser tests, a PostgreSQL server for the database tests.
system-deps:
	@if ! command -v chromium >/dev/null || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		$(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq chromium postgresql >/dev/null; fi
	@chromium --version

test: $(TESTDEPS) system-deps
	$(PY) -m pytest

lint: $(TESTDEPS)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(TESTDEPS)
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

bench: $(RUNTIME)
	$(PY) -m bench.diagnosis

clean-demo:
	rm -rf var
