"""Tiny random-init components saved as real ``from_pretrained`` folders.

The CPU demo and the tests use a Whisper-architecture encoder and a Qwen2-architecture LLM of a few million
parameters, with a byte-level BPE tokenizer trained on the demo corpus's training transcripts. They are written
with ``save_pretrained`` and loaded back through exactly the same ``from_pretrained`` path as real checkpoints
(``openai/whisper-large-v3``, ``Qwen/Qwen2.5-1.5B-Instruct``).

CLI::

    python -m aero_lightning.model.tiny --corpus data_cache/demo_corpus --out data_cache/demo_model
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, WhisperConfig

from aero_lightning.data.chat import AUDIO_SPECIAL_TOKENS
from aero_lightning.model.encoders import PaddingFreeWhisperEncoder

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
"""ChatML, the format of Qwen2.5's template, without Qwen's default system prompt."""

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *AUDIO_SPECIAL_TOKENS]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (the GPT-2 / Qwen scheme) with ChatML and audio special tokens.

    Args:
        texts: training text (transcripts and prompts).
        vocab_size: total vocabulary including the 256 byte symbols and the special tokens.

    Returns:
        A ``PreTrainedTokenizerFast`` with ``chat_template`` set, eos ``<|im_end|>``, pad ``<|endoftext|>``.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def tiny_whisper_config(
    num_mel_bins: int = 80, d_model: int = 192, layers: int = 4, heads: int = 4, ffn_dim: int = 768
) -> WhisperConfig:
    """A Whisper config with a small encoder (the decoder is never built)."""
    return WhisperConfig(
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=ffn_dim,
        decoder_layers=1,
        decoder_attention_heads=heads,
        decoder_ffn_dim=ffn_dim,
        max_source_positions=1500,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
    )


def tiny_qwen2_config(
    vocab_size: int,
    hidden_size: int = 256,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 1024,
) -> Qwen2Config:
    """A Qwen2-architecture config (GQA, RoPE, SwiGLU, RMSNorm) at toy size."""
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def build_tiny_components(
    out_dir: str | Path,
    texts: Iterable[str],
    vocab_size: int = 1000,
    encoder: dict | None = None,
    llm: dict | None = None,
    seed: int = 0,
) -> Path:
    """Write ``OUT/encoder`` (Whisper encoder), ``OUT/llm`` (Qwen2 causal LM + tokenizer), random init.

    Args:
        out_dir: destination folder.
        texts: text to train the tokenizer on.
        vocab_size: tokenizer vocabulary size.
        encoder: keyword overrides for :func:`tiny_whisper_config`.
        llm: keyword overrides for :func:`tiny_qwen2_config`.
        seed: torch seed for the random init.

    Returns:
        ``out_dir`` as a Path.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(texts, vocab_size=vocab_size)
    torch.manual_seed(seed)
    enc = PaddingFreeWhisperEncoder(tiny_whisper_config(**(encoder or {})))
    enc.save_pretrained(out / "encoder")
    lm = Qwen2ForCausalLM(tiny_qwen2_config(vocab_size=len(tokenizer), **(llm or {})))
    lm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    return out


def corpus_texts(corpus_dir: str | Path, split: str = "train") -> list[str]:
    """Transcripts and prompts of a corpus split's shards (for tokenizer training).

    Raises:
        FileNotFoundError, ValueError: for a missing or empty split (:func:`~aero_lightning.data.shard_reader.resolve_split`).
    """
    from aero_lightning.data.rejects import RejectCounter
    from aero_lightning.data.shard_reader import iter_tar, resolve_split

    rejects = RejectCounter()
    texts = ["user", "assistant", "system"]  # role names the chat template writes
    for url in resolve_split(Path(corpus_dir) / split):
        for sample in iter_tar(url, rejects):
            if "json" not in sample:
                continue
            meta = json.loads(sample["json"])
            for message in meta["messages"]:
                content = message["content"]
                parts = [content] if isinstance(content, str) else [p.get("text", "") for p in content]
                texts.extend(p for p in parts if p)
    return texts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Build the tiny random-init demo encoder, LLM and tokenizer."
    )
    parser.add_argument("--corpus", required=True, help="demo corpus folder (with train/manifest.json)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=320,
        help="BPE vocabulary incl. 256 byte symbols: the demo default keeps transcripts near character level, "
        "which a model trained from scratch on a few hours learns far faster than sparse word pieces",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    if (
        (out / "llm" / "config.json").exists()
        and (out / "encoder" / "config.json").exists()
        and not args.overwrite
    ):
        logger.info("%s already holds the demo model; pass --overwrite to rebuild", out)
        return
    build_tiny_components(out, corpus_texts(args.corpus), vocab_size=args.vocab_size, seed=args.seed)
    logger.info("wrote tiny encoder, LLM and tokenizer to %s", out)


if __name__ == "__main__":
    main()
