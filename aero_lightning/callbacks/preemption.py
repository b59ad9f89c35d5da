"""Preemption-safe checkpointing: a signal only sets a flag; every rank saves at the same step boundary.

A SLURM job ends early in two ways: ``sbatch --signal=USR1@300`` sends SIGUSR1 to every task 300 s before the time
limit, and preemption sends SIGTERM to every task (then SIGKILL after the partition's grace time; SIGUSR1 only if
the cluster sets ``send_user_signal``). Lightning 2.6 (``trainer/connectors/signal_connector.py``) handles these
in ways that lose or corrupt training state:

- With ``SLURMEnvironment(auto_requeue=True)`` its SIGUSR1 handler saves ``hpc_ckpt_<N>.ckpt`` inside the handler,
  wherever each rank is in its step. A checkpoint taken during the 4th batch's backward holds ``global_step`` 3
  but a data stream that has consumed 4 batches, so the resumed run never trains batch 4; and under DDP the save's
  collectives (the data-stream state is gathered from every rank) can interleave with the step's gradient
  all-reduces and hang (Lightning issue #21406; 2 CPU processes signalled during backward hung in that save).
- Its SIGTERM handler only logs (``Bypassing SIGTERM``) or stops without saving, so a preempted job loses every
  step since the last periodic checkpoint; and the DataLoader workers die of the SIGTERM, which fails the run.
- With ``ckpt_path`` null, Lightning resumes from the newest ``hpc_ckpt_*`` even when ``checkpoints/last.ckpt``
  is later, so after one requeue every restart goes back to that first hpc checkpoint.

:class:`PreemptionCheckpoint` replaces that: SIGUSR1 and SIGTERM only set a flag; at the end of every optimizer
step the flag is reduced over the ranks (any rank signalled means all stop), and every rank then takes part in
one ordinary ``trainer.save_checkpoint(<dirpath>/hpc_ckpt_<global step>.ckpt)`` (model, optimizer, LR schedule,
loops and every rank's data-stream position, all at the same step). Rank 0 then runs ``scontrol requeue`` (under
SLURM) and all ranks stop. DataLoader worker processes ignore both signals (SLURM signals every process of the job
step; :func:`ignore_in_forked_children` and :func:`aero_lightning.data.stream.ignore_job_signals`).
:func:`resume_checkpoint` picks, at the next start, the checkpoint with the higher ``global_step`` of the
run's ``hpc_ckpt_*`` and ``last.ckpt`` (``aero_lightning.tasks.train``).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

logger = logging.getLogger(__name__)

PREEMPTION_SIGNALS = ("SIGUSR1", "SIGTERM")
"""SIGUSR1: ``sbatch --signal=USR1@<s>`` before the time limit; SIGTERM: preemption, ``scancel``, requeue."""
HPC_PATTERN = "hpc_ckpt_*.ckpt"
"""Preemption checkpoints in the run folder; the number is the checkpoint's global step."""


class PreemptionStop(SystemExit):
    """Ends ``trainer.fit`` on every rank after the preemption checkpoint (exit status 0).

    A ``SystemExit`` so that nothing after ``fit`` runs (no test decoding, no ``result.json``, no final-step
    checkpoint) and Hydra does not report it as a failed job. Exit status 0 because ``srun --kill-on-bad-exit=1``
    would kill the other tasks as soon as one exits non-zero.
    """

    def __init__(self, step: int):
        super().__init__(0)
        self.step = step


def signal_from_name(value: str | int | signal.Signals) -> signal.Signals:
    """``"SIGUSR1"``, ``"USR1"``, ``10`` or ``signal.SIGUSR1`` -> ``signal.SIGUSR1``.

    Raises:
        KeyError: for an unknown signal name.
    """
    if isinstance(value, signal.Signals):
        return value
    if isinstance(value, int):
        return signal.Signals(value)
    name = str(value).upper()
    return signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


_FORK_GUARDED: set[signal.Signals] = set()


