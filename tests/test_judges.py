"""Win-rate judges: the paper's judging prompts and their parsing, the reward judge, the LLM judge against a local
chat-completions server (retries, failures, the verdict cache and resuming after an interruption), the win rate with
its Wilson interval, and the plot."""

import http.server
import json
import logging
import math
import re
import socket
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpo_jax import judges
from dpo_jax.errors import UserError
from dpo_jax.judges import FIRST, LOSS, SECOND, TIE, WIN, Comparison, JudgeError, LLMJudge, RewardJudge

KEY_ENV = "DPO_JAX_TEST_JUDGE_KEY"
KEY = "test-key-123"


def comparison(i):
    """Comparison i; the scripted judge prefers the first response unless i is a multiple of 3."""
    return Comparison(prompt=f"post number {i}", first=f"summary {i}a", second=f"summary {i}b")


def expected_verdict(i):
    return SECOND if i % 3 == 0 else FIRST


def chat_response(content):
    return 200, {}, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})


def good_answer(payload):
    """The paper's answer format, deciding by the comparison's number found in the prompt."""
    i = int(re.search(r"post number (\d+)", payload["messages"][0]["content"]).group(1))
    label = "A" if expected_verdict(i) == FIRST else "B"
    return chat_response(f"Comparison: summary {label} is more precise.\nPreferred: {label}\n"
                         f"More helpful: {label}")


class JudgeServer:
    """A chat-completions endpoint on 127.0.0.1: `respond(payload) -> (status, headers, body)` answers each request,
    and every request's headers and JSON payload are recorded."""

    def __init__(self):
        self.respond = good_answer
        self.requests = []
        self.lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append((dict(self.headers), payload))
                status, headers, body = server.respond(payload)
                try:
                    self.send_response(status)
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body.encode())))
                    self.end_headers()
                    self.wfile.write(body.encode())
                except ConnectionError:  # the client timed out and hung up
                    pass

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1/chat/completions"

    def reset(self, respond=good_answer):
        self.respond, self.requests = respond, []

    def prompts(self):
        return [payload["messages"][0]["content"] for _, payload in self.requests]


@pytest.fixture(scope="module")
def module_server():
    server = JudgeServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    yield server
    server.httpd.shutdown()
    server.httpd.server_close()


@pytest.fixture
def server(module_server, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    module_server.reset()
    return module_server


def make_judge(server, task="tldr", **overrides):
    settings = dict(task=task, api_key_env=KEY_ENV, max_concurrency=4, backoff_seconds=0.001, timeout_seconds=5.0)
    return LLMJudge(server.url, "judge-model", **{**settings, **overrides})


def scripted(*statuses, then=good_answer):
    """Answer the first requests with these HTTP statuses (429 with Retry-After: 0), then as `then` does."""
    remaining, lock = list(statuses), threading.Lock()

    def respond(payload):
        with lock:
            status = remaining.pop(0) if remaining else None
        if status is None:
            return then(payload)
        return status, {"Retry-After": "0"} if status == 429 else {}, json.dumps({"error": f"scripted {status}"})

    return respond


# The paper's prompts and their answers.

def test_judging_prompts_are_the_papers():
    texts = Comparison(prompt="My cat ate my homework.", first="Cat ate it.", second="Homework gone.")
    assert judges.judging_prompt("tldr", texts) == (
        "Which of the following summaries does a better job of summarizing the most important points in the given "
        "forum post, without including unimportant or irrelevant details? A good summary is both precise and "
        "concise.\n\nPost:\nMy cat ate my homework.\n\nSummary A:\nCat ate it.\n\nSummary B:\nHomework gone.\n\n"
        "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, "
        'on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:\n'
        'Comparison: <one-sentence comparison and explanation>\nPreferred: <"A" or "B">')
    assert judges.judging_prompt("hh", texts) == (
        "For the following query to a chatbot, which response is more helpful?\n\nQuery: My cat ate my homework.\n\n"
        "Response A:\nCat ate it.\n\nResponse B:\nHomework gone.\n\n"
        "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. "
        'SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. Your response '
        'should use the format:\nComparison: <one-sentence comparison and explanation>\nMore helpful: <"A" or "B">')


def test_unknown_task_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"'hh', 'tldr'"):
        judges.judging_prompt("imdb", comparison(0))
    with pytest.raises(ValueError, match="imdb"):
        judges.parse_verdict("imdb", "Preferred: A")


