"""The evaluation task: ``python eval.py ckpt=PATH benchmark=NAME`` (a list, or a suite such as ``open_asr``).

For each benchmark the samples are read (hub or local source, :mod:`aero_lightning.eval.sources`), buffered and
sorted by length, decoded in batches (:func:`aero_lightning.eval.decode.decode_waveforms`) and scored:

- ASR as the Open ASR Leaderboard does (:mod:`aero_lightning.metrics.wer`): Whisper's English normaliser on both
  sides, samples whose normalised reference is empty (or TED-LIUM's ignore marker) dropped *before* decoding, as the
  leaderboard filters its datasets, S + D + I pooled over the dataset, and the unweighted mean over datasets;
  plus hallucination loops (:mod:`aero_lightning.metrics.repetition`) and the insertion rate;
- multiple choice as accuracy (:mod:`aero_lightning.metrics.choice`);
- the open tasks (:mod:`aero_lightning.metrics.tasks`): captions with the COCO caption metrics (CIDEr-D, BLEU,
  METEOR, ROUGE-L; SPICE / SPIDEr / FENSE reported as unavailable with the reason where they cannot run), audio QA
  and instructions with exact match and token F1 (plus the LLM judge, ``judge.enabled``, for the benchmarks it is
  meant for), classification with label accuracy.

RTFx = audio seconds / inference wall seconds, where inference is prompt building, log-mel, encoder, projector and
generation (CUDA-synchronised); reading and decoding audio files is excluded, as the leaderboard times the model
call. Outputs in the run folder: ``summary.json``, ``summary.md`` (the table, also logged),
``predictions/<benchmark>.jsonl`` and ``predictions/<benchmark>.skipped.jsonl``.

Every sample of a source is accounted for: scored, dropped for an empty reference, or skipped with a reason
(unreadable audio, a sample lost in a truncated shard, ...). Each benchmark's ``accounting`` in ``summary.json``
adds them up against the source's size when it is known (a shard manifest's counts, a JSON Lines manifest's lines, a
dataset's rows), and the ``.skipped.jsonl`` file lists every skipped input with its reason. Damaged shards are
reported apart (``damaged_shards``): a shard is not a sample, and the samples it lost are counted as
``missing_samples``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from aero_lightning.data.rejects import RejectCounter
from aero_lightning.errors import UserValueError
from aero_lightning.eval.benchmarks import CHOICE_INSTRUCTION, OPEN_TASKS, BenchmarkSpec, spec_from_options
from aero_lightning.eval.decode import (
    GenerationOptions,
    Stopwatch,
    chars_per_token,
    decode_waveforms,
    plan_decode_batches,
)
from aero_lightning.eval.sources import EvalItem, detect_format, iter_items, source_size
from aero_lightning.metrics.caption import DEFAULT_CAPTION_METRICS
from aero_lightning.metrics.choice import choice_accuracy, format_choices
from aero_lightning.metrics.judge import JudgeConfig, JudgeItem, LLMJudge
from aero_lightning.metrics.repetition import repetition_stats
from aero_lightning.metrics.tasks import headline_metric, score_open_task
from aero_lightning.metrics.wer import WERResult, corpus_wer, is_scored_reference, mean_wer, normalize_english
from aero_lightning.model.build import load_model
from aero_lightning.progress import Progress

logger = logging.getLogger(__name__)

__all__ = ["SHARD_REASONS", "evaluate", "markdown_summary", "run_benchmark"]

SHARD_REASONS = frozenset({"truncated_tar", "unreadable_shard"})
"""Reject reasons that count damaged shards, not samples (their lost samples are counted as ``missing_samples``)."""

LONG_ITEM_PROGRESS_S = 60.0
"""A sample at least this long, decoded alone, also shows its progress in generated tokens."""


class _ListedRejects(RejectCounter):
    """A :class:`RejectCounter` that also keeps every skipped input: ``{"key", "reason", "detail", "count"}``."""

    def __init__(self):
        super().__init__()
        self.listed: list[dict[str, Any]] = []

    def reject(self, reason: str, key: str, detail: str = "", *, count: int = 1, log: bool = True) -> None:
        super().reject(reason, key, detail, count=count, log=log)
        self.listed.append({"key": key, "reason": reason, "detail": detail, "count": count})

    def samples(self) -> int:
        """Samples skipped so far (damaged-shard events excluded)."""
        return sum(v for k, v in self.items() if k not in SHARD_REASONS)


def _chunks(items: Iterable[EvalItem], size: int) -> Iterator[list[EvalItem]]:
    it = iter(items)
    while chunk := list(islice(it, size)):
        yield chunk


def run_benchmark(
    model,
    name: str,
    spec: BenchmarkSpec,
    options: GenerationOptions,
    out_dir: str | Path,
    source: str | None = None,
    split: str | None = None,
    hf_config: str | None = None,
    streaming: bool = False,
    prompt: str | None = None,
    max_samples: int | None = None,
    batch_size: int = 16,
    max_batch_audio_s: float | None = 1800.0,
    buffer_size: int = 256,
    repetition: Mapping[str, Any] | None = None,
    progress: bool = True,
    judge: LLMJudge | None = None,
    caption_metrics: Sequence[str] = DEFAULT_CAPTION_METRICS,
) -> dict[str, Any]:
    """Decode and score one benchmark; write ``out_dir/predictions/<name>.jsonl`` and ``<name>.skipped.jsonl``.

    Args:
        model: an :class:`~aero_lightning.model.aero.AeroModel` in eval mode.
        name: the benchmark's name in the run (usually ``spec.name``).
        spec: the registry entry.
        options: generation settings.
        out_dir: the run folder.
        source, split, hf_config, streaming, max_samples: see :func:`aero_lightning.eval.sources.iter_items`.
        prompt: instruction (ASR) or post-prompt after the options (choice); None = the spec's.
        batch_size, max_batch_audio_s: see :func:`aero_lightning.eval.decode.plan_decode_batches`.
        buffer_size: samples read ahead and sorted by length before batching.
        repetition: ``{"min_repeats", "max_n"}`` for the loop measure.
        progress: show progress (:class:`~aero_lightning.progress.Progress`: a bar on a terminal, a log line every
            30 s otherwise), with the source's size as the total when it is known
            (:func:`~aero_lightning.eval.sources.source_size`, or ``max_samples``).
        judge: an LLM judge for open-ended answers (``aqa`` / ``instruct`` benchmarks), or None.
        caption_metrics: caption metric names (:data:`~aero_lightning.metrics.caption.CAPTION_METRICS`).

    Returns:
        The benchmark's summary dict (see :func:`evaluate`).
    """
    rejects = _ListedRejects()
    items = iter_items(spec, source, split, hf_config, streaming, max_samples, rejects)
    size = source_size(spec, source, split, hf_config)
    capped = max_samples is not None and (size is None or max_samples < size)
    instruction = prompt if prompt is not None else spec.prompt
    cpt = chars_per_token(model.tokenizer)
    watch = Stopwatch(next(model.parameters()).device)
    records: list[dict[str, Any]] = []
    rows = 0  # source samples behind the records (several for an item joined from one-reference rows)
    dropped: list[str] = []  # keys of ASR samples whose normalised reference is empty
    order: list[int] = []  # source position of each record
    seen = 0
    # with max_samples below the source's size the bar counts samples read; else every sample accounted for
    bar = Progress(max_samples if capped else size, name, unit="sample", enabled=progress)
    accounted = 0
    for buffer in _chunks(items, buffer_size):
        positions = list(range(seen, seen + len(buffer)))
        seen += len(buffer)
        if spec.task == "asr":
            keep = [
                i for i, item in enumerate(buffer) if is_scored_reference(normalize_english(item.reference))
            ]
            kept = set(keep)
            dropped += [item.key for i, item in enumerate(buffer) if i not in kept]
            buffer = [buffer[i] for i in keep]
            positions = [positions[i] for i in keep]
            prompts = [instruction] * len(buffer)
        elif spec.task == "choice":
            prompts = [format_choices(i.question, i.choices, instruction) for i in buffer]
        else:  # a prepared sample's own messages, else the question followed by the post-prompt (lmms-eval)
            prompts = [
                i.messages
                if i.messages is not None
                else (i.question + instruction if i.question else instruction)
                for i in buffer
            ]
        for batch in plan_decode_batches([i.duration_s for i in buffer], batch_size, max_batch_audio_s):
            long_alone = len(batch) == 1 and buffer[batch[0]].duration_s >= LONG_ITEM_PROGRESS_S
            with watch:
                results = decode_waveforms(
                    model,
                    [list(buffer[j].clips) if buffer[j].clips else buffer[j].waveform for j in batch],
                    [prompts[j] for j in batch],
                    options,
                    tokenizer_chars_per_token=cpt,
                    progress_desc=f"{name}/{buffer[batch[0]].key}" if progress and long_alone else None,
                )
            for j, res in zip(batch, results):
                item = buffer[j]
                record: dict[str, Any] = {"key": item.key, "duration_s": round(item.duration_s, 3)}
                if spec.task == "asr":
                    record |= {"reference": item.reference, "hypothesis": res.text}
                elif spec.task in OPEN_TASKS:
                    record |= {
                        "question": item.question,
                        "references": list(item.references),
                        "group": item.group,
                        "reply": res.text,
                    }
                    if item.context:
                        record["context"] = item.context
                    if item.task:
                        record["task"] = item.task
                else:
                    record |= {
                        "question": item.question,
                        "choices": list(item.choices),
                        "answer": item.answer,
                        "group": item.group,
                        "reply": res.text,
                    }
                record |= {
                    "num_new_tokens": res.num_new_tokens,
                    "finished": res.finished,
                    "stopped_by_repetition_guard": res.stopped_by_repetition_guard,
                    "num_chunks": res.num_chunks,
                }
                records.append(record)
                rows += item.num_rows
                order.append(positions[j])
            done = rows + len(dropped) + (0 if capped else rejects.samples())
            bar.update(done - accounted)
            accounted = done
    done = rows + len(dropped) + (0 if capped else rejects.samples())
    bar.update(done - accounted)  # samples skipped or dropped after the last batch
    bar.close()
    records = [records[i] for i in sorted(range(len(records)), key=order.__getitem__)]  # source order
    audio_s = sum(r["duration_s"] for r in records)
    skipped = {k: v for k, v in sorted(rejects.items()) if k not in SHARD_REASONS}
    read = rows + len(dropped) + sum(skipped.values())
    result: dict[str, Any] = {
        "task": spec.task,
        "description": spec.description,
        "source": str(source) if source is not None else spec.hf_id,
        "num_samples": len(records),
        "skipped": skipped,
        "damaged_shards": {k: v for k, v in sorted(rejects.items()) if k in SHARD_REASONS},
        "accounting": {
            "source_samples": size,
            "scored": rows,
            "dropped_empty_reference": len(dropped),
            "skipped": sum(skipped.values()),
            "read": read,
            "stopped_at_max_samples": bool(
                max_samples is not None and len(records) + len(dropped) >= max_samples
            ),
            "complete": read == size if size is not None else None,
        },
        "audio_s": round(audio_s, 3),
        "inference_s": round(watch.seconds, 3),
        "rtfx": round(audio_s / watch.seconds, 2) if watch.seconds > 0 else None,
        "num_budget_hit": sum(not r["finished"] and not r["stopped_by_repetition_guard"] for r in records),
        "num_stopped_by_repetition_guard": sum(r["stopped_by_repetition_guard"] for r in records),
        "num_chunked": sum(r["num_chunks"] > 1 for r in records),
        "reference": spec.reference,
    }
    if spec.task == "asr":
        wer = corpus_wer([r["reference"] for r in records], [r["hypothesis"] for r in records])
        rep = repetition_stats([r["hypothesis"] for r in records], **dict(repetition or {}))
        loops = set(rep.loop_indices)
        for i, r in enumerate(records):
            r["loop"] = i in loops
        result |= {
            "num_dropped_empty_reference": len(dropped),
            **wer.to_dict(),
            "wer_percent": round(100 * wer.wer, 3) if not math.isnan(wer.wer) else None,
            "insertion_rate": wer.insertions / wer.num_ref_words if wer.num_ref_words else None,
            "repetition": {k: v for k, v in rep.to_dict().items() if k != "loop_indices"},
        }
    elif spec.task in OPEN_TASKS:
        result |= _score_open(spec, records, judge, caption_metrics)
    else:
        acc = choice_accuracy(
            [r["reply"] for r in records],
            [r["choices"] for r in records],
            [r["answer"] for r in records],
            [r["group"] for r in records],
        )
        result |= {**acc.to_dict(), "accuracy_percent": round(100 * acc.accuracy, 3) if records else None}
    pred_dir = Path(out_dir) / "predictions"
    pred_dir.mkdir(parents=True, exist_ok=True)
    pred_file = pred_dir / f"{name}.jsonl"
    with open(pred_file, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    skipped_file = pred_dir / f"{name}.skipped.jsonl"
    with open(skipped_file, "w", encoding="utf-8") as f:
        listed = rejects.listed + [
            {"key": key, "reason": "empty_reference", "detail": "empty after normalisation", "count": 1}
            for key in dropped
        ]
        for r in listed:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    result["predictions"] = str(pred_file)
    result["skipped_list"] = str(skipped_file)
    if rejects:
        logger.warning("%s: skipped inputs by reason: %s (listed in %s)", name, dict(rejects), skipped_file)
    if size is not None and not result["accounting"]["stopped_at_max_samples"] and read != size:
        logger.warning(
            "%s: %d samples accounted for (scored %d, dropped %d, skipped %d) but the source lists %d",
            name,
            read,
            rows,
            len(dropped),
            sum(skipped.values()),
            size,
        )
    return result


def _score_open(
    spec: BenchmarkSpec, records: list[dict[str, Any]], judge: LLMJudge | None, caption_metrics: Sequence[str]
) -> dict[str, Any]:
    """Scores of an open-task benchmark (:func:`~aero_lightning.metrics.tasks.score_open_task`), the LLM judge's
    when it runs, and per-record scores written into ``records``."""
    replies = [r["reply"] for r in records]
    scores, per_item = score_open_task(
        spec.task,
        replies,
        [r["references"] for r in records],
        labels=spec.labels or None,
        groups=[r["group"] for r in records],
        caption_metrics=caption_metrics,
    )
    for name, values in per_item.items():
        for r, value in zip(records, values):
            r[name] = value
    out: dict[str, Any] = {
        **scores,
        "exact_match_percent": round(100 * scores["exact_match"], 3) if records else None,
        "f1_percent": round(100 * scores["f1"], 3) if records else None,
    }
    if spec.task == "classify":
        out["accuracy_percent"] = round(100 * scores["accuracy"], 3) if records else None
    if judge is not None and spec.judge and records:
        verdict = judge.judge(
            [JudgeItem(r["question"], r["references"][0], r["reply"], r.get("context", "")) for r in records]
        )
        for r, score, texts in zip(records, verdict.per_item, verdict.verdicts):
            r["judge_score"] = score
            r["judge_verdicts"] = list(texts)
        out["judge"] = verdict.to_dict()
    elif spec.judge:
        out["judge"] = None  # an LLM-judged benchmark without the judge: token F1 and exact match only
    name, value = headline_metric(spec.task, scores)
    if out.get("judge") and out["judge"]["num_judged"]:
        name, value = "judge_score", out["judge"]["score"]
    out["headline"] = {"metric": name, "value": None if math.isnan(value) else value}
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def _skipped(r: Mapping[str, Any]) -> str:
    """Skipped and dropped samples of a benchmark with their reasons, e.g. ``"2 (missing_samples 2; truncated_tar
    shards 1)"``."""
    parts = [f"{k} {v}" for k, v in r["skipped"].items()]
    if r.get("num_dropped_empty_reference"):
        parts.append(f"empty_reference {r['num_dropped_empty_reference']}")
    parts += [f"{k} shards {v}" for k, v in r.get("damaged_shards", {}).items()]
    total = r["accounting"]["skipped"] + r["accounting"]["dropped_empty_reference"]
    return f"{total} ({'; '.join(parts)})" if parts else "0"


