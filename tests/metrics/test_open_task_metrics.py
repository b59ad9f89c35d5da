"""Exact match and token F1 (SQuAD v1.1) and free-form label accuracy, against hand-worked values."""

from __future__ import annotations

import math

import pytest

from aero_lightning.metrics.choice import classify_accuracy, match_label
from aero_lightning.metrics.tasks import headline_metric, score_open_task
from aero_lightning.metrics.text import exact_match, normalize_answer, qa_scores, token_f1


def test_squad_normalisation():
    # lower case, punctuation out, the articles a / an / the out as whole words ("another" keeps its "an")
    assert normalize_answer("The Cat, sat on an old MAT!") == "cat sat on old mat"
    assert normalize_answer("Another  theory") == "another theory"
    assert exact_match("A Dog.", "dog") and not exact_match("dogs", "dog")


def test_token_f1_by_hand():
    # "dog barking loudly" vs "dog is barking": 2 shared tokens, P = 2/3, R = 2/3 -> F1 = 2/3
    assert token_f1("a dog barking loudly", "the dog is barking") == pytest.approx(2 / 3)
    # a repeated token counts once per reference occurrence: common = min(2, 1) = 1, P = 1/2, R = 1 -> 2/3
    assert token_f1("yes yes", "yes") == pytest.approx(2 / 3)
    assert token_f1("", "") == 0.0  # SQuAD v1.1: nothing shared scores 0, even two empty answers


def test_qa_scores_take_the_best_reference_and_average():
    result = qa_scores(
        ["two", "a bird chirps", "no"],
        [["2", "two"], ["birds chirping", "a bird is chirping"], ["yes"]],
    )
    # item 1: "two" matches exactly (EM 1, F1 1); item 2: vs "birds chirping" nothing shared, vs "bird is chirping"
    # 1 of 2 reply tokens and 1 of 3 reference tokens: F1 = 2 (1/2)(1/3) / (1/2 + 1/3) = 0.4; item 3: 0
    assert result.num_items == 3 and result.num_exact == 1
    assert result.exact_match == pytest.approx(1 / 3)
    assert result.per_item_f1 == pytest.approx((1.0, 0.4, 0.0))
    assert result.f1 == pytest.approx(1.4 / 3)
    assert math.isnan(qa_scores([], []).f1)
    with pytest.raises(ValueError):
        qa_scores(["x"], ["x"])  # a bare string is not a list of references


LABELS = ["dog", "cat", "throat", "throat clearing", "cough"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("Dog.", "dog"),  # rule 1: the normalised reply is a label
        ("I hear a dog barking", "dog"),  # rule 2: one label as whole words
        ("someone is throat clearing", "throat clearing"),  # "throat" inside the longer match is dropped
        ("a dog and a cat", None),  # two labels: unparsed (lmms-eval would take the first in list order)
        ("coughing loudly", None),  # whole words only (lmms-eval's substring test would say "cough")
        ("", None),
    ],
)
def test_match_label(reply, expected):
    assert match_label(reply, LABELS) == expected


def test_classify_accuracy_by_hand():
    replies = ["dog", "It sounds like a cat.", "coughing", "a dog or a cat"]
    refs = [["dog"], ["dog"], ["cough"], ["cat"]]
    r = classify_accuracy(replies, refs, LABELS, groups=["a", "a", "b", "b"])
    # item 1 right; item 2 names "cat" (wrong); items 3 and 4 name no single label (unparsed, wrong)
    assert (r.num_correct, r.num_items, r.num_unparsed, r.num_labels) == (1, 4, 2, 5)
    assert r.accuracy == pytest.approx(0.25) and r.per_group == {"a": 0.5, "b": 0.0}
    # without a label set: the dataset's reference labels {dog, cough, cat}
    assert classify_accuracy(replies, refs).num_labels == 3


def test_score_open_task_headlines():
    scores, per_item = score_open_task("classify", ["dog", "cat"], [["dog"], ["dog"]])
    assert headline_metric("classify", scores) == ("accuracy", 0.5)
    assert per_item["f1"] == [1.0, 0.0]
    scores, _ = score_open_task("aqa", ["yes"], [["yes", "yeah"]])
    assert headline_metric("aqa", scores) == ("f1", 1.0) and scores["exact_match"] == 1.0
    with pytest.raises(ValueError, match="not an open task"):
        score_open_task("asr", ["x"], [["x"]])
