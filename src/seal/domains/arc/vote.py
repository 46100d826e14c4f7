"""Voting predictions down to the ARC-Prize two attempts, the submission format, and scoring."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .grids import Grid, grid_to_list, validate_grid

Attempts = tuple[Grid | None, Grid | None]

# ARC-Prize submissions need a grid in both attempts; this stands in for a missing one.
PLACEHOLDER_GRID: Grid = ((0,),)


def vote(predictions: Iterable[Grid | None], weights: Iterable[float] | None = None) -> Attempts:
    """The two distinct grids with the largest total weight: (attempt_1, attempt_2).

    `predictions` are candidate grids (None for an unparseable one, which is skipped), e.g. one
    per invertible transform or demo order, already mapped back; `weights` defaults to 1 each
    (a count). Ties go to the grid seen first, so the order of `predictions` (e.g. identity
    transform first) is the deterministic tie-break. Missing attempts are None.
    """
    preds = list(predictions)
    ws = [1.0] * len(preds) if weights is None else [float(w) for w in weights]
    if len(ws) != len(preds):
        raise ValueError(f"{len(ws)} weights for {len(preds)} predictions")
    totals: dict[Grid, float] = {}
    first_seen: dict[Grid, int] = {}
    for k, (grid, w) in enumerate(zip(preds, ws, strict=True)):
        if grid is None or not math.isfinite(w):
            continue
        if grid not in totals:
            totals[grid] = 0.0
            first_seen[grid] = k
        totals[grid] += w
    ranked = sorted(totals, key=lambda g: (-totals[g], first_seen[g]))
    ranked += [None, None]
    return ranked[0], ranked[1]


def submission_entry(attempts: Attempts) -> dict[str, list[list[int]]]:
    """One test input's entry in an ARC-Prize submission: ``{"attempt_1": grid, "attempt_2":
    grid}`` as lists of lists; a missing attempt is written as `PLACEHOLDER_GRID` ([[0]])."""
    a1, a2 = attempts
    return {
        "attempt_1": grid_to_list(a1 if a1 is not None else PLACEHOLDER_GRID),
        "attempt_2": grid_to_list(a2 if a2 is not None else PLACEHOLDER_GRID),
    }


def submission(attempts_by_task: Mapping[str, Sequence[Attempts]]) -> dict[str, Any]:
    """A whole ARC-Prize submission: ``{task_id: [entry per test input, ...]}``."""
    return {
        task_id: [submission_entry(a) for a in per_test]
        for task_id, per_test in attempts_by_task.items()
    }


def task_submission(tasks: Sequence[Any], runs_by_task: Mapping[str, Sequence[Any]]) -> dict:
    """The ARC-Prize submission of several runs per task (self-edits, repeats): per test input,
    the 2 attempts voted over every prediction of every run. A run is its per-test-input
    candidate lists (`predictions[k]`: grids as tuples or JSON lists, None where unparsed);
    a task without runs gets placeholder attempts."""
    attempts = {}
    for t in tasks:
        runs = runs_by_task.get(t.id, [])
        attempts[t.id] = [
            vote(
                None if g is None else validate_grid(g)
                for run in runs
                if k < len(run)
                for g in run[k]
            )
            for k in range(len(t.test_inputs))
        ]
    return submission(attempts)


def is_solved(task: Any, attempts_per_test: Sequence[Attempts]) -> bool:
    """True when, for every test input of `task` (a `data.Task`), its known output equals one
    of that input's two attempts (the ARC-Prize rule).

    Raises ValueError if the task has no test outputs or the attempts do not match its test
    inputs one-to-one.
    """
    outputs = task.test_outputs
    if outputs is None:
        raise ValueError(f"task {task.id!r} has no test outputs to score against")
    if len(attempts_per_test) != len(outputs):
        raise ValueError(
            f"task {task.id!r}: {len(attempts_per_test)} attempt pairs for {len(outputs)} tests"
        )
    return all(
        truth is not None and truth in (a1, a2)
        for truth, (a1, a2) in zip(outputs, attempts_per_test, strict=True)
    )