def markdown_summary(summary: Mapping[str, Any]) -> str:
    """The summary as markdown tables (ASR, multiple choice, then the open tasks)."""
    benches = summary["benchmarks"]
    asr = {k: v for k, v in benches.items() if v["task"] == "asr"}
    choice = {k: v for k, v in benches.items() if v["task"] == "choice"}
    open_tasks = {k: v for k, v in benches.items() if v["task"] in OPEN_TASKS}
    lines = []
    if asr:
        lines += [
            "| benchmark | samples | skipped | WER % | S | D | I | insertions % | loops | guard stops | budget hit "
            "| RTFx | Aero WER % |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in asr.items():
            ins = 100 * r["insertion_rate"] if r.get("insertion_rate") is not None else None
            lines.append(
                f"| {name} | {r['num_samples']} | {_skipped(r)} | {_fmt(r.get('wer_percent'))} | "
                f"{r['substitutions']} | {r['deletions']} | {r['insertions']} | {_fmt(ins)} | "
                f"{r['repetition']['num_loops']} | {r['num_stopped_by_repetition_guard']} | {r['num_budget_hit']} | "
                f"{_fmt(r['rtfx'], 1)} | {_fmt(r['reference'])} |"
            )
        if summary.get("mean_wer_percent") is not None:
            lines.append(
                f"| **mean** ({len(summary['mean_over'])} datasets, unweighted) | | | "
                f"**{_fmt(summary['mean_wer_percent'])}** | | | | | | | | {_fmt(summary['rtfx'], 1)} | "
                f"{_fmt(summary.get('reference_mean_wer_percent'))} |"
            )
    if choice:
        if lines:
            lines.append("")
        lines += [
            "| benchmark | items | skipped | accuracy % | unparsed | RTFx |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, r in choice.items():
            lines.append(
                f"| {name} | {r['num_items']} | {_skipped(r)} | {_fmt(r.get('accuracy_percent'))} | "
                f"{r['num_unparsed']} | {_fmt(r['rtfx'], 1)} |"
            )
    if open_tasks:
        if lines:
            lines.append("")
        lines += [
            "| benchmark | task | items | skipped | metric | score | exact match % | token F1 % | judge (1-10) "
            "| RTFx |",
            "|---|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        unavailable: dict[str, str] = {}
        for name, r in open_tasks.items():
            head = r["headline"]
            value = head["value"]
            if value is not None and head["metric"] in ("accuracy", "f1", "exact_match"):
                value = 100 * value  # shown in %, like the other columns
            judge = r.get("judge")
            if "judge" in r and judge is None:
                judged = "off"
            elif judge:
                judged = f"{_fmt(judge['score'])} ({judge['num_judged']}/{judge['num_items']})"
            else:
                judged = "-"
            metric = head["metric"] + (" %" if head["metric"] in ("accuracy", "f1", "exact_match") else "")
            lines.append(
                f"| {name} | {r['task']} | {r['num_items']} | {_skipped(r)} | {metric} | {_fmt(value, 3)} | "
                f"{_fmt(r.get('exact_match_percent'))} | {_fmt(r.get('f1_percent'))} | {judged} | "
                f"{_fmt(r['rtfx'], 1)} |"
            )
            caption_scores = {
                k: r[k] for k in ("bleu_4", "meteor", "rouge_l", "cider_d", "spice", "spider") if k in r
            }
            if caption_scores:
                lines.append(
                    f"| | | | | {', '.join(f'{k} {v:.4f}' for k, v in caption_scores.items())} | | | | | |"
                )
            unavailable |= r.get("caption_unavailable") or {}
        for metric, reason in unavailable.items():
            lines.append(f"\n{metric} unavailable: {reason}")
    return "\n".join(lines) + "\n"


def _benchmark_options(cfg: DictConfig) -> dict[str, dict[str, Any]]:
    node = cfg.get("benchmark")
    if not node:
        raise ValueError("no benchmark selected: pass benchmark=NAME, benchmark=[A,B] or a suite (open_asr)")
    options = OmegaConf.to_container(node, resolve=True)
    bad = [k for k, v in options.items() if not isinstance(v, dict)]
    if bad:
        raise ValueError(
            f"benchmark entries {bad} are not mappings; conf/benchmark/*.yaml nest options under the name"
        )
    return options


def _judge_from(cfg: DictConfig) -> LLMJudge | None:
    """The LLM judge of ``cfg.judge`` when enabled, checked before any model is loaded."""
    node = cfg.get("judge")
    if not node or not node.get("enabled"):
        return None
    try:
        config = JudgeConfig(**OmegaConf.to_container(node, resolve=True))
    except (TypeError, ValueError) as err:
        raise UserValueError(f"judge: {err}") from None
    if config.api_key_env and not os.environ.get(config.api_key_env):
        raise UserValueError(
            f"judge.enabled=true but the environment variable {config.api_key_env} (judge.api_key_env) is not set; "
            "set it, or judge.api_key_env=null for an endpoint without a key"
        )
    return LLMJudge(config)


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the evaluation task from the composed ``conf/eval.yaml``.

    Returns:
        ``{"checkpoint", "benchmarks": {name: {...}}, "mean_wer", "mean_wer_percent", "mean_over", "rtfx",
        "generation", "summary_json", "summary_md"}``; per ASR benchmark the pooled counts
        (:class:`~aero_lightning.metrics.wer.WERResult`), ``wer_percent``, ``insertion_rate``, ``repetition``,
        ``num_dropped_empty_reference``, ``skipped`` samples by reason, ``damaged_shards`` by reason,
        ``accounting`` (``source_samples``: the source's size or None; ``scored + dropped_empty_reference +
        skipped = read``; ``complete``: read equals the source's size), ``audio_s``, ``inference_s``, ``rtfx``,
        ``num_budget_hit``, ``num_stopped_by_repetition_guard``, ``num_chunked``, the ``predictions`` file and the
        ``skipped_list`` file; per choice benchmark the accuracy fields; per open-task benchmark the fields of
        :func:`~aero_lightning.metrics.tasks.score_open_task` (``exact_match``, ``f1``, caption scores and
        ``caption_unavailable``, or ``accuracy``), ``judge`` (the LLM judge's scores, None when it is off for a
        judged benchmark) and ``headline`` (``{"metric", "value"}``).

    Raises:
        KeyError: for a benchmark name not in the registry.
        FileNotFoundError: for a missing checkpoint or local source.
    """
    benchmarks = _benchmark_options(cfg)
    specs = {name: spec_from_options(name, opts) for name, opts in benchmarks.items()}
    for name, opts in benchmarks.items():  # a local benchmark may ask for the judge
        if opts.get("judge") is not None and bool(opts["judge"]) != specs[name].judge:
            specs[name] = dataclasses.replace(specs[name], judge=bool(opts["judge"]))
    judge = _judge_from(cfg)
    for name, opts in benchmarks.items():  # fail on a missing local source before the model is loaded
        source = opts.get("source") or specs[name].hf_id
        if source is None:
            raise ValueError(f"benchmark {name} has no hub copy: set benchmark.{name}.source=PATH")
        detect_format(source)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.ckpt, device=cfg.get("device"), dtype=cfg.get("dtype"), config=cfg.get("config"))
    options = GenerationOptions(**OmegaConf.to_container(cfg.generation, resolve=True))
    repetition = OmegaConf.to_container(cfg.repetition, resolve=True) if cfg.get("repetition") else None
    results: dict[str, Any] = {}
    for name, opts in benchmarks.items():
        spec = specs[name]
        if spec.task == "asr":
            default_prompt = cfg.get("asr_prompt")
        elif spec.task == "choice":
            default_prompt = cfg.get("choice_instruction", CHOICE_INSTRUCTION)
        else:
            default_prompt = None  # the registry's post-prompt
        max_samples = opts.get("max_samples", None)
        if max_samples is None:
            max_samples = cfg.get("max_samples")
        logger.info("benchmark %s: %s", name, spec.description)
        results[name] = run_benchmark(
            model,
            name,
            spec,
            options,
            out_dir,
            source=opts.get("source"),
            split=opts.get("split"),
            hf_config=opts.get("hf_config"),
            streaming=bool(opts.get("streaming", False)),
            prompt=opts.get("prompt") if opts.get("prompt") is not None else default_prompt,
            max_samples=max_samples,
            batch_size=int(cfg.batch_size),
            max_batch_audio_s=cfg.get("max_batch_audio_s"),
            buffer_size=int(cfg.get("buffer_size", 256)),
            repetition=repetition,
            progress=bool(cfg.get("progress", True)),
            judge=judge,
            caption_metrics=tuple(cfg.get("caption_metrics") or DEFAULT_CAPTION_METRICS),
        )
    asr_scored = {
        n: WERResult(**{k: r[k] for k in WERResult.__dataclass_fields__})
        for n, r in results.items()
        if r["task"] == "asr" and r["num_samples"] > 0
    }
    mean = mean_wer(asr_scored) if asr_scored else None
    refs = [results[n]["reference"] for n in asr_scored]
    total_audio = sum(r["audio_s"] for r in results.values())
    total_time = sum(r["inference_s"] for r in results.values())
    summary: dict[str, Any] = {
        "checkpoint": str(cfg.ckpt),
        "benchmarks": results,
        "mean_wer": mean,
        "mean_wer_percent": round(100 * mean, 3) if mean is not None else None,
        "mean_over": sorted(asr_scored),
        "reference_mean_wer_percent": round(sum(refs) / len(refs), 3) if refs and None not in refs else None,
        "audio_s": round(total_audio, 3),
        "inference_s": round(total_time, 3),
        "rtfx": round(total_audio / total_time, 2) if total_time > 0 else None,
        "generation": OmegaConf.to_container(cfg.generation, resolve=True),
    }
    table = markdown_summary(summary)
    summary["summary_json"] = str(out_dir / "summary.json")
    summary["summary_md"] = str(out_dir / "summary.md")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str), encoding="utf-8")
    (out_dir / "summary.md").write_text(table, encoding="utf-8")
    logger.info("evaluation of %s\n%s\nsummary: %s", cfg.ckpt, table, summary["summary_json"])
    return summary
