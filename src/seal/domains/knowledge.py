"""Knowledge incorporation (the paper's SQuAD domain): passages, self-edit prompts, training
sequences, closed-book questions.

A context is a passage (title + text) with questions about it. The self-edit is text the model
writes about the passage (implications, rewrites, Q&A pairs); the inner loop fine-tunes on it
and the reward is closed-book accuracy on the passage's questions.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from seal.jsonfile import JsonFileError, read_json_file

# --------------------------------------------------------------------------------------------
# Passages


@dataclass(frozen=True)
class Question:
    question: str
    answers: tuple[str, ...]  # gold answers; the first is the reference one

    @property
    def answer(self) -> str:
        return self.answers[0]


@dataclass(frozen=True)
class Passage:
    """One context of the knowledge domain."""

    id: str
    title: str
    context: str
    questions: tuple[Question, ...] = field(default=())


class DataError(ValueError):
    """A data file is malformed; the message names the file, the record and the field."""


def passage_id(title: str, context: str) -> str:
    """A stable id from the content (so ids survive reordering and subsetting of files)."""
    return hashlib.sha256(f"{title}\n{context}".encode()).hexdigest()[:16]


def _read_json(path: Path):
    try:
        return read_json_file(path)
    except JsonFileError as e:
        raise DataError(f"{path}: {e}") from None


def _check_text(value: str, where: str, key: str) -> str:
    # JSON can escape lone surrogates ("\ud800"), which are not text: they cannot be encoded,
    # hashed or tokenized, so they are rejected here rather than deep in a run.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(
            f"{where}: field {key!r} has an invalid character at position {e.start} "
            "(a lone surrogate escape)"
        ) from None
    return value


def _str_field(rec: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in rec:
        raise DataError(f"{where}: missing field {key!r}")
    v = rec[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return _check_text(v, where, key)


MAX_CONTEXT_CHARS = 100_000


def _passage_from_record(rec, where: str) -> Passage:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected an object, got {type(rec).__name__}")
    title = _str_field(rec, "title", where)
    context = _str_field(rec, "context", where)
    if len(context) > MAX_CONTEXT_CHARS:
        raise DataError(
            f"{where}: field 'context' has {len(context)} characters "
            f"(limit {MAX_CONTEXT_CHARS}); split it into passages"
        )
    qs = rec.get("questions", [])
    if not isinstance(qs, list):
        raise DataError(f"{where}: field 'questions' must be a list")
    questions = []
    for j, q in enumerate(qs):
        qw = f"{where}.questions[{j}]"
        if not isinstance(q, dict):
            raise DataError(f"{qw}: expected an object")
        text = _str_field(q, "question", qw)
        ans = q.get("answer", q.get("answers"))
        if isinstance(ans, str):
            answers = (ans,)
        elif isinstance(ans, list) and ans and all(isinstance(a, str) for a in ans):
            answers = tuple(ans)
        elif isinstance(ans, list) and ans and all(isinstance(a, dict) for a in ans):
            answers = tuple(_str_field(a, "text", f"{qw}.answers[{m}]") for m, a in enumerate(ans))
        else:
            raise DataError(f"{qw}: field 'answer' must be a non-empty string or list of strings")
        for m, a in enumerate(answers):
            _check_text(a, qw, f"answer[{m}]")
        questions.append(Question(text, answers))
    return Passage(passage_id(title, context), title, context, tuple(questions))


def load_seal_json(path: str | Path) -> list[Passage]:
    """SEAL-format JSON: `[{title, context, questions: [{question, answer}]}]`."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of passages, got {type(data).__name__}")
    return [_passage_from_record(r, f"{path}: record {i}") for i, r in enumerate(data)]


