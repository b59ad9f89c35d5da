"""Caption metrics through pycocoevalcap: aac-metrics' published example, a hand-worked ROUGE-L, and the metrics
that cannot run here reported with their reason."""

from __future__ import annotations

import os

import pytest

from aero_lightning.metrics import caption
from aero_lightning.metrics.caption import caption_metric_status, caption_scores

# aac-metrics' README ("Evaluate a specific metric"): CIDEr-D {"cider_d": 0.9614}, per item [1.3641, 0.5587];
# and ("Evaluate default metrics"): BLEU-1 0.4278
CANDIDATES = ["a man is speaking", "rain falls"]
REFERENCES = [
    ["a man speaks.", "someone speaks.", "a man is speaking while a bird is chirping in the background"],
    ["rain is falling hard on a surface"],
]

_problem = caption_metric_status(["cider_d"])["cider_d"]
if _problem and not os.environ.get("CI"):  # CI installs Java and the caption extra (.ci/run, make install)
    pytest.skip(f"caption metrics cannot run here: {_problem}", allow_module_level=True)


def test_cider_d_and_bleu_match_the_published_example():
    r = caption_scores(CANDIDATES, REFERENCES, metrics=("bleu", "cider_d"))
    assert r.unavailable == {}
    assert r.scores["cider_d"] == pytest.approx(0.9614, abs=5e-5)
    assert r.per_item["cider_d"] == pytest.approx([1.3641, 0.5587], abs=5e-5)
    assert r.scores["bleu_1"] == pytest.approx(0.4278, abs=5e-5)


def test_rouge_l_by_hand():
    # After PTB tokenisation (lower case, "." removed). Item 1, "a man is speaking" (4 tokens): the LCS with
    # "a man speaks" is 2 (P 2/4, R 2/3), with "someone speaks" 0, with the 12-token reference 4 (P 1, R 4/12); the
    # best P = 1 and best R = 2/3 give (1 + 1.2^2) P R / (R + 1.2^2 P) = 2.44 (2/3) / (2/3 + 1.44) = 0.772152.
    # Item 2, "rain falls" vs the 7-token reference: LCS 1, P 1/2, R 1/7 -> 2.44 (1/14) / (1/7 + 0.72) = 0.201987.
    r = caption_scores(CANDIDATES, REFERENCES, metrics=("rouge_l",))
    assert r.per_item["rouge_l"] == pytest.approx([0.772152, 0.201987], abs=1e-6)
    assert r.scores["rouge_l"] == pytest.approx((0.772152 + 0.201987) / 2, abs=1e-6)


def test_meteor_runs_and_an_exact_caption_beats_a_wrong_one():
    r = caption_scores(
        ["a dog barks", "a dog barks"], [["a dog barks"], ["rain falls on a roof"]], ("meteor",)
    )
    assert "meteor" in r.scores and r.per_item["meteor"][0] > 0.5 > r.per_item["meteor"][1] >= 0.0


def test_spice_spider_and_fense_are_reported_unavailable_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setattr(caption, "_package_dir", lambda: tmp_path)  # a pycocoevalcap without the CoreNLP jars
    status = caption_metric_status(["cider_d", "spice", "spider", "fense"])
    assert status["cider_d"] is None
    assert "stanford-corenlp-3.6.0.jar" in status["spice"] and "nlp.stanford.edu" in status["spice"]
    assert status["spider"] == status["spice"]
    assert "paraphrase-TinyBERT-L6-v2" in status["fense"]
    r = caption_scores(CANDIDATES, REFERENCES, metrics=("cider_d", "spider", "fense"))
    assert set(r.scores) == {"cider_d"} and set(r.unavailable) == {"spider", "fense"}


def test_no_java_or_no_package_makes_every_metric_unavailable(monkeypatch):
    monkeypatch.setattr(caption, "_java_problem", lambda: "no java on PATH: ...")
    r = caption_scores(CANDIDATES, REFERENCES, metrics=("bleu", "cider_d"))
    assert r.scores == {} and r.unavailable == {
        "bleu": "no java on PATH: ...",
        "cider_d": "no java on PATH: ...",
    }
    monkeypatch.setattr(caption, "_package_dir", lambda: None)
    assert "pip install 'aero_lightning[caption]'" in caption_metric_status(["cider_d"])["cider_d"]
    with pytest.raises(ValueError, match="unknown caption metric"):
        caption_metric_status(["cider"])


def test_an_empty_caption_scores_zero_without_shifting_the_others():
    r = caption_scores(["", *CANDIDATES], [["a dog barks"], *REFERENCES], metrics=("cider_d",))
    assert r.per_item["cider_d"][0] == 0.0 and len(r.per_item["cider_d"]) == 3
