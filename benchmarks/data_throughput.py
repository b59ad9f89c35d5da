"""Audio seconds delivered per wall second by one data worker, shards -> training batch.

Rows, all in one process (= one worker, one core), over the same shards:

- ``stream``: :class:`aero_lightning.data.stream.TrainStream` as a DataLoader worker runs it: read tar, parse JSON,
  tokenise and cost the chat, plan packed micro-batches, decode FLAC, collate the packed batch. Log-mel is left
  to the accelerator, which computes it in batch, so the CPU workers only read, decode and pack.
- ``stream + log-mel (CPU)``: the same plus our batched log-mel (:class:`LogMelSpectrogram`) on this CPU, i.e.
  even without an accelerator.
- baseline ``HF per sample``: WebDataset read + soundfile decode + ``WhisperFeatureExtractor`` called per sample
  (padded to 30 s, numpy), the usual HF-style worker.

Figures are audio seconds per wall second (``x real time``). Target (issue 3): the stream >= 1000x real time per
core and >= 3x the baseline.

A second table gives the audio bytes of a packed 32768-token batch, measured on the batches the stream row
produced: the 16-bit PCM the batches carry (windows back to back), against the float32 windows zero-padded to the
longest that they carried before (``W x max(window_lengths) x 4`` bytes; the batches also held no other large
tensor). Target (issue 18): at least 2x smaller.

Run: ``python benchmarks/data_throughput.py [--corpus DIR] [--tokenizer DIR]``. Defaults: the demo corpus's train
split and the demo model's tokenizer (``make demo`` builds both). Writes ``benchmarks/results/data_throughput.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import time
from pathlib import Path

import soundfile as sf
import torch
import webdataset as wds
from transformers import AutoTokenizer, WhisperFeatureExtractor

from aero_lightning.data.audio_tokens import AudioTokenCounter
from aero_lightning.data.datamodule import resolve_split
from aero_lightning.data.features import LogMelSpectrogram, pcm_windows
from aero_lightning.data.stream import TrainStream

SAMPLE_RATE_HZ = 16000


def run_stream(urls, tokenizer, seconds: float, log_mel: LogMelSpectrogram | None) -> dict:
    """Pull packed batches for ``seconds`` of wall time; count audio seconds delivered."""
    counter = AudioTokenCounter(encoder_downsample=2, projector_downsample=2)
    stream = TrainStream(
        {"corpus": urls},
        {"corpus": 1.0},
        tokenizer,
        counter,
        mode="packed",
        packing_length=32768,
        buffer_size=2048,
    )
    it = iter(stream)
    next(it)  # warm-up: the first block is read and planned
    audio_s, batches, t0 = 0.0, 0, time.perf_counter()
    pcm_bytes, float_bytes = 0, 0
    while time.perf_counter() - t0 < seconds:
        batch = next(it)
        lengths = batch["window_lengths"]
        pcm_bytes += batch["audio_pcm"].numel() * batch["audio_pcm"].element_size()
        float_bytes += len(lengths) * int(lengths.max()) * 4  # the float32 padded windows of the old batches
        if log_mel is not None:
            with torch.no_grad():
                log_mel(pcm_windows(batch["audio_pcm"], lengths), lengths)
        audio_s += float(batch["audio_samples"].sum()) / SAMPLE_RATE_HZ
        batches += 1
    wall = time.perf_counter() - t0
    return {
        "audio_s": audio_s,
        "wall_s": wall,
        "batches": batches,
        "x_real_time": audio_s / wall,
        "pcm16_mb_per_batch": pcm_bytes / batches / 1e6,
        "float32_padded_mb_per_batch": float_bytes / batches / 1e6,
    }


def run_baseline(urls, seconds: float) -> dict:
    """WebDataset + soundfile + WhisperFeatureExtractor per sample (the HF-style worker)."""
    extractor = WhisperFeatureExtractor(feature_size=80)
    ds = wds.WebDataset(list(urls), resampled=True, shardshuffle=False, empty_check=False)
    it = iter(ds)
    audio_s, samples, t0 = 0.0, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        raw = next(it)
        wave, sr = sf.read(io.BytesIO(raw["flac"]), dtype="float32")
        extractor(wave, sampling_rate=sr, return_tensors="np")
        json.loads(raw["json"])
        audio_s += len(wave) / sr
        samples += 1
    wall = time.perf_counter() - t0
    return {"audio_s": audio_s, "wall_s": wall, "samples": samples, "x_real_time": audio_s / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="data_cache/demo_corpus/train", help="a prepared split folder")
    parser.add_argument(
        "--tokenizer", default="data_cache/demo_model/llm", help="tokenizer with audio tokens"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="wall seconds per row")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "data_throughput.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)  # one worker = one core
    urls = resolve_split(args.corpus)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)

    rows = {
        "baseline: HF WhisperFeatureExtractor per sample": run_baseline(urls, args.seconds),
        "stream (decode + pack; log-mel on the accelerator)": run_stream(urls, tokenizer, args.seconds, None),
        "stream + batched log-mel on this CPU": run_stream(
            urls, tokenizer, args.seconds, LogMelSpectrogram(80)
        ),
    }
    base = rows["baseline: HF WhisperFeatureExtractor per sample"]["x_real_time"]
    lines = ["| path (1 process, 1 thread) | audio s / wall s | vs baseline |", "|---|---:|---:|"]
    for name, r in rows.items():
        r["vs_baseline"] = r["x_real_time"] / base
        lines.append(f"| {name} | {r['x_real_time']:.0f}x | {r['vs_baseline']:.2f}x |")
    stream = rows["stream (decode + pack; log-mel on the accelerator)"]
    lines += [
        "",
        "| audio in a packed 32768-token batch | MB per batch | vs before |",
        "|---|---:|---:|",
        f"| before: float32 windows, zero-padded to the longest | {stream['float32_padded_mb_per_batch']:.2f} | 1.00x |",
        f"| now: int16 PCM, windows back to back | {stream['pcm16_mb_per_batch']:.2f} | "
        f"{stream['float32_padded_mb_per_batch'] / stream['pcm16_mb_per_batch']:.2f}x smaller |",
    ]
    table = "\n".join(lines)
    print(table)  # noqa: T201 - benchmark output
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores visible"
    print(f"\ncorpus {args.corpus} ({len(urls)} shards), {args.seconds:.0f} s per row, {machine}")  # noqa: T201
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "script": "benchmarks/data_throughput.py",
                "args": vars(args),
                "machine": machine,
                "rows": rows,
                "table": table,
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
