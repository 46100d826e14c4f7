"""Grading of closed-book answers (SEAL domain 1, knowledge incorporation).

Offline metrics follow the official SQuAD v1.1 evaluation script (``normalize_answer``,
``exact_match``, ``f1``). On top of those:

* ``contains`` — the normalized gold answer occurs as a whole-token span of the prediction;
* ``strict_contains`` — the same, but only within a short first sentence, so a model that recites
  a whole passage cannot score;
* ``recitation`` — flags predictions that copy a long verbatim span of the passage;
* an LLM judge (the paper's metric: correct if the answer conveys the gold answer and does not
  contradict it), served by any OpenAI-compatible endpoint (``OpenAIJudge``) or by any
  ``prompt -> reply`` function such as a local model (``CallableJudge``). A judge that cannot
  produce a verdict leaves the item *ungraded* (``None``); an ungraded item is never counted as
  wrong.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import string
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Protocol, runtime_checkable

from seal.remote import ChatClient, EndpointClient, RemoteConfigError, RemoteError

logger = logging.getLogger(__name__)

METRICS = ("em", "f1", "contains", "strict", "judge")

# ---------------------------------------------------------------------------------------------
# SQuAD v1.1 metrics
# ---------------------------------------------------------------------------------------------

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Normalize an answer exactly as the official SQuAD v1.1 script does.

    Lowercase, drop ASCII punctuation (``string.punctuation``), replace the articles a/an/the
    (whole words) by a space, then collapse all whitespace to single spaces.
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCTUATION)
    s = _ARTICLES_RE.sub(" ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> float:
    """1.0 if the normalized prediction equals the normalized gold answer, else 0.0.

    As in the official script, two answers that both normalize to "" match (1.0).
    """
    return float(normalize_answer(prediction) == normalize_answer(gold))


def f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 between normalized prediction and gold (official SQuAD v1.1 rule).

    Tokens are the whitespace-split normalized strings; overlap counts multiplicities. As in the
    v1.1 script, no overlap gives 0.0, including when both sides normalize to "" (so, unlike
    ``exact_match``, two empty answers score 0.0 here).
    """
    pred_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    num_same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(pred_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def _contains_tokens(haystack: list[str], needle: list[str]) -> bool:
    """Whether ``needle`` occurs as a contiguous run of ``haystack`` (non-empty needle)."""
    k = len(needle)
    if k == 0 or k > len(haystack):
        return False
    first = needle[0]
    return any(
        haystack[i] == first and haystack[i : i + k] == needle for i in range(len(haystack) - k + 1)
    )


def contains(prediction: str, gold: str) -> float:
    """1.0 if the normalized gold answer occurs in the normalized prediction on token boundaries.

    Matching is on whole normalized tokens, so gold "10" does not match "1000". A gold answer that
    normalizes to "" (e.g. "the") never matches.
    """
    return float(
        _contains_tokens(normalize_answer(prediction).split(), normalize_answer(gold).split())
    )


# Abbreviations whose trailing period does not end a sentence ("Mr. Smith", "St. Louis").
# fmt: off
_ABBREVIATIONS = frozenset((
    "mr", "mrs", "ms", "dr", "st", "jr", "sr", "prof", "mt", "ft", "gen", "col", "lt", "sgt",
    "capt", "gov", "sen", "rep", "rev", "hon", "inc", "co", "corp", "ltd", "vs", "etc", "approx",
    "ca", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
))
# fmt: on
_SENTENCE_END_RE = re.compile(r"[.!?](?=\s)")
_DOTTED_ACRONYM_RE = re.compile(r"(?:[a-z]\.)+[a-z]")


def first_sentence(text: str) -> str:
    """The first sentence of ``text``: up to the first newline or sentence-ending punctuation.

    Leading/trailing whitespace is ignored. A period does not end the sentence after a single
    letter ("J. Smith"), a dotted acronym ("U.S.") or a common abbreviation ("Mr.", "St."); a
    period not followed by whitespace ("3.5") never does.
    """
    text = text.strip()
    newline = text.find("\n")
    if newline != -1:
        text = text[:newline].rstrip()
    for m in _SENTENCE_END_RE.finditer(text):
        if m.group() == ".":
            before = text[: m.start()].rsplit(None, 1)
            word = before[-1].lower().lstrip("(\"'") if before else ""
            if (
                word in _ABBREVIATIONS
                or (len(word) == 1 and word.isalpha())
                or _DOTTED_ACRONYM_RE.fullmatch(word)
            ):
                continue
        return text[: m.end()]
    return text


def strict_contains(prediction: str, gold: str, max_words: int = 30) -> float:
    """1.0 if the gold answer is contained (as in ``contains``) in the prediction's first sentence
    and that sentence has at most ``max_words`` whitespace-separated words; else 0.0.

    This is what keeps a model that recites a whole passage from scoring.
    """
    sentence = first_sentence(prediction)
    if len(sentence.split()) > max_words:
        return 0.0
    return contains(sentence, gold)


@lru_cache(maxsize=256)
def _ngram_set(text: str, n: int) -> frozenset[tuple[str, ...]]:
    # Cached because each passage is graded against all of its questions.
    tokens = normalize_answer(text).split()
    return frozenset(zip(*(tokens[i:] for i in range(n)), strict=False))


def recitation(prediction: str, passage: str, min_words: int = 12) -> float:
    """1.0 if the prediction contains a verbatim span of at least ``min_words`` consecutive
    normalized tokens of the passage, else 0.0.

    Runs in time linear in the lengths of both texts (set of the passage's ``min_words``-grams).
    """
    if min_words < 1:
        raise ValueError("min_words must be >= 1")
    passage_ngrams = _ngram_set(passage, min_words)
    if not passage_ngrams:
        return 0.0
    tokens = normalize_answer(prediction).split()
    return float(
        any(
            tuple(tokens[i : i + min_words]) in passage_ngrams
            for i in range(len(tokens) - min_words + 1)
        )
    )


def _golds(gold: str | Sequence[str]) -> list[str]:
    golds = [gold] if isinstance(gold, str) else list(gold)
    if not golds:
        raise ValueError("at least one gold answer is required")
    return golds


def exact_match_multi(prediction: str, golds: Sequence[str]) -> float:
    """Max of ``exact_match`` over the gold answers (the official script's rule)."""
    return max(exact_match(prediction, g) for g in _golds(golds))


def f1_multi(prediction: str, golds: Sequence[str]) -> float:
    """Max of ``f1`` over the gold answers (the official script's rule)."""
    return max(f1(prediction, g) for g in _golds(golds))


def contains_multi(prediction: str, golds: Sequence[str]) -> float:
    """Max of ``contains`` over the gold answers."""
    return max(contains(prediction, g) for g in _golds(golds))


def strict_contains_multi(prediction: str, golds: Sequence[str], max_words: int = 30) -> float:
    """Max of ``strict_contains`` over the gold answers."""
    return max(strict_contains(prediction, g, max_words) for g in _golds(golds))


# ---------------------------------------------------------------------------------------------
# Per-answer grades
# ---------------------------------------------------------------------------------------------


class JudgeItem(NamedTuple):
    """One answer to judge. ``gold`` may list several acceptable answers."""

    question: str
    gold: str | Sequence[str]
    prediction: str


class Verdict(NamedTuple):
    """A judge's verdict: ``correct`` is None when the item is ungraded (then ``error`` says why).

    ``raw`` is the judge's reply text, when there was one.
    """

    correct: bool | None
    raw: str | None = None
    error: str | None = None


@dataclass
class Grade:
    """All grades of one answer. ``judge`` is 1.0/0.0, or None when ungraded."""

    em: float
    f1: float
    contains: float
    strict: float
    recitation: float
    judge: float | None = None
    judge_raw: str | None = None


def grade_answer(
    prediction: str,
    gold: str | Sequence[str],
    passage: str,
    judge_verdict: Verdict | None = None,
    *,
    max_words: int = 30,
    min_recitation_words: int = 12,
) -> Grade:
    """Grade one prediction against its gold answer(s) and source passage.

    With several gold answers each metric is the max over them. ``judge_verdict`` (if given)
    fills ``judge``/``judge_raw``; a verdict with ``correct=None`` leaves ``judge`` None.
    """
    golds = _golds(gold)
    judge = None
    judge_raw = None
    if judge_verdict is not None:
        judge_raw = judge_verdict.raw
        if judge_verdict.correct is not None:
            judge = float(judge_verdict.correct)
    return Grade(
        em=exact_match_multi(prediction, golds),
        f1=f1_multi(prediction, golds),
        contains=contains_multi(prediction, golds),
        strict=strict_contains_multi(prediction, golds, max_words),
        recitation=recitation(prediction, passage, min_recitation_words),
        judge=judge,
        judge_raw=judge_raw,
    )


@dataclass
class ScoreLists:
    """Per-metric score lists of a set of grades.

    ``scores`` has one list per name in ``METRICS`` plus "recitation", aligned with the input
    grades except "judge", which holds only graded items (``n_ungraded`` were skipped).
    """

    scores: dict[str, list[float]] = field(default_factory=dict)
    n: int = 0
    n_ungraded: int = 0


def collect_scores(grades: Sequence[Grade]) -> ScoreLists:
    """Gather per-metric score lists from grades, skipping ungraded judge scores (counted)."""
    names = (*METRICS, "recitation")
    scores: dict[str, list[float]] = {name: [] for name in names}
    n_ungraded = 0
    for g in grades:
        for name in names:
            value = getattr(g, name)
            if value is None:
                n_ungraded += 1
            else:
                scores[name].append(float(value))
    return ScoreLists(scores=scores, n=len(grades), n_ungraded=n_ungraded)


# ---------------------------------------------------------------------------------------------
# LLM judge
# ---------------------------------------------------------------------------------------------

JUDGE_PROMPT = """\
You are grading an answer to a question about a passage. The passage is not shown; judge only \
from the gold answer.

Question: {question}
Gold answer: {gold}
Predicted answer: {prediction}

The predicted answer is correct if it conveys the gold answer and does not contradict it. \
Paraphrases, equivalent forms and extra detail consistent with the gold answer are fine. An answer \
that omits the gold answer, contradicts it, or states something incompatible with it is incorrect.

Is the predicted answer correct? Reply with exactly one word: "yes" or "no".\
"""


def prompt_version(template: str) -> str:
    """A short id of a judge prompt template; it keys the cache, so editing a prompt invalidates
    its cached verdicts."""
    return "sha256:" + hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


JUDGE_PROMPT_VERSION = prompt_version(JUDGE_PROMPT)


def format_gold(gold: str | Sequence[str]) -> str:
    """The gold answer(s) as shown to the judge: several distinct answers are joined by " | "."""
    golds = list(dict.fromkeys(g.strip() for g in _golds(gold)))
    return " | ".join(golds)


def build_judge_prompt(item: JudgeItem, template: str = JUDGE_PROMPT) -> str:
    """Fill a judge prompt template with an item."""
    return template.format(
        question=item.question.strip(),
        gold=format_gold(item.gold),
        prediction=item.prediction.strip(),
    )


_YES_NO_RE = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_judge_reply(text: object) -> bool | None:
    """Parse a judge reply: the first whole word "yes"/"no" (any case) decides; None if there is
    none (or ``text`` is not a string). Never raises."""
    if not isinstance(text, str):
        return None
    m = _YES_NO_RE.search(text)
    if m is None:
        return None
    return m.group(1).lower() == "yes"


def cache_key(model: str, version: str, question: str, gold: str, prediction: str) -> str:
    """Content hash keying a cached verdict (JSON-encoded list, so fields cannot run together)."""
    payload = json.dumps([model, version, question, gold, prediction], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class VerdictCache:
    """Append-only JSONL store of determinate verdicts, keyed by content hash.

    Each line is one JSON object with the key, the judged content and the raw judge reply.
    Unreadable lines (e.g. one truncated by a crash) are skipped with a warning. Thread-safe
    within a process; each record is written with one ``write`` call on an append-mode file.
    """

    FILENAME = "judge_cache.jsonl"

    def __init__(self, cache_dir: str | os.PathLike[str]):
        self.path = Path(cache_dir) / self.FILENAME
        self._lock = threading.Lock()
        self._entries: dict[str, dict] = {}
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line.decode("utf-8"))
                    key = record["key"]
                    correct = record["correct"]
                    if not isinstance(key, str) or not isinstance(correct, bool):
                        raise ValueError("bad field types")
                except (ValueError, KeyError, TypeError, RecursionError) as exc:
                    logger.warning(
                        "skipping unreadable judge cache line %d in %s (%s)", lineno, self.path, exc
                    )
                    continue
                self._entries[key] = record

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> Verdict | None:
        """The cached verdict for ``key``, or None."""
        record = self._entries.get(key)
        if record is None:
            return None
        return Verdict(correct=record["correct"], raw=record.get("raw"), error=None)

    def put(self, key: str, verdict: Verdict, **content: str) -> None:
        """Store a determinate verdict (``correct`` not None) with the content it judged."""
        if verdict.correct is None:
            raise ValueError("ungraded verdicts are not cached")
        record = {"key": key, "correct": verdict.correct, "raw": verdict.raw, **content}
        record["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a+b") as fh:
                # After a crash mid-line the file may not end in a newline; start a fresh line so
                # the new record is not glued to the broken one.
                if fh.tell() > 0:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        line = "\n" + line
                fh.write(line.encode("utf-8"))
            self._entries[key] = record


@runtime_checkable
class Judge(Protocol):
    """Anything that judges answers; one verdict per item, in order."""

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]: ...


