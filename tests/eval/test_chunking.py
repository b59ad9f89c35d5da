"""Long recordings: the chunk layout and the merge rule (against transformers' own), what one pass holds, and the
chunked decoding path giving the merged text of its chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.pipelines.automatic_speech_recognition import _find_longest_common_sequence, chunk_iter

from aero_lightning.data.chat import DEFAULT_ASR_PROMPT, encode_chat
from aero_lightning.eval.chunking import max_pass_samples, merge_chunk_texts, merge_word_lists, plan_chunks
from aero_lightning.eval.decode import (
    GenerationOptions,
    chars_per_token,
    decode_waveforms,
    pass_limit_samples,
    user_messages,
)

SR = 16000


def test_plan_chunks():
    assert plan_chunks(100, 40, 5) == [(0, 40), (30, 70), (60, 100)]
    assert plan_chunks(101, 40, 5) == [(0, 40), (30, 70), (60, 100), (90, 101)]
    assert plan_chunks(40, 40, 5) == [(0, 40)]
    assert plan_chunks(41, 40, 0) == [(0, 40), (40, 41)]
    with pytest.raises(ValueError, match="longer than twice its stride"):
        plan_chunks(100, 10, 5)


class _Identity:
    """A feature extractor for transformers' chunk_iter that returns the chunk itself."""

    sampling_rate = SR

    def __call__(self, chunk, **kwargs):
        return {"chunk": chunk}


@pytest.mark.parametrize(
    ("n", "chunk", "stride"), [(100, 40, 5), (101, 40, 5), (1000, 300, 50), (999, 100, 0)]
)
def test_plan_chunks_is_transformers_chunk_iter(n, chunk, stride):
    samples = np.arange(n)
    theirs = [c["chunk"] for c in chunk_iter(samples, _Identity(), chunk, stride, stride)]
    ours = [samples[a:b] for a, b in plan_chunks(n, chunk, stride)]
    assert len(ours) == len(theirs) and all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_merge_word_lists_by_hand():
    # the overlap aligns: the next chunk's first aligned words are dropped
    assert merge_word_lists([["a", "b", "c", "d", "e"], ["d", "e", "f", "g"]]) == list("abcdefg")
    # case and surrounding punctuation are ignored when comparing; the earlier chunk's spelling is kept
    assert merge_word_lists([["the", "cat", "Sat."], ["cat", "sat", "on", "the", "mat"]]) == [
        "the", "cat", "Sat.", "on", "the", "mat",
    ]  # fmt: skip
    # one differing word inside the overlap: 3 of 4 words match, the alignment still wins
    assert merge_word_lists([["x", "one", "two", "three", "four"], ["one", "too", "three", "four", "y", "z"]]) == [
        "x", "one", "two", "three", "four", "y", "z",
    ]  # fmt: skip
    # a single matching word is not an alignment (more than one must match): the chunk is appended whole
    assert merge_word_lists([["hello", "there", "general"], ["General", "Kenobi"]]) == [
        "hello", "there", "general", "General", "Kenobi",
    ]  # fmt: skip
    assert merge_word_lists([["a", "b"], [], ["c", "d"]]) == ["a", "b", "c", "d"]
    assert merge_word_lists([]) == []
    assert merge_chunk_texts(["so it  goes on", "goes on and on"]) == "so it goes on and on"