def load_squad_official(path: str | Path) -> list[Passage]:
    """The official SQuAD v1.1 layout: `{data: [{title, paragraphs: [{context, qas}]}]}`."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: expected an object with a 'data' list (SQuAD v1.1 layout)")
    out = []
    for i, article in enumerate(data["data"]):
        where = f"{path}: data[{i}]"
        if not isinstance(article, dict):
            raise DataError(f"{where}: expected an object")
        title = _str_field(article, "title", where).replace("_", " ")
        paragraphs = article.get("paragraphs", [])
        if not isinstance(paragraphs, list):
            raise DataError(f"{where}: field 'paragraphs' must be a list")
        for k, para in enumerate(paragraphs):
            pw = f"{where}.paragraphs[{k}]"
            if not isinstance(para, dict):
                raise DataError(f"{pw}: expected an object")
            qas = para.get("qas", [])
            if not isinstance(qas, list):
                raise DataError(f"{pw}: field 'qas' must be a list")
            questions = []
            for j, qa in enumerate(qas):
                if not isinstance(qa, dict):
                    raise DataError(f"{pw}.qas[{j}]: expected an object")
                answers = qa.get("answers", [])
                if not isinstance(answers, list):
                    raise DataError(f"{pw}.qas[{j}]: field 'answers' must be a list")
                q = {"answers": [a.get("text") for a in answers if isinstance(a, dict)]}
                if "question" in qa:
                    q["question"] = qa["question"]
                questions.append(q)
            rec = {"title": title, "questions": questions}
            if "context" in para:
                rec["context"] = para["context"]
            out.append(_passage_from_record(rec, pw))
    return out


def load_hf_squad(split: str = "validation") -> list[Passage]:
    """SQuAD from the Hugging Face hub via `datasets` (needs internet and `seal-lm[datasets]`);
    questions are grouped by passage."""
    try:
        import datasets
    except ImportError:
        raise DataError(
            "loading 'hf:squad' needs the datasets package: pip install 'seal-lm[datasets]'"
        ) from None
    ds = datasets.load_dataset("squad", split=split)
    grouped: dict[tuple[str, str], list] = {}
    for row in ds:
        grouped.setdefault((row["title"], row["context"]), []).append(
            {"question": row["question"], "answers": list(row["answers"]["text"])}
        )
    return [
        _passage_from_record(
            {"title": t.replace("_", " "), "context": c, "questions": q}, f"hf:squad/{split}[{i}]"
        )
        for i, ((t, c), q) in enumerate(grouped.items())
    ]


def demo_path(split: str) -> Path:
    return Path(str(resources.files("seal") / "data" / "demo" / f"{split}.json"))


def load_passages(spec: str, split: str = "eval") -> list[Passage]:
    """`demo` / `demo:train` / `demo:eval`, `hf:squad[:split]`, or a path to a SEAL-format or
    official SQuAD JSON file (detected from its shape)."""
    if spec == "demo" or spec.startswith("demo:"):
        s = spec.split(":", 1)[1] if ":" in spec else split
        if s not in ("train", "eval"):
            raise DataError(f"demo corpus split must be train or eval, got {s!r}")
        return load_seal_json(demo_path(s))
    if spec.startswith("hf:"):
        parts = spec.split(":")
        return load_hf_squad(parts[2] if len(parts) > 2 else "validation")
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataError(f"{spec}: no such data file (or use 'demo', 'demo:train', 'hf:squad')")
    data = _read_json(path)
    if isinstance(data, dict) and "data" in data:
        return load_squad_official(path)
    return load_seal_json(path)


def demo_corpus_texts() -> list[str]:
    """All demo passages and questions as plain text (trains the tiny test tokenizer)."""
    texts = []
    for split in ("train", "eval"):
        for p in load_seal_json(demo_path(split)):
            texts.append(f"{p.title}\n{p.context}")
            texts.extend(f"{q.question} {q.answer}" for q in p.questions)
    return texts


def load_teacher_self_edits(path: str | Path, passages: list[Passage]) -> dict[str, list[str]]:
    """Self-edits written by another model (e.g. the paper's GPT-4.1 file): a list of
    `{title, context, completions: [str]}` matched to passages by content. Returns
    passage id -> completions, for the passages that have them."""
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of {{title, context, completions}}")
    by_id: dict[str, list[str]] = {}
    for i, rec in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected an object")
        title, context = _str_field(rec, "title", where), _str_field(rec, "context", where)
        comps = rec.get("completions")
        if not isinstance(comps, list) or not all(isinstance(c, str) for c in comps):
            raise DataError(f"{where}: field 'completions' must be a list of strings")
        for m, c in enumerate(comps):
            _check_text(c, where, f"completions[{m}]")
        by_id[passage_id(title, context)] = comps
    return {p.id: by_id[p.id] for p in passages if p.id in by_id}


# --------------------------------------------------------------------------------------------
# Self-edit prompts


@dataclass(frozen=True)
class SelfEditPrompt:
    """A self-edit prompt variant.

    `instruction` is followed by the passage; `cue` starts the model's answer (in chat mode it
    pre-fills the assistant turn). `split` says how the completion becomes training items:
    `lines` (one item per non-empty line), `qa` (one item per "Question N:" block), `after_cue`
    (lines after the last `cue_marker`, for chain-of-thought), `whole` (the completion is one
    document) or `none` (no self-edit: the passage alone)."""

    name: str
    instruction: str
    cue: str
    split: str = "lines"
    cue_marker: str = ""

    def render(self, title: str, context: str) -> str:
        return f"{self.instruction}\n\nPassage:\n{title}\n{context}\n\n"


_READ = "Let's read the following passage and "
PROMPTS: dict[str, SelfEditPrompt] = {
    p.name: p
    for p in [
        SelfEditPrompt(
            "implications",
            _READ + "produce a list of implications derived "
            "directly or indirectly from the content.",
            "Implications:\n",
        ),
        SelfEditPrompt(
            "implications-long",
            _READ + "produce a long list of implications "
            "derived directly or indirectly from the content.",
            "Implications:\n",
        ),
        SelfEditPrompt(
            "implications-very-long",
            _READ + "produce a very long list of "
            "implications derived directly or indirectly from the content.",
            "Implications:\n",
        ),
        SelfEditPrompt(
            "rewrite",
            _READ + "rewrite it in a few different ways, each one separated by a newline.",
            "Rewritten passages:\n",
        ),
        SelfEditPrompt(
            "self-qa", _READ + "rewrite it in a question-answer format.", "Question 1: ", split="qa"
        ),
        SelfEditPrompt(
            "implications-cot",
            _READ + "produce a list of implications derived "
            "directly or indirectly from the content. First think step by step "
            "about what the passage says and what follows from it; then write "
            "'Implications:' followed by the list, one per line.",
            "Reasoning:\n",
            split="after_cue",
            cue_marker="Implications:",
        ),
        SelfEditPrompt("none", "", "", split="none"),
    ]
}


def prompt_variant(name: str, extra: dict[str, SelfEditPrompt] | None = None) -> SelfEditPrompt:
    table = {**PROMPTS, **(extra or {})}
    if name not in table:
        raise KeyError(f"unknown self-edit prompt {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def self_edit_prompt_text(
    passage: Passage, variant: SelfEditPrompt, tokenizer=None, chat: bool = True
) -> str:
    """The text the generator continues. Raw mode: the paper's prompt. Chat mode: the same
    instruction as the user turn, the cue pre-filled in the assistant turn."""
    body = variant.render(passage.title, passage.context)
    if chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        head = tokenizer.apply_chat_template(
            [{"role": "user", "content": body.rstrip()}], tokenize=False, add_generation_prompt=True
        )
        return head + variant.cue
    return body + variant.cue


_QA_SPLIT = re.compile(r"\n?(?=Question\s+\d+\s*:)")
_LIST_MARK = re.compile(r"^\s*(?:[-*•]|\(?\d{1,3}[.)])\s+")
_HEADER = re.compile(r"^\s*(?:\*\*|#+\s*)?[A-Za-z][\w\s-]{0,40}:(?:\*\*)?\s*$")


def self_edit_items(
    completion: str, variant: SelfEditPrompt, strip_markers: bool = True
) -> list[str]:
    """Split a self-edit into training items by the variant's rule (the paper's rules: one
    item per non-empty line; self-QA splits on 'Question N:').

    With `strip_markers`, list numbering ("1. ", "- ") and bare header lines
    ("**Implications:**") are removed. The reference code kept them; measured on the demo
    corpus, a small model trained on numbered lines starts its answers with "1. ..." and
    answers worse, and the numbers carry no knowledge."""
    if variant.split == "none":
        return []
    text = completion.replace("\r\n", "\n")
    if variant.split == "whole":
        return [text.strip()] if text.strip() else []
    if variant.split == "after_cue" and variant.cue_marker and variant.cue_marker in text:
        text = text.rsplit(variant.cue_marker, 1)[1]
    if variant.split == "qa":
        text = variant.cue + text if not text.lstrip().startswith("Question") else text
        return [b.strip() for b in _QA_SPLIT.split(text) if b.strip()]
    items = [ln.strip() for ln in text.split("\n") if ln.strip()]
    # Drop a leading preamble line ("Sure, here are some implications:") when a numbered
    # list follows it, as the reference implementation does.
    if len(items) > 1 and items[1].startswith("1.") and not items[0].startswith("1."):
        items = items[1:]
    if strip_markers:
        items = [_LIST_MARK.sub("", it).strip() for it in items if not _HEADER.match(it)]
        items = [it for it in items if it]
    return items


def training_texts(
    passage: Passage, completions: list[str], variant: SelfEditPrompt, include_passage: bool = True
) -> list[str]:
    """The inner loop's training sequences: each self-edit item prefixed with the title, plus
    the passage itself as one more sequence (as in the paper)."""
    seqs = [f"{passage.title}\n{item}" for c in completions for item in self_edit_items(c, variant)]
    if include_passage or not seqs:
        seqs.append(f"{passage.title}\n{passage.context.strip()}")
    return seqs


# --------------------------------------------------------------------------------------------
# Closed-book questions

ANSWER_INSTRUCTION = "Let's answer a question directly and concisely."


def answer_prompt_text(title: str, question: str, tokenizer=None, chat: bool = True) -> str:
    """The paper's evaluation prompt (no passage in context); chat mode puts it in a user turn."""
    body = f"{ANSWER_INSTRUCTION}\nQuestion: Topic: {title}\n{question}\nAnswer:\n"
    if chat and tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": body.rstrip()}], tokenize=False, add_generation_prompt=True
        )
    return body


