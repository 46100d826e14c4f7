"""ARC grids: the immutable `Grid` type, validation, and the text formats a model reads and writes.

A grid is a tuple of rows, each a tuple of ints 0-9; at least 1x1 and at most 30x30 (the ARC
limits). Two text formats round-trip exactly:

- ``"compact"``: one row per line, digits concatenated (``"0120\\n3400"``);
- ``"list"``: the paper's Python-list format (``"[[0, 1, 2, 0], [3, 4, 0, 0]]"``), one line.

Task prompts are plain text: for each demonstration ``"Input:\\n<grid>\\nOutput:\\n<grid>\\n\\n"``,
then the test input and ``"Output:\\n"``, so that the model's completion is the output grid.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable, Sequence
from typing import Any, Literal

Grid = tuple[tuple[int, ...], ...]
Pair = tuple[Grid, Grid]
GridFormat = Literal["compact", "list"]

FORMATS: tuple[str, ...] = ("compact", "list")
MAX_SIDE = 30
# End-of-text markers a completion may still carry (Llama 3, GPT-2 style, SentencePiece, ChatML).
END_MARKERS: tuple[str, ...] = (
    "<|eot_id|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "<|im_end|>",
    "</s>",
    "<eos>",
)
# Only this many characters of a completion are examined: a 30x30 grid needs under 3,000 in
# either format, so this leaves ample room for surrounding text while bounding the work done.
MAX_PARSE_CHARS = 100_000


def validate_grid(grid: Any) -> Grid:
    """Check that `grid` is a valid ARC grid and return it as an immutable `Grid`.

    Accepts any 2-D nesting of sequences (lists, tuples, numpy arrays) of integers. Raises
    ValueError naming the problem: not a sequence of rows, empty, ragged rows ("row 3 has 5
    cells, expected 4"), a value that is not an integer or is outside 0-9, or a side over 30.
    """
    if hasattr(grid, "tolist") and not isinstance(grid, (str, bytes)):
        grid = grid.tolist()  # numpy arrays: plain Python ints, and rows as lists
    if isinstance(grid, (str, bytes)) or not isinstance(grid, Sequence):
        raise ValueError(f"expected a list of rows, got {type(grid).__name__}")
    if len(grid) == 0:
        raise ValueError("grid is empty (no rows)")
    if len(grid) > MAX_SIDE:
        raise ValueError(f"grid has {len(grid)} rows, more than {MAX_SIDE}")
    rows: list[tuple[int, ...]] = []
    width = -1
    for r, row in enumerate(grid):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise ValueError(f"row {r} is not a list of cells (got {type(row).__name__})")
        if len(row) == 0:
            raise ValueError(f"row {r} is empty")
        if width < 0:
            width = len(row)
            if width > MAX_SIDE:
                raise ValueError(f"row {r} has {width} cells, more than {MAX_SIDE}")
        elif len(row) != width:
            raise ValueError(f"row {r} has {len(row)} cells, expected {width}")
        cells = []
        for c, value in enumerate(row):
            # bool is an int subclass; True as a colour is almost certainly a bug upstream.
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(f"row {r}, column {c}: {value!r} is not an integer")
            if not 0 <= value <= 9:
                raise ValueError(f"row {r}, column {c}: value {value} is outside 0-9")
            cells.append(int(value))
        rows.append(tuple(cells))
    return tuple(rows)


def is_valid_grid(grid: Any) -> bool:
    """True when `validate_grid(grid)` would succeed."""
    try:
        validate_grid(grid)
    except ValueError:
        return False
    return True


def grid_shape(grid: Grid) -> tuple[int, int]:
    """(height, width) of a grid."""
    return len(grid), len(grid[0]) if grid else 0


def fits(grid: Grid, max_side: int = MAX_SIDE) -> bool:
    """True when both sides of `grid` are at most `max_side` (augmented grids may exceed 30)."""
    h, w = grid_shape(grid)
    return h <= max_side and w <= max_side


def grid_to_list(grid: Grid) -> list[list[int]]:
    """The grid as a list of lists (the JSON form used by ARC files and submissions)."""
    return [list(row) for row in grid]


def format_grid(grid: Any, fmt: GridFormat = "compact") -> str:
    """Render a grid as text in `fmt` ("compact" or "list"); no trailing newline.

    `parse_grid(format_grid(g, fmt), fmt) == g` for every valid grid. Raises ValueError for an
    invalid grid or an unknown format.
    """
    g = validate_grid(grid)
    if fmt == "compact":
        return "\n".join("".join(str(v) for v in row) for row in g)
    if fmt == "list":
        return "[" + ", ".join("[" + ", ".join(str(v) for v in row) + "]" for row in g) + "]"
    raise ValueError(f"unknown grid format {fmt!r}; expected one of {FORMATS}")


def _cut_at_end_marker(text: str) -> str:
    cut = len(text)
    for marker in END_MARKERS:
        i = text.find(marker)
        if 0 <= i < cut:
            cut = i
    return text[:cut]


_COMPACT_ROW = re.compile(r"[0-9]+")


def _parse_compact(text: str) -> Grid | None:
    # The answer is the first run of consecutive digit-only lines; the run ends at the first
    # line that is not one (a blank line, or the model going on with "Input:").
    rows: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if _COMPACT_ROW.fullmatch(line):
            rows.append(line)
            if len(rows) > MAX_SIDE:
                return None
        elif rows:
            break
    if not rows:
        return None
    width = len(rows[0])
    if width > MAX_SIDE or any(len(row) != width for row in rows):
        return None
    return tuple(tuple(int(ch) for ch in row) for row in rows)


_LIST_START = re.compile(r"\[\s*\[")
_LIST_TOKEN = re.compile(r"\s*(?:([\[\],])|([0-9]+)|(\S))")


def _parse_list(text: str) -> Grid | None:
    # The answer starts at the first "[[" (whitespace allowed between the brackets); a small
    # state machine then reads rows of single digits. Anything malformed from there is None.
    start = _LIST_START.search(text)
    if start is None:
        return None
    tokens = _LIST_TOKEN.finditer(text, start.start())
    rows: list[tuple[int, ...]] = []
    row: list[int] = []
    # States: "open" (expect outer "["), "row" (expect "[" of a row), "cell" (expect a digit,
    # or "]" for an empty row, which is rejected), "after_cell" ("," or "]"), "after_row" ("," or
    # the final "]").
    state = "open"
    for m in tokens:
        punct, number, other = m.group(1), m.group(2), m.group(3)
        if other is not None:
            return None
        if state == "open":
            if punct != "[":
                return None
            state = "row"
        elif state == "row":
            if punct != "[":
                return None
            row = []
            state = "cell"
        elif state == "cell":
            if number is None or len(number) != 1:
                return None
            row.append(int(number))
            if len(row) > MAX_SIDE:
                return None
            state = "after_cell"
        elif state == "after_cell":
            if punct == ",":
                state = "cell"
            elif punct == "]":
                if rows and len(row) != len(rows[0]):
                    return None
                rows.append(tuple(row))
                if len(rows) > MAX_SIDE:
                    return None
                state = "after_row"
            else:
                return None
        elif state == "after_row":
            if punct == ",":
                state = "row"
            elif punct == "]":
                return tuple(rows)
            else:
                return None
    return None


def parse_grid(text: Any, fmt: GridFormat = "compact") -> Grid | None:
    """Read the first grid in a model's answer; None when there is no well-formed one.

    Never raises, whatever `text` is (not a string, empty, binary junk, huge). Leading and
    trailing whitespace is ignored, and so is everything from the first end-of-text marker
    (`END_MARKERS`) on. Only the first `MAX_PARSE_CHARS` characters are examined.

    "compact": the first run of consecutive lines made only of digits 0-9 is the grid; text
    before it (e.g. a repeated "Output:") and after it is ignored.
    "list": the grid starts at the first "[[" and must be a list of equal-length rows of single
    digits.
    The first grid-shaped candidate decides: if it is ragged, has a value outside 0-9 or a side
    over 30, the answer is None (a later grid in the text is not looked for, since that is the
    model continuing, not answering).
    """
    try:
        if isinstance(text, (bytes, bytearray)):
            text = bytes(text[: MAX_PARSE_CHARS * 4]).decode("utf-8", errors="replace")
        if not isinstance(text, str):
            return None
        text = _cut_at_end_marker(text[:MAX_PARSE_CHARS]).strip()
        if fmt == "compact":
            return _parse_compact(text)
        if fmt == "list":
            return _parse_list(text)
        return None
    except Exception:  # noqa: BLE001 - the promise is "never raises"; a bug here means no grid
        return None


def format_example(input_grid: Any, output_grid: Any | None, fmt: GridFormat = "compact") -> str:
    """One demonstration as prompt text: ``"Input:\\n<in>\\nOutput:\\n<out>\\n\\n"``.

    With `output_grid` None the text stops after ``"Output:\\n"`` (the query, whose completion is
    the output grid), so ``format_example(i, o) == format_example(i, None) + format_grid(o) +
    "\\n\\n"``.
    """
    text = f"Input:\n{format_grid(input_grid, fmt)}\nOutput:\n"
    if output_grid is None:
        return text
    return text + format_grid(output_grid, fmt) + "\n\n"


def format_task_prompt(
    train_pairs: Iterable[tuple[Any, Any]], test_input: Any, fmt: GridFormat = "compact"
) -> str:
    """A plain-text few-shot prompt: every demonstration, then the test input and "Output:\\n".

    The expected completion is `format_grid(test_output, fmt)` (the caller appends the
    tokenizer's end-of-sequence token when training).
    """
    parts = [format_example(i, o, fmt) for i, o in train_pairs]
    parts.append(format_example(test_input, None, fmt))
    return "".join(parts)
