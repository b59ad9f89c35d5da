"""Validation during training, per task: decode the named validation sets every N steps and score each with its
task's metric.

Every ``every_n_train_steps`` optimizer steps the first ``max_samples`` items of each validation set are decoded
greedily (:func:`aero_lightning.eval.decode.decode_waveforms`, duration-scaled budget) and scored like ``eval.py``:

- ASR samples with the Whisper normaliser, empty references dropped, pooled S + D + I: ``wer``, ``insertion_rate``,
  ``loop_rate``, decoded with the fixed ASR instruction (``prompt``);
- the other tasks (samples carry ``task`` in their JSON) are decoded with each sample's own prompt messages (its
  question or instruction, every audio clip; :func:`aero_lightning.data.chat.prompt_messages`) and scored with
  :func:`aero_lightning.metrics.tasks.score_open_task`: ``cider_d`` for captions (``f1`` instead when the caption
  metrics cannot run here), ``accuracy`` for classification (against the labels the set's references use),
  ``f1`` and ``exact_match`` for audio QA and instructions.

Logged to every logger per corpus: ``val/<name>/<metric>``, or ``val/<name>/<task>/<metric>`` for a set that mixes
tasks; text-only samples (no audio) are not decoded. TensorBoard also gets ``num_examples`` audio clips
(``wer_examples/<name>/<i>``) and a reference / hypothesis table (``wer_examples/<name>``) so a listener can check
what the model hears.

Every rank decodes its share of the items (``items[rank::world]``) and rank 0 gathers the replies, scores and logs
them, so the decode time is divided by the number of ranks. With parameters sharded across ranks (FSDP, DeepSpeed
ZeRO-3) every forward is a collective: each rank then pads its share to the same number of items (repeats, not
scored) and generates with ``synced_gpus``, so all ranks run the same forward passes.

The class keeps its first name, :class:`WERMonitor` (``conf/callbacks/default.yaml``'s ``wer``); :class:`TaskMonitor`
is the same class.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import lightning as L
import numpy as np
import torch

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
from aero_lightning.distributed import gather_objects, parameters_are_sharded
from aero_lightning.eval.decode import (
    GenerationOptions,
    chars_per_token,
    decode_waveforms,
    plan_decode_batches,
)
from aero_lightning.eval.sources import EvalItem, iter_shard_items
from aero_lightning.metrics.repetition import repetition_stats
from aero_lightning.metrics.tasks import headline_metric, score_open_task
from aero_lightning.metrics.wer import corpus_wer, is_scored_reference, normalize_english

logger = logging.getLogger(__name__)

__all__ = ["TaskMonitor", "WERMonitor"]

MONITOR_CAPTION_METRICS = ("cider_d",)
"""Caption metrics computed during training: CIDEr-D only (METEOR's Java start-up costs seconds per call)."""


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "(empty)"


def _reference(item: EvalItem) -> str:
    return item.reference if item.task == "asr" else " / ".join(item.references)


def _scored(item: EvalItem) -> bool:
    if item.task == "asr":
        return is_scored_reference(normalize_english(item.reference))
    return item.duration_s > 0 and bool(item.references)  # a text-only sample has no audio to listen to


class WERMonitor(L.Callback):
    """Decode validation sets during training and log each task's metric per corpus (module docstring).

    Args:
        val_sets: ``{name: folder}`` of prepared shard folders (``data.val_dirs``).
        every_n_train_steps: decode every this many optimizer steps; 0 disables the callback.
        max_samples: items decoded per set (the first ones, in shard order, so every run sees the same).
        batch_size: items per generation batch.
        num_examples: audio + text examples logged per set (TensorBoard).
        prompt: the ASR instruction (ASR samples; the others use their own messages).
        generation: :class:`GenerationOptions` fields (``num_beams``, ``max_new_tokens``, ...).
        caption_metrics: caption metric names scored during training (CIDEr-D by default).
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
        caption_metrics: Sequence[str] = MONITOR_CAPTION_METRICS,
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
        self.caption_metrics = tuple(caption_metrics)
        self._cache: dict[str, list[EvalItem]] = {}
        self._last_step = -1
        self.last_results: dict[str, dict] = {}

    # ------------------------------------------------------------------ data
    def _items(self, name: str, folder: str) -> list[EvalItem]:
        """The set's first ``max_samples`` scored items, read once and kept in memory."""
        if name not in self._cache:
            items = iter_shard_items(folder, max_items=self.max_samples)
            self._cache[name] = [i for i in items if _scored(i)]
        return self._cache[name]

    def _prompt(self, item: EvalItem):
        if item.task == "asr":
            return self.prompt
        if item.messages is not None:
            return item.messages
        return item.question or self.prompt

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
            ``{name: {metric: value, ..., "num_samples"}}`` on rank 0 (empty on the others); the metrics of a set
            that mixes tasks are named ``<task>/<metric>``.
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
                    logger.warning("WERMonitor: validation set %s (%s) has no scored item", name, folder)
                    continue
                mine = list(range(rank, len(items), world))
                if sharded:  # every rank the same number of generate calls: pad with repeats, dropped below
                    padded = mine + [mine[0] if mine else 0] * (-(-len(items) // world) - len(mine))
                else:
                    padded = mine
                hyps_mine: dict[int, str] = {}
                for batch in plan_decode_batches([items[j].duration_s for j in padded], self.batch_size):
                    chosen = [items[padded[b]] for b in batch]
                    decoded = decode_waveforms(
                        model,
                        [list(i.clips) if i.clips else i.waveform for i in chosen],
                        [self._prompt(i) for i in chosen],
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
                results[name] = self._score(name, items, hyps, step)
                self._log(trainer, name, results[name], items, hyps, step)
        finally:
            model.train(was_training)
        self.last_results = results
        return results

    def _score(self, name: str, items: list[EvalItem], hyps: list[str], step: int) -> dict:
        by_task: dict[str, list[int]] = {}
        for j, item in enumerate(items):
            by_task.setdefault(item.task or "asr", []).append(j)
        out: dict[str, float] = {}
        for task, idx in by_task.items():
            prefix = "" if len(by_task) == 1 else f"{task}/"
            task_hyps = [hyps[j] for j in idx]
            if task == "asr":
                wer = corpus_wer([items[j].reference for j in idx], task_hyps)
                metrics = {
                    "wer": wer.wer,
                    "insertion_rate": wer.insertions / max(1, wer.num_ref_words),
                    "loop_rate": repetition_stats(task_hyps).loop_rate,
                }
                logger.info("step %d: %s WER %.2f%% over %d utterances", step, name, 100 * wer.wer, len(idx))
            else:
                scores, _ = score_open_task(
                    task,
                    task_hyps,
                    [list(items[j].references) for j in idx],
                    caption_metrics=self.caption_metrics,
                )
                head, value = headline_metric(task, scores)
                metrics = {head: value, "f1": scores["f1"], "exact_match": scores["exact_match"]}
                logger.info("step %d: %s %s %s %.4f over %d items", step, name, task, head, value, len(idx))
            out |= {f"{prefix}{k}": v for k, v in metrics.items()}
            out[f"{prefix}num_samples"] = len(idx)
        if len(by_task) > 1:
            out["num_samples"] = len(items)
        return out

    def _log(
        self, trainer, name: str, metrics: dict, items: list[EvalItem], hyps: list[str], step: int
    ) -> None:
        scalars = {
            f"val/{name}/{k}": float(v)
            for k, v in metrics.items()
            if not k.endswith("num_samples") and not (isinstance(v, float) and math.isnan(v))
        }
        for lg in trainer.loggers:
            lg.log_metrics(scalars, step=step)
            experiment = getattr(lg, "experiment", None)
            if not hasattr(experiment, "add_audio"):
                continue  # not TensorBoard
            rows = ["| key | reference | hypothesis |", "|---|---|---|"]
            for i, item in enumerate(items[: self.num_examples]):
                wave = torch.from_numpy(np.clip(item.waveform, -1.0, 1.0))[None]  # (1, T)
                experiment.add_audio(f"wer_examples/{name}/{i}", wave, step, sample_rate=16000)
                rows.append(
                    f"| {item.key} | {_markdown_cell(_reference(item))} | {_markdown_cell(hyps[i])} |"
                )
            if self.num_examples:
                experiment.add_text(f"wer_examples/{name}", "\n".join(rows), step)


TaskMonitor = WERMonitor
"""The per-task validation monitor under its descriptive name."""