class _CachingJudge:
    """Shared batch logic: cache lookup, in-batch de-duplication, bounded thread pool."""

    model: str
    prompt_template: str
    concurrency: int
    cache: VerdictCache | None

    def _judge_one(self, prompt: str) -> Verdict:
        raise NotImplementedError

    def _scrub(self, text: str) -> str:
        return text

    def judge(self, items: Sequence[JudgeItem]) -> list[Verdict]:
        """Judge each item; ``Verdict.correct`` is None (with ``error`` set) for ungraded ones.

        Cached verdicts are reused without a request; identical items in one batch are judged
        once; only determinate verdicts are cached, so ungraded items are retried next time.
        """
        version = prompt_version(self.prompt_template)
        results: list[Verdict | None] = [None] * len(items)
        pending: dict[str, tuple[list[int], dict[str, str], str]] = {}
        for i, item in enumerate(items):
            content = {
                "question": item.question,
                "gold": format_gold(item.gold),
                "prediction": item.prediction,
            }
            key = cache_key(self.model, version, **content)
            cached = self.cache.get(key) if self.cache is not None else None
            if cached is not None:
                results[i] = cached
            elif key in pending:
                pending[key][0].append(i)
            else:
                pending[key] = ([i], content, build_judge_prompt(item, self.prompt_template))

        def run(key: str) -> tuple[str, Verdict]:
            try:
                return key, self._judge_one(pending[key][2])
            except Exception as exc:  # one bad item must not sink the batch
                msg = self._scrub(f"{type(exc).__name__}: {exc}")
                return key, Verdict(None, None, f"unexpected error: {msg}")

        workers = max(1, min(self.concurrency, len(pending)))
        if workers == 1:
            done = [run(key) for key in pending]
        else:
            with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                done = list(pool.map(run, pending))
        for key, verdict in done:
            indices, content, _ = pending[key]
            if verdict.correct is not None and self.cache is not None:
                self.cache.put(key, verdict, model=self.model, prompt_version=version, **content)
            for i in indices:
                results[i] = verdict
        return [r if r is not None else Verdict(None, None, "internal: missing") for r in results]


