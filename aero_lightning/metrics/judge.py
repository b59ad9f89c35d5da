"""An LLM judge for open-ended answers, with AIR-Bench chat's prompt, over an OpenAI-compatible endpoint.

AIR-Bench (Yang et al., "AIR-Bench: Benchmarking Large Audio-Language Models via Generative Comprehension",
ACL 2024; https://github.com/OFA-Sys/AIR-Bench, ``score_chat.py``) scores its chat questions with GPT-4: the judge
sees a detailed description of the audio (the dataset's ``meta_info``), the question, the reference answer and the
model's answer, and rates both answers from 1 to 10. We send its prompt as lmms-eval's ``air_bench`` task does
(``lmms_eval/tasks/air_bench/utils.py``, "prompt taken from the AIR-Bench repo", which adds "Please only output the
2 required number and no text."): twice per item, the reference as assistant 1 and the reply as assistant 2, then
swapped, against position bias. A verdict is read as lmms-eval reads it: dots removed, the numbers 1..10 found as
whole words (``\\b(?:[1-9]|10)\\b``); the reply's score is the second number of the first verdict and the first of
the second, the reference's the other two. An item's score is the mean of the reply's two scores.

The endpoint is any OpenAI-compatible ``POST {base_url}/chat/completions`` (OpenAI, Azure's compatible route, vLLM,
llama.cpp's server, ...), set in the evaluation config with the model name and the *name* of the environment
variable holding the API key; the judge is off unless ``judge.enabled=true``. Failures never stop an evaluation: a
timeout, a connection error, an HTTP error after the retries, a reply that is not the API's JSON, or a verdict
without the scores is counted by reason (``failures``) and the item gets no score. lmms-eval counts such an item as
0 in its mean; we report the mean over judged items (``score``) and that convention too (``score_failed_as_zero``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

__all__ = [
    "AIR_BENCH_CHAT_PROMPT",
    "JudgeConfig",
    "JudgeError",
    "JudgeItem",
    "JudgeResult",
    "LLMJudge",
    "air_bench_prompt",
    "parse_verdict",
]

logger = logging.getLogger(__name__)

AIR_BENCH_CHAT_PROMPT = (
    "You are a helpful and precise assistant for checking the quality of the answer.\n"
    "[Detailed Audio Description]\nXAudioX\n[Question]\nXQuestionX\n"
    "[The Start of Assistant 1s Answer]\nXAssistant1X\n[The End of Assistant 1s Answer]\n"
    "[The Start of Assistant 2s Answer]\nXAssistant2X\n[The End of Assistant 2s Answer]\n[System]\n"
    "We would like to request your feedback on the performance of two AI assistants in response to the user "
    "question and audio description displayed above. AI assistants are provided with detailed audio descriptions "
    "and questions.\n"
    "Please rate the helpfulness, relevance, accuracy, and comprehensiveness of their responses. "
    "Each assistant receives an overall score on a scale of 1 to 10, where a higher score indicates better overall "
    "performance. "
    "Please output a single line containing only two values indicating the scores for Assistant 1 and 2, "
    "respectively. "
    "The two scores are separated by a space. Please only output the 2 required number and no text."
)
"""AIR-Bench chat's judging prompt (OFA-Sys/AIR-Bench ``score_chat.py``, with lmms-eval's closing sentence)."""

_SCORE = re.compile(r"\b(?:[1-9]|10)\b")


class JudgeError(Exception):
    """One judge request that failed; ``reason`` is a short code counted in :class:`JudgeResult`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def air_bench_prompt(context: str, question: str, first: str, second: str) -> str:
    """The judging prompt with the audio description, the question and the two answers filled in.

    Filled in the order lmms-eval uses (``str.replace`` of ``XAudioX``, ``XQuestionX``, ``XAssistant1X``,
    ``XAssistant2X``).
    """
    return (
        AIR_BENCH_CHAT_PROMPT.replace("XAudioX", context)
        .replace("XQuestionX", question)
        .replace("XAssistant1X", first)
        .replace("XAssistant2X", second)
    )


