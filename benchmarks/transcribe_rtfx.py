"""Transcription speed (RTFx) of the demo model: batch 1 (baseline) vs batched generation, in one run.

RTFx = seconds of audio / wall seconds of inference (log-mel, encoder, projector, prompt, generation; files already
decoded), the Open ASR Leaderboard's speed figure. The same utterances of the demo test split are transcribed with
each batch size through the path ``transcribe.py`` and ``eval.py`` use
(:func:`aero_lightning.eval.decode.decode_waveforms`: length-sorted batches, greedy, duration-scaled budget,
per-sample cut, repetition guard), after one warm-up batch at the start of the run. The last rows decode long
recordings (the utterances joined and repeated: 15 and 60 minutes by default) at batch 1. A recording longer than
one pass holds (the LLM's context with the prompt and the budget: about 150 s for the demo model's 4096 positions;
at most ``max_pass_s`` = 900 s) is decoded in overlapping chunks (``stride_s`` 5 s on each side) whose texts are
merged, as ``transcribe.py`` does.

An untrained model (the default: the demo encoder/LLM of ``make demo`` with a fresh projector, seed 0) rarely emits
its end-of-turn token, so it decodes until the repetition guard stops a loop or up to each sample's budget
(``16 + duration x 25 chars/s / chars per token``): the table then measures that decoding, and the ``new tokens``,
``guard stops`` and ``budget hits`` columns say how each row ended. Pass ``--ckpt`` for a trained checkpoint.

Run: ``python benchmarks/transcribe_rtfx.py [--ckpt PATH] [--samples 64] [--batch-sizes 1,8,32]
[--long-s 900,3600]``.
Writes ``benchmarks/results/transcribe_rtfx.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT
from aero_lightning.eval.benchmarks import get_benchmark
from aero_lightning.eval.decode import (
    GenerationOptions,
    Stopwatch,
    chars_per_token,
    decode_waveforms,
    pass_limit_samples,
    plan_decode_batches,
)
from aero_lightning.eval.sources import iter_items
from aero_lightning.model.aero import AeroModel
from aero_lightning.model.build import build_aero_model, load_model
from aero_lightning.model.projector import MLPStackProjector


def demo_model(model_dir: str) -> AeroModel:
    """The demo architecture (experiment=demo) from the tiny components, fresh projector (seed 0)."""
    torch.manual_seed(0)
    return build_aero_model(
        encoder={"name_or_path": f"{model_dir}/encoder"},
        llm={"name_or_path": f"{model_dir}/llm"},
        projector=lambda encoder_dim, llm_dim: MLPStackProjector(
            encoder_dim, llm_dim, stack_factor=4, hidden_dim=512
        ),
        attn_implementation="varlen",
    ).eval()


def transcribe(
    model, waves: list[np.ndarray], batch_size: int, options: GenerationOptions, cpt: float
) -> dict:
    """Decode ``waves`` in length-sorted batches of ``batch_size``; time the inference only."""
    watch = Stopwatch()
    texts = [""] * len(waves)
    tokens = chunks = guard_stops = budget_hits = 0
    batches = plan_decode_batches([len(w) / 16000 for w in waves], batch_size)
    with torch.no_grad():
        for batch in batches:
            with watch:
                results = decode_waveforms(
                    model, [waves[i] for i in batch], options=options, tokenizer_chars_per_token=cpt
                )
            for i, r in zip(batch, results):
                texts[i] = r.text
                tokens += r.num_new_tokens
                chunks += r.num_chunks
                guard_stops += r.stopped_by_repetition_guard
                budget_hits += r.budget_hit
    audio_s = sum(len(w) for w in waves) / 16000
    return {
        "batch_size": batch_size,
        "files": len(waves),
        "audio_s": audio_s,
        "wall_s": watch.seconds,
        "rtfx": audio_s / watch.seconds,
        "new_tokens": tokens,
        "new_tokens_per_s": tokens / watch.seconds,
        "chunks": chunks,
        "guard_stops": guard_stops,
        "budget_hits": budget_hits,
        "texts": texts,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="data_cache/demo_corpus/test")
    parser.add_argument("--model", default="data_cache/demo_model", help="tiny components (without --ckpt)")
    parser.add_argument(
        "--ckpt", default=None, help="a trained checkpoint / run folder / save_pretrained folder"
    )
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument(
        "--long-s", default="900,3600", help="long recordings at batch 1, seconds, comma-separated ('': none)"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "transcribe_rtfx.json"))
    args = parser.parse_args()
    model = load_model(args.ckpt, device="cpu") if args.ckpt else demo_model(args.model)
    items = list(iter_items(get_benchmark("demo"), source=args.corpus, max_samples=args.samples))
    waves = [i.waveform for i in items]
    options = GenerationOptions()
    cpt = chars_per_token(model.tokenizer)
    with torch.no_grad():  # warm-up: first-call allocations stay out of the timings
        decode_waveforms(model, waves[:8], options=options, tokenizer_chars_per_token=cpt)
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        start = time.perf_counter()
        rows.append(
            {"name": f"{len(waves)} utterances, batch {bs}", **transcribe(model, waves, bs, options, cpt)}
        )
        rows[-1]["total_s"] = time.perf_counter() - start
    base = rows[0]
    for r in rows:
        r["vs_batch_1"] = r["rtfx"] / base["rtfx"]
        r["same_text_as_batch_1"] = sum(a == b for a, b in zip(r["texts"], base["texts"]))
    joined = np.concatenate(waves)
    for long_s in [float(s) for s in args.long_s.split(",") if s.strip()]:
        reps = int(np.ceil(long_s * 16000 / len(joined)))
        long_wave = np.tile(joined, reps)[: int(long_s * 16000)]
        start = time.perf_counter()
        row = transcribe(model, [long_wave], 1, options, cpt)
        row |= {
            "name": f"one {long_s / 60:.0f}-minute recording, batch 1",
            "vs_batch_1": row["rtfx"] / base["rtfx"],
            "total_s": time.perf_counter() - start,
        }
        row["audio_tokens"] = model.audio_token_counter()(len(long_wave))
        rows.append(row)
    pass_s = pass_limit_samples(model, DEFAULT_ASR_PROMPT, options, cpt) / 16000
    lines = [
        "| run | audio s | wall s | RTFx | new tokens | tokens/s | chunks | guard stops | budget hits | vs batch 1 "
        "| same text as batch 1 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        same = f"{r['same_text_as_batch_1']}/{r['files']}" if "same_text_as_batch_1" in r else "-"
        lines.append(
            f"| {r['name']} | {r['audio_s']:.1f} | {r['wall_s']:.2f} | {r['rtfx']:.1f} | {r['new_tokens']} | "
            f"{r['new_tokens_per_s']:.0f} | {r['chunks']} | {r['guard_stops']} | {r['budget_hits']} | "
            f"{r['vs_batch_1']:.2f}x | {same} |"
        )
    table = "\n".join(lines)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    source = args.ckpt or f"{args.model} (untrained projector, seed 0)"
    print(table)  # noqa: T201 - benchmark output
    print(  # noqa: T201
        f"\nmodel {source}; budget 16 + duration x 25 chars/s / {cpt:.2f} chars per token; one pass holds "
        f"{pass_s:.1f} s; {machine}"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in rows:
        r.pop("texts", None)
    out.write_text(
        json.dumps({"script": "benchmarks/transcribe_rtfx.py", "args": vars(args), "model": source,
                    "chars_per_token": cpt, "pass_limit_s": pass_s, "machine": machine, "rows": rows,
                    "table": table}, indent=2) + "\n"
    )  # fmt: skip


if __name__ == "__main__":
    main()
