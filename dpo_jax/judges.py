"""Judges for the paper's win rates (Rafailov et al. 2023, Section 6.2 and Appendix C.2): which of two responses to
a prompt is better, asked of a reward function or of an LLM (GPT-4 in the paper) with the paper's judging prompt.

A judge answers positionally (FIRST / SECOND / TIE, None when the answer could not be read); `orient` turns that into
WIN / LOSS / TIE for the evaluated side, and `win_rate` counts ties as half a win, with a 95% Wilson interval.

The LLM judge keeps a verdict cache (JSON lines, appended as each answer arrives): an interrupted evaluation resumes
without paying again for what was already answered.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import math
import os
import re
import threading
import urllib.error
import urllib.request
from typing import Callable, Mapping, Sequence

import numpy as np
from absl import logging

from dpo_jax.errors import UserError

FIRST, SECOND, TIE = "first", "second", "tie"  # positional verdicts; None = unparseable, counted and never guessed
WIN, LOSS = "win", "loss"  # the evaluated response's view (TIE shared)

WILSON_Z = 1.959963984540054  # the standard normal's 97.5% quantile: a two-sided 95% interval
MAX_BACKOFF_SECONDS = 60.0

# The paper's GPT-4 prompts (Appendix C.2), and the label of the line that carries the verdict.
PROMPTS = {
    "tldr": (
        "Which of the following summaries does a better job of summarizing the most important points in the given "
        "forum post, without including unimportant or irrelevant details? A good summary is both precise and concise."
        "\n\nPost:\n{prompt}\n\nSummary A:\n{first}\n\nSummary B:\n{second}\n\n"
        "FIRST provide a one-sentence comparison of the two summaries, explaining which you prefer and why. SECOND, "
        'on a new line, state only "A" or "B" to indicate your choice. Your response should use the format:\n'
        'Comparison: <one-sentence comparison and explanation>\nPreferred: <"A" or "B">'
    ),
    "hh": (
        "For the following query to a chatbot, which response is more helpful?\n\nQuery: {prompt}\n\n"
        "Response A:\n{first}\n\nResponse B:\n{second}\n\n"
        "FIRST provide a one-sentence comparison of the two responses and explain which you feel is more helpful. "
        'SECOND, on a new line, state only "A" or "B" to indicate which response is more helpful. Your response '
        'should use the format:\nComparison: <one-sentence comparison and explanation>\nMore helpful: <"A" or "B">'
    ),
}
VERDICT_LABELS = {"tldr": "preferred", "hh": "more helpful"}


class JudgeError(UserError, RuntimeError):
    """The judge could not answer: no API key, a rejected request, or a service still failing after the retries."""


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Two responses to one prompt, in the order the judge sees them."""

    prompt: str  # the post (TL;DR) or the dialogue query (HH)
    first: str  # shown first ("Summary A" / "Response A")
    second: str  # shown second


def _check_task(task: str) -> None:
    if task not in PROMPTS:
        raise ValueError(f"unknown judging task {task!r}; valid tasks: {sorted(PROMPTS)}")


def judging_prompt(task: str, comparison: Comparison) -> str:
    """The paper's judging prompt for `task` ("tldr" or "hh") with the comparison's texts filled in."""
    _check_task(task)
    return PROMPTS[task].format(prompt=comparison.prompt, first=comparison.first, second=comparison.second)


def parse_verdict(task: str, text: str) -> str | None:
    """FIRST / SECOND from the last "Preferred:" (tldr) or "More helpful:" (hh) line of a judge's answer; None when
    there is no such line or its value is not exactly A or B (quotes, markdown emphasis and a final period allowed)."""
    _check_task(task)
    label = re.compile(rf"^[\s*_]*{VERDICT_LABELS[task]}[\s*_]*:(.*)$", re.IGNORECASE)
    values = [match.group(1) for match in map(label.match, text.splitlines()) if match]
    if not values:
        return None
    value = values[-1].strip().rstrip(".").strip(" \t*_\"'`").lower()
    return {"a": FIRST, "b": SECOND}.get(value)


def orient(verdict: str | None, evaluated_first: bool) -> str | None:
    """The positional verdict as WIN / LOSS / TIE (None stays None) for the response under evaluation."""
    if verdict not in (FIRST, SECOND, TIE, None):
        raise ValueError(f"not a positional verdict: {verdict!r}")
    if verdict in (TIE, None):
        return verdict
    return WIN if (verdict == FIRST) == evaluated_first else LOSS


def wilson_interval(rate: float, n: int, z: float = WILSON_Z) -> tuple[float, float]:
    """The Wilson score interval around an observed rate over n trials; NaNs when n is 0."""
    if n == 0:
        return math.nan, math.nan
    shrink = 1 + z * z / n
    center = (rate + z * z / (2 * n)) / shrink
    half_width = z * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / shrink
    # The exact interval holds the rate and lies in [0, 1]; the clamps only absorb rounding (at rate 0 or 1).
    return max(0.0, min(rate, center - half_width)), min(1.0, max(rate, center + half_width))


