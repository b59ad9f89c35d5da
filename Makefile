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

# Build the espeak-ng corpus and the tiny random-init model, train on CPU, decode the test split, print WER.
demo: install
	$(BIN)/python -m aero_lightning.data.synth --out $(DEMO_CORPUS) --train $(DEMO_TRAIN) --val $(DEMO_VAL) --test $(DEMO_TEST)
	$(BIN)/python -m aero_lightning.model.tiny --corpus $(DEMO_CORPUS) --out $(DEMO_MODEL)
	$(BIN)/python train.py experiment=demo $(DEMO_ARGS)

# The longer demo (experiments/demo/README.md, 60 min of training on 2 cores): a 40 000-sentence corpus and a
# tokenizer trained on it (both replace the `make demo` ones in place), encoder CTC pre-training
# (experiment=demo_ctc), then one run that trains the LLM on the frozen encoder and projector and, from step 600,
# every weight (experiment=demo_staged); prints the test WER.
demo-long: install
	$(BIN)/python -m aero_lightning.data.synth --out $(DEMO_CORPUS) --train $(DEMO_LONG_TRAIN) --val $(DEMO_VAL) --test $(DEMO_TEST)
	$(BIN)/python -m aero_lightning.model.tiny --corpus $(DEMO_CORPUS) --out $(DEMO_MODEL) --overwrite
	$(BIN)/python train.py experiment=demo_ctc
	$(BIN)/python train.py experiment=demo_staged

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
	rm -rf $(DEMO_CORPUS) $(DEMO_MODEL) outputs/demo outputs/demo_ctc outputs/demo_staged outputs/demo_long outputs/demo_finetune

# One GPU, offline, < 10 min: import checks, pytest -m gpu, benchmarks/mfu.py at Aero's shapes, aero_full with ZeRO-2
# (20 steps), ZeRO-3 and FSDP2 (3 steps), a 15-minute transcription; writes benchmarks/results/gpu_check_<device>.json
# (benchmarks/README.md). Install first on the GPU machine (< 2 min), in the environment GPU_PYTHON names:
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 && pip install -e ".[gpu,dev]"
gpu-check:
	GPU_CHECK_PYTHON="$(GPU_PYTHON)" bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

# The same steps on the CPU at tiny shapes (the test suite runs it too: tests/test_gpu_check.py).
gpu-check-dry: install
	GPU_CHECK_PYTHON="$(BIN)/python" bash benchmarks/gpu_check.sh --dry-run $(GPU_CHECK_ARGS)
