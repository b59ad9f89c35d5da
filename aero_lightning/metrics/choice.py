"""Multiple-choice accuracy for audio question answering (MMAU, AIR-Bench foundation).

The prompt lists the options as ``A. ...``, ``B. ...`` and asks for the letter (lmms-eval's MMAU and AIR-Bench
tasks: "Answer with the option's letter from the given choices directly."). A reply is mapped to an option by, in
order: a parenthesised letter ``(B)``; a letter standing alone (``B``, ``B.``, ``B)``, ``answer: B``) — the last one
if several; the reply equal to one option's text (case and punctuation ignored); exactly one option's text
contained in the reply. Otherwise the reply is *unparsed* and scored wrong. lmms-eval instead picks a random
letter for unparsed replies (``parse_multi_choice_response``), which adds chance-level noise; we count them
(``num_unparsed``) so the difference is visible.
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

__all__ = ["ChoiceResult", "choice_accuracy", "format_choices", "parse_choice"]

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