def win_rate(verdicts: Sequence[str | None]) -> dict:
    """Counts of WIN / LOSS / TIE / None verdicts and the win rate (wins + ties / 2) over the parseable ones, with its
    95% Wilson interval; rate and interval are NaN when nothing was parseable."""
    verdicts = list(verdicts)
    unknown = set(verdicts) - {WIN, LOSS, TIE, None}
    if unknown:
        raise ValueError(f"win_rate takes {WIN!r}, {LOSS!r}, {TIE!r} or None; got {sorted(map(repr, unknown))}")
    wins, losses, ties = verdicts.count(WIN), verdicts.count(LOSS), verdicts.count(TIE)
    n = wins + losses + ties
    rate = (wins + ties / 2) / n if n else math.nan
    ci_low, ci_high = wilson_interval(rate, n)
    return {"wins": wins, "losses": losses, "ties": ties, "unparseable": verdicts.count(None), "n": n,
            "win_rate": rate, "ci_low": ci_low, "ci_high": ci_high}


def plot_win_rates(curves: Mapping[str, Sequence[dict]], path: str) -> str:
    """Draw win rate against sampling temperature, one line with its 95% interval per label, into the PNG `path`."""
    from matplotlib.figure import Figure  # not pyplot: no global backend switch, so notebooks keep theirs

    fig = Figure(figsize=(5.5, 4))
    ax = fig.subplots()
    for label, points in curves.items():
        points = sorted(points, key=lambda point: point["temperature"])
        temperature, rate, ci_low, ci_high = (
            np.array([point[field] for point in points], dtype=float)
            for field in ("temperature", "win_rate", "ci_low", "ci_high"))
        ax.errorbar(temperature, rate, yerr=[rate - ci_low, ci_high - rate], marker="o", capsize=3, label=label)
    ax.axhline(0.5, linestyle="--", color="gray", linewidth=1)
    ax.set(xlabel="sampling temperature", ylabel="win rate", ylim=(0, 1))
    if curves:
        ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


class RewardJudge:
    """Higher reward wins; equal rewards tie (a NaN reward gives None)."""

    name = "reward"

    def __init__(self, reward: Callable[[list[str], list[str]], np.ndarray]):
        self.reward = reward  # (prompts, responses) -> one score per response

    def judge(self, comparisons: Sequence[Comparison]) -> list[str | None]:
        """One verdict per comparison, from one call of the reward on all first and one on all second responses."""
        if not comparisons:
            return []
        prompts = [comparison.prompt for comparison in comparisons]
        first = np.asarray(self.reward(prompts, [comparison.first for comparison in comparisons]), dtype=float)
        second = np.asarray(self.reward(prompts, [comparison.second for comparison in comparisons]), dtype=float)
        if first.shape != (len(comparisons),) or second.shape != (len(comparisons),):
            raise ValueError(f"the reward gave shapes {first.shape} and {second.shape} for {len(comparisons)} pairs")
        return [None if math.isnan(a) or math.isnan(b) else FIRST if a > b else SECOND if b > a else TIE
                for a, b in zip(first.tolist(), second.tolist())]


class _Stopped(Exception):
    """Another request of the same batch failed or the user interrupted: give up without a further attempt."""


def _message_content(body: str) -> str | None:
    """choices[0].message.content of a chat-completions response body, or None when the body is not that shape."""
    try:
        content = json.loads(body)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    return content if isinstance(content, str) else None


def _retry_after_seconds(headers) -> float | None:
    """The Retry-After header in seconds, None when absent or given as an HTTP date."""
    try:
        return max(0.0, float(headers.get("Retry-After")))
    except (TypeError, ValueError):
        return None


def _error_body(error: urllib.error.HTTPError) -> str:
    try:
        return error.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


