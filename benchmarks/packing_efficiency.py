"""Real-token fraction of padded vs packed micro-batches at 4096 and 32768 tokens (Aero's two budgets).

Samples are drawn from two duration distributions, costed exactly as the training stream costs them (Aero's
projector: 25 audio tokens per second, ``AudioTokenCounter(projector_downsample=2)``; text tokens from a speaking rate), cut into
blocks of ``--buffer-size`` and planned with the library's planners (:func:`aero_lightning.data.packing.plan_batches`),
as :class:`aero_lightning.data.stream.TrainStream` does. Baselines in the same run: ``padded_arrival`` (padded
batches cut in arrival order, as a fixed-order padded loader would) and ``padded`` (the stream's padded mode,
length-sorted within the buffer).

Columns:
- ``real/budget``: real tokens / (micro-batches x packing_length): how much of every step's token budget is data.
- ``real/computed``: real tokens / tokens the LLM processes (padding included; 1 for packed rows).
- ``skipped``: samples over the budget (skipped and counted by the stream, never truncated).
- ``docs/batch``: mean documents per micro-batch.

Also: encoder frames of padding-free 30 s windows vs every window padded to 30 s (3000 log-mel frames).

Distributions (parametric stand-ins, not the corpora themselves):
- ``librispeech``: LibriSpeech train-960-shaped: normal with mean 12.3 s and sd 3.8 s clipped to [0.8, 35] s
  (the corpus's published mean utterance length is ~12.3 s, segments are at most ~35 s).
- ``longform_tail``: 85 % of the above, 15 % log-uniform between 30 s and 15 min.

Run: ``python benchmarks/packing_efficiency.py`` (CPU, ~1 min). Writes ``benchmarks/results/packing_efficiency.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.data.packing import plan_batches, plan_padded, plan_stats

SAMPLE_RATE_HZ = 16000
TEXT_TOKENS_PER_S = 3.5  # ~2.7 words/s read speech x ~1.3 Qwen2.5 BPE tokens per English word
TEMPLATE_TOKENS = 32  # ChatML system/user/assistant scaffolding + ASR instruction + audio bos/eos


def durations(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sample ``n`` durations in seconds from a named distribution (module docstring)."""
    base = np.clip(rng.normal(12.3, 3.8, n), 0.8, 35.0)
    if kind == "librispeech":
        return base
    if kind == "longform_tail":
        tail = rng.random(n) < 0.15
        base[tail] = np.exp(rng.uniform(np.log(30.0), np.log(900.0), int(tail.sum())))
        return base
    raise ValueError(f"unknown distribution {kind!r}")


def costs_of(durations_s: np.ndarray, counter: AudioTokenCounter) -> list[int]:
    """LLM tokens per sample: audio tokens + text tokens + template."""
    return [
        counter(round(d * SAMPLE_RATE_HZ)) + round(d * TEXT_TOKENS_PER_S) + TEMPLATE_TOKENS
        for d in durations_s
    ]


def simulate(costs: list[int], mode: str, packing_length: int, buffer_size: int) -> dict:
    """Plan ``costs`` block by block like the training stream; return the summed accounting.

    ``mode`` is ``packed``, ``padded`` (the stream's length-sorted padded batches) or ``padded_arrival`` (baseline
    without sorting).
    """
    kept = [c for c in costs if c <= packing_length]
    totals = {"real_tokens": 0, "computed_tokens": 0, "budget_tokens": 0, "batches": 0}
    for start in range(0, len(kept) - buffer_size + 1, buffer_size):
        block = kept[start : start + buffer_size]
        if mode == "padded_arrival":
            plan = plan_padded(block, packing_length, sort=False)
        else:
            plan = plan_batches(block, packing_length, mode)
        stats = plan_stats(block, plan, "packed" if mode == "packed" else "padded", packing_length)
        for k in ("real_tokens", "computed_tokens", "budget_tokens"):
            totals[k] += stats[k]
        totals["batches"] += len(plan)
    n_planned = (len(kept) // buffer_size) * buffer_size
    return {
        "real_over_budget": totals["real_tokens"] / totals["budget_tokens"],
        "real_over_computed": totals["real_tokens"] / totals["computed_tokens"],
        "skipped": len(costs) - len(kept),
        "skipped_frac": (len(costs) - len(kept)) / len(costs),
        "docs_per_batch": n_planned / totals["batches"],
        "batches": totals["batches"],
    }


def encoder_frames(durations_s: np.ndarray, counter: AudioTokenCounter) -> tuple[int, int]:
    """Encoder frames padding-free vs with every 30 s window padded to 3000 log-mel frames."""
    free = padded = 0
    for d in durations_s:
        for w in counter.window_lengths(round(d * SAMPLE_RATE_HZ)):
            frames = -(-w // counter.hop_length)
            free += -(-frames // counter.encoder_downsample)
            padded += 1500
    return free, padded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=40_000)
    parser.add_argument("--buffer-size", type=int, default=4096, help="samples planned together")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "packing_efficiency.json"))
    args = parser.parse_args()

    counter = AudioTokenCounter(encoder_downsample=2, projector_downsample=2)  # Aero: 25 tokens / s
    rows, encoder_rows = [], []
    t0 = time.perf_counter()
    for dist in ("librispeech", "longform_tail"):
        d = durations(dist, args.samples, np.random.default_rng(args.seed))
        costs = costs_of(d, counter)
        for mode in ("padded_arrival", "padded", "packed"):
            for packing_length in (4096, 32768):
                r = simulate(costs, mode, packing_length, args.buffer_size)
                rows.append({"distribution": dist, "mode": mode, "packing_length": packing_length, **r})
        free, padded = encoder_frames(d, counter)
        encoder_rows.append(
            {
                "distribution": dist,
                "frames_padding_free": free,
                "frames_padded_30s": padded,
                "saved": 1 - free / padded,
            }
        )

    lines = [
        "| distribution | mode | packing_length | real/budget | real/computed | skipped | docs/batch |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['distribution']} | {r['mode']} | {r['packing_length']} | {100 * r['real_over_budget']:.2f} % | "
            f"{100 * r['real_over_computed']:.2f} % | {r['skipped']} ({100 * r['skipped_frac']:.1f} %) | "
            f"{r['docs_per_batch']:.1f} |"
        )
    lines += [
        "",
        "| distribution | encoder frames, padding-free | padded to 30 s | saved |",
        "|---|---:|---:|---:|",
    ]
    for e in encoder_rows:
        lines.append(
            f"| {e['distribution']} | {e['frames_padding_free']:,} | {e['frames_padded_30s']:,} | "
            f"{100 * e['saved']:.1f} % |"
        )
    table = "\n".join(lines)
    print(table)  # noqa: T201 - benchmark output
    print(
        f"\n{args.samples} samples per distribution, buffer {args.buffer_size}, {time.perf_counter() - t0:.1f} s"
    )  # noqa: T201
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "script": "benchmarks/packing_efficiency.py",
                "args": vars(args),
                "tokens": {
                    "audio_tokens_per_s": 25,
                    "text_tokens_per_s": TEXT_TOKENS_PER_S,
                    "template": TEMPLATE_TOKENS,
                },
                "rows": rows,
                "encoder": encoder_rows,
                "table": table,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
