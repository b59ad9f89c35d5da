"""The auxiliary CTC term takes only transcripts as targets: in a packed row of an ASR document and documents of
other tasks (a label, a spoken instruction's answer, a text-only reply), the model's CTC loss and target count are
the ASR document's alone, and the data module's group count agrees with the model's."""

from __future__ import annotations

import numpy as np
import torch

from aero_lightning.data.chat import AUDIO_TOKEN, asr_messages, encode_chat
from aero_lightning.data.datamodule import ctc_target_tokens
from aero_lightning.data.packing import collate_packed, collate_padded

SR = 16000


def _doc(tokenizer, counter, key, task, messages, seconds, seed):
    clips = [] if seconds is None else [(0.1 * np.random.default_rng(seed).standard_normal(round(seconds * SR))).astype(np.float32)]  # fmt: skip
    enc = encode_chat(tokenizer, messages, [counter(len(c)) for c in clips])
    return {"key": key, "task": task, "messages": messages, "waveforms": clips, "input_ids": enc.input_ids,
            "labels": enc.labels}  # fmt: skip


def _user(*parts):
    return {"role": "user", "content": list(parts)}


def _reply(text):
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def test_ctc_targets_are_the_transcripts_only(make_model, tokenizer):
    model = make_model(ctc_weight=0.5)
    counter = model.audio_token_counter()
    audio, prompt = {"type": "audio"}, {"type": "text", "text": "first reply"}
    docs = [
        _doc(tokenizer, counter, "a", "asr", asr_messages("the cat sat on the mat"), 1.1, 0),
        _doc(tokenizer, counter, "c", "classify", [_user(audio, prompt), _reply("hello world")], 0.9, 1),
        _doc(tokenizer, counter, "i", "instruct", [_user(audio), _reply("second reply")], 0.7, 2),
        _doc(tokenizer, counter, "t", "text", [_user(prompt), _reply("hello")], None, 3),
    ]
    model.eval()
    with torch.no_grad():
        packed = collate_packed(docs, counter)
        out = model.forward_batch(packed)
        alone = model.forward_batch(collate_padded(docs[:1], counter, tokenizer.pad_token_id))
    eot = tokenizer.convert_tokens_to_ids("<|im_end|>")
    asr_targets = len(tokenizer("the cat sat on the mat", add_special_tokens=False)["input_ids"])
    assert int(alone.ctc_target_tokens) == asr_targets
    assert int(out.ctc_target_tokens) == asr_targets  # before: the label and the answer were targets too
    torch.testing.assert_close(out.ctc_loss_sum, alone.ctc_loss_sum, rtol=1e-5, atol=1e-4)
    audio_id = tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)
    assert ctc_target_tokens(packed, audio_id, eot) == asr_targets
    # a batch without task names (older collators) keeps every audio document
    untagged = {k: v for k, v in packed.items() if k != "tasks"}
    with torch.no_grad():
        everything = model.forward_batch(untagged)
    assert int(everything.ctc_target_tokens) == ctc_target_tokens(untagged, audio_id, eot) > asr_targets


def test_a_row_without_transcripts_trains_and_logs_no_ctc_mean(make_model, tokenizer):
    """A packed row of only non-ASR documents (first-fit packing groups the short ones): CTC sum and count 0, a
    finite micro-batch loss equal to the LM mean, and no train/ctc_loss point (before: 0 / 0 = nan in both)."""
    from aero_lightning.lit_module import AeroLitModule

    model = make_model(ctc_weight=0.5)
    counter = model.audio_token_counter()
    audio, prompt = {"type": "audio"}, {"type": "text", "text": "first reply"}
    docs = [
        _doc(tokenizer, counter, "c", "classify", [_user(audio, prompt), _reply("hello world")], 0.9, 1),
        _doc(tokenizer, counter, "i", "instruct", [_user(audio), _reply("second reply")], 0.7, 2),
    ]
    module = AeroLitModule(model)
    logged = {}
    module.log = lambda name, value, **kw: logged.__setitem__(name, float(value))
    model.eval()
    with torch.no_grad():
        batch = collate_packed(docs, counter)
        out = model.forward_batch(batch)
        loss = module.training_step(batch, 0)
    assert int(out.ctc_target_tokens) == 0 and float(out.ctc_loss) == 0.0
    torch.testing.assert_close(loss, out.loss)
    assert "train/ctc_loss" not in logged and logged["train/loss"] == float(out.loss)