@pytest.mark.parametrize("text, verdict", [
    ("Comparison: A is shorter.\nPreferred: A", FIRST),
    ("Comparison: B keeps the key point.\nPreferred: B", SECOND),
    ('Comparison: x\npreferred: "B".', SECOND),
    ("PREFERRED:   'a'  ", FIRST),
    ("**Preferred:** A", FIRST),
    ("Preferred: A\nOn reflection.\nPreferred: B", SECOND),  # the last verdict line counts
    ("Comparison: both are fine.", None),
    ("Preferred: C", None),
    ("Preferred: A and B", None),
    ("Preferred: A or B", None),
    ("Preferred:", None),
    ("", None),
    ("I prefer A.", None),
    ("More helpful: A", None),  # the other task's line
])
def test_parse_tldr_verdicts(text, verdict):
    assert judges.parse_verdict("tldr", text) == verdict


@pytest.mark.parametrize("text, verdict", [
    ("Comparison: A answers the question.\nMore helpful: A", FIRST),
    ("Comparison: B is kinder.\nmore HELPFUL: \"B\".", SECOND),
    ("More helpful: neither", None),
    ("More helpful: AB", None),
    ("Preferred: A", None),
    ("Comparison: only a comparison.", None),
])
def test_parse_hh_verdicts(text, verdict):
    assert judges.parse_verdict("hh", text) == verdict


@given(st.text(), st.sampled_from(["A", "B"]))
def test_a_final_verdict_line_decides_whatever_came_before(text, label):
    assert judges.parse_verdict("tldr", text) in (FIRST, SECOND, None)
    assert judges.parse_verdict("tldr", f"{text}\nPreferred: {label}") == (FIRST if label == "A" else SECOND)


# The reward judge.

def test_reward_judge_higher_wins_equal_ties_one_call_per_side():
    calls = []

    def reward(prompts, responses):
        calls.append((list(prompts), list(responses)))
        return np.array([float(len(response)) if response != "nan" else np.nan for response in responses])

    pairs = [Comparison("p0", "long answer", "short"), Comparison("p1", "ab", "abcd"), Comparison("p2", "xy", "zw"),
             Comparison("p3", "nan", "x")]
    assert RewardJudge(reward).judge(pairs) == [FIRST, SECOND, TIE, None]
    assert calls == [(["p0", "p1", "p2", "p3"], ["long answer", "ab", "xy", "nan"]),
                     (["p0", "p1", "p2", "p3"], ["short", "abcd", "zw", "x"])]
    assert RewardJudge(reward).judge([]) == [] and len(calls) == 2
    assert RewardJudge.name == "reward"


# The LLM judge.

@pytest.mark.parametrize("task", ["tldr", "hh"])
def test_llm_judge_sends_the_papers_prompt_and_reads_the_verdicts(server, task):
    pairs = [comparison(i) for i in range(7)]
    judge = make_judge(server, task=task)
    assert judge.judge(pairs) == [expected_verdict(i) for i in range(7)]
    for headers, payload in server.requests:
        assert headers["Authorization"] == f"Bearer {KEY}"
        assert payload["model"] == "judge-model" and payload["temperature"] == 0.0
        assert [message["role"] for message in payload["messages"]] == ["user"]
    assert sorted(server.prompts()) == sorted(judges.judging_prompt(task, pair) for pair in pairs)
    opening = "Post:\npost number 3\n\nSummary A:\nsummary 3a\n\nSummary B:\nsummary 3b" if task == "tldr" else \
        "Query: post number 3\n\nResponse A:\nsummary 3a\n\nResponse B:\nsummary 3b"
    assert any(opening in prompt for prompt in server.prompts())
    assert judge.stats == {"requests": 7, "retries": 0, "cached": 0, "unparseable": 0}


def test_llm_judge_keeps_the_input_order_when_answers_arrive_out_of_order(server):
    def slower_for_earlier(payload):
        i = int(re.search(r"post number (\d+)", payload["messages"][0]["content"]).group(1))
        time.sleep(0.02 * (8 - i))
        return good_answer(payload)

    server.reset(slower_for_earlier)
    assert make_judge(server, max_concurrency=8).judge([comparison(i) for i in range(8)]) == \
        [expected_verdict(i) for i in range(8)]


def test_malformed_answers_are_none_and_counted(server):
    answers = {0: chat_response("Comparison: both are good.\nPreferred: C"), 1: chat_response("No verdict here."),
               2: (200, {}, "this is not json"), 3: (200, {}, json.dumps({"choices": []})),
               4: (200, {}, json.dumps({"choices": [{"message": {"content": None}}]}))}

    def respond(payload):
        i = int(re.search(r"post number (\d+)", payload["messages"][0]["content"]).group(1))
        return answers.get(i) or good_answer(payload)

    server.reset(respond)
    judge = make_judge(server)
    assert judge.judge([comparison(i) for i in range(6)]) == [None] * 5 + [expected_verdict(5)]
    assert judge.stats == {"requests": 6, "retries": 0, "cached": 0, "unparseable": 5}


