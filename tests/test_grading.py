"""Tests of seal.grading: SQuAD metrics, containment/recitation, and the LLM judge clients.

The OpenAI judge is exercised against a real OpenAI-compatible HTTP server on loopback that
decides yes/no by a simple rule and injects faults on request.
"""

from __future__ import annotations

import json
import logging
import re
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai_stub import OpenAIStubHandler, OpenAIStubServer

from seal.grading import (
    JUDGE_PROMPT,
    METRICS,
    CallableJudge,
    Grade,
    Judge,
    JudgeConfigError,
    JudgeItem,
    OpenAIJudge,
    Verdict,
    collect_scores,
    contains,
    contains_multi,
    exact_match,
    exact_match_multi,
    f1,
    f1_multi,
    first_sentence,
    grade_answer,
    normalize_answer,
    parse_judge_reply,
    recitation,
    strict_contains,
)

# ---------------------------------------------------------------------------------------------
# SQuAD metrics
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The Denver Broncos!", "denver broncos"),
        ("  an   Apple,  a pear  ", "apple pear"),
        ("Theater", "theater"),  # "the" only as a whole word
        ("U.S.A.", "usa"),  # punctuation dropped, not replaced by spaces
        ("rock-and-roll", "rockandroll"),
        ("A\tB\nC", "b c"),  # "a" is an article; whitespace collapsed
        ("", ""),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_exact_match():
    assert exact_match("The Denver Broncos.", "denver broncos") == 1.0
    assert exact_match("Denver Broncos won", "Denver Broncos") == 0.0
    assert exact_match("the", "") == 1.0  # both normalize to "" (official script's behaviour)
    assert exact_match_multi("Broncos", ["Denver Broncos", "broncos"]) == 1.0


def test_f1_hand_worked():
    # pred tokens [the->removed] denver broncos won = 3 tokens; gold 2; common 2
    # precision 2/3, recall 2/2 -> f1 = 2*(2/3)*1/(2/3+1) = (4/3)/(5/3) = 0.8
    assert f1("the Denver Broncos won", "Denver Broncos") == pytest.approx(0.8)
    # pred [broncos] 1 token, gold [denver broncos] 2; common 1
    # precision 1, recall 1/2 -> f1 = 2*0.5/1.5 = 2/3
    assert f1("Broncos", "the Denver Broncos") == pytest.approx(2 / 3)
    # pred [in 1999 and 2000] 4 tokens, gold [1999] 1; common 1
    # precision 1/4, recall 1 -> f1 = 2*0.25/1.25 = 0.4
    assert f1("In 1999, and 2000.", "1999") == pytest.approx(0.4)
    # multiplicity: pred [a->removed] [paris paris] vs gold [paris]; common min(2,1)=1
    # precision 1/2, recall 1 -> 2/3
    assert f1("Paris Paris", "Paris") == pytest.approx(2 / 3)
    # pred [new york city] vs gold [york new]: common 2; p 2/3, r 1 -> 0.8 (order-free bag)
    assert f1("New York City", "york, new") == pytest.approx(0.8)
    assert f1("London", "Paris") == 0.0
    assert f1("", "") == 0.0  # v1.1: no common tokens -> 0, even when both are empty
    assert f1("the", "Paris") == 0.0
    # max over golds: 0.8 vs 1.0
    assert f1_multi("Denver Broncos", ["the Denver Broncos won", "Denver Broncos"]) == 1.0


# ---------------------------------------------------------------------------------------------
# contains / strict / recitation
# ---------------------------------------------------------------------------------------------


def test_contains_token_boundaries():
    assert contains("It was 1000 years ago.", "10") == 0.0
    assert contains("About 10 years.", "10") == 1.0
    assert contains("It happened in 1,000 AD", "1000") == 1.0  # commas are punctuation
    assert contains("The Denver Broncos won Super Bowl 50.", "Denver Broncos") == 1.0
    assert contains("Denver's Broncos", "Denver Broncos") == 0.0  # "denvers" != "denver"
    assert contains("Broncos of Denver", "Denver Broncos") == 0.0  # order matters
    assert contains("anything", "the") == 0.0  # gold normalizes to ""
    assert contains("", "Paris") == 0.0
    assert contains_multi("Paris", ["London", "paris"]) == 1.0


