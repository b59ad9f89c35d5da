"""WER during training: decode the named validation sets every N steps and log WER per corpus.

Every ``every_n_train_steps`` optimizer steps the first ``max_samples`` utterances of each validation set are
decoded greedily (:func:`aero_lightning.eval.decode.decode_waveforms`, duration-scaled budget) and scored like
``eval.py`` (Whisper normaliser, empty references dropped, pooled S + D + I). Logged to every logger:
``val/<name>/wer``, ``val/<name>/insertion_rate``, ``val/<name>/loop_rate``; TensorBoard also gets
``num_examples`` audio clips (``wer_examples/<name>/<i>``) and a reference / hypothesis table
(``wer_examples/<name>``) so a listener can check what the model hears.

Every rank decodes its share of the utterances (``items[rank::world]``) and rank 0 gathers the hypotheses, scores
and logs them, so the decode time is divided by the number of ranks. With parameters sharded across ranks (FSDP,
DeepSpeed ZeRO-3) every forward is a collective: each rank then pads its share to the same number of utterances
(repeats, not scored) and generates with ``synced_gpus``, so all ranks run the same forward passes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import lightning as L
import numpy as np
import torch

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
from aero_lightning.distributed import gather_objects, parameters_are_sharded
from aero_lightning.eval.benchmarks import BenchmarkSpec
from aero_lightning.eval.decode import (
    GenerationOptions,
    chars_per_token,
    decode_waveforms,
    plan_decode_batches,
)
from aero_lightning.eval.sources import EvalItem, iter_items
from aero_lightning.metrics.repetition import repetition_stats
from aero_lightning.metrics.wer import corpus_wer, is_scored_reference, normalize_english

logger = logging.getLogger(__name__)

__all__ = ["WERMonitor"]


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"


class WERMonitor(L.Callback):
    """Decode validation sets during training and log WER (module docstring).

    Args:
        val_sets: ``{name: folder}`` of prepared shard folders (``data.val_dirs``).
        every_n_train_steps: decode every this many optimizer steps; 0 disables the callback.
        max_samples: utterances decoded per set (the first ones, in shard order, so every run sees the same).
        batch_size: utterances per generation batch.
        num_examples: audio + text examples logged per set (TensorBoard).
        prompt: the ASR instruction.
        generation: :class:`GenerationOptions` fields (``num_beams``, ``max_new_tokens``, ...).
    """

    def __init__(
        self,
        val_sets: Mapping[str, str] | None = None,
        every_n_train_steps: int = 0,
        max_samples: int = 64,
        batch_size: int = 16,
        num_examples: int = 4,
        prompt: str = DEFAULT_ASR_PROMPT,
        generation: Mapping | None = None,
    ):
        if every_n_train_steps < 0 or max_samples < 1 or batch_size < 1 or num_examples < 0:
            raise ValueError(
                "every_n_train_steps, num_examples >= 0 and max_samples, batch_size >= 1 required"
            )
        self.val_sets = dict(val_sets or {})
        self.every_n_train_steps = int(every_n_train_steps)
        self.max_samples = int(max_samples)
        self.batch_size = int(batch_size)
        self.num_examples = int(num_examples)
        self.prompt = prompt
        self.options = GenerationOptions(**dict(generation or {}))
        self._cache: dict[str, list[EvalItem]] = {}
        self._last_step = -1
        self.last_results: dict[str, dict] = {}

    # ------------------------------------------------------------------ data
    def _items(self, name: str, folder: str) -> list[EvalItem]:
        """The set's first ``max_samples`` scored utterances, read once and kept in memory."""
        if name not in self._cache:
            spec = BenchmarkSpec(name=name, task="asr", description=f"validation set {name}")
            items = iter_items(spec, source=folder, max_samples=self.max_samples)
            self._cache[name] = [i for i in items if is_scored_reference(normalize_english(i.reference))]
        return self._cache[name]

    # ------------------------------------------------------------------ hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (
            not self.every_n_train_steps
            or step == 0
            or step % self.every_n_train_steps
            or step == self._last_step
        ):
            return
        self._last_step = step
        if self.val_sets:
            self.run(trainer, pl_module)  # on every rank: each decodes its share

    @torch.no_grad()
    def run(self, trainer, pl_module) -> dict[str, dict]:
        """Decode every set now (every rank its share) and log the results at ``trainer.global_step`` (rank 0).

        A collective when there are several ranks: every rank must call it.

        Returns:
            ``{name: {"wer", "insertion_rate", "loop_rate", "num_samples"}}`` on rank 0 (empty on the others).
        """
        model = pl_module.model
        was_training = model.training
        model.eval()
        step = trainer.global_step
        rank, world = trainer.global_rank, trainer.world_size
        sharded = world > 1 and parameters_are_sharded(trainer.strategy)
        cpt = chars_per_token(model.tokenizer)
        results = {}
        try:
            for name, folder in self.val_sets.items():
                items = self._items(name, folder)
                if not items:
                    logger.warning("WERMonitor: validation set %s (%s) has no scored utterance", name, folder)
                    continue
                mine = list(range(rank, len(items), world))
                if sharded:  # every rank the same number of generate calls: pad with repeats, dropped below
                    padded = mine + [mine[0] if mine else 0] * (-(-len(items) // world) - len(mine))
                else:
                    padded = mine
                hyps_mine: dict[int, str] = {}
                for batch in plan_decode_batches([items[j].duration_s for j in padded], self.batch_size):
                    decoded = decode_waveforms(
                        model,
                        [items[padded[b]].waveform for b in batch],
                        self.prompt,
                        self.options,
                        cpt,
                        synced_gpus=sharded,
                    )
                    for b, res in zip(batch, decoded):
                        if b < len(mine):
                            hyps_mine[padded[b]] = res.text
                gathered = gather_objects(hyps_mine)
                if rank != 0:
                    continue
                merged = {j: h for part in gathered for j, h in part.items()}
                hyps = [merged[j] for j in range(len(items))]
                refs = [i.reference for i in items]
                wer = corpus_wer(refs, hyps)
                loops = repetition_stats(hyps)
                results[name] = {
                    "wer": wer.wer,
                    "insertion_rate": wer.insertions / max(1, wer.num_ref_words),
                    "loop_rate": loops.loop_rate,
                    "num_samples": wer.num_samples,
                }
                self._log(trainer, name, results[name], items, hyps, step)
                logger.info(
                    "step %d: %s WER %.2f%% over %d utterances", step, name, 100 * wer.wer, wer.num_samples
                )
        finally:
            model.train(was_training)
        self.last_results = results
        return results

    def _log(
        self, trainer, name: str, metrics: dict, items: list[EvalItem], hyps: list[str], step: int
    ) -> None:
        scalars = {f"val/{name}/{k}": float(v) for k, v in metrics.items() if k != "num_samples"}
        for lg in trainer.loggers:
            lg.log_metrics(scalars, step=step)
            experiment = getattr(lg, "experiment", None)
            if not hasattr(experiment, "add_audio"):
                continue  # not TensorBoard
            rows = ["| key | reference | hypothesis |", "|---|---|---|"]
            for i, item in enumerate(items[: self.num_examples]):
                wave = torch.from_numpy(np.clip(item.waveform, -1.0, 1.0))[None]  # (1, T)
                experiment.add_audio(f"wer_examples/{name}/{i}", wave, step, sample_rate=16000)
                rows.append(f"| {item.key} | {_markdown_cell(item.reference)} | {_markdown_cell(hyps[i])} |")
            if self.num_examples:
                experiment.add_text(f"wer_examples/{name}", "\n".join(rows), step)
