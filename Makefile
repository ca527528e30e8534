# Two entry points, both from nothing: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve generate test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned resolve would pull a CUDA build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

HOST ?= 127.0.0.1
PORT ?= 8000

# Set up and run the main job: serve the default model (Gemma 3 270M) on an OpenAI-compatible API.
serve: $(STAMP)
	$(VENV)/bin/tokenmill serve --host $(HOST) --port $(PORT)

# Offline generation with the default model, no server.
generate: $(STAMP)
	$(VENV)/bin/tokenmill generate --max-tokens 48 \
		--prompt "The three most important ideas in distributed systems are" \
		--prompt "def fibonacci(n):"

test: $(STAMP)
	$(PY) -m pytest -q tests

bench: $(STAMP)
	$(PY) benchmarks/engine_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