# --------------------------------------------------------------------------------------------
# The domain object used by the SEAL loops


class KnowledgeDomain:
    """Knowledge incorporation behind the Domain protocol (see domains/base.py)."""

    name = "knowledge"
    default_selection = "best"

    def __init__(
        self, train: list[Passage], eval: list[Passage], self_edit, inner_loop, judge=None
    ):
        self._train, self._eval = train, eval
        self.self_edit_cfg, self.inner_cfg, self.judge = self_edit, inner_loop, judge
        self.variant = prompt_variant(self_edit.prompt, self_edit.variants())

    def train_contexts(self) -> list[Passage]:
        return self._train

    def eval_contexts(self) -> list[Passage]:
        return self._eval

    def context_id(self, ctx: Passage) -> str:
        return ctx.id

    def self_edit_prompt(self, ctx: Passage, tokenizer) -> str:
        return self_edit_prompt_text(ctx, self.variant, tokenizer, self.self_edit_cfg.chat)

    def sampling_params(self):
        from seal.generation import SamplingParams

        c = self.self_edit_cfg
        return SamplingParams(c.max_new_tokens, True, c.temperature, c.top_p)

    def make_job(
        self, ctx: Passage, completion: str, key: str, sample: int, repeat: int, seed: int
    ):
        from seal.domains.base import Job

        texts = training_texts(
            ctx, [completion] if completion else [], self.variant, self.inner_cfg.include_passage
        )
        payload = {"passage": ctx, "texts": texts}
        return Job(key, ctx.id, sample, repeat, seed, payload=payload, cost=len(texts))

    def make_runner(self, lm):
        return KnowledgeRunner(lm, self.inner_cfg, self.judge)


class KnowledgeRunner:
    """Adapts the knowledge inner loop to the Runner protocol."""

    def __init__(self, lm, cfg, judge=None):
        from seal.inner_loop import InnerLoop

        self.inner = InnerLoop(lm, cfg, judge=judge)
        self.capacity = self.inner.capacity

    def run(self, jobs):
        from seal.domains.base import Result
        from seal.inner_loop import KnowledgeJob

        kjobs = [
            KnowledgeJob(j.key, [j.payload["passage"]], j.payload["texts"], j.seed) for j in jobs
        ]
        out = []
        for res in self.inner.run(kjobs):
            metric = self.inner.cfg.reward_metric
            out.append(
                Result(
                    key=res.key,
                    reward=res.reward,
                    scores=[g.get(metric) for g in res.grades],
                    detail={
                        "metrics": res.metrics,
                        "answers": res.answers,
                        "grades": res.grades,
                        "n_sequences": res.n_sequences,
                        "train_tokens": res.train_tokens,
                        "loss_first": res.losses[0] if res.losses else None,
                        "loss_last": res.losses[-1] if res.losses else None,
                    },
                    seconds=res.seconds,
                )
            )
        return out

    def close(self) -> None:
        self.inner.close()
