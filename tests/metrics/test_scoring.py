"""Scoring as the Open ASR Leaderboard does, hallucination loops, and multiple-choice accuracy (hand-worked)."""

from __future__ import annotations

import math

import pytest

from aero_lightning.metrics.choice import choice_accuracy, format_choices, parse_choice
from aero_lightning.metrics.repetition import longest_tandem_repeat, repetition_stats
from aero_lightning.metrics.wer import corpus_wer, is_scored_reference, mean_wer, normalize_english


# ------------------------------------------------------------------------------------------------ WER
def test_one_substitution_one_deletion_one_insertion():
    #  ---  alpha bravo charlie delta echo
    # zulu  alpha bravo charly   ---   echo  -> I (zulu), S (charlie->charly), D (delta) over N = 5 reference words;
    # every other alignment costs more than these 3 edits
    r = corpus_wer(["alpha bravo charlie delta echo"], ["zulu alpha bravo charly echo"])
    assert (r.substitutions, r.deletions, r.insertions, r.hits) == (1, 1, 1, 3)
    assert r.num_ref_words == 5
    assert r.wer == pytest.approx(3 / 5)


def test_errors_pool_over_the_dataset_after_normalisation():
    refs = ["Hello, World!", "the colour grey", "alpha bravo"]
    hyps = ["hello world", "the color gray", "alpha"]  # punctuation/case and British spelling are not errors
    r = corpus_wer(refs, hyps)
    assert (r.substitutions, r.deletions, r.insertions) == (0, 1, 0)
    assert r.num_ref_words == 2 + 3 + 2
    assert r.wer == pytest.approx(1 / 7)  # pooled: 1 error / 7 words, not the mean of 0, 0, 1/2


def test_all_deleted_and_all_inserted():
    r = corpus_wer(["one fine day"], [""])
    assert (r.substitutions, r.deletions, r.insertions) == (0, 3, 0)
    assert r.wer == pytest.approx(1.0)
    r = corpus_wer(["yes"], ["yes no no no"])
    assert (r.substitutions, r.deletions, r.insertions) == (0, 0, 3)
    assert r.wer == pytest.approx(3.0)


def test_samples_with_an_empty_normalised_reference_are_dropped():
    refs = ["uh", "", "  ", "ignore_time_segment_in_scoring", "good morning"]
    hyps = ["anything at all", "x", "y", "z", "good morning"]
    assert normalize_english("uh") == "" and normalize_english("ignore_time_segment_in_scoring") == (
        "ignore time segment in scoring"
    )
    r = corpus_wer(refs, hyps)
    assert (r.num_samples, r.num_dropped) == (1, 4)
    assert r.wer == 0.0 and r.insertions == 0  # the dropped hypotheses' words are not insertions
    assert not is_scored_reference("") and not is_scored_reference("ignore time segment in scoring")
    assert is_scored_reference("good morning")
    everything_dropped = corpus_wer(["um"], ["hello"])
    assert math.isnan(everything_dropped.wer) and everything_dropped.num_samples == 0


def test_mean_is_unweighted_across_datasets():
    small = corpus_wer(["alpha bravo charlie delta"], ["alpha bravo charlie"])  # 1 / 4
    large = corpus_wer(["golf hotel india juliet kilo lima mike november oscar papa"], ["golf"] * 1)  # 9 / 10
    assert small.wer == pytest.approx(0.25) and large.wer == pytest.approx(0.9)
    assert mean_wer({"small": small, "large": large}) == pytest.approx((0.25 + 0.9) / 2)
    pooled = (1 + 9) / (4 + 10)
    assert mean_wer({"small": small, "large": large}) != pytest.approx(pooled)
    with pytest.raises(ValueError, match="no scored samples"):
        mean_wer({"small": small, "empty": corpus_wer(["uh"], ["x"])})


# -------------------------------------------------------------------------------------------- loops
def test_longest_tandem_repeat():
    assert longest_tandem_repeat("the the the the the end".split()) == (5, 1, ("the",))
    assert longest_tandem_repeat("so thank you thank you thank you bye".split()) == (3, 2, ("thank", "you"))
    assert longest_tandem_repeat("a b c a b c a b c".split(), max_n=2)[0] == 1  # period 3 not looked for
    assert longest_tandem_repeat("a b c a b c a b c".split(), max_n=3) == (3, 3, ("a", "b", "c"))
    assert longest_tandem_repeat("no repeats in here".split())[0] == 1
    assert longest_tandem_repeat([]) == (1, 1, ())
    # repeats that are not back to back do not count
    assert longest_tandem_repeat("the cat and the dog and the bird".split())[0] == 1


def test_repetition_stats_flags_loops_after_normalisation():
    hyps = [
        "Thank you. Thank you. Thank you. Thank you. Thank you.",  # 5 copies of "thank you"
        "the the the",  # 3 copies: below the threshold
        "a normal sentence",
        "",
    ]
    r = repetition_stats(hyps, min_repeats=5)
    assert (r.num_hypotheses, r.num_loops, r.loop_indices, r.max_copies) == (4, 1, [0], 5)
    assert r.loop_rate == pytest.approx(0.25)
    assert repetition_stats(hyps, min_repeats=3).num_loops == 2
    assert repetition_stats([]).loop_rate == 0.0


# ------------------------------------------------------------------------------------ multiple choice
CHOICES = ["dog barking", "cat meowing", "car horn", "rain"]


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("B", 1),
        ("B.", 1),
        ("(C)", 2),
        ("The answer is D.", 3),
        ("Answer: A", 0),
        ("I think (A), no wait, (C)", 2),  # the last parenthesised letter
        ("cat meowing", 1),  # the option's text
        ("It sounds like a car horn to me", 2),  # exactly one option's text inside the reply
        ("A dog is barking somewhere", None),  # an article, and no option text: unparsed
        ("dog barking or cat meowing", None),  # two options named
        ("E", None),  # not an option letter
        ("", None),
    ],
)
def test_parse_choice(reply, expected):
    assert parse_choice(reply, CHOICES) == expected


def test_choice_accuracy_counts_unparsed_as_wrong_and_groups():
    replies = ["A", "B", "no idea", "(B)"]
    choices = [CHOICES, CHOICES, CHOICES[:2], CHOICES[:2]]
    answers = [0, 0, 1, 1]
    r = choice_accuracy(replies, choices, answers, groups=["sound", "sound", "speech", "speech"])
    assert (r.num_correct, r.num_items, r.num_unparsed) == (2, 4, 1)
    assert r.accuracy == pytest.approx(0.5)
    assert r.per_group == {"sound": 0.5, "speech": 0.5}
    with pytest.raises(ValueError, match="outside"):
        choice_accuracy(["A"], [CHOICES[:2]], [2])


def test_format_choices():
    text = format_choices("What is heard?", ["dog", "cat"], "Answer with the letter.")
    assert text == "What is heard?\nA. dog\nB. cat\nAnswer with the letter."
    with pytest.raises(ValueError):
        format_choices("q", ["only one"])