def parse_verdict(text: str) -> list[int]:
    """The scores 1..10 in a verdict, in order (lmms-eval's reading: dots removed, whole-word numbers)."""
    return [int(m) for m in _SCORE.findall(text.strip().replace(".", ""))]


@dataclass(frozen=True)
class JudgeConfig:
    """Where and how to ask the judge (``judge`` in ``conf/eval.yaml``).

    Attributes:
        enabled: off by default; the LLM-judge benchmarks then report token F1 and exact match only.
        base_url: the API root, e.g. ``https://api.openai.com/v1``; requests go to ``{base_url}/chat/completions``.
        model: the judge model's name (lmms-eval's AIR-Bench task uses ``gpt-4o-2024-11-20``).
        api_key_env: name of the environment variable holding the API key (sent as ``Authorization: Bearer``);
            None or an unset variable sends no key (local servers).
        timeout_s: seconds per request.
        max_retries: further tries of a request that timed out, failed to connect or got HTTP 429 / 5xx.
        retry_wait_s: seconds before the first retry, doubled for each next one.
        temperature: sampling temperature of the judge (lmms-eval: 0).
        max_tokens: the judge's reply budget.
        workers: requests in flight at once.
    """

    enabled: bool = False
    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-2024-11-20"
    api_key_env: str | None = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 2
    retry_wait_s: float = 2.0
    temperature: float = 0.0
    max_tokens: int = 1024
    workers: int = 4

    def __post_init__(self) -> None:
        if self.timeout_s <= 0 or self.max_retries < 0 or self.retry_wait_s < 0 or self.workers < 1:
            raise ValueError(
                "judge: timeout_s > 0, max_retries >= 0, retry_wait_s >= 0 and workers >= 1 required"
            )
        if self.enabled and not (self.base_url and self.model):
            raise ValueError("judge.enabled needs judge.base_url and judge.model")


@dataclass(frozen=True)
class JudgeItem:
    """One answer to judge: the audio description (``context``), the question, the reference and the reply."""

    question: str
    reference: str
    reply: str
    context: str = ""


@dataclass(frozen=True)
class JudgeResult:
    """The judge's scores over a dataset.

    Attributes:
        score: mean over judged items of the reply's score (1..10), nan when none was judged.
        reference_score: mean over the same items of the reference's score.
        score_failed_as_zero: the sum of the reply's scores over all items / items (lmms-eval's aggregation).
        num_items: items asked about.
        num_judged: items with both verdicts read.
        failures: failed items by reason (``timeout``, ``connection``, ``http_<code>``, ``bad_response``,
            ``no_scores``).
        per_item: each item's score, None where it failed.
        verdicts: each item's two raw verdicts (empty strings where a request failed).
        model: the model name the endpoint reported.
    """

    score: float
    reference_score: float
    score_failed_as_zero: float
    num_items: int
    num_judged: int
    failures: dict[str, int] = field(default_factory=dict)
    per_item: list[float | None] = field(default_factory=list)
    verdicts: list[tuple[str, str]] = field(default_factory=list)
    model: str = ""

    def to_dict(self) -> dict:
        return {
            "score": self.score,
            "reference_score": self.reference_score,
            "score_failed_as_zero": self.score_failed_as_zero,
            "num_items": self.num_items,
            "num_judged": self.num_judged,
            "failures": dict(self.failures),
            "model": self.model,
        }