def ignore_in_forked_children(sig: signal.Signals) -> None:
    """Processes forked from this one from now on (DataLoader workers) start with ``sig`` ignored.

    SLURM signals every process of a job step, DataLoader workers included. A forked worker would otherwise keep the
    parent's Python handler (harmless, but the flag it sets is the worker's own) or, for a signal the parent never
    handled, die of it (SIGUSR1's default action), and the trainer would fail with "DataLoader worker killed" in the
    middle of the preemption step. torch then gives each worker its own SIGTERM handler when the worker loop starts,
    so the training stream ignores both signals again from inside the worker
    (:func:`aero_lightning.data.stream.ignore_job_signals`); this covers the worker's start-up and any other
    forked child. ``subprocess`` children (``scontrol``) are not affected: they are exec'ed without the at-fork
    hooks. Registered once per signal and process.
    """
    if sig in _FORK_GUARDED or not hasattr(os, "register_at_fork"):
        return
    os.register_at_fork(after_in_child=lambda: signal.signal(sig, signal.SIG_IGN))
    _FORK_GUARDED.add(sig)


def slurm_job_to_requeue() -> str | None:
    """The job id ``scontrol requeue`` takes for this job: ``<array job>_<task>`` for an array task, else
    ``SLURM_JOB_ID``; None outside a SLURM batch job (also in ``srun --pty bash``-style sessions, job name ``bash``
    or ``interactive``, which Lightning does not treat as SLURM jobs either)."""
    if "SLURM_JOB_ID" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    array = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array else os.environ["SLURM_JOB_ID"]
    if not re.fullmatch(r"[0-9_]+", job):
        raise ValueError(f"unexpected SLURM job id {job!r}")
    return job


def requeue_slurm_job(job: str, timeout_s: float = 60.0) -> bool:
    """Run ``scontrol requeue <job>``; True if it succeeded. Failures are logged, not raised: the checkpoint is
    already written and the job can be resubmitted by hand."""
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired) as err:
        logger.warning("scontrol requeue %s failed: %s", job, err)
        return False
    if proc.returncode != 0:
        logger.warning("scontrol requeue %s exited %d: %s", job, proc.returncode, proc.stderr.strip())
        return False
    logger.info("requeued SLURM job %s", job)
    return True