def test_contains_year_1000_with_comma_gold():
    # "1,000" normalizes to "1000" so it does match a prediction mentioning 1000.
    assert contains("in the year 1000", "1,000") == 1.0


def test_first_sentence():
    assert first_sentence("  Paris. It is in France.") == "Paris."
    assert first_sentence("Mr. Smith won. Then more.") == "Mr. Smith won."
    assert first_sentence("The U.S. Army did. Later.") == "The U.S. Army did."
    assert first_sentence("It cost 3.5 million! Wow") == "It cost 3.5 million!"
    assert first_sentence("\nParis\nLondon") == "Paris"
    assert first_sentence("no terminator") == "no terminator"


def test_strict_contains():
    assert strict_contains("Denver Broncos.", "Denver Broncos") == 1.0
    # gold in the second sentence only
    assert strict_contains("It was a team. The Denver Broncos.", "Denver Broncos") == 0.0
    # gold in a first sentence that is too long
    long_first = " ".join(["word"] * 30) + " Denver Broncos won."
    assert strict_contains(long_first, "Denver Broncos") == 0.0
    assert strict_contains(long_first, "Denver Broncos", max_words=40) == 1.0
    assert strict_contains("1000 people.", "10") == 0.0


PASSAGE = (
    "Super Bowl 50 was an American football game to determine the champion of the National "
    "Football League (NFL) for the 2015 season. The American Football Conference (AFC) champion "
    "Denver Broncos defeated the National Football Conference (NFC) champion Carolina Panthers "
    "24-10 to earn their third Super Bowl title."
)


def test_recitation():
    recited = (
        "The answer: Super Bowl 50 was an American football game to determine the champion of "
        "the National Football League."
    )
    assert recitation(recited, PASSAGE) == 1.0
    assert recitation("Denver Broncos", PASSAGE) == 0.0
    # 11 consecutive passage tokens (after normalization) is below the default threshold of 12:
    # [super bowl 50 was american football game to determine champion of]
    eleven = "super bowl 50 was an american football game to determine the champion of"
    assert len(normalize_answer(eleven).split()) == 11
    assert recitation(eleven, PASSAGE) == 0.0
    assert recitation(eleven + " national", PASSAGE) == 1.0
    assert recitation(eleven, PASSAGE, min_words=11) == 1.0
    # normalization: case and punctuation do not hide a recitation
    assert recitation(recited.upper().replace(" ", "  ,"), PASSAGE) == 1.0
    assert recitation("anything at all here", "too short") == 0.0


def test_long_recitation_scores_contains_but_not_strict():
    grade = grade_answer(PASSAGE, ["Denver Broncos"], PASSAGE)
    assert grade.contains == 1.0
    assert grade.strict == 0.0  # the gold is not in the first sentence (and it is long)
    assert grade.recitation == 1.0