def _verdict_from_reply(raw: str | None) -> Verdict:
    correct = parse_judge_reply(raw)
    if correct is None:
        return Verdict(None, raw, "unparseable judge reply (no yes/no)")
    return Verdict(correct, raw, None)


class CallableJudge(_CachingJudge):
    """Judge served by a ``(prompt: str) -> str`` function, e.g. a local model's generate.

    Same prompt, parsing and caching rules as ``OpenAIJudge``. ``name`` identifies the judge in
    the cache key; the disk cache is off unless ``cache_dir`` is given, because a function has no
    stable identity of its own. Exceptions from ``fn`` leave the item ungraded (no retries).
    ``concurrency`` defaults to 1 since local models are rarely thread-safe.
    """

    def __init__(
        self,
        fn: Callable[[str], str],
        *,
        name: str = "callable",
        cache_dir: str | os.PathLike[str] | None = None,
        concurrency: int = 1,
        prompt_template: str = JUDGE_PROMPT,
    ):
        self.fn = fn
        self.model = name
        self.prompt_template = prompt_template
        self.concurrency = concurrency
        self.cache = VerdictCache(cache_dir) if cache_dir is not None else None

    def __repr__(self) -> str:
        return f"CallableJudge(name={self.model!r})"

    def _judge_one(self, prompt: str) -> Verdict:
        try:
            raw = self.fn(prompt)
        except Exception as exc:
            return Verdict(None, None, f"judge function failed: {type(exc).__name__}: {exc}")
        if not isinstance(raw, str):
            return Verdict(None, None, f"judge function returned {type(raw).__name__}, not str")
        return _verdict_from_reply(raw)


