"""Start the tasks of a fake SLURM job step on this machine, the way ``srun`` does.

``python -m helpers.fake_srun --ntasks N --log-dir DIR -- python train.py ...`` starts N copies of the command with
the variables ``srun`` gives each task (``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_NTASKS``, ...; the job's own
``SLURM_JOB_ID`` etc. come from the caller's environment), stdout and stderr of task ``i`` in ``DIR/task<i>.log``,
all in this process's process group, so that a signal sent to the group reaches every task and its DataLoader
workers, as SLURM signals every process of a job step. This launcher itself lives through SIGUSR1 and SIGTERM
(a no-op handler, so that the tasks start with the default dispositions) and exits with the first non-zero task
status, or 0.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ntasks", type=int, required=True)
    parser.add_argument("--log-dir", type=Path, required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    args.log_dir.mkdir(parents=True, exist_ok=True)
    tasks = []
    for i in range(args.ntasks):
        env = dict(
            os.environ,
            SLURM_PROCID=str(i),
            SLURM_LOCALID=str(i),
            SLURM_NODEID="0",
            SLURM_NTASKS=str(args.ntasks),
            SLURM_NTASKS_PER_NODE=str(args.ntasks),
            SLURM_NNODES="1",
            SLURM_NODELIST="localhost",
            SLURM_STEP_NODELIST="localhost",
        )
        log = open(args.log_dir / f"task{i}.log", "a", encoding="utf-8")
        tasks.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
    codes = [t.wait() for t in tasks]
    return next((c for c in codes if c != 0), 0)


if __name__ == "__main__":
    sys.exit(main())
