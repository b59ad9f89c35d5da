"""MFU and tokens/s of an Aero-shaped model: padded 4096 vs packed 32768, Liger on and off (GPU).

The model is random-init with Aero-1-Audio's shapes, built in memory (no download): a Whisper-large-v3 encoder
(d 1280, 32 layers, 20 heads, FFN 5120, 128 mel bins), AvgPool(2) + Linear projector (25 tokens/s) and a
Qwen2.5-1.5B LLM (hidden 1536, 28 layers, 12 heads / 2 KV heads, FFN 8960, vocab 151 936, tied embeddings). Full
fine-tuning, bf16 autocast with fp32 master weights, AdamW, activation checkpointing.

Rows (every row trains on the same synthetic documents: LibriSpeech-shaped durations, random audio, replies of
3.5 tokens per second of audio):

- ``padded 4096`` (Aero's baseline): encoder windows padded to 30 s (``padding_free: false``), LLM batches padded
  to the longest in arrival order under ``len x longest <= 4096``, ``sdpa``.
- ``packed 32768``: padding-free encoder windows and one packed LLM row of up to 32768 tokens, ``varlen``
  attention (or ``--attn flash_attention_2``).

MFU = model FLOPs per second / the GPU's dense bf16 peak, in the two conventions of :mod:`aero_lightning.model.flops`:
the whole model (encoder, projector and LLM; real tokens only, trainable 6N, attention per document, the LM head at
the loss's target positions) and the LLM's text FLOPs as lmms-engine counts them (Aero's training framework, so
comparable with Aero's published MFU). Tokens/s counts real LLM tokens per GPU, audio s/s seconds of audio per GPU.

Run on one GPU: ``python benchmarks/mfu.py`` (~10 min on an H100). ``--tiny`` runs the same code on toy shapes in
fp32 on CPU (a smoke test; its MFU is not meaningful). ``--max-seconds S`` ends each row's timed loop once it has run
S seconds (at least one timed step; the row records how many it timed), and ``--steps``, ``--warmup`` and ``--docs``
shorten it further (``benchmarks/gpu_check.sh`` runs ``--steps 3 --warmup 2 --docs 400 --max-seconds 10``); the
models are initialised on the GPU. Writes ``benchmarks/results/mfu.json`` (``mfu_tiny_cpu.json`` with ``--tiny``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from aero_lightning.data.chat import asr_messages, encode_chat
from aero_lightning.data.features import SAMPLE_RATE_HZ
from aero_lightning.data.packing import collate_packed, collate_padded, plan_packed, plan_padded
from aero_lightning.model.aero import AeroModel
from aero_lightning.model.encoders import PaddingFreeWhisperEncoder, WhisperAudioEncoder
from aero_lightning.model.flops import batch_lengths, batch_targets, count_params, peak_flops, step_flops
from aero_lightning.model.projector import AvgPoolProjector
from aero_lightning.model.tiny import tiny_qwen2_config, tiny_whisper_config, train_tokenizer

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which".split()

AERO_ENCODER = {"num_mel_bins": 128, "d_model": 1280, "layers": 32, "heads": 20, "ffn_dim": 5120}
"""Whisper-large-v3's encoder (:func:`~aero_lightning.model.tiny.tiny_whisper_config` arguments)."""
TINY_ENCODER = {"num_mel_bins": 128, "d_model": 64, "layers": 2, "heads": 2, "ffn_dim": 128}
"""The toy encoder of ``--tiny`` (and of ``benchmarks/gpu_check.sh --dry-run``)."""
QWEN2_5_1_5B_VOCAB = 151_936
"""Qwen2.5-1.5B's embedding rows (its tokenizer has 151 665 tokens; the matrix is padded)."""


