"""Projector-only training with and without the encoder-output cache (``data.encoder_cache``), on CPU.

Two encoder shapes, both random init and built from their configs (no download): the demo encoder
(``conf/model/encoder/demo_tiny.yaml``: ``aero_lightning.model.tiny``'s Whisper config, d_model 192, 4 layers) and a
Whisper-small-shaped one (d_model 768, 12 layers, 12 heads, FFN 3072, 80 mel bins). Each drives the demo LLM through
the ``mlp_stack`` projector (k = 5, hidden 2048) with encoder and LLM frozen: the tiny-audio recipe's first stage.

For each shape, on the first ``--samples`` utterances of the demo corpus (copied into a temporary split):

- the one-off cache build (``aero_lightning.data.cache_encoder.cache_split``, float16: decode, log-mel, encoder,
  write), its wall time and the cache's bytes per second of audio, beside the FLAC shards' own;
- the same packed micro-batches (one training stream, same seed) delivered from the audio (baseline) and from the
  cache: the time the stream takes to produce a batch, and the time of a training step on it (``forward_batch``
  with the chunked loss, backward, AdamW on the projector), after ``--warmup`` untimed steps;
- the break-even: epochs over the cached audio after which the build has paid for itself (build time / the step
  time saved per epoch).

Run: ``OMP_NUM_THREADS=1 python benchmarks/encoder_cache.py [--samples 64 --steps 5 --packing-length 1024]``
(defaults: the demo corpus and model of ``make demo``). Writes ``benchmarks/results/encoder_cache.json`` and prints
a markdown table.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers import WhisperConfig

from aero_lightning.data.cache_encoder import cache_split
from aero_lightning.data.encoder_cache import model_encoder_fingerprint, resolve_cache
from aero_lightning.data.rejects import RejectCounter
from aero_lightning.data.shard_reader import iter_tar, resolve_split
from aero_lightning.data.shards import ShardWriter, build_manifest, read_manifest, write_manifest
from aero_lightning.data.stream import TrainStream
from aero_lightning.model.build import build_aero_model
from aero_lightning.model.encoders import PaddingFreeWhisperEncoder
from aero_lightning.model.projector import MLPStackProjector
from aero_lightning.model.tiny import tiny_whisper_config

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {
    "demo (d 192, 4 layers)": tiny_whisper_config(),
    "whisper-small (d 768, 12 layers)": WhisperConfig(
        num_mel_bins=80,
        d_model=768,
        encoder_layers=12,
        encoder_attention_heads=12,
        encoder_ffn_dim=3072,
        max_source_positions=1500,
        decoder_layers=1,
    ),
}


def subset_split(corpus: Path, out: Path, n: int) -> Path:
    """The first ``n`` samples of a prepared split, as a split of its own (one shard)."""
    with ShardWriter(out, "subset", max_samples_per_shard=n) as writer:
        for url in resolve_split(corpus):
            for raw in iter_tar(url, RejectCounter()):
                if writer.num_samples == n:
                    break
                record = json.loads(raw["json"])
                writer.write(raw["__key__"], raw["flac"], record)
            if writer.num_samples == n:
                break
    write_manifest(
        out,
        build_manifest(corpus="subset", split="train", shards=writer.shards, durations_s=writer.durations_s),
    )
    return out


def build_model(encoder_config: WhisperConfig, llm_dir: Path, folder: Path):
    torch.manual_seed(0)
    PaddingFreeWhisperEncoder(encoder_config).save_pretrained(folder)
    return build_aero_model(
        encoder={"name_or_path": str(folder)},
        llm={"name_or_path": str(llm_dir)},
        projector=functools.partial(MLPStackProjector, stack_factor=5, hidden_dim=2048),
        freeze=[r"^encoder\.", r"^llm\."],
        attn_implementation="varlen",
    )


def batches(
    model, split: Path, n: int, packing_length: int, encoder_cache: dict | None
) -> tuple[list, float]:
    """``n`` packed training batches of the split and the mean seconds the stream took per batch."""
    stream = TrainStream(
        {"subset": resolve_split(split)},
        {"subset": 1.0},
        model.tokenizer,
        model.audio_token_counter(),
        mode="packed",
        packing_length=packing_length,
        buffer_size=64,
        seed=0,
        encoder_cache=encoder_cache,
    )
    it = iter(stream)
    out, t0 = [], time.perf_counter()
    for _ in range(n):
        out.append(next(it))
    return out, (time.perf_counter() - t0) / n


def step_seconds(model, batch_list: list, warmup: int) -> tuple[float, float]:
    """Mean CPU and wall seconds of a projector-only training step over the batches after ``warmup`` untimed ones.

    CPU seconds are this process's (``time.process_time``): on a shared machine they count the step's own work,
    where wall time also counts the other jobs' share of the cores.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    cpu, wall = [], []
    for i, batch in enumerate(batch_list):
        c0, t0 = time.process_time(), time.perf_counter()
        out = model.forward_batch(batch)
        (out.loss_sum / out.num_target_tokens.clamp_min(1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
    return sum(cpu) / len(cpu), sum(wall) / len(wall)


def run_shape(name: str, config: WhisperConfig, args, split: Path, work: Path) -> dict:
    model = build_model(config, args.llm, work / "encoder")
    c0, t0 = time.process_time(), time.perf_counter()
    manifest = cache_split(split, model.encoder, model.feature_extractor, dtype="float16", progress=False)
    build_s, build_wall_s = time.process_time() - c0, time.perf_counter() - t0
    cached = resolve_cache(split, model_encoder_fingerprint(model))
    reader = {
        "shards": cached.shards,
        "dtype": cached.dtype,
        "hidden_size": cached.hidden_size,
        "build_rejects": cached.build_rejects,
    }
    n = args.warmup + args.steps
    plain, plain_data_s = batches(model, split, n, args.packing_length, None)
    fast, fast_data_s = batches(model, split, n, args.packing_length, reader)
    assert [b["keys"] for b in plain] == [b["keys"] for b in fast]
    uncached_s, uncached_wall_s = step_seconds(model, plain, args.warmup)
    cached_s, cached_wall_s = step_seconds(model, fast, args.warmup)
    audio_s = sum(int(b["audio_samples"].sum()) for b in plain[args.warmup :]) / 16000 / args.steps
    return {
        "encoder": name,
        "encoder_params_m": sum(p.numel() for p in model.encoder.parameters()) / 1e6,
        "audio_s_per_step": audio_s,
        "uncached_step_s": uncached_s,
        "cached_step_s": cached_s,
        "speedup": uncached_s / cached_s,
        "uncached_step_wall_s": uncached_wall_s,
        "cached_step_wall_s": cached_wall_s,
        "speedup_wall": uncached_wall_s / cached_wall_s,
        "uncached_data_s_per_batch": plain_data_s,
        "cached_data_s_per_batch": fast_data_s,
        "cache_bytes_per_audio_s": manifest["bytes_per_audio_s"],
        "cache_build_s": build_s,
        "cache_build_wall_s": build_wall_s,
        "cache_audio_s": manifest["audio_s"],
        # epochs over the cached audio after which the one-off build has paid for itself
        "break_even_epochs": build_s / max((uncached_s - cached_s) / audio_s * manifest["audio_s"], 1e-9),
    }


def _shown(value):
    """A path argument relative to the repository when it lies inside it."""
    if isinstance(value, Path):
        path = value.resolve()
        return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--corpus", type=Path, default=ROOT / "data_cache/demo_corpus/train")
    parser.add_argument("--llm", type=Path, default=ROOT / "data_cache/demo_model/llm")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--packing-length", type=int, default=1024)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/encoder_cache.json")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        split = subset_split(args.corpus, Path(tmp) / "subset" / "train", args.samples)
        shards = read_manifest(split)["shards"]
        flac_bytes_per_s = sum(s["size_bytes"] for s in shards) / sum(s["duration_s"] for s in shards)
        for i, (name, config) in enumerate(SHAPES.items()):
            rows.append(run_shape(name, config, args, split, Path(tmp) / f"shape{i}"))

    threads = os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {threads} thread(s), torch {torch.__version__}"
    print(
        f"Projector-only training (encoder and LLM frozen), demo LLM, mlp_stack k=5; packed rows of "
        f"{args.packing_length} tokens; {args.steps} timed steps after {args.warmup}; fp32 on CPU ({machine}); "
        f"cache float16 over {args.samples} demo utterances; the FLAC shards hold {flac_bytes_per_s:,.0f} bytes per "
        "audio second. Times are CPU seconds of this process (wall-clock speed-up in brackets).\n"
    )
    print(
        "| encoder | params | audio s/step | step uncached (s) | step cached (s) | speed-up | data s/batch "
        "uncached / cached | cache bytes / audio s | cache build (s) for audio (s) | break-even (epochs) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['encoder']} | {r['encoder_params_m']:.1f}M | {r['audio_s_per_step']:.1f} | "
            f"{r['uncached_step_s']:.3f} | {r['cached_step_s']:.3f} | {r['speedup']:.1f}x ({r['speedup_wall']:.1f}x) | "
            f"{r['uncached_data_s_per_batch']:.3f} / {r['cached_data_s_per_batch']:.3f} | "
            f"{r['cache_bytes_per_audio_s']:,.0f} | {r['cache_build_s']:.1f} for {r['cache_audio_s']:.1f} | "
            f"{r['break_even_epochs']:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "script": "benchmarks/encoder_cache.py",
        "args": {k: _shown(v) for k, v in vars(args).items()},
        "machine": machine,
        "flac_bytes_per_audio_s": flac_bytes_per_s,
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    main()
