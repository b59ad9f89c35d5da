"""One scoring entry for the open tasks (captions, audio QA, classification, instructions), shared by ``eval.py``
and the validation monitor so both report the same numbers.

Per task:

- ``caption``: the caption metrics of :mod:`aero_lightning.metrics.caption` (BLEU, METEOR, ROUGE-L, CIDEr-D; SPICE,
  SPIDEr and FENSE where they can run), with token F1 and exact match alongside;
- ``aqa`` and ``instruct``: exact match and token F1 (:mod:`aero_lightning.metrics.text`); the LLM judge
  (:mod:`aero_lightning.metrics.judge`) is run by the caller when it is enabled;
- ``classify``: label accuracy (:func:`aero_lightning.metrics.choice.classify_accuracy`), with token F1 and exact
  match alongside.

The headline metric (:func:`headline_metric`) is CIDEr-D for captions (token F1 when the caption metrics cannot run
here), accuracy for classification and token F1 for the question-answering tasks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from aero_lightning.metrics.caption import DEFAULT_CAPTION_METRICS, caption_scores
from aero_lightning.metrics.choice import classify_accuracy
from aero_lightning.metrics.text import qa_scores

__all__ = ["headline_metric", "score_open_task"]


def score_open_task(
    task: str,
    replies: Sequence[str],
    references: Sequence[Sequence[str]],
    labels: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
    caption_metrics: Iterable[str] = DEFAULT_CAPTION_METRICS,
) -> tuple[dict[str, Any], dict[str, list[float]]]:
    """Score one dataset of an open task.

    Args:
        task: ``caption``, ``aqa``, ``classify`` or ``instruct``.
        replies: model texts.
        references: each item's accepted captions / answers / labels.
        labels: ``classify``: the label set (None: every reference label).
        groups: optional category per item, for per-group accuracy (``classify``).
        caption_metrics: ``caption``: metric names of :data:`~aero_lightning.metrics.caption.CAPTION_METRICS`.

    Returns:
        ``(scores, per_item)``: ``scores`` has ``exact_match``, ``f1``, ``num_exact``, ``num_items`` and per task
        ``accuracy``, ``num_correct``, ``num_unparsed``, ``num_labels``, ``per_group`` (classify) or the caption
        scores by name with ``caption_unavailable`` (caption); ``per_item`` holds per-item ``f1`` (and
        ``cider_d`` / ``correct`` where computed).

    Raises:
        ValueError: for an unknown task or mismatched lengths.
    """
    if task not in ("caption", "aqa", "classify", "instruct"):
        raise ValueError(f"not an open task: {task!r}")
    qa = qa_scores(replies, references)
    scores: dict[str, Any] = qa.to_dict()
    per_item: dict[str, list[float]] = {"f1": list(qa.per_item_f1)}
    if task == "classify":
        acc = classify_accuracy(replies, references, labels, groups)
        scores |= {k: v for k, v in acc.to_dict().items() if k != "num_items"}
    elif task == "caption":
        cap = caption_scores(replies, references, caption_metrics)
        scores |= cap.scores
        scores["caption_unavailable"] = dict(cap.unavailable)
        per_item |= {k: v for k, v in cap.per_item.items() if k == "cider_d"}
    return scores, per_item


def headline_metric(task: str, scores: Mapping[str, Any]) -> tuple[str, float]:
    """The one number a task is summarised by: ``(name, value)`` (module docstring); nan when missing."""
    if task == "classify":
        name = "accuracy"
    elif task == "caption":
        name = "cider_d" if "cider_d" in scores else "f1"
    else:
        name = "f1"
    value = scores.get(name)
    return name, float(value) if value is not None else math.nan