def aero_llm_config(vocab_size: int = QWEN2_5_1_5B_VOCAB) -> Qwen2Config:
    """Qwen2.5-1.5B's architecture: hidden 1536, 28 layers, 12 query / 2 key-value heads, FFN 8960, tied
    embeddings, RoPE theta 1e6, 32768 positions."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        max_position_embeddings=32_768,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )


def tiny_llm_config(vocab_size: int) -> Qwen2Config:
    """The toy Qwen2-architecture LLM of ``--tiny``: 2 layers of width 64, 4 query / 2 key-value heads."""
    config = tiny_qwen2_config(vocab_size=vocab_size, hidden_size=64, layers=2, heads=4, intermediate=128)
    config.max_position_embeddings = 32_768
    return config


def build_model(
    tiny: bool, attn: str, padding_free: bool, liger: bool, tokenizer, device: torch.device | None = None
) -> AeroModel:
    """Random-init Aero-shaped (or toy) model, initialised directly on ``device`` (a GPU inits 2.2B weights in
    about a second; the CPU takes tens of seconds)."""
    torch.manual_seed(0)
    enc_cfg = tiny_whisper_config(**(TINY_ENCODER if tiny else AERO_ENCODER))
    llm_cfg = tiny_llm_config(len(tokenizer)) if tiny else aero_llm_config()
    enc_cfg._attn_implementation = attn
    llm_cfg._attn_implementation = attn
    with torch.device(device or "cpu"):
        encoder = WhisperAudioEncoder(PaddingFreeWhisperEncoder(enc_cfg), padding_free=padding_free)
        llm = Qwen2ForCausalLM(llm_cfg)
        projector = AvgPoolProjector(encoder_dim=enc_cfg.d_model, llm_dim=llm_cfg.hidden_size, pool=2)
    return AeroModel(encoder, projector, llm, tokenizer, gradient_checkpointing=not tiny, liger=liger)


def documents(tokenizer, counter, n: int, seed: int = 0) -> list[dict]:
    """Synthetic documents with LibriSpeech-shaped durations (mean 12.3 s, sd 3.8 s, 0.8-35 s)."""
    rng = np.random.default_rng(seed)
    docs = []
    for i, seconds in enumerate(np.clip(rng.normal(12.3, 3.8, n), 0.8, 35.0)):
        wave = (0.05 * rng.standard_normal(round(seconds * 16000))).astype(np.float32)
        text = " ".join(rng.choice(WORDS, size=max(1, round(seconds * 2.7))))
        messages = asr_messages(text)
        enc = encode_chat(tokenizer, messages, [counter(len(wave))])
        docs.append({"key": f"d{i}", "waveform": wave, "messages": messages, "input_ids": enc.input_ids,
                     "labels": enc.labels})  # fmt: skip
    return docs


def measure(
    model: AeroModel,
    batches: list[dict],
    device,
    dtype,
    warmup: int,
    steps: int,
    max_seconds: float | None = None,
) -> dict:
    """Train ``warmup + steps`` steps; time the last ``steps``; model FLOPs from real lengths.

    With ``max_seconds`` the timed loop ends after the first step that brings it past that many seconds (at least
    one timed step); ``steps`` in the result is the number of steps timed."""
    model.to(device).train()
    params = count_params(model)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-5, fused=device.type == "cuda"
    )
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    )
    flops = llm_flops = tokens = audio_samples = timed = 0
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + steps):
        batch = batches[i % len(batches)]
        if i == warmup:
            sync()
            t0 = time.perf_counter()
        on_device = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        with autocast:
            out = model.forward_batch(on_device)
        (out.loss_sum / out.num_target_tokens.clamp_min(1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= warmup:
            windows, docs = batch_lengths(batch, model.audio_token_counter())
            step = step_flops(params, windows, docs, target_tokens=batch_targets(batch))
            flops += step["total"]
            llm_flops += step["lmms_engine"]
            tokens += sum(docs)
            audio_samples += int(batch["window_lengths"].sum())
            timed += 1
            if max_seconds is not None:
                sync()
                if time.perf_counter() - t0 >= max_seconds:
                    break
    sync()
    wall = time.perf_counter() - t0
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"steps": timed, "wall_s": wall, "tokens_per_s": tokens / wall,
            "audio_s_per_s": audio_samples / SAMPLE_RATE_HZ / wall, "model_flops_per_s": flops / wall,
            "llm_flops_per_s": llm_flops / wall, "peak_mem_gib": peak_mem}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy shapes, fp32, CPU allowed (smoke test)")
    parser.add_argument("--attn", default="varlen", help="packed backend: varlen or flash_attention_2")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--docs", type=int, default=1200)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="end each row's timed loop after this many seconds (at least one timed step)",
    )
    parser.add_argument(
        "--padded-length", type=int, default=None, help="padded budget (4096; 512 with --tiny)"
    )
    parser.add_argument(
        "--packed-length", type=int, default=None, help="packed row (32768; 4096 with --tiny)"
    )
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not args.tiny and device.type != "cuda":
        raise SystemExit("benchmarks/mfu.py needs a GPU (use --tiny for a CPU smoke test)")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    padded_len, packed_len = (512, 4096) if args.tiny else (4096, 32_768)
    padded_len, packed_len = args.padded_length or padded_len, args.packed_length or packed_len
    tokenizer = train_tokenizer(WORDS * 20, vocab_size=400)
    probe = build_model(args.tiny, "sdpa", True, False, tokenizer, torch.device("meta"))
    docs = documents(tokenizer, probe.audio_token_counter(), args.docs if not args.tiny else 64)
    del probe
    costs = [len(d["input_ids"]) for d in docs]
    doc_costs = list(zip(docs, costs))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak = peak_flops(name, dtype)
    rows = {}
    for liger in (False, True):
        for mode in ("padded", "packed"):
            if liger and args.tiny:
                continue  # Liger needs CUDA
            budget = padded_len if mode == "padded" else packed_len
            usable = [(d, c) for d, c in doc_costs if c <= budget]
            ds, cs = [d for d, _ in usable], [c for _, c in usable]
            model = build_model(
                args.tiny,
                "sdpa" if mode == "padded" else args.attn,
                mode == "packed",
                liger,
                tokenizer,
                device,
            )
            counter = model.audio_token_counter()
            if mode == "packed":
                batches = [collate_packed([ds[i] for i in b], counter) for b in plan_packed(cs, budget)]
            else:
                batches = [
                    collate_padded([ds[i] for i in b], counter, tokenizer.pad_token_id)
                    for b in plan_padded(cs, budget, sort=False)
                ]
            r = measure(model, batches, device, dtype, args.warmup, args.steps, args.max_seconds)
            r["mfu"] = r["model_flops_per_s"] / peak if peak else None
            r["mfu_llm"] = r["llm_flops_per_s"] / peak if peak else None
            r["liger"] = model.liger
            rows[f"{mode} {budget}, liger {'on' if liger else 'off'}"] = r
            del model
            if device.type == "cuda":
                torch.cuda.empty_cache()
    base = next(iter(rows.values()))["tokens_per_s"]
    lines = [
        "| run | tokens/s/GPU | audio s/s/GPU | model TFLOP/s | MFU | LLM TFLOP/s (lmms-engine) | MFU (lmms-engine) "
        "| peak mem GiB | vs padded |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fraction(x: float | None) -> str:
        return f"{x:.3f}" if x is not None else "n/a"

    for key, r in rows.items():
        lines.append(f"| {key} | {r['tokens_per_s']:.0f} | {r['audio_s_per_s']:.1f} | "
                     f"{r['model_flops_per_s'] / 1e12:.1f} | {fraction(r['mfu'])} | "
                     f"{r['llm_flops_per_s'] / 1e12:.1f} | {fraction(r['mfu_llm'])} | "
                     f"{r['peak_mem_gib']:.1f} | {r['tokens_per_s'] / base:.2f}x |")  # fmt: skip
    table = "\n".join(lines)
    print(table)  # noqa: T201 - benchmark output
    print(
        f"\ndevice: {name}, peak {peak or 'unknown'} FLOP/s, {'toy shapes' if args.tiny else 'Aero shapes'}"
    )  # noqa: T201
    out = Path(
        args.out or Path(__file__).parent / "results" / ("mfu_tiny_cpu.json" if args.tiny else "mfu.json")
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"script": "benchmarks/mfu.py", "args": vars(args), "device": name, "peak_flops": peak,
                               "rows": rows, "table": table}, indent=2, default=str) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()
