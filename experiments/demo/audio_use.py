"""Does the LLM read the audio? Print, for a checkpoint, the validation LM loss per target token with the real
audio, with silence and with white noise in its place, and the statistics of the projected audio embeddings.

    python experiments/demo/audio_use.py outputs/demo_long [--batches 2]

If the three losses are equal the LLM ignores the audio. ``collapse`` is the share of the audio embeddings' mean
square that is one vector shared by all tokens (1.0: every audio token is the same vector).
"""

from __future__ import annotations

import argparse

import torch

from aero_lightning.data.datamodule import AeroDataModule
from aero_lightning.model.build import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("ckpt", help="run folder, Lightning .ckpt or save_pretrained folder")
    parser.add_argument("--val-dir", default="data_cache/demo_corpus/validation")
    parser.add_argument("--batches", type=int, default=2, help="validation batches of 50 utterances")
    args = parser.parse_args()

    model = load_model(args.ckpt, device="cpu")
    dm = AeroDataModule(train={}, val_dirs={"val": args.val_dir}, test_dir=None, eval_batch_size=50)
    dm.bind_model(model.tokenizer, model.audio_token_counter())
    sums = {"real": [0.0, 0], "silence": [0.0, 0], "noise": [0.0, 0]}
    embeddings = []
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, batch in enumerate(dm.val_dataloader()[0]):
            if i >= args.batches:
                break
            pcm = batch["audio_pcm"]  # (S,) int16
            noise = (0.05 * 32768 * torch.randn(pcm.shape, generator=generator)).round().clamp(-32768, 32767)
            replaced = {"real": pcm, "silence": torch.zeros_like(pcm), "noise": noise.to(torch.int16)}
            for name, audio in replaced.items():
                out = model.forward_batch(batch | {"audio_pcm": audio})
                sums[name][0] += float(out.loss_sum)
                sums[name][1] += int(out.num_target_tokens)
            feats, lengths = model.compute_features(pcm, batch["window_lengths"])
            embeddings.append(model.embed_audio(feats, lengths))  # (N_audio, D)
    audio = torch.cat(embeddings)
    text = model.llm.get_input_embeddings().weight
    shared = audio.mean(0).pow(2).sum() / audio.pow(2).sum(-1).mean()
    print("| audio | LM loss per target token | target tokens |")
    print("|---|---:|---:|")
    for name, (loss_sum, count) in sums.items():
        print(f"| {name} | {loss_sum / count:.4f} | {count} |")
    print()
    print("| audio embedding norm | text embedding norm | collapse |")
    print("|---:|---:|---:|")
    print(f"| {audio.norm(dim=-1).mean():.3f} | {text.norm(dim=-1).mean():.3f} | {shared:.4f} |")


if __name__ == "__main__":
    main()
