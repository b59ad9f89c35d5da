"""Forward + backward time of packed-row attention on CPU: the ``varlen`` backend against two baselines.

A packed row of ``L`` tokens holds ``D`` documents (``cu_seqlens``). Three ways to keep attention inside each
document, timed over the same ``query``/``key``/``value`` (fp32, causal, grouped-query heads as in the demo LLM):

- ``dense block-diagonal mask`` (baseline): one SDPA call with an ``(L, L)`` boolean mask, what transformers'
  ``sdpa`` backend builds for a packed row from ``position_ids``; its work grows with ``L**2``;
- ``per document, slicing`` (baseline): one SDPA call per document on ``query[:, :, start:end]``, the earlier
  ``varlen`` CPU path; each slice's backward writes its gradient into a zero tensor of the whole row, so the
  backward does ``D x L`` extra work;
- ``varlen`` (``aero_lightning.model.attention.varlen_attention_forward``): one SDPA call per document on
  ``torch.split`` views, whose backward is a single concatenation.

Outputs and input gradients of the three are checked against each other before timing. Document lengths are drawn
uniformly from ``[min_len, max_len]`` until the row is full (defaults: the demo LLM's ~90-token utterances in a
3072-token row).

Run: ``python benchmarks/varlen_cpu.py [--length 3072 --min-len 40 --max-len 140 --heads 4 --kv-heads 2
--head-dim 64 --repeats 10]``. Writes ``benchmarks/results/varlen_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from aero_lightning.model.attention import packed_attention_kwargs, varlen_attention_forward


def document_lengths(total: int, min_len: int, max_len: int, seed: int) -> list[int]:
    """Random document lengths (tokens) that sum to ``total``; the last one takes the remainder."""
    g = torch.Generator().manual_seed(seed)
    out, left = [], total
    while left > 0:
        n = min(left, int(torch.randint(min_len, max_len + 1, (1,), generator=g)))
        out.append(n)
        left -= n
    return out


def slicing(query, key, value, cu: torch.Tensor, gqa: bool) -> torch.Tensor:
    """The earlier ``varlen`` CPU path: one SDPA per document on slices of the row. Returns ``(1, L, H, d)``."""
    bounds = cu.tolist()
    outs = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True, enable_gqa=gqa
        )
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous()


def dense_mask(query, key, value, cu: torch.Tensor, gqa: bool) -> torch.Tensor:
    """One SDPA call with a causal block-diagonal ``(L, L)`` mask. Returns ``(1, L, H, d)``."""
    length = query.shape[2]
    doc = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.diff(cu))  # (L,) document index per token
    pos = torch.arange(length)
    mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])  # (L, L), True = attend
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=gqa)
    return out.transpose(1, 2).contiguous()


def varlen(query, key, value, cu: torch.Tensor, gqa: bool) -> torch.Tensor:
    """The project's ``varlen`` backend. Returns ``(1, L, H, d)``."""
    module = SimpleNamespace(is_causal=True)
    return varlen_attention_forward(module, query, key, value, None, **packed_attention_kwargs(cu))[0]


def time_fwd_bwd(fn, inputs, cu, gqa: bool, repeats: int) -> float:
    """Median seconds of forward + backward over ``repeats`` calls (after one warm-up call)."""
    times = []
    for i in range(repeats + 1):
        q, k, v = (t.detach().requires_grad_(True) for t in inputs)
        t0 = time.perf_counter()
        fn(q, k, v, cu, gqa).sum().backward()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=3072, help="tokens in the packed row")
    parser.add_argument("--min-len", type=int, default=40)
    parser.add_argument("--max-len", type=int, default=140)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "varlen_cpu.json"))
    args = parser.parse_args()

    lengths = document_lengths(args.length, args.min_len, args.max_len, seed=0)
    cu = torch.nn.functional.pad(torch.tensor(lengths).cumsum(0), (1, 0)).to(torch.int32)
    g = torch.Generator().manual_seed(0)
    shape_q = (1, args.heads, args.length, args.head_dim)
    shape_kv = (1, args.kv_heads, args.length, args.head_dim)
    inputs = [torch.randn(s, generator=g) for s in (shape_q, shape_kv, shape_kv)]
    gqa = args.kv_heads != args.heads
    fns = {
        "dense block-diagonal mask (baseline)": dense_mask,
        "per document, slicing (baseline)": slicing,
        "varlen (per document, split)": varlen,
    }

    # the three must agree before their times mean anything
    results = {}
    for name, fn in fns.items():
        q, k, v = (t.detach().requires_grad_(True) for t in inputs)
        out = fn(q, k, v, cu, gqa)
        out.square().sum().backward()
        results[name] = (out.detach(), q.grad, k.grad, v.grad)
    ref = results["dense block-diagonal mask (baseline)"]
    for name, got in results.items():
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=f"{name} differs from the dense mask")

    rows = {name: time_fwd_bwd(fn, inputs, cu, gqa, args.repeats) for name, fn in fns.items()}
    base = rows["per document, slicing (baseline)"]
    print(
        f"packed row of {args.length} tokens, {len(lengths)} documents ({args.min_len}-{args.max_len} tokens), "
        f"{args.heads} heads / {args.kv_heads} KV heads x {args.head_dim}, fp32, {torch.get_num_threads()} threads"
    )
    print("| attention over the packed row | forward + backward, ms | vs slicing |")
    print("|---|---:|---:|")
    for name, sec in rows.items():
        print(f"| {name} | {1000 * sec:.1f} | {base / sec:.2f}x |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps(
            {
                "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
                "torch": torch.__version__,
                "args": vars(args),
                "documents": len(lengths),
                "ms_fwd_bwd": {k: 1000 * v for k, v in rows.items()},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
