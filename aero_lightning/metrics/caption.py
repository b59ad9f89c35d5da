"""Audio-captioning metrics from the COCO caption evaluation code (``pycocoevalcap``), not re-implemented here.

``pycocoevalcap`` 1.2 (https://github.com/salaniz/pycocoevalcap, the Python 3 package of the MS-COCO caption
evaluation code, tylin/coco-caption) is what the DCASE audio-captioning evaluation (caption-evaluation-tools) and
``aac-metrics`` reproduce: captions and references are PTB-tokenised by Stanford CoreNLP's ``PTBTokenizer``
(lower-cased, punctuation tokens removed), then scored with

- BLEU-1..4 (Papineni et al., ACL 2002), corpus-level;
- METEOR 1.5 (Denkowski and Lavie, WMT 2014; ``meteor-1.5.jar``, with its English paraphrase table);
- ROUGE-L (Lin, 2004; LCS F-measure with beta = 1.2, the best precision and recall over the references);
- CIDEr-D (Vedantam et al., CVPR 2015): TF-IDF n-gram vectors (n = 1..4, document frequencies over the
  references of the evaluated set), clipped candidate counts, a Gaussian length penalty (sigma = 6), x 10; the
  COCO code's ``Cider`` class is this CIDEr-D variant (no stemming), the one audio captioning reports;
- SPICE (Anderson et al., ECCV 2016; ``spice-1.0.jar``) and SPIDEr = (CIDEr-D + SPICE) / 2 (Liu et al., ICCV 2017).

What runs where. Tokenisation, METEOR and SPICE are Java programs shipped inside the wheel, so every metric needs a
``java`` on ``PATH`` (Debian: ``apt-get install default-jre-headless``; ``.ci/run`` installs it). SPICE also
needs Stanford CoreNLP 3.6.0 (``stanford-corenlp-3.6.0.jar`` and ``stanford-corenlp-3.6.0-models.jar`` in
``pycocoevalcap/spice/lib``), which ``pycocoevalcap`` downloads from nlp.stanford.edu on first use; it is not on
PyPI, so where only package registries are reachable SPICE and SPIDEr are *unavailable* (reported with this
reason, never downloaded mid-run). FENSE (Zhou et al., ICASSP 2022) needs a Sentence-BERT checkpoint
(``paraphrase-TinyBERT-L6-v2``) and its fluency-error detector from the FENSE releases, neither of which a package
registry ships: unavailable likewise. Copy the two CoreNLP jars into ``pycocoevalcap/spice/lib`` to enable SPICE.

Scores are on the libraries' scales (BLEU, METEOR, ROUGE-L, SPICE in [0, 1]; CIDEr-D in [0, 10]). Checked against
aac-metrics' published example (its README): CIDEr-D 0.9614 with per-item 1.3641 and 0.5587, BLEU-1 0.4278.
"""

from __future__ import annotations

import logging
import math
import shutil
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

__all__ = [
    "CAPTION_METRICS",
    "DEFAULT_CAPTION_METRICS",
    "CaptionResult",
    "caption_metric_status",
    "caption_scores",
]

logger = logging.getLogger(__name__)

CAPTION_METRICS = ("bleu", "meteor", "rouge_l", "cider_d", "spice", "spider", "fense")
"""Metric names :func:`caption_scores` accepts (``bleu`` reports ``bleu_1`` .. ``bleu_4``)."""

DEFAULT_CAPTION_METRICS = ("bleu", "meteor", "rouge_l", "cider_d", "spice", "spider", "fense")
"""What ``eval.py`` asks for; the unavailable ones are reported with their reason."""

_INSTALL = "pip install 'aero_lightning[caption]' (pycocoevalcap==1.2)"
_FENSE = (
    "FENSE needs the Sentence-BERT checkpoint paraphrase-TinyBERT-L6-v2 and FENSE's fluency-error detector, "
    "downloaded from the model hub and the FENSE releases; no package registry ships them, so it cannot run here"
)


@dataclass(frozen=True)
class CaptionResult:
    """Caption metrics of one dataset.

    Attributes:
        scores: corpus scores by name (``bleu_1`` .. ``bleu_4``, ``meteor``, ``rouge_l``, ``cider_d``, ``spice``,
            ``spider``), for the metrics that ran.
        per_item: item scores by name (BLEU: per-item BLEU-4), for the metrics that ran.
        unavailable: ``{metric: reason}`` for the metrics asked for that could not run.
        num_items: captions scored.
    """

    scores: dict[str, float]
    per_item: dict[str, list[float]] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)
    num_items: int = 0

    def to_dict(self) -> dict:
        return {
            "scores": dict(self.scores),
            "unavailable": dict(self.unavailable),
            "num_items": self.num_items,
        }


def _package_dir() -> Path | None:
    try:
        import pycocoevalcap
    except ImportError:
        return None
    return Path(next(iter(pycocoevalcap.__path__)))


@lru_cache(maxsize=1)
def _java_problem() -> str | None:
    java = shutil.which("java")
    if java is None:
        return "no java on PATH: PTB tokenisation, METEOR and SPICE run Java programs (apt-get install default-jre-headless)"
    try:
        subprocess.run([java, "-version"], capture_output=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError) as err:
        return f"{java} -version failed: {err}"
    return None


def _spice_problem(package: Path) -> str | None:
    lib = package / "spice" / "lib"
    missing = [
        name
        for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
        if not (lib / name).is_file()
    ]
    if missing:
        return (
            f"SPICE needs Stanford CoreNLP 3.6.0 ({', '.join(missing)} missing in {lib}); pycocoevalcap downloads "
            "it from nlp.stanford.edu on first use and no package registry ships it, so it is not fetched here. "
            "Copy the jars there to enable SPICE and SPIDEr"
        )
    return None


