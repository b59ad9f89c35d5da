"""Accuracy for multiple-choice audio question answering (MMAU, AIR-Bench foundation) and free-form classification.

The prompt lists the options as ``A. ...``, ``B. ...`` and asks for the letter (lmms-eval's MMAU and AIR-Bench
tasks: "Answer with the option's letter from the given choices directly."). A reply is mapped to an option by, in
order: a parenthesised letter ``(B)``; a letter standing alone (``B``, ``B.``, ``B)``, ``answer: B``) — the last one
if several; the reply equal to one option's text (case and punctuation ignored); exactly one option's text
contained in the reply. Otherwise the reply is *unparsed* and scored wrong. lmms-eval instead picks a random
letter for unparsed replies (``parse_multi_choice_response``), which adds chance-level noise; we count them
(``num_unparsed``) so the difference is visible.

Free-form classification (``classify`` benchmarks: sound events, emotions, genres, voices) scores a reply against
a label set (the benchmark's labels, or every reference label of the dataset when it names none). A reply names a
label by, in order:

1. *exact label*: the normalised reply (lower case, punctuation removed, whitespace collapsed) equals one
   normalised label;
2. *extraction*, after lmms-eval's rule for free-form classification (``lmms_eval/tasks/vocalsound/utils.py``,
   ``get_answer``: the label whose lower-cased name occurs in the lower-cased reply): the labels whose normalised
   text occurs in the normalised reply as whole words; a matched label inside a longer matched one ("throat"
   inside "throat clearing") is dropped; exactly one remaining label is the answer.

Two differences from lmms-eval, both to keep a reply from being credited by accident: it matches substrings
("cough" inside "coughing", "sigh" inside "sighted") and, when several labels occur, takes the first in its
class list's order; we match whole words and count a reply naming several labels as *unparsed* (scored wrong,
``num_unparsed``). An item is correct when the label it names is one of its references.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

__all__ = [
    "ChoiceResult",
    "ClassifyResult",
    "choice_accuracy",
    "classify_accuracy",
    "format_choices",
    "match_label",
    "parse_choice",
]

LETTERS = string.ascii_uppercase


def format_choices(question: str, choices: Sequence[str], instruction: str = "") -> str:
    """``question`` followed by ``A. choice`` lines and an optional instruction line.

    Raises:
        ValueError: for fewer than 2 or more than 26 options.
    """
    if not 2 <= len(choices) <= len(LETTERS):
        raise ValueError(f"a multiple-choice item needs 2..26 options, got {len(choices)}")
    lines = [question.strip(), *(f"{LETTERS[i]}. {c}" for i, c in enumerate(choices))]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


def _norm(text: str) -> str:
    return " ".join(text.lower().translate(str.maketrans("", "", string.punctuation)).split())


def parse_choice(reply: str, choices: Sequence[str]) -> int | None:
    """Index of the option a reply names, or None (rules in the module docstring).

    Args:
        reply: the model's text.
        choices: the option texts, in letter order.

    Returns:
        0-based option index, or None if the reply names no option unambiguously.
    """
    letters = LETTERS[: len(choices)]
    text = reply.strip()
    paren = [m.group(1) for m in re.finditer(rf"\(([{letters}])\)", text)]
    if paren:
        return letters.index(paren[-1])
    alone = [m.group(1) for m in re.finditer(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", text)]
    # a lone capital "A" inside a sentence ("A dog barks") is an article, not an answer: only accept it when the
    # reply is short or the letter is followed by '.', ')' or ':'
    strict = [m.group(1) for m in re.finditer(rf"(?<![A-Za-z])([{letters}])(?:[.):]|$)", text)]
    if strict:
        return letters.index(strict[-1])
    if alone and len(text.split()) <= 2:
        return letters.index(alone[-1])
    norm_reply = _norm(text)
    norm_choices = [_norm(c) for c in choices]
    for i, c in enumerate(norm_choices):
        if c and norm_reply == c:
            return i
    contained = [i for i, c in enumerate(norm_choices) if c and re.search(rf"\b{re.escape(c)}\b", norm_reply)]
    if len(contained) == 1:
        return contained[0]
    return None


@dataclass(frozen=True)
class ChoiceResult:
    """Accuracy of one multiple-choice dataset.

    Attributes:
        accuracy: ``num_correct / num_items`` (nan for no items).
        num_correct: items whose parsed option is the answer.
        num_items: items scored.
        num_unparsed: replies that named no option (scored wrong).
        per_group: ``{group: accuracy}`` when groups were given (MMAU task, AIR-Bench task name).
    """

    accuracy: float
    num_correct: int
    num_items: int
    num_unparsed: int
    per_group: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def choice_accuracy(
    replies: Sequence[str],
    choices: Sequence[Sequence[str]],
    answers: Sequence[int],
    groups: Sequence[str] | None = None,
) -> ChoiceResult:
    """Score replies against the correct option indices.

    Args:
        replies: model texts.
        choices: the options of each item.
        answers: 0-based index of each item's correct option.
        groups: optional category per item, for per-group accuracy.

    Returns:
        :class:`ChoiceResult`.

    Raises:
        ValueError: if the lengths differ or an answer index is out of range.
    """
    if not (len(replies) == len(choices) == len(answers)) or (
        groups is not None and len(groups) != len(replies)
    ):
        raise ValueError("replies, choices, answers (and groups) must have the same length")
    correct = unparsed = 0
    by_group: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for i, (reply, opts, answer) in enumerate(zip(replies, choices, answers)):
        if not 0 <= answer < len(opts):
            raise ValueError(f"item {i}: answer index {answer} outside its {len(opts)} options")
        picked = parse_choice(reply, opts)
        hit = picked == answer
        correct += hit
        unparsed += picked is None
        if groups is not None:
            by_group[groups[i]][0] += hit
            by_group[groups[i]][1] += 1
    n = len(replies)
    return ChoiceResult(
        accuracy=correct / n if n else float("nan"),
        num_correct=correct,
        num_items=n,
        num_unparsed=unparsed,
        per_group={g: c / t for g, (c, t) in sorted(by_group.items())},
    )


def _contains(text: str, phrase: str) -> bool:
    return bool(phrase) and re.search(rf"(?<!\S){re.escape(phrase)}(?!\S)", text) is not None


def match_label(reply: str, labels: Sequence[str]) -> str | None:
    """The label a free-form reply names, or None (rules in the module docstring).

    Args:
        reply: the model's text.
        labels: the label set.

    Returns:
        One of ``labels`` (as given), or None when the reply names none or several.
    """
    norm_reply = _norm(reply)
    by_norm: dict[str, str] = {}
    for label in labels:
        by_norm.setdefault(_norm(label), label)
    by_norm.pop("", None)
    if norm_reply in by_norm:
        return by_norm[norm_reply]
    found = [n for n in by_norm if _contains(norm_reply, n)]
    found = [n for n in found if not any(o != n and _contains(o, n) for o in found)]
    return by_norm[found[0]] if len(found) == 1 else None


@dataclass(frozen=True)
class ClassifyResult:
    """Accuracy of one free-form classification dataset.

    Attributes:
        accuracy: ``num_correct / num_items`` (nan for no items).
        num_correct: items whose named label is one of their references.
        num_items: items scored.
        num_unparsed: replies that named no label or several (scored wrong).
        num_labels: size of the label set.
        per_group: ``{group: accuracy}`` when groups were given.
    """

    accuracy: float
    num_correct: int
    num_items: int
    num_unparsed: int
    num_labels: int
    per_group: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def classify_accuracy(
    replies: Sequence[str],
    references: Sequence[Sequence[str]],
    labels: Sequence[str] | None = None,
    groups: Sequence[str] | None = None,
) -> ClassifyResult:
    """Score free-form replies against reference labels.

    Args:
        replies: model texts.
        references: each item's correct label(s).
        labels: the label set; None: every reference label of the dataset.
        groups: optional category per item, for per-group accuracy.

    Returns:
        :class:`ClassifyResult`.

    Raises:
        ValueError: if the lengths differ or an item has no reference.
    """
    if len(replies) != len(references) or (groups is not None and len(groups) != len(replies)):
        raise ValueError("replies, references (and groups) must have the same length")
    if any(isinstance(r, str) or not r for r in references):
        raise ValueError("each item needs a non-empty list of reference labels")
    label_set = list(labels) if labels else sorted({r for refs in references for r in refs})
    correct = unparsed = 0
    by_group: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for i, (reply, refs) in enumerate(zip(replies, references)):
        picked = match_label(reply, label_set)
        hit = picked is not None and _norm(picked) in {_norm(r) for r in refs}
        correct += hit
        unparsed += picked is None
        if groups is not None:
            by_group[groups[i]][0] += hit
            by_group[groups[i]][1] += 1
    n = len(replies)
    return ClassifyResult(
        accuracy=correct / n if n else float("nan"),
        num_correct=correct,
        num_items=n,
        num_unparsed=unparsed,
        num_labels=len({_norm(label) for label in label_set} - {""}),
        per_group={g: c / t for g, (c, t) in sorted(by_group.items())},
    )
