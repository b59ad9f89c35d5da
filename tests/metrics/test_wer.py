"""Hand-worked WER cases (Open ASR Leaderboard conventions)."""

import math

import pytest

from aero_lightning.metrics.wer import WERResult, corpus_wer, mean_wer, normalize_english


def _result(wer: float, num_ref_words: int) -> WERResult:
    errors = round(wer * num_ref_words)
    return WERResult(
        wer=wer,
        substitutions=errors,
        deletions=0,
        insertions=0,
        hits=num_ref_words - errors,
        num_ref_words=num_ref_words,
        num_samples=1,
        num_dropped=0,
    )


def test_substitution_and_deletion():
    # the cat sat->sit on the(deleted) mat: S=1, D=1, I=0 over N=6 reference words.
    r = corpus_wer(["the cat sat on the mat"], ["the cat sit on mat"])
    assert (r.substitutions, r.deletions, r.insertions, r.hits) == (1, 1, 0, 4)
    assert r.num_ref_words == 6
    assert r.wer == pytest.approx(2 / 6)
    assert (r.num_samples, r.num_dropped) == (1, 0)


def test_insertion_can_push_wer_above_one():
    r = corpus_wer(["hello world"], ["hello big world"])
    assert (r.substitutions, r.deletions, r.insertions) == (0, 0, 1)
    assert r.wer == pytest.approx(1 / 2)
    r = corpus_wer(["yes"], ["no no no"])
    assert (r.substitutions, r.deletions, r.insertions) == (1, 0, 2)
    assert r.wer == pytest.approx(3.0)


def test_pooling_is_not_mean_of_utterance_wers():
    refs = ["the cat sat on the mat", "hello world"]
    hyps = ["the cat sit on mat", "hello big bad world"]
    r = corpus_wer(refs, hyps)
    # utterance 1: 2 errors / 6 words, utterance 2: 2 insertions / 2 words -> pooled 4 / 8.
    assert (r.substitutions, r.deletions, r.insertions) == (1, 1, 2)
    assert r.num_ref_words == 8
    assert r.wer == pytest.approx(0.5)
    per_utterance_mean = (2 / 6 + 2 / 2) / 2
    assert per_utterance_mean == pytest.approx(2 / 3)
    assert r.wer != pytest.approx(per_utterance_mean)


def test_empty_hypothesis_is_all_deletions():
    r = corpus_wer(["the cat sat"], [""])
    assert (r.substitutions, r.deletions, r.insertions, r.hits) == (0, 3, 0, 0)
    assert r.wer == pytest.approx(1.0)
    # A hypothesis that normalises to empty behaves the same way.
    assert corpus_wer(["the cat sat"], ["Uh, um."]).deletions == 3


def test_fillers_normalise_to_empty():
    assert normalize_english("uh") == ""
    assert normalize_english("Um.") == ""
    assert normalize_english("hmm") == ""


def test_empty_reference_pairs_are_dropped_and_counted():
    refs = ["uh", "", "the cat sat on the mat", "  "]
    hyps = ["something", "anything", "the cat sit on mat", "words"]
    r = corpus_wer(refs, hyps)
    assert (r.num_samples, r.num_dropped) == (1, 3)
    assert r.num_ref_words == 6
    assert r.insertions == 0  # the dropped pairs' hypotheses are not counted as insertions
    assert r.wer == pytest.approx(2 / 6)


def test_all_references_dropped_gives_nan():
    r = corpus_wer(["uh", ""], ["hello", ""])
    assert math.isnan(r.wer)
    assert (r.num_samples, r.num_dropped, r.num_ref_words) == (0, 2, 0)
    empty = corpus_wer([], [])
    assert math.isnan(empty.wer) and empty.num_samples == 0 and empty.num_dropped == 0


def test_normalisation_removes_case_and_punctuation():
    assert normalize_english("Hello, World!") == "hello world"
    assert corpus_wer(["Hello, World!"], ["hello world"]).wer == 0.0
    # Without normalisation the same pair is two substitutions.
    assert corpus_wer(["Hello, World!"], ["hello world"], normalize=False).wer == pytest.approx(1.0)


def test_normaliser_expands_titles_and_spellings():
    assert normalize_english("Mr. Smith") == "mister smith"
    assert corpus_wer(["Mr. Smith"], ["mister smith"]).wer == 0.0
    assert corpus_wer(["the colour"], ["the color"]).wer == 0.0
    assert corpus_wer(["I'm here"], ["I am here"]).wer == 0.0


def test_length_mismatch_raises_with_both_lengths():
    with pytest.raises(ValueError, match=r"2 references vs 1 hypotheses"):
        corpus_wer(["a", "b"], ["a"])


def test_to_dict_round_trip():
    r = corpus_wer(["the cat sat on the mat"], ["the cat sit on mat"])
    d = r.to_dict()
    assert d["substitutions"] == 1 and d["deletions"] == 1 and d["num_ref_words"] == 6
    assert WERResult(**d) == r


def test_mean_wer_is_unweighted():
    results = {"a": _result(0.1, 10), "b": _result(0.5, 1000)}
    assert mean_wer(results) == pytest.approx(0.3)


def test_mean_wer_rejects_empty_and_nan():
    with pytest.raises(ValueError):
        mean_wer({})
    nan_result = corpus_wer(["uh"], ["hello"])
    with pytest.raises(ValueError, match="nan"):
        mean_wer({"a": _result(0.1, 10), "empty": nan_result})
