# aero_lightning — set-up, demo and tests. `make demo` and `make test` work on a fresh machine (Python >= 3.10).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO_CORPUS ?= data_cache/demo_corpus
DEMO_MODEL ?= data_cache/demo_model
DEMO_TRAIN ?= 12000
DEMO_VAL ?= 200
DEMO_TEST ?= 200
DEMO_ARGS ?=
DEMO_LONG_TRAIN ?= 40000
DEMO_LONG_CORPUS ?= data_cache/demo_long_corpus
DEMO_LONG_MODEL ?= data_cache/demo_long_model
PYTEST_ARGS ?=
# make gpu-check: the interpreter (default: .venv/bin/python if present, else python3) and extra arguments, e.g.
# GPU_CHECK_ARGS="--devices 8" for the preemption drill, "--skip mfu", "--keep"
GPU_PYTHON ?=
GPU_CHECK_ARGS ?=

.PHONY: install demo demo-long test test-all lint format clean-demo gpu-check gpu-check-dry

# torch is installed first and pinned, so nothing can resolve a multi-GB CUDA build by accident.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# Build the espeak-ng corpus and the tiny random-init model, then the staged recipe (experiments/demo/README.md):
# the encoder alone with CTC (experiment=demo_ctc), then the LLM on the frozen encoder and, from step 200, every
# weight (experiment=demo_staged); decodes the test split, prints the WER and five transcripts beside their
# references. Run folders: outputs/demo_ctc, outputs/demo.
demo: install
	$(BIN)/python -m aero_lightning.data.synth --out $(DEMO_CORPUS) --train $(DEMO_TRAIN) --val $(DEMO_VAL) --test $(DEMO_TEST)
	$(BIN)/python -m aero_lightning.model.tiny --corpus $(DEMO_CORPUS) --out $(DEMO_MODEL)
	$(BIN)/python train.py experiment=demo_ctc paths.demo_corpus_dir=$(abspath $(DEMO_CORPUS)) paths.demo_model_dir=$(abspath $(DEMO_MODEL)) $(DEMO_ARGS)
	$(BIN)/python train.py experiment=demo_staged paths.demo_corpus_dir=$(abspath $(DEMO_CORPUS)) paths.demo_model_dir=$(abspath $(DEMO_MODEL)) $(DEMO_ARGS)

# The long demo (experiments/demo/README.md): the same recipe, longer, on a 40 000-sentence corpus with its own
# tokenizer, in its own folders (data_cache/demo_long_corpus, data_cache/demo_long_model, outputs/demo_long_ctc,
# outputs/demo_long), so `make demo` and `make demo-long` run in either order without touching each other.
demo-long: install
	$(BIN)/python -m aero_lightning.data.synth --out $(DEMO_LONG_CORPUS) --train $(DEMO_LONG_TRAIN) --val $(DEMO_VAL) --test $(DEMO_TEST)
	$(BIN)/python -m aero_lightning.model.tiny --corpus $(DEMO_LONG_CORPUS) --out $(DEMO_LONG_MODEL)
	$(BIN)/python train.py experiment=demo_long_ctc paths.demo_corpus_dir=$(abspath $(DEMO_LONG_CORPUS)) paths.demo_model_dir=$(abspath $(DEMO_LONG_MODEL)) $(DEMO_ARGS)
	$(BIN)/python train.py experiment=demo_long_staged paths.demo_corpus_dir=$(abspath $(DEMO_LONG_CORPUS)) paths.demo_model_dir=$(abspath $(DEMO_LONG_MODEL)) $(DEMO_ARGS)

# The default test run (CPU, < 15 min): everything except `slow` and `gpu` tests.
test: install
	$(BIN)/python -m pytest -m "not slow and not gpu" -q $(PYTEST_ARGS)

test-all: install
	$(BIN)/python -m pytest -m "not gpu" -q $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean-demo:
	rm -rf $(DEMO_CORPUS) $(DEMO_MODEL) $(DEMO_LONG_CORPUS) $(DEMO_LONG_MODEL) outputs/demo outputs/demo_ctc outputs/demo_joint \
		outputs/demo_long outputs/demo_long_ctc outputs/demo_long_stage2 outputs/demo_long_stage3

# One GPU, offline, < 10 min: import checks, pytest -m gpu, benchmarks/mfu.py at Aero's shapes, aero_full with ZeRO-2
# (20 steps), ZeRO-3 and FSDP2 (3 steps), a 15-minute transcription; writes benchmarks/results/gpu_check_<device>.json
# (benchmarks/README.md). Install first on the GPU machine (< 2 min), in the environment GPU_PYTHON names:
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 && pip install -e ".[gpu,dev]"
gpu-check:
	GPU_CHECK_PYTHON="$(GPU_PYTHON)" bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

# The same steps on the CPU at tiny shapes (the test suite runs it too: tests/test_gpu_check.py).
gpu-check-dry: install
	GPU_CHECK_PYTHON="$(BIN)/python" bash benchmarks/gpu_check.sh --dry-run $(GPU_CHECK_ARGS)
