"""Knowledge data: loaders, prompt variants, the paper's sequence-building rules."""

import json
from pathlib import Path

import pytest

from seal.domains.knowledge import (
    PROMPTS,
    DataError,
    answer_prompt_text,
    load_passages,
    load_seal_json,
    load_squad_official,
    load_teacher_self_edits,
    self_edit_items,
    self_edit_prompt_text,
    training_texts,
)

SQUAD = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "squad")


def test_demo_corpus_shape():
    train, ev = load_passages("demo:train"), load_passages("demo:eval")
    assert len(train) + len(ev) >= 60
    for p in train + ev:
        assert 4 <= len(p.questions) <= 5
    assert not {p.id for p in train} & {p.id for p in ev}


def test_seal_json_and_teacher_file_from_shared_data():
    import os

    if not os.path.exists(f"{SQUAD}/eval.json"):
        pytest.skip("shared data not present")
    ps = load_seal_json(f"{SQUAD}/eval.json")
    assert len(ps) == 200 and sum(len(p.questions) for p in ps) == 974
    edits = load_teacher_self_edits(f"{SQUAD}/self_edits/gpt-4.1.json", ps[:5])
    assert len(edits) == 5 and all(len(c) == 5 for c in edits.values())


def test_official_squad_layout(tmp_path):
    data = {
        "version": "1.1",
        "data": [
            {
                "title": "Super_Bowl_50",
                "paragraphs": [
                    {
                        "context": "Super Bowl 50 was an American football game.",
                        "qas": [
                            {
                                "id": "1",
                                "question": "What sport?",
                                "answers": [
                                    {"answer_start": 20, "text": "American football"},
                                    {"answer_start": 29, "text": "football"},
                                ],
                            }
                        ],
                    }
                ],
            }
        ],
    }
    path = tmp_path / "dev-v1.1.json"
    path.write_text(json.dumps(data))
    ps = load_passages(str(path))
    assert ps[0].title == "Super Bowl 50"
    assert ps[0].questions[0].answers == ("American football", "football")
    assert load_squad_official(path) == ps


@pytest.mark.parametrize(
    "content, message",
    [
        (b'[{"title": "T"}]', "record 0: missing field 'context'"),
        (b"{not json", "invalid JSON at line 1"),
        (b"\xff\xfe[]", "not UTF-8"),
        (
            b'[{"title": "T", "context": "c", "questions": [{"question": "q"}]}]',
            "record 0.questions[0]: field 'answer'",
        ),
        (b'{"a": 1}', "expected a JSON list"),
        (b'[{"title": "", "context": "c"}]', "field 'title' is empty"),
    ],
)
def test_bad_files_name_file_record_and_field(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(DataError) as e:
        load_passages(str(path))
    assert str(path) in str(e.value) and message in str(e.value)


def test_missing_file_is_clear():
    with pytest.raises(DataError, match="no such data file"):
        load_passages("/nonexistent/x.json")


def test_implications_split_rules():
    v = PROMPTS["implications"]
    comp = "Sure, here are the implications:\n1. A is B.\n\n2. C was built in 1843.\n"
    assert self_edit_items(comp, v, strip_markers=False) == [
        "1. A is B.",
        "2. C was built in 1843.",
    ]
    assert self_edit_items(comp, v) == ["A is B.", "C was built in 1843."]
    assert self_edit_items("**Implications:**\n\n- X.\n* Y.\n10) Z.", v) == ["X.", "Y.", "Z."]
    p = load_passages("demo:eval")[0]
    seqs = training_texts(p, [comp], v)
    assert seqs[0] == f"{p.title}\nA is B."
    assert seqs[-1] == f"{p.title}\n{p.context.strip()}"  # the passage is always added
    assert len(seqs) == 3


def test_self_qa_split_and_none():
    v = PROMPTS["self-qa"]
    comp = "Who built it?\nAnswer: Ada.\nQuestion 2: When?\nAnswer: 1843."
    assert self_edit_items(comp, v) == [
        "Question 1: Who built it?\nAnswer: Ada.",
        "Question 2: When?\nAnswer: 1843.",
    ]
    p = load_passages("demo:eval")[0]
    assert training_texts(p, ["anything"], PROMPTS["none"]) == [f"{p.title}\n{p.context.strip()}"]


def test_cot_keeps_lines_after_marker():
    v = PROMPTS["implications-cot"]
    comp = "The passage says X.\nSo Y.\nImplications:\nA.\nB."
    assert self_edit_items(comp, v) == ["A.", "B."]


def test_prompt_texts_raw_and_chat(tiny):
    p = load_passages("demo:eval")[0]
    raw = self_edit_prompt_text(p, PROMPTS["implications"], None, chat=False)
    assert raw.startswith("Let's read the following passage and produce a list of implications")
    assert raw.endswith(f"Passage:\n{p.title}\n{p.context}\n\nImplications:\n")
    chat = self_edit_prompt_text(p, PROMPTS["implications"], tiny.tokenizer, chat=True)
    assert "<|im_start|>user" in chat and chat.endswith("<|im_start|>assistant\nImplications:\n")
    q = answer_prompt_text("Topic", "Who?", None, chat=False)
    assert (
        q
        == "Let's answer a question directly and concisely.\nQuestion: Topic: Topic\nWho?\nAnswer:\n"
    )
