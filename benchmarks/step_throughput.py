"""Training throughput of the demo model: packed vs padded micro-batches at the same token budget (CPU).

The same decoded samples are planned three ways under one ``packing_length`` and trained with the real training
step (forward with the chunked loss, backward, AdamW), fp32 on CPU:

- ``padded, arrival order`` (baseline): padded batches cut in arrival order, ``len x longest <= budget``;
- ``padded, length-sorted``: the stream's ``padded`` mode (sorted within the buffer);
- ``packed``: the stream's ``packed`` mode (first-fit-decreasing, one row, ``varlen`` attention).

Reported: real (non-padding) LLM tokens per second of wall time, audio seconds per second, and the real-token
fraction of what the LLM computed. Samples are drawn from the corpus with a long tail: by default every 8th
sample is the concatenation of 8 demo clips (~20 s), because the demo corpus alone (1-5 s clips) is too uniform
for padding to matter.

Run: ``python benchmarks/step_throughput.py [--corpus DIR --model DIR --packing-length 2048 --seconds 40]``
(defaults: the demo corpus and model of ``make demo``). Writes ``benchmarks/results/step_throughput.json``.
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

from aero_lightning.data.chat import asr_messages, encode_chat, reference_text
from aero_lightning.data.datamodule import make_dataset, resolve_split
from aero_lightning.data.packing import collate_packed, collate_padded, plan_packed, plan_padded
from aero_lightning.model.aero import AeroModel
from aero_lightning.model.build import build_aero_model
from aero_lightning.model.projector import MLPStackProjector


def load_samples(corpus: str, n: int, long_every: int, model: AeroModel) -> list[dict]:
    """``n`` encoded samples; every ``long_every``-th is 8 clips joined (a long-form tail)."""
    it = iter(make_dataset(resolve_split(corpus)))
    counter = model.audio_token_counter()
    out = []
    while len(out) < n:
        parts = [next(it) for _ in range(8 if long_every and len(out) % long_every == long_every - 1 else 1)]
        wave = np.concatenate([p["waveform"] for p in parts])
        messages = asr_messages(" ".join(reference_text(p["messages"]) for p in parts))
        enc = encode_chat(model.tokenizer, messages, [counter(len(wave))])
        out.append(
            {"key": parts[0]["key"], "waveform": wave, "messages": messages, "input_ids": enc.input_ids,
             "labels": enc.labels, "corpus": "demo"}
        )  # fmt: skip
    return out


def train(model: AeroModel, batches: list[dict], seconds: float) -> dict:
    """Train on ``batches`` (cycled) for ``seconds`` after 2 warm-up steps; count real tokens."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(batch):
        out = model.forward_batch(batch)
        (out.loss_sum / out.num_target_tokens.clamp_min(1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for b in batches[:2]:
        step(b)
    real = computed = audio = steps = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        b = batches[(steps + 2) % len(batches)]
        step(b)
        mask = b.get("attention_mask")
        real += int(mask.sum()) if mask is not None else b["input_ids"].numel()
        computed += b["input_ids"].numel()
        audio += int(b["audio_samples"].sum()) / 16000
        steps += 1
    wall = time.perf_counter() - t0
    return {
        "steps": steps,
        "wall_s": wall,
        "tokens_per_s": real / wall,
        "audio_s_per_s": audio / wall,
        "real_fraction": real / computed,
        "s_per_step": wall / steps,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", default="data_cache/demo_corpus/train")
    parser.add_argument("--model", default="data_cache/demo_model")
    parser.add_argument("--packing-length", type=int, default=2048, help="LLM tokens per micro-batch")
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument(
        "--long-every", type=int, default=8, help="every N-th sample is 8 clips joined; 0: none"
    )
    parser.add_argument("--seconds", type=float, default=40.0, help="timed wall seconds per mode")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "step_throughput.json"))
    args = parser.parse_args()
    torch.manual_seed(0)

    def fresh_model() -> AeroModel:
        torch.manual_seed(0)
        return build_aero_model(
            encoder={"name_or_path": f"{args.model}/encoder"},
            llm={"name_or_path": f"{args.model}/llm"},
            projector=lambda encoder_dim, llm_dim: MLPStackProjector(
                encoder_dim, llm_dim, stack_factor=4, hidden_dim=512
            ),
            attn_implementation="varlen",
        )

    model = fresh_model()
    samples = load_samples(args.corpus, args.samples, args.long_every, model)
    costs = [len(s["input_ids"]) for s in samples]
    samples = [s for s, c in zip(samples, costs) if c <= args.packing_length]
    costs = [c for c in costs if c <= args.packing_length]
    counter, pad = model.audio_token_counter(), model.tokenizer.pad_token_id
    plans = {
        "padded, arrival order (baseline)": (plan_padded(costs, args.packing_length, sort=False), "padded"),
        "padded, length-sorted": (plan_padded(costs, args.packing_length), "padded"),
        "packed": (plan_packed(costs, args.packing_length), "packed"),
    }
    rng = np.random.default_rng(0)
    rows = {}
    for name, (plan, mode) in plans.items():
        order = rng.permutation(len(plan))
        batches = [
            collate_packed([samples[i] for i in plan[j]], counter)
            if mode == "packed"
            else collate_padded([samples[i] for i in plan[j]], counter, pad)
            for j in order
        ]
        rows[name] = train(fresh_model(), batches, args.seconds)
    base = rows["padded, arrival order (baseline)"]["tokens_per_s"]
    lines = [
        f"| mode (packing_length {args.packing_length}) | real tokens/s | audio s/s | real/computed | s/step | vs baseline |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        r["vs_baseline"] = r["tokens_per_s"] / base
        lines.append(
            f"| {name} | {r['tokens_per_s']:.0f} | {r['audio_s_per_s']:.1f} | {100 * r['real_fraction']:.1f} % | "
            f"{r['s_per_step']:.2f} | {r['vs_baseline']:.2f}x |"
        )
    table = "\n".join(lines)
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    )
    print(table)  # noqa: T201 - benchmark output
    print(f"\n{len(samples)} samples ({sum(costs)} tokens), {args.seconds:.0f} s per mode, {machine}")  # noqa: T201
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps({"script": "benchmarks/step_throughput.py", "args": vars(args), "machine": machine, "rows": rows,
                    "table": table}, indent=2) + "\n"
    )  # fmt: skip


if __name__ == "__main__":
    main()
