# shoal: every target installs what it needs; `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
MODEL ?= models/default
PROTO_SRC := $(wildcard protos/shoal/v1/*.proto)

.PHONY: install protos model run test bench gpu-check fixtures clean

install: $(STAMP) protos

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Stubs (with .pyi) are generated, never committed.
protos: $(STAMP)
ifneq ($(PROTO_SRC),)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO_SRC)
endif

# The default model: a small random-weight Llama checkpoint in the real HF format.
model: $(MODEL)/config.json
$(MODEL)/config.json: | $(STAMP)
	$(BIN)/python -m worker.random_checkpoint --preset default --out $(MODEL)

run: install model
	$(BIN)/python -m worker.batch --model $(MODEL) --input examples/prompts.jsonl --output /dev/stdout

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python scripts/bench_engine.py

# For a CUDA machine without network: its system python already has cupy and friends.
gpu-check:
	PYTHONPATH=. $(PYTHON) scripts/gpu_check.py

# Reference logits from Hugging Face transformers (needs torch; never a runtime/test dependency).
fixtures:
	test -x .venv-fixtures/bin/python || $(PYTHON) -m venv .venv-fixtures
	.venv-fixtures/bin/pip install -q torch==2.13.0 transformers safetensors tokenizers numpy
	.venv-fixtures/bin/python scripts/make_fixtures.py --out tests/fixtures

clean:
	rm -rf $(VENV) models