class LLMJudge:
    """Scores open-ended answers with an LLM over an OpenAI-compatible chat-completions endpoint.

    Args:
        config: :class:`JudgeConfig` or a mapping of its fields.
        sleep: the wait between retries (replaced in tests).
    """

    def __init__(self, config: JudgeConfig | Mapping, sleep=time.sleep):
        self.config = config if isinstance(config, JudgeConfig) else JudgeConfig(**dict(config))
        self._sleep = sleep

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        env = self.config.api_key_env
        key = os.environ.get(env) if env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _post(self, content: str) -> tuple[str, str]:
        """One request; returns (verdict text, model name). Raises :class:`JudgeError`."""
        payload = {
            "model": self.config.model,
            "messages": [{"role": "user", "content": content}],
            "temperature": self.config.temperature,
            "max_tokens": self.config.max_tokens,
        }
        request = urllib.request.Request(
            self.config.base_url.rstrip("/") + "/chat/completions",
            data=json.dumps(payload).encode("utf-8"),
            headers=self._headers(),
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_s) as response:
                body = response.read()
        except urllib.error.HTTPError as err:
            raise JudgeError(f"http_{err.code}", str(err.reason)) from None
        except TimeoutError as err:
            raise JudgeError("timeout", str(err)) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise JudgeError("timeout", str(err.reason)) from None
            raise JudgeError("connection", str(err.reason)) from None
        except (OSError, ValueError) as err:  # a connection reset mid-body, a malformed URL
            raise JudgeError("connection", f"{type(err).__name__}: {err}") from None
        try:
            data = json.loads(body)
            text = data["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError(f"content is {type(text).__name__}")
        except (ValueError, KeyError, IndexError, TypeError) as err:
            raise JudgeError("bad_response", f"{type(err).__name__}: {err}; body {body[:200]!r}") from None
        return text.strip(), str(data.get("model", ""))

    def ask(self, content: str) -> tuple[str, str]:
        """Send one prompt, retrying timeouts, connection errors and HTTP 429 / 5xx.

        Returns:
            ``(verdict, model)``.

        Raises:
            JudgeError: when every try failed, or at once for other HTTP errors and malformed replies.
        """
        wait = self.config.retry_wait_s
        for attempt in range(self.config.max_retries + 1):
            try:
                return self._post(content)
            except JudgeError as err:
                retry = err.reason in ("timeout", "connection", "http_429") or err.reason.startswith("http_5")
                if not retry or attempt == self.config.max_retries:
                    raise
                logger.info("judge request failed (%s), retry %d in %.1f s", err, attempt + 1, wait)
                self._sleep(wait)
                wait *= 2
        raise AssertionError("unreachable")

    def _judge_one(
        self, item: JudgeItem
    ) -> tuple[float | None, float | None, tuple[str, str], str, str | None]:
        verdicts = ["", ""]
        model = ""
        try:
            verdicts[0], model = self.ask(
                air_bench_prompt(item.context, item.question, item.reference, item.reply)
            )
            verdicts[1], _ = self.ask(
                air_bench_prompt(item.context, item.question, item.reply, item.reference)
            )
        except JudgeError as err:
            logger.warning("judge: %s", err)
            return None, None, (verdicts[0], verdicts[1]), model, err.reason
        first, second = parse_verdict(verdicts[0]), parse_verdict(verdicts[1])
        if len(first) < 2 or len(second) < 1:
            logger.warning("judge: no scores in the verdicts %r / %r", verdicts[0][:100], verdicts[1][:100])
            return None, None, (verdicts[0], verdicts[1]), model, "no_scores"
        reference = (first[0] + second[1]) / 2 if len(second) > 1 else float(first[0])
        return (first[1] + second[0]) / 2, reference, (verdicts[0], verdicts[1]), model, None

    def judge(self, items: Sequence[JudgeItem]) -> JudgeResult:
        """Judge every item (``workers`` requests at a time); never raises for a failed request.

        Returns:
            :class:`JudgeResult`.
        """
        with ThreadPoolExecutor(max_workers=self.config.workers) as pool:
            outcomes = list(pool.map(self._judge_one, items))
        scores = [o[0] for o in outcomes]
        refs = [o[1] for o in outcomes if o[1] is not None]
        judged = [s for s in scores if s is not None]
        failures = Counter(o[4] for o in outcomes if o[4] is not None)
        n = len(items)
        return JudgeResult(
            score=sum(judged) / len(judged) if judged else math.nan,
            reference_score=sum(refs) / len(refs) if refs else math.nan,
            score_failed_as_zero=sum(judged) / n if n else math.nan,
            num_items=n,
            num_judged=len(judged),
            failures=dict(sorted(failures.items())),
            per_item=scores,
            verdicts=[o[2] for o in outcomes],
            model=next((o[3] for o in outcomes if o[3]), ""),
        )