def test_429_and_500_are_retried(server):
    server.reset(scripted(429, 500))
    judge = make_judge(server, max_concurrency=1)
    assert judge.judge([comparison(1)]) == [FIRST]
    assert judge.stats["requests"] == 3 and judge.stats["retries"] == 2


def test_retry_after_is_honoured_over_the_backoff(server):
    server.reset(scripted(429))  # Retry-After: 0, while the exponential backoff would wait 30 s
    start = time.monotonic()
    assert make_judge(server, backoff_seconds=30.0).judge([comparison(1)]) == [FIRST]
    assert time.monotonic() - start < 5


def test_a_timeout_is_retried(server):
    def slow_first(payload, answered=[]):
        if not answered:
            answered.append(True)
            time.sleep(0.5)
        return good_answer(payload)

    server.reset(slow_first)
    judge = make_judge(server, timeout_seconds=0.2)
    assert judge.judge([comparison(2)]) == [FIRST]
    assert judge.stats["retries"] == 1


def test_persistent_500_fails_naming_url_status_and_attempts(server):
    server.reset(lambda payload: (500, {}, "overloaded"))
    with pytest.raises(JudgeError, match=r"still failing after 3 attempts: HTTP 500") as failure:
        make_judge(server, max_retries=2, max_concurrency=1).judge([comparison(1)])
    assert server.url in str(failure.value) and len(server.requests) == 3
    assert isinstance(failure.value, UserError)  # the CLI reports it in one line


def test_connection_errors_are_retried_then_fail(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}/v1/chat/completions"
    judge = LLMJudge(url, "m", task="tldr", api_key_env=KEY_ENV, max_retries=2, backoff_seconds=0.001)
    with pytest.raises(JudgeError, match="after 3 attempts"):
        judge.judge([comparison(1)])
    assert judge.stats["retries"] == 2


def test_401_fails_at_once_with_the_body(server):
    server.reset(lambda payload: (401, {}, json.dumps({"error": "Incorrect API key provided"})))
    with pytest.raises(JudgeError, match=r"HTTP 401.*Incorrect API key"):
        make_judge(server, max_concurrency=1).judge([comparison(1)])
    assert len(server.requests) == 1