class PreemptionCheckpoint(L.Callback):
    """On SIGUSR1 / SIGTERM: finish the step, save on every rank at the same step boundary, requeue, stop.

    The handlers are installed for ``trainer.fit`` only (in :meth:`setup`, so that a signal during the checkpoint
    restore is kept, and again in :meth:`on_train_start`, because Lightning registers its own SIGTERM handler in
    between), and the previous ones are restored at the end of fit. After an exception Lightning's teardown puts
    this callback's handler back; it then passes every signal on to the previous handler. A signal received during validation is acted on after the next optimizer step. A signal received on
    the final step does not stop the run: it ends normally.

    Args:
        dirpath: folder of ``hpc_ckpt_<global step>.ckpt`` (default ``trainer.default_root_dir``). It must be the
            same after a requeue (``slurm/aero.sbatch`` names the run folder after the job id).
        signals: signals that request the checkpoint (names such as ``"SIGUSR1"`` / ``"USR1"``, or numbers).
        requeue: run ``scontrol requeue`` on rank 0 after the save when inside a SLURM batch job.
    """

    def __init__(
        self,
        dirpath: str | os.PathLike | None = None,
        signals: Sequence[str | int] = PREEMPTION_SIGNALS,
        requeue: bool = True,
    ):
        self.dirpath = None if dirpath is None else Path(dirpath)
        self.signals = [signal_from_name(s) for s in signals]
        self.requeue = requeue
        self.received: str | None = None
        self._pid: int | None = None
        self._armed = False
        self._previous: dict[signal.Signals, object] = {}  # the handlers before fit, per signal
        self._checked_step = -1

    # ------------------------------------------------------------------ signal handling
    def _handle(self, signum: int, frame) -> None:
        if self._armed and os.getpid() == self._pid:
            # a flag and nothing else: the main thread may be anywhere in the step (in a collective, in backward),
            # so nothing that saves, logs or communicates may run here
            if self.received is None:
                self.received = signal.Signals(signum).name
            return
        # outside fit: behave as the handler this one replaced. Lightning re-installs the handlers it found when fit
        # started (this one) after an exception, i.e. after on_exception restored them
        previous = self._previous.get(signal.Signals(signum), signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action, as if no handler had been installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: not in the main thread, signal handlers not installed")
            return
        for sig in self.signals:
            previous = signal.signal(sig, self._handle)
            if previous != self._handle:  # a second fit finds this handler still installed (see _handle)
                self._previous.setdefault(sig, signal.SIG_DFL if previous is None else previous)
        self._armed = True

    def _restore(self) -> None:
        self._armed = False
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._pid = os.getpid()
        self.received = None
        env = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            # Lightning would save inside its SIGUSR1 handler (module docstring); this callback saves instead
            env.auto_requeue = False
            rank_zero_warn(
                "PreemptionCheckpoint: turned off SLURMEnvironment.auto_requeue (Lightning saves inside the signal "
                "handler, mid-step); build the environment with aero_lightning.strategies.slurm_environment"
            )
        for sig in self.signals:
            ignore_in_forked_children(sig)
        self._install()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # Lightning's _SignalConnector replaced the SIGTERM handler after setup
        self._checked_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        if trainer.global_step == self._checked_step:
            return  # inside an accumulation group: no optimizer step was taken, nothing consistent to save yet
        self._checked_step = trainer.global_step
        if self.received is not None:
            logger.info("rank %d: %s received", trainer.global_rank, self.received)
        # one tiny collective per optimizer step; any rank signalled -> every rank stops here
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        step = trainer.global_step
        if trainer.max_steps > 0 and step >= trainer.max_steps:
            logger.info("preemption signal on the final step %d: the run ends normally", step)
            return
        path = (self.dirpath or Path(trainer.default_root_dir)) / f"hpc_ckpt_{step}.ckpt"
        if trainer.is_global_zero:
            logger.info("preemption: saving %s at global step %d", path, step)
        trainer.save_checkpoint(path)  # on every rank, at the same step; ends with a barrier
        if trainer.is_global_zero:
            job = slurm_job_to_requeue() if self.requeue else None
            if job is not None:
                requeue_slurm_job(job)
            logger.info("preemption checkpoint %s written; stopping", path)
        trainer.strategy.barrier("PreemptionCheckpoint.requeue")  # no rank exits before rank 0 has requeued
        raise PreemptionStop(step)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._restore()


# ---------------------------------------------------------------------------------------------------- resume
def checkpoint_step(path: str | os.PathLike) -> int:
    """The ``global_step`` stored in a Lightning checkpoint.

    Reads only the pickled metadata: tensors are memory-mapped (``torch.load(mmap=True)``), so a 31 GB checkpoint
    costs a few MB of reads. Handles a single file, an FSDP2 / distributed-checkpoint folder (``meta.pt`` written by
    Lightning's ``ModelParallelStrategy``) and a DeepSpeed folder (``checkpoint/*model_states.pt``, which holds
    Lightning's client state).

    Raises:
        FileNotFoundError: if the folder holds none of those files.
        KeyError: if the checkpoint has no ``global_step``.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("meta.pt")) or sorted((path / "checkpoint").glob("*model_states.pt"))
        if not found:
            raise FileNotFoundError(f"{path}: no meta.pt or checkpoint/*model_states.pt")
        path = found[0]
    state = torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    return int(state["global_step"])


def newest_checkpoint(paths: Iterable[str | os.PathLike]) -> tuple[Path, int] | None:
    """``(path, global_step)`` of the checkpoint with the highest ``global_step``, or None.

    Paths that do not exist are skipped; unreadable ones (e.g. cut short by a node failure) are skipped with a
    warning. On a tie the later path in ``paths`` wins.
    """
    best: tuple[Path, int] | None = None
    for p in map(Path, paths):
        if not p.exists():
            continue
        try:
            step = checkpoint_step(p)
        except Exception as err:  # a broken checkpoint must not stop the resume from a good one
            logger.warning("skipping unreadable checkpoint %s: %s", p, err)
            continue
        if best is None or step >= best[1]:
            best = (p, step)
    return best


def resume_checkpoint(hpc_dir: str | os.PathLike, last_ckpt: str | os.PathLike) -> tuple[Path, int] | None:
    """The checkpoint a restarted run continues from: the higher ``global_step`` of ``hpc_dir/hpc_ckpt_*.ckpt``
    and ``last_ckpt``, or None when there is neither (a fresh run). On a tie ``last_ckpt`` wins (same state)."""
    return newest_checkpoint([*sorted(Path(hpc_dir).glob(HPC_PATTERN)), Path(last_ckpt)])