def test_merge_is_transformers_rule_on_words():
    """Word ids merged by our rule equal transformers' _find_longest_common_sequence on the same ids."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(12)]
    tokenizer = type("Tok", (), {"all_special_ids": []})()
    for _ in range(50):
        text = list(rng.integers(0, len(vocab), 40))
        first = text[:25]
        second = text[20 - int(rng.integers(0, 6)) : 34]  # overlaps the first by 0-10 words
        third = text[30:40]
        if rng.random() < 0.3:  # a recognition error inside an overlap
            second[1] = (second[1] + 1) % len(vocab)
        chunks = [first, second, third]
        theirs = _find_longest_common_sequence([np.array([c]) for c in chunks], tokenizer).tolist()
        ours = merge_word_lists([[vocab[i] for i in c] for c in chunks])
        assert ours == [vocab[i] for i in theirs]


def test_max_pass_samples():
    def audio(n):
        return n // 10

    def budget(n):
        return 50

    assert max_pass_samples(1000, 100, audio, budget) == 8509  # 850 + 100 + 50 = 1000
    assert max_pass_samples(1000, 100, audio, budget, cap_samples=5000) == 5000
    assert max_pass_samples(None, 100, audio, budget, cap_samples=5000) == 5000
    assert max_pass_samples(None, 100, audio, budget) is None
    with pytest.raises(ValueError, match="cannot hold"):
        max_pass_samples(140, 100, audio, budget)


def test_pass_limit_of_the_tiny_model_is_its_context(model):
    """The tiny LLM has 4096 positions: the limit is the longest clip whose slots, prompt and budget fit them."""
    options = GenerationOptions()
    cpt = chars_per_token(model.tokenizer)
    limit = pass_limit_samples(model, DEFAULT_ASR_PROMPT, options, cpt)
    prompt = len(encode_chat(model.tokenizer, user_messages(), [1], add_generation_prompt=True).input_ids) - 1
    counter = model.audio_token_counter()

    def used(n):
        return counter(n) + prompt + options.budget(n / SR, cpt)

    assert model.llm.config.max_position_embeddings == 4096
    assert used(limit) <= 4096 < used(limit + 1)
    assert 30 * SR < limit < 900 * SR  # the context, not max_pass_s, bounds this model
    capped = pass_limit_samples(model, DEFAULT_ASR_PROMPT, GenerationOptions(max_pass_s=20), cpt)
    assert capped == 20 * SR


@pytest.fixture
def plain_model(model):
    """The tiny model with special and blank tokens' embeddings zeroed, so its random replies are visible words."""
    tok = model.tokenizer
    blank = [i for i in range(len(tok)) if i in tok.all_special_ids or not tok.decode([i]).strip()]
    with torch.no_grad():
        model.llm.get_input_embeddings().weight[blank] = 0.0
    return model.eval()


def test_a_long_input_gives_the_merged_text_of_its_chunks(plain_model):
    model = plain_model
    wave = (0.1 * np.random.default_rng(1).standard_normal(50 * SR)).astype(np.float32)  # 50 s
    options = GenerationOptions(max_new_tokens=6, chunk_s=20, stride_s=2)
    (result,) = decode_waveforms(model, [wave], options=options)
    spans = plan_chunks(len(wave), 20 * SR, 2 * SR)
    assert spans == [(0, 20 * SR), (16 * SR, 36 * SR), (32 * SR, 50 * SR)]
    alone = [
        decode_waveforms(model, [wave[a:b]], options=GenerationOptions(max_new_tokens=6))[0] for a, b in spans
    ]
    assert all(r.text for r in alone)  # not vacuous
    assert result.text == merge_chunk_texts([r.text for r in alone])
    assert result.num_chunks == 3 and result.num_new_tokens == sum(r.num_new_tokens for r in alone)
    assert result.budget == 18 and result.finished == all(r.finished for r in alone)
    # without chunk_s, a recording over the pass limit is chunked at the limit: here max_pass_s=20
    (auto,) = decode_waveforms(
        model, [wave], options=GenerationOptions(max_new_tokens=6, max_pass_s=20, stride_s=2)
    )
    assert auto == result
    # a short recording in the same call stays one pass
    short, again = decode_waveforms(model, [wave[: 5 * SR], wave], options=options)
    assert short.num_chunks == 1 and again == result


def test_chunk_s_longer_than_a_pass_is_refused(model):
    wave = np.zeros(SR, dtype=np.float32) + 0.01
    with pytest.raises(ValueError, match="longer than one pass holds"):
        decode_waveforms(
            model, [wave], options=GenerationOptions(max_new_tokens=4, chunk_s=60, max_pass_s=30)
        )
