"""How much does the encoder alone hear? Greedy CTC decoding of a checkpoint's CTC head, scored like the demo.

    python experiments/demo/ctc_greedy.py outputs/demo_ctc [--split test|validation] [--corpus DIR]
    python experiments/demo/ctc_greedy.py outputs/demo_ctc/checkpoints/step0002000.ckpt   # one checkpoint

Greedy CTC (Graves et al. 2006): per encoder frame the most likely token, repeats merged, blanks (the pad token,
the CTC blank of ``AeroModel``) removed, tokens decoded with the LLM tokenizer. WER is pooled over the split with
the Whisper English normaliser, the same scoring as the demo's test decode. Needs a run trained with
``model.ctc_weight > 0`` (a ``ctc_only`` stage-1 run or the joint demo). This is a diagnostic of the acoustic
model: the LLM is not used.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from aero_lightning.data.datamodule import AeroDataModule
from aero_lightning.metrics.wer import corpus_wer
from aero_lightning.model.build import load_model


def greedy_ctc(log_probs: torch.Tensor, length: int, blank: int) -> list[int]:
    """Best path of one window: ``log_probs (T, V)``, ``length`` valid frames -> token ids, repeats merged and
    blanks dropped."""
    best = log_probs[:length].argmax(-1).tolist()
    out, previous = [], None
    for token in best:
        if token != previous and token != blank:
            out.append(token)
        previous = token
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="run folder or Lightning .ckpt")
    parser.add_argument("--corpus", default="data_cache/demo_corpus")
    parser.add_argument("--split", default="test", choices=["test", "validation"])
    args = parser.parse_args()

    model = load_model(args.ckpt, device="cpu").eval()
    if getattr(model, "ctc_head", None) is None:
        raise SystemExit(f"{args.ckpt} has no CTC head: train with model.ctc_weight > 0")
    dm = AeroDataModule(train={}, val_dirs={"x": str(Path(args.corpus) / args.split)}, test_dir=None)
    dm.bind_model(model.tokenizer, model.audio_token_counter())
    refs, hyps = [], []
    blank = model.tokenizer.pad_token_id
    with torch.no_grad():
        for batch in dm.val_dataloader()[0]:
            feats, lengths = model.compute_features(batch["audio_pcm"], batch["window_lengths"])
            hidden, enc_lengths = model.encoder(feats, lengths)  # (W, S, D_enc): one window per demo clip
            if hidden.shape[0] != len(batch["references"]):
                raise SystemExit(
                    "clips longer than 30 s (several windows) are not handled by this diagnostic"
                )
            log_probs = model.ctc_head(hidden).float().log_softmax(-1)
            for row, n, ref in zip(log_probs, enc_lengths.tolist(), batch["references"]):
                hyps.append(model.tokenizer.decode(greedy_ctc(row, n, blank), skip_special_tokens=True))
                refs.append(ref)
    result = corpus_wer(refs, hyps)
    print(
        f"greedy CTC on {args.split}: {len(refs)} utterances, WER {100 * result.wer:.1f} %  {result.to_dict()}"
    )
    for ref, hyp in list(zip(refs, hyps))[:5]:
        print(f"  ref: {ref}\n  hyp: {hyp}")


if __name__ == "__main__":
    main()