def test_a_missing_api_key_fails_at_construction_naming_the_variable(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(JudgeError, match=KEY_ENV):
        make_judge(server)
    assert server.requests == []


def test_an_interrupted_run_resumes_asking_only_what_is_unanswered(server, tmp_path):
    cache = str(tmp_path / "verdicts.jsonl")
    pairs = [comparison(i) for i in range(10)]
    answered, lock = [], threading.Lock()

    def fail_after_four(payload):  # the service answers four requests, then breaks for good
        with lock:
            if len(answered) == 4:
                return 500, {}, "down"
            answered.append(payload["messages"][0]["content"])
        return good_answer(payload)

    server.reset(fail_after_four)
    with pytest.raises(JudgeError, match="HTTP 500"):
        make_judge(server, cache_path=cache, max_retries=3).judge(pairs)
    with open(cache) as lines:
        assert len(lines.readlines()) == 4

    server.reset()
    judge = make_judge(server, cache_path=cache)
    assert judge.judge(pairs) == [expected_verdict(i) for i in range(10)]
    assert len(server.requests) == 6 and not set(server.prompts()) & set(answered)
    assert judge.stats["cached"] == 4 and judge.stats["requests"] == 6
    assert judge.judge(pairs) == [expected_verdict(i) for i in range(10)] and len(server.requests) == 6


def test_a_torn_last_cache_line_is_dropped_with_a_warning(server, tmp_path, caplog):
    cache = tmp_path / "verdicts.jsonl"
    pairs = [comparison(i) for i in range(3)]
    make_judge(server, cache_path=str(cache), max_concurrency=1).judge(pairs)
    text = cache.read_text()
    cache.write_text(text[: len(text) - len(text.splitlines()[-1]) // 2 - 1])  # killed halfway through the last line

    server.reset()
    with caplog.at_level(logging.WARNING):
        judge = make_judge(server, cache_path=str(cache))
    assert "torn last line" in caplog.text
    assert judge.judge(pairs) == [expected_verdict(i) for i in range(3)]
    assert len(server.requests) == 1 and judge.stats["cached"] == 2
    assert [json.loads(line)["verdict"] for line in cache.read_text().splitlines()] == \
        [expected_verdict(i) for i in range(3)]


def test_unparseable_verdicts_are_cached_and_the_key_includes_the_model(server, tmp_path):
    cache = str(tmp_path / "judge" / "verdicts.jsonl")  # its folder is created
    server.reset(lambda payload: chat_response("I cannot decide."))
    assert make_judge(server, cache_path=cache).judge([comparison(1)]) == [None]
    server.reset()
    resumed = make_judge(server, cache_path=cache)
    assert resumed.judge([comparison(1)]) == [None] and server.requests == []
    assert resumed.stats == {"requests": 0, "retries": 0, "cached": 1, "unparseable": 1}
    other_model = LLMJudge(server.url, "another-model", task="tldr", api_key_env=KEY_ENV, cache_path=cache)
    assert other_model.judge([comparison(1)]) == [FIRST] and len(server.requests) == 1


# Win rates.

def test_win_rate_and_its_wilson_interval_by_hand():
    verdicts = [WIN] * 7 + [LOSS] * 2 + [TIE] + [None]
    result = judges.win_rate(verdicts)
    z = 1.959963984540054
    # p = (7 + 1/2) / 10 = 0.75 over n = 10 parseable verdicts.
    # Wilson: (p + z²/2n ± z·√(p(1−p)/n + z²/4n²)) / (1 + z²/n), with p = 0.75 and n = 10 substituted:
    center = (0.75 + z**2 / 20) / (1 + z**2 / 10)
    half_width = z * math.sqrt(0.75 * 0.25 / 10 + z**2 / 400) / (1 + z**2 / 10)
    assert {key: result[key] for key in ("wins", "losses", "ties", "unparseable", "n")} == \
        {"wins": 7, "losses": 2, "ties": 1, "unparseable": 1, "n": 10}
    assert result["win_rate"] == 0.75
    assert result["ci_low"] == pytest.approx(center - half_width, abs=1e-12)
    assert result["ci_high"] == pytest.approx(center + half_width, abs=1e-12)
    # The Wilson bounds are the rates q whose normal test accepts p: (p − q)² = z²·q(1 − q)/n.
    for q in (result["ci_low"], result["ci_high"]):
        assert (0.75 - q) ** 2 == pytest.approx(z**2 * q * (1 - q) / 10, abs=1e-12)
    assert 0.40 < result["ci_low"] < 0.45 and 0.91 < result["ci_high"] < 0.93


def test_win_rate_with_nothing_parseable_is_nan():
    result = judges.win_rate([None, None])
    assert result["n"] == 0 and result["unparseable"] == 2
    assert all(math.isnan(result[key]) for key in ("win_rate", "ci_low", "ci_high"))
    with pytest.raises(ValueError, match="first"):
        judges.win_rate([FIRST])  # positional verdicts must be oriented first


@given(st.lists(st.sampled_from([WIN, LOSS, TIE, None]), min_size=1, max_size=60))
def test_the_interval_holds_the_rate(verdicts):
    result = judges.win_rate(verdicts)
    if result["n"]:
        assert 0 <= result["ci_low"] <= result["win_rate"] <= result["ci_high"] <= 1


def test_orient():
    assert [judges.orient(verdict, True) for verdict in (FIRST, SECOND, TIE, None)] == [WIN, LOSS, TIE, None]
    assert [judges.orient(verdict, False) for verdict in (FIRST, SECOND, TIE, None)] == [LOSS, WIN, TIE, None]
    with pytest.raises(ValueError):
        judges.orient(WIN, True)


def test_plot_win_rates_writes_a_png(tmp_path):
    point = lambda t, rate: {"temperature": t, **{k: judges.win_rate([WIN] * rate + [LOSS] * (10 - rate))[k]
                                                  for k in ("win_rate", "ci_low", "ci_high")}}
    curves = {"DPO vs reference": [point(0.25, 6), point(0.0, 7), point(1.0, 4)],
              "PPO vs reference": [point(0.0, 5), point(0.25, 6), point(1.0, 2)],
              "nothing parseable": [{"temperature": 0.0, "win_rate": math.nan, "ci_low": math.nan,
                                     "ci_high": math.nan}]}
    path = judges.plot_win_rates(curves, str(tmp_path / "plots" / "win_rates.png"))
    with open(path, "rb") as png:
        assert png.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "plots" / "win_rates.png").stat().st_size > 1000