def default_cache_dir() -> Path:
    """Default judge cache directory: ``judge/`` in seal's per-user cache (see models.cache_root)."""
    from seal.models import cache_root

    return cache_root() / "judge"


class JudgeConfigError(RemoteConfigError):
    """The judge cannot be set up (e.g. its API key variable is missing).

    A ``seal.remote.RemoteConfigError``, so either name catches it.
    """


_DEFAULT_CACHE = object()


class OpenAIJudge(EndpointClient, _CachingJudge):
    """Judge served by an OpenAI-compatible chat-completions endpoint (GPT-4.1 in the paper).

    The HTTP side is a ``seal.remote.ChatClient``. The API key is read from the environment
    variable ``api_key_env`` only; when it is unset, a loopback ``base_url`` gets a dummy key and
    any other endpoint raises ``JudgeConfigError``. The key is kept inside the client: it is not
    in this object's repr, the cache or error texts.

    Requests use temperature 0 and ``max_tokens``. The client's own retries are off; instead each
    item gets up to ``max_retries`` retries with exponential backoff and jitter
    (``backoff_base * 2**attempt``, capped at ``backoff_max``, a random 50-100% of it; a server
    ``Retry-After`` is honoured up to the cap) on timeouts, connection errors, HTTP 408/429/5xx
    and unusable response bodies. Other 4xx errors leave the item ungraded at once. An item
    whose retries run out is ungraded with the last error recorded; it is never counted wrong.

    Determinate verdicts are cached in ``cache_dir`` (default ``default_cache_dir()``; None turns
    the disk cache off). At most ``concurrency`` requests are in flight.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str = "OPENAI_API_KEY",
        cache_dir: str | os.PathLike[str] | None | object = _DEFAULT_CACHE,
        max_retries: int = 4,
        timeout: float = 30,
        concurrency: int = 4,
        *,
        max_tokens: int = 8,
        backoff_base: float = 1.0,
        backoff_max: float = 30.0,
        prompt_template: str = JUDGE_PROMPT,
    ):
        try:
            self._client = ChatClient(
                base_url,
                model,
                api_key_env,
                timeout,
                max_retries,
                backoff_base=backoff_base,
                backoff_max=backoff_max,
                purpose="judge",
            )
        except RemoteConfigError as exc:
            raise JudgeConfigError(str(exc)) from None
        self.base_url = base_url
        self.model = model
        self.api_key_env = api_key_env
        self.timeout = timeout
        self.concurrency = concurrency
        self.max_tokens = max_tokens
        self.prompt_template = prompt_template
        if cache_dir is _DEFAULT_CACHE:
            cache_dir = default_cache_dir()
        self.cache = VerdictCache(cache_dir) if cache_dir is not None else None  # type: ignore[arg-type]

    # Retry settings live on the client; these keep them readable and settable here.
    max_retries = property(
        lambda self: self._client.max_retries,
        lambda self, v: setattr(self._client, "max_retries", v),
    )
    backoff_base = property(
        lambda self: self._client.backoff_base,
        lambda self, v: setattr(self._client, "backoff_base", v),
    )
    backoff_max = property(
        lambda self: self._client.backoff_max,
        lambda self, v: setattr(self._client, "backoff_max", v),
    )

    def _scrub(self, text: str) -> str:
        return self._client.scrub(text)

    def _judge_one(self, prompt: str) -> Verdict:
        try:
            # The private call keeps a null reply content as None (recorded as raw=None).
            (raw,) = self._client._complete(
                prompt, temperature=0, max_tokens=self.max_tokens, top_p=1.0, n=1
            )
        except RemoteError as exc:
            return Verdict(None, None, exc.message)
        return _verdict_from_reply(raw)