def test_grade_answer_and_collect():
    g1 = grade_answer("Denver Broncos", "Denver Broncos", PASSAGE, Verdict(True, "yes", None))
    g2 = grade_answer("the Denver Broncos won", ["Broncos", "Denver Broncos"], PASSAGE)
    g3 = grade_answer("Carolina", "Denver Broncos", PASSAGE, Verdict(None, "maybe", "unparseable"))
    g4 = grade_answer("Carolina", "Denver Broncos", PASSAGE, Verdict(False, "no", None))
    assert g1 == Grade(1.0, 1.0, 1.0, 1.0, 0.0, 1.0, "yes")
    assert g2.em == 0.0 and g2.f1 == pytest.approx(0.8) and g2.contains == 1.0
    assert g2.judge is None and g3.judge is None and g3.judge_raw == "maybe"
    assert g4.judge == 0.0
    collected = collect_scores([g1, g2, g3, g4])
    assert set(METRICS) <= set(collected.scores)
    assert collected.n == 4 and collected.n_ungraded == 2
    assert collected.scores["judge"] == [1.0, 0.0]
    assert collected.scores["em"] == [1.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------

# Word-ish texts rich in articles, punctuation and whitespace (what normalization acts on).
_texty = st.lists(
    st.sampled_from(
        [
            "the",
            "an",
            "a",
            "The",
            "Paris",
            "paris",
            "10",
            "1000",
            "x",
            " ",
            ",",
            ".",
            "!",
            "'",
            "-",
            "\t",
            "\n",
            "é",
            "A",
        ]
    ),
    max_size=15,
).map("".join)


@settings(max_examples=700, deadline=None)
@given(st.text(max_size=60))
def test_normalize_idempotent(s):
    once = normalize_answer(s)
    assert normalize_answer(once) == once


@settings(max_examples=200, deadline=None)
@given(_texty, _texty)
def test_f1_bounds_and_em_implies_f1(pred, gold):
    score = f1(pred, gold)
    assert 0.0 <= score <= 1.0
    if exact_match(pred, gold) == 1.0 and normalize_answer(gold):
        assert score == pytest.approx(1.0)


@settings(max_examples=200, deadline=None)
@given(st.one_of(_texty, st.text(max_size=40)))
def test_contains_self(x):
    if normalize_answer(x):
        assert contains(x, x) == 1.0


@settings(max_examples=700, deadline=None)
@given(st.one_of(st.text(), st.none(), st.integers(), st.binary()))
def test_parse_judge_reply_never_raises(reply):
    assert parse_judge_reply(reply) in (True, False, None)


def test_parse_judge_reply_examples():
    assert parse_judge_reply("Yes") is True
    assert parse_judge_reply("  no.") is False
    assert parse_judge_reply("**YES**, it matches") is True
    assert parse_judge_reply("The answer is no") is False
    assert parse_judge_reply("Nope, yes") is True  # "nope" is not the word "no"
    assert parse_judge_reply("I'm not sure") is None
    assert parse_judge_reply("") is None


def test_judge_prompt_has_rule():
    text = JUDGE_PROMPT.lower()
    assert "conveys the gold answer" in text and "does not contradict" in text
    assert '"yes" or "no"' in text
    JUDGE_PROMPT.format(question="q", gold="g", prediction="p")  # placeholders are complete


# ---------------------------------------------------------------------------------------------
# A local OpenAI-compatible server with fault injection
# ---------------------------------------------------------------------------------------------

# The stub server (openai_stub) answers yes/no by a simple rule: "Yes." if any gold answer (split
# on "|") is in the prediction, else "No". A question may carry "[[fault:KIND:COUNT]]": the first
# COUNT requests for that question fail with KIND (COUNT "inf": always). KIND is one of the stub's
# shared kinds (timeout, close, 400, 429, 500, 503, malformed, nochoices) or garbage (a 200 whose
# reply is neither yes nor no).


class JudgeHandler(OpenAIStubHandler):
    def _fault_key(self, prompt: str) -> str:
        return re.search(r"Question: (.*)", prompt).group(1)

    def _answer(self, payload: dict, prompt: str):
        gold = re.search(r"Gold answer: (.*)", prompt).group(1)
        pred = re.search(r"Predicted answer: (.*)", prompt).group(1)
        golds = [g.strip().lower() for g in gold.split("|")]
        verdict = "Yes." if any(g in pred.lower() for g in golds) else "No"
        self._reply(payload, [verdict])

    def _fault(self, kind: str):
        if kind == "garbage":
            self._reply({"model": "m"}, ["I cannot tell."])
        else:
            super()._fault(kind)


class FakeOpenAIServer(OpenAIStubServer):
    """The judge's server: yes/no by containment of the gold answer, with fault injection."""

    handler_class = JudgeHandler


@pytest.fixture
def server():
    # A "timeout" fault answers after 2 s, well past the judges' 1-s timeout; a plain request
    # has that second to be answered even on a busy 2-core machine (at 0.3 s, one was retried
    # under `make test`, and the request count came out 5 instead of 3).
    with FakeOpenAIServer(hang_s=2.0) as srv:
        yield srv


SECRET = "sk-planted-SECRET-key-0123456789"


@pytest.fixture
def judge_factory(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SEAL_TEST_JUDGE_KEY", SECRET)
    made = []

    def make(**kw):
        args = dict(
            base_url=server.base_url,
            model="judge-model",
            api_key_env="SEAL_TEST_JUDGE_KEY",
            cache_dir=tmp_path / "cache",
            max_retries=3,
            timeout=1.0,
            concurrency=4,
            backoff_base=0.01,
            backoff_max=0.05,
        )
        args.update(kw)
        judge = OpenAIJudge(**args)
        made.append(judge)
        return judge

    yield make
    for judge in made:
        judge.close()


def _item(question, gold, prediction):
    return JudgeItem(question=question, gold=gold, prediction=prediction)


def test_openai_judge_verdicts_and_cache(server, judge_factory, tmp_path):
    judge = judge_factory()
    assert isinstance(judge, Judge)
    items = [
        _item("Who won Super Bowl 50?", "Denver Broncos", "The Denver Broncos won."),
        _item("Who lost Super Bowl 50?", "Carolina Panthers", "The Denver Broncos."),
        _item("Which year?", ["2015", "the 2015 season"], "In 2015."),
        _item("Who won Super Bowl 50?", "Denver Broncos", "The Denver Broncos won."),  # dup
    ]
    verdicts = judge.judge(items)
    assert [v.correct for v in verdicts] == [True, False, True, True]
    assert verdicts[0].raw == "Yes." and verdicts[1].raw == "No"
    assert all(v.error is None for v in verdicts)
    assert server.n_requests == 3  # the duplicate was judged once
    sent = server.requests[0]
    assert sent["temperature"] == 0 and sent["max_tokens"] <= 16
    assert sent["model"] == "judge-model"
    assert set(server.auth_headers) == {f"Bearer {SECRET}"}

    # Same content again, with a fresh client reading the on-disk cache: no HTTP request.
    again = judge_factory().judge(items)
    assert again == verdicts
    assert server.n_requests == 3

    # The cache keeps the raw judge output, one line per determinate verdict.
    lines = (tmp_path / "cache" / "judge_cache.jsonl").read_text().splitlines()
    assert len(lines) == 3
    assert {json.loads(line)["raw"] for line in lines} == {"Yes.", "No"}

    # A different judge model is a different cache key.
    judge_factory(model="other-model").judge(items[:1])
    assert server.n_requests == 4


def test_openai_judge_key_never_leaks(server, judge_factory, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    judge = judge_factory(max_retries=1)
    verdicts = judge.judge(
        [
            _item("ok", "Paris", "Paris"),
            _item("fails [[fault:400:inf]]", "Paris", "Paris"),
            _item("flaky [[fault:500:1]]", "Paris", "Paris"),
        ]
    )
    assert [v.correct for v in verdicts] == [True, None, True]
    assert SECRET not in repr(judge)
    assert all(SECRET not in (v.error or "") for v in verdicts)
    assert SECRET not in caplog.text
    cache_text = (tmp_path / "cache" / "judge_cache.jsonl").read_text()
    assert cache_text and SECRET not in cache_text
    for path in (tmp_path / "cache").rglob("*"):
        assert SECRET.encode() not in path.read_bytes()


@pytest.mark.parametrize(
    "kind", ["timeout", "close", "429", "500", "503", "malformed", "nochoices"]
)
def test_openai_judge_retries_transient_faults(server, judge_factory, kind):
    judge = judge_factory()
    question = f"Who won? [[fault:{kind}:2]]"
    (verdict,) = judge.judge([_item(question, "Denver Broncos", "Denver Broncos")])
    assert verdict == Verdict(True, "Yes.", None)
    assert server.n_requests == 3  # two faults, then success


@pytest.mark.parametrize("kind", ["timeout", "close", "429", "503", "malformed"])
def test_openai_judge_persistent_faults_are_ungraded(server, judge_factory, tmp_path, kind):
    judge = judge_factory(max_retries=2)
    question = f"Who won? [[fault:{kind}:inf]]"
    items = [_item(question, "Denver Broncos", "Denver Broncos"), _item("q2", "a", "a")]
    verdicts = judge.judge(items)
    assert verdicts[0].correct is None  # ungraded, not wrong
    assert verdicts[0].error and "gave up after 3 attempts" in verdicts[0].error
    assert verdicts[1].correct is True  # other items are unaffected
    assert server.n_requests == 3 + 1
    # Ungraded results are not cached, so the next call asks again.
    judge.judge(items[:1])
    assert server.n_requests == 4 + 3
    grade = grade_answer("Denver Broncos", "Denver Broncos", "", verdicts[0])
    assert grade.judge is None


def test_openai_judge_non_retryable_4xx(server, judge_factory):
    judge = judge_factory()
    (verdict,) = judge.judge([_item("q [[fault:400:inf]]", "a", "a")])
    assert verdict.correct is None and "HTTP 400" in verdict.error
    assert server.n_requests == 1  # no retries


def test_openai_judge_unparseable_reply(server, judge_factory, tmp_path):
    judge = judge_factory()
    (verdict,) = judge.judge([_item("q [[fault:garbage:inf]]", "a", "a")])
    assert verdict.correct is None and verdict.raw == "I cannot tell."
    assert "unparseable" in verdict.error
    assert not (tmp_path / "cache" / "judge_cache.jsonl").exists()


def test_openai_judge_connection_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("SEAL_TEST_NO_SUCH_KEY", raising=False)
    with socket.socket() as sock:  # find a port with nothing listening on it
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    judge = OpenAIJudge(
        f"http://127.0.0.1:{port}/v1",
        "m",
        api_key_env="SEAL_TEST_NO_SUCH_KEY",  # loopback: a dummy key is allowed
        cache_dir=tmp_path,
        max_retries=2,
        timeout=0.5,
        backoff_base=0.01,
    )
    (verdict,) = judge.judge([_item("q", "a", "a")])
    judge.close()
    assert verdict.correct is None and "connection error" in verdict.error


def test_openai_judge_requires_key_for_remote(monkeypatch, tmp_path):
    monkeypatch.delenv("SEAL_TEST_NO_SUCH_KEY", raising=False)
    with pytest.raises(JudgeConfigError, match="SEAL_TEST_NO_SUCH_KEY"):
        OpenAIJudge("https://api.example.com/v1", "gpt-4.1", "SEAL_TEST_NO_SUCH_KEY", tmp_path)


def test_cache_skips_corrupt_lines(server, judge_factory, tmp_path, caplog):
    items = [_item("q1", "Paris", "Paris"), _item("q2", "Rome", "Paris")]
    judge_factory().judge(items)
    assert server.n_requests == 2
    cache_file = tmp_path / "cache" / "judge_cache.jsonl"
    with cache_file.open("a") as fh:
        fh.write("not json at all\n")
        fh.write('{"key": "abc", "correct": tru')  # truncated by a "crash", no newline
    with caplog.at_level(logging.WARNING, logger="seal.grading"):
        judge = judge_factory()
    assert "skipping unreadable judge cache line" in caplog.text
    assert [v.correct for v in judge.judge(items)] == [True, False]
    assert server.n_requests == 2  # still served from the readable lines
    judge.judge([_item("q3", "Oslo", "Oslo")])  # appended after the broken line, on its own line
    assert server.n_requests == 3
    judge_factory().judge([_item("q3", "Oslo", "Oslo")])
    assert server.n_requests == 3


def test_callable_judge(tmp_path):
    prompts = []

    def fn(prompt: str) -> str:
        prompts.append(prompt)
        if "boom" in prompt:
            raise RuntimeError("model crashed")
        return "yes" if "Predicted answer: Paris" in prompt else "No, it does not."

    judge = CallableJudge(fn, name="local-test", cache_dir=tmp_path)
    items = [_item("capital?", "Paris", "Paris"), _item("capital?", "Paris", "Rome"),
             _item("boom", "x", "x")]  # fmt: skip
    verdicts = judge.judge(items)
    assert [v.correct for v in verdicts] == [True, False, None]
    assert "model crashed" in verdicts[2].error
    assert "Gold answer: Paris" in prompts[0]
    assert len(prompts) == 3
    assert [v.correct for v in CallableJudge(fn, name="local-test", cache_dir=tmp_path).judge(
        items)] == [True, False, None]  # fmt: skip
    assert len(prompts) == 4  # only the ungraded item was asked again
