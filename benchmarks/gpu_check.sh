#!/usr/bin/env bash
# One prepared command that checks the whole GPU path on one GPU in under 10 minutes (`make gpu-check`):
# import checks, `pytest -m gpu`, benchmarks/mfu.py at Aero's shapes, train.py experiment=aero_full with ZeRO-2
# (20 steps), ZeRO-3 and FSDP2 (3 steps each) on random-init Whisper-large-v3 / Qwen2.5-1.5B-shaped components and a
# generated corpus, and a 15-minute recording transcribed in one pass. Writes
# benchmarks/results/gpu_check_<device>.json and prints one table. What each step checks: benchmarks/README.md.
#
#   benchmarks/gpu_check.sh                  # one GPU, offline (no hub downloads), < 10 min
#   benchmarks/gpu_check.sh --devices 2      # + preemption drill: SIGUSR1 to every rank mid-step, three times
#   benchmarks/gpu_check.sh --dry-run        # the same steps on the CPU at tiny shapes (the test suite runs it)
#   benchmarks/gpu_check.sh --skip mfu       # leave steps out (also --keep, --workdir, --out, --budget-s)
#
# Python: $GPU_CHECK_PYTHON, else .venv/bin/python when it exists, else python3. Expected install on a GPU machine
# (under 2 minutes; flash-attn is not needed, varlen attention uses torch's own kernels):
#   pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 && pip install -e ".[gpu,dev]"
# Exit status: 0 all steps ok or skipped, 1 a step failed or timed out, 2 no CUDA device (without --dry-run).
set -euo pipefail

# relative --workdir / --out are the caller's, not the repository root's
GPU_CHECK_CWD="$PWD"
export GPU_CHECK_CWD
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python="${GPU_CHECK_PYTHON:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then
    python=.venv/bin/python
  else
    python=python3
  fi
fi

# find_spec only: importing them takes seconds, and without CUDA the check ends at once
if ! "$python" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "lightning", "hydra", "aero_lightning")))' >/dev/null 2>&1; then
  echo "gpu_check: $python lacks torch, lightning, hydra or aero_lightning. Install first:" >&2
  echo '  pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128 && pip install -e ".[gpu,dev]"' >&2
  echo "(or point GPU_CHECK_PYTHON at the interpreter that has them)" >&2
  exit 2
fi

exec "$python" benchmarks/gpu_check.py "$@"
