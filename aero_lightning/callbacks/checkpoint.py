"""Checkpointing that always keeps the final step of a run.

Lightning's ``ModelCheckpoint`` (2.6) saves on its schedule (``every_n_train_steps``, validation, epoch end) and,
at the end of training, writes ``last.ckpt`` only if no "last" checkpoint was written before. A run whose
``trainer.max_steps`` is not a multiple of ``every_n_train_steps`` therefore ends with ``last.ckpt`` holding an
earlier step: the final steps (the end of the LR decay) are lost to ``eval.py``, ``export`` and ``ckpt_path=``
resumes, while the in-run test decode still sees the final weights in memory. The same defect was reported against
other trainers (e.g. https://github.com/huggingface/transformers/pull/30160).
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalStepModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that also saves when training ends on a step its schedule did not save.

    At the end of ``trainer.fit`` (``max_steps`` reached, or ``max_epochs``), if the last saved global step is not the
    trainer's, it writes the step-named checkpoint (``filename``, e.g. ``step0002300.ckpt``, under the same
    ``save_top_k`` rules) and, with ``save_last``, ``last.ckpt``. Arguments are ``ModelCheckpoint``'s. Nothing is
    saved under ``fast_dev_run``, outside fitting, or when no optimizer step was taken.
    """

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the state; with ``save_last="link"`` a resumed run keeps updating ``last.ckpt`` in place.

        In link mode ``last.ckpt`` is the step checkpoint itself, which Lightning saves before it first sets
        ``last_model_path``: the first step checkpoint of a run records ``last_model_path = ""``. A run resumed from
        it would find ``last.ckpt`` present but not its own and link ``last-v1.ckpt`` instead, leaving ``last.ckpt``
        at the resumed step. Resuming in the same ``dirpath`` (Lightning restores the paths only then), the run
        continues the checkpoint's run, so its ``last.ckpt`` link is this run's.
        """
        super().load_state_dict(state_dict)
        if (
            self.save_last == "link"
            and not self.last_model_path
            and state_dict.get("dirpath") == self.dirpath
        ):
            self.last_model_path = self.format_checkpoint_name({}, self.CHECKPOINT_NAME_LAST)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.global_step > 0 and not self._should_skip_saving_checkpoint(trainer):
            candidates = self._monitor_candidates(trainer)
            self._save_topk_checkpoint(trainer, candidates)
            self._save_last_checkpoint(trainer, candidates)
        super().on_train_end(trainer, pl_module)
