"""The LLM judge against a local fake OpenAI-compatible server (http.server in a thread, canned verdicts): the
AIR-Bench prompt it sends, how verdicts are read, and failures counted, never raised."""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from aero_lightning.metrics.judge import (
    AIR_BENCH_CHAT_PROMPT,
    JudgeConfig,
    JudgeItem,
    LLMJudge,
    air_bench_prompt,
    parse_verdict,
)

# canned verdicts by reply text: (reference as assistant 1, reply as assistant 1)
VERDICTS = {
    "good": ("9 7", "8 9"),
    "terse": ("10 3.", "Scores: 2 10"),
    "refuses": ("I cannot rate this.", ""),
}


class FakeJudge(BaseHTTPRequestHandler):
    requests: list[dict] = []
    failures_left: dict[str, int] = {}

    def log_message(self, *args):  # keep the test output clean
        pass

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeJudge.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **payload})
        content = payload["messages"][0]["content"]
        first = content.split("[The Start of Assistant 1s Answer]\n")[1].split("\n")[0]
        second = content.split("[The Start of Assistant 2s Answer]\n")[1].split("\n")[0]
        reply = second if first == "REF" else first
        if reply == "slow":
            time.sleep(1.0)
        if reply == "flaky" and FakeJudge.failures_left.get(reply, 0) > 0:
            FakeJudge.failures_left[reply] -= 1
            return self._send(503, b'{"error": "overloaded"}')
        if reply == "broken":
            return self._send(200, b"<html>not json</html>")
        if reply == "forbidden":
            return self._send(403, b'{"error": "no"}')
        verdict = VERDICTS.get(reply, ("8 6", "6 8"))[0 if first == "REF" else 1]
        body = {"model": "fake-judge-1", "choices": [{"message": {"role": "assistant", "content": verdict}}]}
        self._send(200, json.dumps(body).encode())


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # the judge hung up on the slow reply: expected
        pass


@pytest.fixture
def server():
    FakeJudge.requests = []
    FakeJudge.failures_left = {"flaky": 1}
    httpd = QuietServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def _judge(url: str, **kw) -> LLMJudge:
    config = JudgeConfig(enabled=True, base_url=url, model="judge-x", api_key_env="AERO_TEST_JUDGE_KEY",
                         timeout_s=0.5, max_retries=1, retry_wait_s=0.0, workers=2, **kw)  # fmt: skip
    return LLMJudge(config, sleep=lambda s: None)


def test_prompt_is_air_bench_chat_filled_in_order():
    assert AIR_BENCH_CHAT_PROMPT.startswith(
        "You are a helpful and precise assistant for checking the quality"
    )
    text = air_bench_prompt("a dog barks twice", "What animal?", "A dog.", "A cat.")
    assert "[Detailed Audio Description]\na dog barks twice\n[Question]\nWhat animal?\n" in text
    assert "[The Start of Assistant 1s Answer]\nA dog.\n[The End of Assistant 1s Answer]" in text
    assert "[The Start of Assistant 2s Answer]\nA cat.\n[The End of Assistant 2s Answer]" in text
    assert text.endswith("Please only output the 2 required number and no text.")
    # lmms-eval's reading: dots dropped, whole-word 1..10 (11 and 0 are not scores)
    assert parse_verdict("7. 9.") == [7, 9] and parse_verdict("11 0 10 x5") == [10]


def test_judge_scores_swapped_pairs_and_sends_the_request(server, monkeypatch):
    monkeypatch.setenv("AERO_TEST_JUDGE_KEY", "sk-test")
    items = [JudgeItem("What is heard?", "REF", reply, "a dog barks") for reply in ("good", "terse")]
    result = _judge(server).judge(items)
    # good: reference first "9 7" -> reply 7; reply first "8 9" -> reply 8: (7 + 8) / 2 = 7.5; reference (9 + 9) / 2
    # terse: "10 3." -> 3; "Scores: 2 10" -> 2: 2.5; reference (10 + 10) / 2 = 10
    assert result.per_item == [7.5, 2.5]
    assert result.score == pytest.approx(5.0) and result.reference_score == pytest.approx(9.5)
    assert result.num_judged == 2 and result.failures == {} and result.model == "fake-judge-1"
    assert len(FakeJudge.requests) == 4
    request = FakeJudge.requests[0]
    assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test"
    assert request["model"] == "judge-x" and request["temperature"] == 0.0 and request["max_tokens"] == 1024
    sent = sorted(
        r["messages"][0]["content"] for r in FakeJudge.requests if "good" in r["messages"][0]["content"]
    )
    assert sent == sorted(
        [air_bench_prompt("a dog barks", "What is heard?", "REF", "good"),
         air_bench_prompt("a dog barks", "What is heard?", "good", "REF")]
    )  # fmt: skip


def test_failures_are_counted_not_raised(server, monkeypatch):
    monkeypatch.delenv("AERO_TEST_JUDGE_KEY", raising=False)  # no key: no Authorization header
    replies = ["good", "refuses", "broken", "slow", "forbidden", "flaky"]
    result = _judge(server).judge([JudgeItem("Q?", "REF", r) for r in replies])
    # refuses: no scores in the verdict; broken: HTTP 200 with a body that is not the API's JSON; slow: over the
    # 0.5 s timeout on both tries; forbidden: HTTP 403, not retried; flaky: one 503, then answered on the retry
    assert result.failures == {"bad_response": 1, "http_403": 1, "no_scores": 1, "timeout": 1}
    assert result.per_item == [7.5, None, None, None, None, 6.0]  # flaky: default "8 6" -> 6, "6 8" -> 6
    assert result.num_items == 6 and result.num_judged == 2
    assert result.score == pytest.approx(6.75)
    assert result.score_failed_as_zero == pytest.approx((7.5 + 6.0) / 6)  # lmms-eval's aggregation
    assert all(r["auth"] is None for r in FakeJudge.requests)
    assert (
        sum(1 for r in FakeJudge.requests if "\nslow\n" in r["messages"][0]["content"]) == 2
    )  # retried once


def test_unreachable_endpoint_and_bad_config():
    judge = _judge("http://127.0.0.1:9/v1")  # the discard port: connection refused
    result = judge.judge([JudgeItem("Q?", "REF", "good")])
    assert result.failures == {"connection": 1} and math.isnan(result.score)
    with pytest.raises(ValueError, match="workers"):
        JudgeConfig(workers=0)
    with pytest.raises(ValueError, match="base_url"):
        JudgeConfig(enabled=True, base_url="")