def caption_metric_status(metrics: Iterable[str] = DEFAULT_CAPTION_METRICS) -> dict[str, str | None]:
    """Whether each metric can run here: ``{metric: None}`` when it can, else ``{metric: reason}``.

    Raises:
        ValueError: for a name not in :data:`CAPTION_METRICS`.
    """
    metrics = list(metrics)
    unknown = [m for m in metrics if m not in CAPTION_METRICS]
    if unknown:
        raise ValueError(f"unknown caption metric(s) {unknown}; known: {', '.join(CAPTION_METRICS)}")
    package = _package_dir()
    status: dict[str, str | None] = {}
    for m in metrics:
        if m == "fense":
            status[m] = _FENSE
        elif package is None:
            status[m] = f"pycocoevalcap is not installed: {_INSTALL}"
        elif (problem := _java_problem()) is not None:
            status[m] = problem
        elif m in ("spice", "spider"):
            status[m] = _spice_problem(package)
        else:
            status[m] = None
    return status


def _tokenize(candidates: Sequence[str], references: Sequence[Sequence[str]]):
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    # an empty line would shift PTBTokenizer's line-per-caption output, so an empty caption is a lone space
    res = tokenizer.tokenize({i: [{"caption": c if c.strip() else " "}] for i, c in enumerate(candidates)})
    gts = tokenizer.tokenize(
        {i: [{"caption": r if r.strip() else " "} for r in refs] for i, refs in enumerate(references)}
    )
    return gts, res


def caption_scores(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    metrics: Iterable[str] = DEFAULT_CAPTION_METRICS,
) -> CaptionResult:
    """Score captions against their references with ``pycocoevalcap`` (module docstring).

    A metric that cannot run (no package, no Java, no CoreNLP models for SPICE, FENSE) or fails while running is
    listed in ``unavailable`` with its reason; nothing is raised for it.

    Args:
        candidates: one caption per item.
        references: the reference captions of each item (at least one).
        metrics: names from :data:`CAPTION_METRICS`.

    Returns:
        :class:`CaptionResult`.

    Raises:
        ValueError: on different lengths, an item without references, or an unknown metric name.
    """
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} captions for {len(references)} reference lists")
    if any(isinstance(r, str) or not r for r in references):
        raise ValueError("each item needs a non-empty list of reference captions")
    status = caption_metric_status(metrics)
    unavailable = {m: reason for m, reason in status.items() if reason is not None}
    wanted = [m for m, reason in status.items() if reason is None]
    scores: dict[str, float] = {}
    per_item: dict[str, list[float]] = {}
    if not candidates or not wanted:
        return CaptionResult(scores, per_item, unavailable, len(candidates))
    try:
        gts, res = _tokenize(candidates, references)
    except Exception as err:  # noqa: BLE001 - the Java tokenizer fails in several ways; none stops an eval
        reason = f"PTB tokenisation failed: {type(err).__name__}: {err}"
        return CaptionResult(scores, per_item, unavailable | dict.fromkeys(wanted, reason), len(candidates))

    def run(name: str, make) -> None:
        try:
            corpus, items = make().compute_score(gts, res)
        except Exception as err:  # noqa: BLE001 - a Java scorer failing costs its metric, not the evaluation
            unavailable[name] = f"{name} failed: {type(err).__name__}: {err}"
            return
        if name == "bleu":
            for n, value in enumerate(corpus, 1):
                scores[f"bleu_{n}"] = float(value)
            per_item["bleu_4"] = [float(v) for v in items[-1]]
        elif name == "spice":
            scores[name] = float(corpus)
            per_item[name] = [float(item["All"]["f"]) for item in items]
        else:
            scores[name] = float(corpus)
            per_item[name] = [float(v) for v in items]

    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    makers = {"bleu": lambda: _QuietBleu(Bleu(4)), "rouge_l": Rouge, "cider_d": Cider}
    for name in ("bleu", "meteor", "rouge_l", "cider_d", "spice"):
        if name == "meteor" and "meteor" in wanted:
            from pycocoevalcap.meteor.meteor import Meteor

            run("meteor", Meteor)
        elif name == "spice" and ("spice" in wanted or "spider" in wanted):
            from pycocoevalcap.spice.spice import Spice

            run("spice", Spice)
        elif name in wanted and name in makers:
            run(name, makers[name])
    if "spider" in wanted:
        if "cider_d" not in scores:  # SPIDEr needs CIDEr-D even when only SPIDEr was asked for
            run("cider_d", Cider)
        if "spice" in scores and "cider_d" in scores:
            scores["spider"] = (scores["cider_d"] + scores["spice"]) / 2
            per_item["spider"] = [(c + s) / 2 for c, s in zip(per_item["cider_d"], per_item["spice"])]
        else:
            unavailable["spider"] = "SPIDEr is the mean of CIDEr-D and SPICE: " + unavailable.get(
                "spice", unavailable.get("cider_d", "one of them did not run")
            )
    for name in ("spice", "cider_d"):  # computed only for SPIDEr: not reported on their own
        if name not in wanted and name not in unavailable:
            scores.pop(name, None)
            per_item.pop(name, None)
    if "spice" not in wanted:
        unavailable.pop("spice", None)
    scores = {k: v for k, v in scores.items() if not math.isnan(v)}
    return CaptionResult(scores, per_item, unavailable, len(candidates))


class _QuietBleu:
    """``Bleu.compute_score`` prints its statistics unless ``verbose=0``."""

    def __init__(self, bleu):
        self.bleu = bleu

    def compute_score(self, gts, res):
        return self.bleu.compute_score(gts, res, verbose=0)
