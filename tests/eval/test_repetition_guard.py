"""The repetition guard: its rule on hand-made token sequences, the stopping criterion against that rule, and a real
tiny model whose greedy reply loops, stopped and flagged by decode_waveforms, transcribe_files and the exported
pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch
from helpers.looping import make_looping

from aero_lightning.eval.decode import GenerationOptions, chars_per_token, decode_waveforms
from aero_lightning.eval.repetition_guard import RepetitionGuard, repetition_guard_from
from aero_lightning.tasks.transcribe import transcribe_files

SMALL = RepetitionGuard(max_ngram=3, min_repeats=3, min_tokens=6)  # spans: n=1 -> 6, n=2 -> 6, n=3 -> 9


def test_spans_of_the_default_guard():
    guard = RepetitionGuard()
    assert [guard.span(n) for n in (1, 6, 10, 20, 32)] == [40, 42, 40, 80, 128]
    assert [SMALL.span(n) for n in (1, 2, 3)] == [6, 6, 9]


@pytest.mark.parametrize(
    ("tokens", "stop"),
    [
        ([5, 1, 1, 1, 1, 1, 1, 7], 7),  # six copies of a one-token unit: stopped after the sixth
        ([5, 1, 1, 1, 1, 1], None),  # five: no
        ([9, 1, 2, 1, 2, 1, 2, 3], 7),  # three copies of (1, 2)
        ([1, 2, 3, 1, 2, 3, 1, 2, 3], 9),  # three copies of (1, 2, 3)
        ([1, 2, 3, 1, 2, 3, 1, 2], None),
        ([1, 1, 1, 2, 2, 2, 1, 1, 1], None),
        ([4, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 1], 7),  # the first loop to complete wins
        ([], None),
    ],
)
def test_find_stop_on_hand_made_sequences(tokens, stop):
    assert SMALL.find_stop(tokens) == stop


def test_speech_like_repeats_do_not_stop_the_default_guard():
    digits = [16, 15] + [15] * 6  # "1000000": seven one-digit tokens in Qwen's tokenizer
    phrase = [101, 102] * 3  # "no no" x 3
    assert RepetitionGuard().find_stop(digits + phrase + digits) is None
    assert RepetitionGuard().find_stop([7] * 39) is None and RepetitionGuard().find_stop([7] * 40) == 40


@pytest.mark.parametrize("num_beams", [1, 3])
def test_the_criterion_stops_where_find_stop_says(num_beams):
    """Fed one token at a time after a prompt that itself repeats (audio slots), the criterion fires first at the
    prefix length find_stop gives, for every row of a batch: counting runs step by step (greedy) and checking the
    newest tokens directly (beam search, whose rows change between steps)."""
    rng = np.random.default_rng(0)
    rows = [
        list(rng.integers(0, 50, 60)),  # random: no loop
        [3, 4] + [8, 9, 10] * 6 + [1],  # a 3-token loop
        list(rng.integers(0, 50, 10)) + [2] * 20,  # a 1-token loop after some text
        [1, 2] * 2 + [3] * 5 + [5, 6, 7] * 3,  # two copies of (1, 2) and five of (3,) stop nothing
    ]
    length = max(len(r) for r in rows)
    rows = [r + list(range(100, 100 + length - len(r))) for r in rows]  # distinct filler, no new loop
    prompt = torch.full((len(rows), 30), 77)  # 30 identical prompt tokens
    new = torch.tensor(rows)
    criterion = SMALL.criterion(num_beams)
    first = [None] * len(rows)
    for t in range(1, length + 1):
        fired = criterion(torch.cat([prompt, new[:, :t]], dim=1), None)
        assert fired.shape == (len(rows),) and fired.dtype == torch.bool
        for b in range(len(rows)):
            if fired[b] and first[b] is None:
                first[b] = t
    assert first == [SMALL.find_stop(r) for r in rows]
    assert first[0] is None and first[1] == 2 + 9 and first[2] == 10 + 6 and first[3] == 9 + 9


def test_repetition_guard_from_config_values():
    assert repetition_guard_from(None) is None and repetition_guard_from(False) is None
    assert repetition_guard_from(True) == RepetitionGuard()
    assert repetition_guard_from({"enabled": False, "max_ngram": 3}) is None
    assert repetition_guard_from({"enabled": True, "max_ngram": 8}) == RepetitionGuard(8, 4, 40)
    assert GenerationOptions(repetition_guard={"enabled": False}).repetition_guard is None
    assert GenerationOptions().repetition_guard == RepetitionGuard()
    with pytest.raises(ValueError, match="min_repeats >= 2"):
        repetition_guard_from({"min_repeats": 1})
    with pytest.raises(ValueError, match="must be a mapping"):
        repetition_guard_from("yes")


@pytest.fixture
def looping(model):
    model.eval()
    token = make_looping(model, "the")
    return model, token


def test_the_guard_stops_a_looping_generation_and_flags_it(looping):
    model, token = looping
    wave = (0.1 * np.random.default_rng(0).standard_normal(48_000)).astype(np.float32)  # 3 s
    (free,) = decode_waveforms(
        model, [wave], options=GenerationOptions(max_new_tokens=200, repetition_guard=None)
    )
    assert (free.num_new_tokens, free.finished, free.stopped_by_repetition_guard, free.budget_hit) == (
        200,
        False,
        False,
        True,
    )
    assert free.text == "the" * 200  # it loops until the budget: what the guard is for
    (guarded,) = decode_waveforms(model, [wave], options=GenerationOptions(max_new_tokens=200))
    assert (guarded.num_new_tokens, guarded.finished, guarded.stopped_by_repetition_guard) == (
        40,
        False,
        True,
    )
    assert guarded.text == "the" * 40 and not guarded.budget_hit


def test_each_row_of_a_batch_is_stopped_or_cut_on_its_own(looping):
    """A long sample whose budget exceeds the guard's 40 tokens is stopped by the guard; a short one whose budget is
    below it is cut at its budget, in the same generate call."""
    model, _ = looping
    cpt = chars_per_token(model.tokenizer)
    options = GenerationOptions(base_new_tokens=0, chars_per_second=100 * cpt / 3.0)  # 3 s -> 100 tokens
    waves = [np.full(48_000, 0.05, dtype=np.float32), np.full(8_000, 0.05, dtype=np.float32)]
    budgets = [options.budget(len(w) / 16000, cpt) for w in waves]
    assert budgets[1] < 40 < budgets[0]
    long, short = decode_waveforms(model, waves, options=options, tokenizer_chars_per_token=cpt)
    assert (long.num_new_tokens, long.stopped_by_repetition_guard, long.budget_hit) == (40, True, False)
    assert (short.num_new_tokens, short.stopped_by_repetition_guard, short.budget_hit) == (
        budgets[1],
        False,
        True,
    )


def test_transcribe_counts_and_flags_guard_stops(looping, tmp_path):
    model, _ = looping
    path = tmp_path / "loop.wav"
    sf.write(path, np.full(48_000, 0.05, dtype=np.float32), 16000)
    out = transcribe_files(model, [path], options=GenerationOptions(max_new_tokens=200), progress=False)
    (record,) = out["records"]
    assert record["stopped_by_repetition_guard"] is True and record["num_new_tokens"] == 40
    assert (out["stopped_by_repetition_guard"], out["budget_hit"], out["transcribed"]) == (1, 0, 1)


def test_the_exported_pipeline_stops_and_flags_the_same_loop(looping, tmp_path):
    from transformers import pipeline

    from aero_lightning.hf.export import export

    model, _ = looping
    out = export(model, tmp_path / "hf", generation=GenerationOptions())
    asr = pipeline("automatic-speech-recognition", model=str(out), trust_remote_code=True)
    audio = {"raw": np.full(48_000, 0.05, dtype=np.float32), "sampling_rate": 16000}
    assert asr(audio, max_new_tokens=200) == {"text": "the" * 40, "stopped_by_repetition_guard": True}
    assert asr(audio, max_new_tokens=200, repetition_guard=False) == {
        "text": "the" * 200,
        "stopped_by_repetition_guard": False,
    }
