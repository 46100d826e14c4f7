"""Test-time-training data for one ARC task, built from its demonstrations only.

Follows the ARC TTT paper (Akyurek et al. 2024) as SEAL uses it:

1. leave-n-out tasks (n in {1, 2}): each demonstration in turn is the query; n - 1 further
   demonstrations are dropped in every possible way, and the rest (in their original order)
   are the context;
2. every chosen augmenter is applied to every leave-n-out task (the same transform on all its
   grids); a task with a grid over 30x30 is dropped;
3. copies with a random colour permutation and a shuffled context order are added;
4. exact duplicates are removed and the result is capped at `max_examples` (a seeded sample).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .augment import Augmenter, ColourPermutation, augment_pairs, augmenters_for
from .grids import Grid, GridFormat, Pair, format_grid, format_task_prompt, validate_grid

MAX_TTT_EXAMPLES = 250


@dataclass(frozen=True)
class LeaveOutTask:
    """A task made from demonstrations: `context` pairs and one `query` pair.

    `left_out` holds the demonstration indices not in the context, the query's index first.
    """

    context: tuple[Pair, ...]
    query: Pair
    left_out: tuple[int, ...]


@dataclass(frozen=True)
class TTTExample:
    """One training example: context demonstrations, a query input and its output, and the
    names of the augmentations that produced it (empty for an un-augmented leave-n-out task)."""

    context: tuple[Pair, ...]
    query_input: Grid
    query_output: Grid
    augmentations: tuple[str, ...] = ()

    def key(self) -> tuple:
        """The content (context and query); two examples with equal keys are duplicates."""
        return (self.context, self.query_input, self.query_output)

    def prompt(self, fmt: GridFormat = "compact") -> str:
        """The model input: context demonstrations, then the query input and "Output:\\n"."""
        return format_task_prompt(self.context, self.query_input, fmt)

    def completion(self, fmt: GridFormat = "compact") -> str:
        """The target completion: the query output grid as text (no end-of-sequence token)."""
        return format_grid(self.query_output, fmt)


def _pairs(train_pairs: Iterable[tuple[Any, Any]]) -> list[Pair]:
    return [(validate_grid(i), validate_grid(o)) for i, o in train_pairs]


def leave_n_out_tasks(train_pairs: Sequence[tuple[Any, Any]], n: int) -> list[LeaveOutTask]:
    """All leave-n-out tasks of the demonstrations, in a fixed order.

    For each demonstration i (the query) and each set of n - 1 other demonstrations to drop,
    the remaining demonstrations form the context. With N demonstrations that is
    N * C(N - 1, n - 1) tasks, each with N - n context pairs; none when N - n < 1 (a task needs
    at least one demonstration in its context). Raises ValueError for n < 1.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    pairs = _pairs(train_pairs)
    count = len(pairs)
    if count - n < 1:
        return []
    out: list[LeaveOutTask] = []
    for i in range(count):
        others = [j for j in range(count) if j != i]
        for dropped in itertools.combinations(others, n - 1):
            context = tuple(pairs[j] for j in others if j not in dropped)
            out.append(LeaveOutTask(context, pairs[i], (i, *dropped)))
    return out


def _augmented(task: LeaveOutTask, aug: Augmenter) -> TTTExample | None:
    pairs = augment_pairs(aug, [*task.context, task.query])
    if pairs is None:
        return None
    (qi, qo) = pairs[-1]
    return TTTExample(tuple(pairs[:-1]), qi, qo, (aug.name,))


def dedup_examples(examples: Iterable[TTTExample]) -> list[TTTExample]:
    """Drop exact duplicates (equal `key()`), keeping the first occurrence and the order."""
    seen: set[tuple] = set()
    out: list[TTTExample] = []
    for ex in examples:
        k = ex.key()
        if k not in seen:
            seen.add(k)
            out.append(ex)
    return out


def build_ttt_examples(
    train_pairs: Sequence[tuple[Any, Any]],
    families: Iterable[str],
    seed: int = 0,
    max_examples: int = MAX_TTT_EXAMPLES,
    n_values: Sequence[int] = (1, 2),
    colour_perms: int = 1,
    shuffle_orders: bool = True,
) -> list[TTTExample]:
    """Test-time-training examples for a task's demonstrations under the chosen augmentation
    families (names from `augment.FAMILIES`, e.g. a `TTTConfig.families()`).

    The result is: the leave-n-out tasks for each n in `n_values`; each of them under each
    augmenter of `families` (dropped when a grid exceeds 30x30); then `colour_perms` rounds of
    copies of all of those, each copy with its own random colour permutation and, if
    `shuffle_orders`, a shuffled context order. As in the TTT code, no colour permutation is
    applied when `families` is empty (that configuration asks for no augmentation); the copies
    then differ only in order, and are omitted when `shuffle_orders` is off too. Exact
    duplicates are removed, and if more than `max_examples` remain a sample of that many is
    kept (in their original relative order).

    Deterministic: the same arguments always give the same list. Every grid is at most 30x30.
    """
    if max_examples < 0:
        raise ValueError(f"max_examples must be >= 0, got {max_examples}")
    rng = random.Random(seed)
    families = set(families)
    augmenters = augmenters_for(families, rng)
    base: list[LeaveOutTask] = []
    for n in n_values:
        base += leave_n_out_tasks(train_pairs, n)

    examples = [TTTExample(t.context, t.query[0], t.query[1]) for t in base]
    for aug in augmenters:
        for task in base:
            ex = _augmented(task, aug)
            if ex is not None:
                examples.append(ex)
    examples = dedup_examples(examples)

    use_colours = bool(families)
    if use_colours or shuffle_orders:
        copies: list[TTTExample] = []
        for _ in range(colour_perms):
            for ex in examples:
                names = list(ex.augmentations)
                context, qi, qo = list(ex.context), ex.query_input, ex.query_output
                if use_colours:
                    perm = ColourPermutation.random(rng)
                    context = [(perm.apply(i), perm.apply(o)) for i, o in context]
                    qi, qo = perm.apply(qi), perm.apply(qo)
                    names.append(perm.name)
                if shuffle_orders:
                    rng.shuffle(context)
                    names.append("shuffle_order")
                copies.append(TTTExample(tuple(context), qi, qo, tuple(names)))
        examples = dedup_examples(examples + copies)

    if len(examples) > max_examples:
        keep = sorted(rng.sample(range(len(examples)), max_examples))
        examples = [examples[i] for i in keep]
    return examples