class LLMJudge:
    """Asks an OpenAI-compatible chat-completions endpoint with the paper's judging prompt.

    `stats` counts HTTP requests sent (retries included), retries, comparisons answered from the verdict cache, and
    unparseable verdicts returned (cached ones included)."""

    def __init__(self, url: str, model: str, *, task: str, api_key_env: str = "OPENAI_API_KEY",
                 cache_path: str | None = None, max_concurrency: int = 8, max_retries: int = 6,
                 backoff_seconds: float = 1.0, timeout_seconds: float = 60.0, temperature: float = 0.0):
        _check_task(task)
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise JudgeError(f"the LLM judge needs an API key in the environment variable {api_key_env}: it is unset")
        self.name = f"llm:{model}"
        self.url, self.model, self.task, self.temperature = url, model, task, temperature
        self.cache_path, self.max_concurrency, self.max_retries = cache_path, max_concurrency, max_retries
        self.backoff_seconds, self.timeout_seconds = backoff_seconds, timeout_seconds
        self._headers = {"Content-Type": "application/json", "Authorization": f"Bearer {api_key}"}
        self._lock = threading.Lock()  # guards the verdicts, the stats and the cache file
        self.stats = {"requests": 0, "retries": 0, "cached": 0, "unparseable": 0}
        if cache_path:
            os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
        self._verdicts = _load_cache(cache_path) if cache_path else {}

    def cache_key(self, prompt: str) -> str:
        """The verdict cache's key: what determines the answer (model, task, full prompt, temperature)."""
        fields = json.dumps([self.model, self.task, prompt, self.temperature])
        return hashlib.sha256(fields.encode("utf-8")).hexdigest()

    def judge(self, comparisons: Sequence[Comparison]) -> list[str | None]:
        """FIRST / SECOND / None per comparison, in order; cached prompts are not asked again, the others are asked
        concurrently and each answer is cached as it arrives. Unparseable answers are cached too: asking again
        would pay again for what is, at temperature 0, most likely the same answer."""
        prompts = [judging_prompt(self.task, comparison) for comparison in comparisons]
        keys = [self.cache_key(prompt) for prompt in prompts]
        with self._lock:
            cached = sum(key in self._verdicts for key in keys)
            pending = {key: prompt for key, prompt in zip(keys, prompts) if key not in self._verdicts}
        self._count("cached", cached)
        self._ask_all(pending)
        verdicts = [self._verdicts[key] for key in keys]
        self._count("unparseable", verdicts.count(None))
        return verdicts

    def _ask_all(self, prompts_by_key: Mapping[str, str]) -> None:
        stop = threading.Event()
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            futures = [pool.submit(self._ask, key, prompt, stop) for key, prompt in prompts_by_key.items()]
            for future in concurrent.futures.as_completed(futures):
                future.result()  # the first failure propagates
        finally:
            # On a failure or Ctrl-C: drop the queued requests, let those in flight finish (their answers are paid
            # for and get cached) but not retry.
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)

    def _ask(self, key: str, prompt: str, stop: threading.Event) -> None:
        body = self._request(prompt, stop)
        content = _message_content(body)
        verdict = None if content is None else parse_verdict(self.task, content)
        if content is None:
            logging.warning("%s: a response without choices[0].message.content: %r", self.url, body[:200])
        self._record(key, verdict, body if content is None else content)

    def _request(self, prompt: str, stop: threading.Event) -> str:
        """The body of a successful response, retrying 429s, 5xxs, connection errors and timeouts with backoff."""
        payload = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                              "temperature": self.temperature}).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            if stop.is_set():
                raise _Stopped()
            self._count("requests")
            if attempt:
                self._count("retries")
            retry_after = None
            try:
                request = urllib.request.Request(self.url, data=payload, headers=self._headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout_seconds) as response:
                    return response.read().decode("utf-8", errors="replace")
            except urllib.error.HTTPError as error:
                body = _error_body(error)
                if error.code != 429 and error.code < 500:
                    raise JudgeError(f"{self.url} refused the request: HTTP {error.code}: {body[:200]!r}") from error
                failure, retry_after = f"HTTP {error.code}: {body[:200]!r}", _retry_after_seconds(error.headers)
            except (urllib.error.URLError, http.client.HTTPException, OSError) as error:  # refused, reset, timed out
                failure = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            if attempt == self.max_retries:
                raise JudgeError(f"{self.url} still failing after {attempt + 1} attempts: {failure}")
            delay = self.backoff_seconds * 2**attempt if retry_after is None else retry_after
            if stop.wait(min(delay, MAX_BACKOFF_SECONDS)):
                raise _Stopped()
        raise AssertionError("unreachable")

    def _record(self, key: str, verdict: str | None, raw: str) -> None:
        with self._lock:
            self._verdicts[key] = verdict
            if self.cache_path:
                with open(self.cache_path, "a", encoding="utf-8") as cache:
                    cache.write(json.dumps({"key": key, "verdict": verdict, "raw": raw}, ensure_ascii=False) + "\n")
                    cache.flush()

    def _count(self, stat: str, amount: int = 1) -> None:
        with self._lock:
            self.stats[stat] += amount


def _load_cache(path: str) -> dict[str, str | None]:
    """Verdicts by key from a cache file (none if absent). A line torn by a kill mid-write is dropped from the file,
    with a warning, so the next append starts on a line of its own."""
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as cache:
        data = cache.read()
    lines = data.split(b"\n")
    verdicts = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if record["verdict"] not in (FIRST, SECOND, TIE, None):
                raise ValueError(f"unknown verdict {record['verdict']!r}")
            verdicts[record["key"]] = record["verdict"]
        except (ValueError, KeyError, TypeError):
            torn = number == len(lines)  # the last piece: after the last newline
            logging.warning("%s: dropped %s: %r", path, "its torn last line" if torn else f"line {number}", line[:80])
            if torn:
                with open(path, "r+b") as cache:
                    cache.truncate(len(data) - len(line))
        else:
            if number == len(lines):  # a whole record whose newline was not written
                with open(path, "ab") as cache:
                    cache.write(b"\n")
    return verdicts
