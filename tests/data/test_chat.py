"""Chat prompts with audio slots and labels on the assistant replies, with the tiny ChatML tokenizer."""

from __future__ import annotations

import pytest

from aero_lightning.data.chat import (
    AUDIO_TOKEN,
    IGNORE_INDEX,
    asr_messages,
    encode_chat,
    prompt_messages,
    render_messages,
)

REPLY = "the cat sat on the mat"


def _labelled_spans(labels: list[int]) -> list[list[int]]:
    spans, current = [], []
    for label in labels:
        if label == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            current.append(label)
    return spans + ([current] if current else [])


def _decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_labels_cover_reply_and_end_of_turn_only(tokenizer):
    enc = encode_chat(tokenizer, asr_messages(REPLY), [7])
    assert len(enc.input_ids) == len(enc.labels)
    labelled = [t for t in enc.labels if t != IGNORE_INDEX]
    assert _decode(tokenizer, labelled) == REPLY + "<|im_end|>"
    assert len(_labelled_spans(enc.labels)) == 1
    # labels equal the input ids where set
    assert all(lab == tok for tok, lab in zip(enc.input_ids, enc.labels) if lab != IGNORE_INDEX)
    # ChatML's newline after <|im_end|> is not trained
    assert _decode(tokenizer, enc.input_ids[-1:]) == "\n"
    assert enc.labels[-1] == IGNORE_INDEX
    assert enc.labels[-2] == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_input_ids_equal_whole_template_tokenisation(tokenizer):
    messages = asr_messages(REPLY)
    enc = encode_chat(tokenizer, messages, [5])
    text = tokenizer.apply_chat_template(render_messages(messages, [5]), tokenize=False)
    assert enc.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert _decode(tokenizer, enc.input_ids) == text


@pytest.mark.parametrize("count", [0, 1, 13, 375])
def test_audio_slot_count(tokenizer, count):
    enc = encode_chat(tokenizer, asr_messages(REPLY), [count])
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    assert enc.input_ids.count(audio_id) == count
    assert enc.num_audio_tokens == [count]
    bos, eos = (tokenizer.convert_tokens_to_ids(t) for t in ("<|audio_bos|>", "<|audio_eos|>"))
    start = enc.input_ids.index(bos)
    assert enc.input_ids[start + 1 + count] == eos
    assert all(enc.labels[i] == IGNORE_INDEX for i, t in enumerate(enc.input_ids) if t == audio_id)


@pytest.mark.parametrize("counts", [[], [3, 4]])
def test_audio_part_clip_count_mismatch_raises(tokenizer, counts):
    with pytest.raises(ValueError, match="audio"):
        encode_chat(tokenizer, asr_messages(REPLY), counts)


def test_generation_prompt(tokenizer):
    messages = prompt_messages(asr_messages(REPLY))
    assert [m["role"] for m in messages] == ["user"]
    enc = encode_chat(tokenizer, messages, [9], add_generation_prompt=True)
    suffix = tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert enc.input_ids[-len(suffix) :] == suffix
    assert all(label == IGNORE_INDEX for label in enc.labels)
    assert enc.input_ids.count(tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)) == 9
    # The generation prompt is the training prompt up to the reply
    train = encode_chat(tokenizer, asr_messages(REPLY), [9])
    assert train.input_ids[: len(enc.input_ids)] == enc.input_ids


def test_multi_turn_labels_both_replies(tokenizer):
    messages = [
        {"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "Transcribe the audio."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "first reply"}]},
        {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "second reply"},
    ]
    enc = encode_chat(tokenizer, messages, [4])
    spans = [_decode(tokenizer, s) for s in _labelled_spans(enc.labels)]
    assert spans == ["first reply<|im_end|>", "second reply<|im_end|>"]
    text = tokenizer.apply_chat_template(render_messages(messages, [4]), tokenize=False)
    assert _decode(tokenizer, enc.input_ids) == text
    assert enc.labels[-1] == IGNORE_INDEX


def test_unsupported_part_type_raises(tokenizer):
    messages = [{"role": "user", "content": [{"type": "image"}]}, {"role": "assistant", "content": "x"}]
    with pytest.raises(ValueError, match="unsupported"):
        encode_chat(tokenizer, messages, [])
