"""The Domain protocol: what the SEAL loops need to know about a kind of context.

A domain supplies contexts (training and held-out), the prompt under which the generator
writes a self-edit, how self-edits are sampled, and the inner loop that turns (context,
self-edit) into a reward. The loops in rest_em.py only ever talk to this interface, so
knowledge incorporation and ARC plug in the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from seal.generation import SamplingParams


@dataclass
class Job:
    """One inner loop to run: apply `completion` (a self-edit) for context `ctx_id`.

    `key` names the job uniquely within a phase (it is how resume finds finished work);
    `payload` is whatever the domain's runner needs, and must be plain data. `cost` estimates
    its training work (knowledge: its training sequences): executors batch jobs of similar
    cost together, so that the adapters sharing passes finish together (see
    executors.chunks_by_position)."""

    key: str
    ctx_id: str
    sample: int
    repeat: int
    seed: int
    payload: Any = None
    cost: float = 0.0


@dataclass
class Result:
    """What an inner loop returns: the reward and per-item scores (questions, test inputs),
    plus anything the domain wants kept in the run directory (answers, grades, losses)."""

    key: str
    reward: float | None
    scores: list[float | None]
    detail: dict = field(default_factory=dict)
    seconds: float = 0.0


class Runner(Protocol):
    """Runs jobs on one loaded model; `capacity` jobs at a time share batched passes."""

    capacity: int

    def run(self, jobs: list[Job]) -> list[Result]: ...

    def close(self) -> None: ...


@runtime_checkable
class Domain(Protocol):
    """A SEAL domain: contexts, the self-edit prompt, jobs and the runner that scores them.

    Optional: `eval_artifacts(contexts, results) -> {name: JSON object}`, files the outer loop
    writes beside each round's eval scores as `eval/round_N.<name>` (ARC: the submission)."""

    name: str
    #: the paper's selection rule for this domain: "best" (knowledge) or "threshold" (binary)
    default_selection: str

    def train_contexts(self) -> list[Any]: ...

    def eval_contexts(self) -> list[Any]: ...

    def context_id(self, ctx: Any) -> str: ...

    def self_edit_prompt(self, ctx: Any, tokenizer) -> str: ...

    def sampling_params(self) -> SamplingParams: ...

    def make_job(
        self, ctx: Any, completion: str, key: str, sample: int, repeat: int, seed: int
    ) -> Job: ...

    def make_runner(self, lm) -> Runner: ...
