"""Exact match and token F1 of free-form answers (open-ended audio QA, spoken instructions).

The measures are SQuAD v1.1's (Rajpurkar et al., "SQuAD: 100,000+ Questions for Machine Comprehension of Text",
EMNLP 2016; the official ``evaluate-v1.1.py`` script):

- *normalisation* (``normalize_answer``): lower-case, remove ASCII punctuation (``string.punctuation``), remove
  the articles ``a``, ``an``, ``the`` as whole words, collapse whitespace;
- *exact match*: the normalised reply equals the normalised reference;
- *token F1*: with ``common`` the multiset intersection of the two normalised token lists,
  ``P = |common| / |reply tokens|``, ``R = |common| / |reference tokens|``, ``F1 = 2PR / (P + R)``, and 0 when
  nothing is shared (v1.1 also gives 0 when both are empty);
- with several references the best one counts (``metric_max_over_ground_truths``), and the dataset score is the
  mean over items.

lmms-eval's Clotho-AQA task scores ``exact_match`` with ``ignore_case`` and ``ignore_punctuation`` (HF evaluate's
measure, which keeps the articles): for its one-word answers the two agree except on a reply such as "a dog"
against "dog", which SQuAD's normalisation counts as a match.
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = ["QAResult", "exact_match", "normalize_answer", "qa_scores", "token_f1"]

_PUNCTUATION = str.maketrans("", "", string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION)).split())


def exact_match(reply: str, reference: str) -> bool:
    """True when the normalised reply equals the normalised reference."""
    return normalize_answer(reply) == normalize_answer(reference)


def token_f1(reply: str, reference: str) -> float:
    """SQuAD v1.1's token F1 of ``reply`` against one ``reference`` (module docstring)."""
    reply_tokens = normalize_answer(reply).split()
    reference_tokens = normalize_answer(reference).split()
    same = sum((Counter(reply_tokens) & Counter(reference_tokens)).values())
    if same == 0:
        return 0.0
    precision = same / len(reply_tokens)
    recall = same / len(reference_tokens)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class QAResult:
    """Exact match and token F1 of one dataset.

    Attributes:
        exact_match: mean over items of the best reference's exact match, in [0, 1] (nan for no items).
        f1: mean over items of the best reference's token F1, in [0, 1] (nan for no items).
        num_items: items scored.
        num_exact: items whose reply matches a reference exactly.
        per_item_f1: each item's best F1, in order.
    """

    exact_match: float
    f1: float
    num_items: int
    num_exact: int
    per_item_f1: tuple[float, ...] = ()

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("per_item_f1")
        return out


def qa_scores(replies: Sequence[str], references: Sequence[Sequence[str]]) -> QAResult:
    """Score replies against one or more references each.

    Args:
        replies: model texts.
        references: the accepted answers of each item (at least one).

    Returns:
        :class:`QAResult`.

    Raises:
        ValueError: if the lengths differ or an item has no reference.
    """
    if len(replies) != len(references):
        raise ValueError(f"{len(replies)} replies for {len(references)} reference lists")
    exact, f1s = 0, []
    for i, (reply, refs) in enumerate(zip(replies, references)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"item {i}: references must be a non-empty list of strings")
        exact += any(exact_match(reply, r) for r in refs)
        f1s.append(max(token_f1(reply, r) for r in refs))
    n = len(replies)
    return QAResult(
        exact_match=exact / n if n else math.nan,
        f1=sum(f1s) / n if n else math.nan,
        num_items=n,
        num_exact=exact,
        per_item_f1=tuple(f1s),
    )
