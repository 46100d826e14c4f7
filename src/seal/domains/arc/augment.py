"""Grid augmentations for ARC test-time training and prediction voting.

Every augmenter is a small frozen object with a stable `name`, `apply(grid) -> Grid` and
`inverse(grid) -> Grid | None`. `inverse(g)` is defined exactly on the image of `apply`: it
returns None for a grid `apply` cannot have produced (e.g. an "upsampled" grid whose 2x2 blocks
are not uniform), and otherwise `apply(inverse(g)) == g`; for every grid `inverse(apply(g)) == g`.

`apply` may return a grid over 30x30 (size, chain and repeat augmenters double a side); code
that augments a task drops such results (`augment_pairs` returns None).

Families, as the paper's self-edit names them (after the augmenters of the ARC TTT paper,
Akyurek et al. 2024, whose code these follow):

- ``use_basic_augmentations``: rotate 90/180/270, flip up-down / left-right, transpose,
  anti-transpose (with the identity, the dihedral group), the four mirror "reflections" of the
  TTT code (the grid concatenated with its flip, below/above/right/left), and a random
  translation (a cyclic shift, as the TTT code's RandomTranslateXY);
- ``use_size_augmentations``: resolution x2 (each cell a 2x2 block), height x2, width x2;
- ``use_chain_augmentations``: each non-identity dihedral op followed by resolution x2;
- ``use_repeat_augmentations``: tile x2 vertically, horizontally, and both.

Colour permutations (1-9 permuted, 0 = background fixed) and demonstration-order permutations
are applied on top by the TTT data builder.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from .data import Task
from .grids import Grid, Pair, fits

FAMILIES: tuple[str, ...] = (
    "use_basic_augmentations",
    "use_size_augmentations",
    "use_chain_augmentations",
    "use_repeat_augmentations",
)


def _arr(grid: Grid) -> np.ndarray:
    return np.asarray(grid, dtype=np.int8)


def _grid(a: np.ndarray) -> Grid:
    return tuple(tuple(int(v) for v in row) for row in a.tolist())


class Augmenter(ABC):
    """A grid transform with a stable name and an inverse where one exists."""

    @property
    @abstractmethod
    def name(self) -> str:
        """A stable identifier, the same across runs (used in logs and dedup bookkeeping)."""

    @abstractmethod
    def apply(self, grid: Grid) -> Grid:
        """The transformed grid (possibly over 30x30)."""

    @abstractmethod
    def inverse(self, grid: Grid) -> Grid | None:
        """The grid `apply` maps to `grid`, or None when `grid` is not in the image of `apply`."""

    def __str__(self) -> str:
        return self.name


# op -> (forward on an array, inverse op name)
_DIHEDRAL: dict[str, tuple] = {
    "identity": (lambda a: a, "identity"),
    "rotate90": (lambda a: np.rot90(a, 1), "rotate270"),  # counter-clockwise, as np.rot90
    "rotate180": (lambda a: np.rot90(a, 2), "rotate180"),
    "rotate270": (lambda a: np.rot90(a, 3), "rotate90"),
    "flip_ud": (lambda a: a[::-1, :], "flip_ud"),
    "flip_lr": (lambda a: a[:, ::-1], "flip_lr"),
    "transpose": (lambda a: a.T, "transpose"),
    "anti_transpose": (lambda a: np.rot90(a, 2).T, "anti_transpose"),
}
DIHEDRAL_OPS: tuple[str, ...] = tuple(_DIHEDRAL)


@dataclass(frozen=True)
class Dihedral(Augmenter):
    """One of the 8 symmetries of the square (`DIHEDRAL_OPS`); always invertible."""

    op: str

    def __post_init__(self) -> None:
        if self.op not in _DIHEDRAL:
            raise ValueError(f"unknown dihedral op {self.op!r}; expected one of {DIHEDRAL_OPS}")

    @property
    def name(self) -> str:
        return self.op

    def apply(self, grid: Grid) -> Grid:
        return _grid(_DIHEDRAL[self.op][0](_arr(grid)))

    def inverse(self, grid: Grid) -> Grid | None:
        return _grid(_DIHEDRAL[_DIHEDRAL[self.op][1]][0](_arr(grid)))


@dataclass(frozen=True)
class Roll(Augmenter):
    """Cyclic shift by (dy, dx): rows move down by dy, columns right by dx (mod the shape).

    This is the TTT code's random translation. It keeps the shape, so the shift is undone
    exactly from the shifted grid alone.
    """

    dy: int
    dx: int

    @property
    def name(self) -> str:
        return f"roll_{self.dy}_{self.dx}"

    def apply(self, grid: Grid) -> Grid:
        return _grid(np.roll(_arr(grid), (self.dy, self.dx), axis=(0, 1)))

    def inverse(self, grid: Grid) -> Grid | None:
        return _grid(np.roll(_arr(grid), (-self.dy, -self.dx), axis=(0, 1)))

    @classmethod
    def random(cls, rng: random.Random, max_shift: int = 3) -> Roll:
        """A shift with dy, dx each in 1..max_shift (never the identity)."""
        return cls(rng.randint(1, max_shift), rng.randint(1, max_shift))


@dataclass(frozen=True)
class Translate(Augmenter):
    """Shift by (dy, dx) onto a larger canvas padded with `fill`.

    The result has shape (h + |dy|, w + |dx|): a positive dy pads |dy| rows on top, a negative
    one at the bottom (likewise dx for columns, left/right). The original shape is recovered
    from the padded shape and (dy, dx), so the inverse needs no stored state: it crops the
    padding back off, and returns None if the grid is too small or the padding is not `fill`.
    """

    dy: int
    dx: int
    fill: int = 0

    @property
    def name(self) -> str:
        return f"translate_{self.dy}_{self.dx}_fill{self.fill}"

    def apply(self, grid: Grid) -> Grid:
        a = _arr(grid)
        h, w = a.shape
        out = np.full((h + abs(self.dy), w + abs(self.dx)), self.fill, dtype=a.dtype)
        y0, x0 = max(self.dy, 0), max(self.dx, 0)
        out[y0 : y0 + h, x0 : x0 + w] = a
        return _grid(out)

    def inverse(self, grid: Grid) -> Grid | None:
        a = _arr(grid)
        h, w = a.shape[0] - abs(self.dy), a.shape[1] - abs(self.dx)
        if h < 1 or w < 1:
            return None
        y0, x0 = max(self.dy, 0), max(self.dx, 0)
        mask = np.ones(a.shape, dtype=bool)
        mask[y0 : y0 + h, x0 : x0 + w] = False
        if np.any(a[mask] != self.fill):
            return None
        return _grid(a[y0 : y0 + h, x0 : x0 + w])


@dataclass(frozen=True)
class Mirror(Augmenter):
    """The grid concatenated with its own flip along `axis` (0: stacked, 1: side by side).

    `reverse=False` puts the flip after (below / right), `reverse=True` before (above / left).
    These are the TTT code's "Reflect" augmenters. The inverse keeps the original half and
    checks the other half is its flip.
    """

    axis: int
    reverse: bool = False

    @property
    def name(self) -> str:
        sides = {(0, False): "below", (0, True): "above", (1, False): "right", (1, True): "left"}
        return f"mirror_{sides[(self.axis, self.reverse)]}"

    def apply(self, grid: Grid) -> Grid:
        a = _arr(grid)
        flipped = np.flip(a, axis=self.axis)
        parts = (flipped, a) if self.reverse else (a, flipped)
        return _grid(np.concatenate(parts, axis=self.axis))

    def inverse(self, grid: Grid) -> Grid | None:
        a = _arr(grid)
        n = a.shape[self.axis]
        if n % 2:
            return None
        first, second = np.split(a, 2, axis=self.axis)
        original, other = (second, first) if self.reverse else (first, second)
        if not np.array_equal(np.flip(original, axis=self.axis), other):
            return None
        return _grid(original)


@dataclass(frozen=True)
class Upscale(Augmenter):
    """Each cell becomes an fy x fx block (resolution x2 is (2, 2), height x2 (2, 1), width x2
    (1, 2)). The inverse downsamples; None unless every block is uniform."""

    fy: int
    fx: int

    @property
    def name(self) -> str:
        if self.fy == self.fx:
            return f"resolution_x{self.fy}"
        if self.fx == 1:
            return f"height_x{self.fy}"
        if self.fy == 1:
            return f"width_x{self.fx}"
        return f"upscale_{self.fy}x{self.fx}"

    def apply(self, grid: Grid) -> Grid:
        return _grid(np.repeat(np.repeat(_arr(grid), self.fy, axis=0), self.fx, axis=1))

    def inverse(self, grid: Grid) -> Grid | None:
        a = _arr(grid)
        h, w = a.shape
        if h % self.fy or w % self.fx:
            return None
        small = a[:: self.fy, :: self.fx]
        if not np.array_equal(self.apply(_grid(small)), grid):
            return None
        return _grid(small)


@dataclass(frozen=True)
class Tile(Augmenter):
    """The grid repeated `reps` times along `axis` (0: vertically, 1: horizontally, 2: both).

    The inverse takes the first tile and checks every tile equals it."""

    axis: int
    reps: int = 2

    @property
    def name(self) -> str:
        where = {0: "vertical", 1: "horizontal", 2: "both"}[self.axis]
        return f"tile_{where}_x{self.reps}"

    def _reps(self) -> tuple[int, int]:
        return {0: (self.reps, 1), 1: (1, self.reps), 2: (self.reps, self.reps)}[self.axis]

    def apply(self, grid: Grid) -> Grid:
        return _grid(np.tile(_arr(grid), self._reps()))

    def inverse(self, grid: Grid) -> Grid | None:
        a = _arr(grid)
        ry, rx = self._reps()
        if a.shape[0] % ry or a.shape[1] % rx:
            return None
        first = a[: a.shape[0] // ry, : a.shape[1] // rx]
        if not np.array_equal(np.tile(first, (ry, rx)), a):
            return None
        return _grid(first)


@dataclass(frozen=True)
class ColourPermutation(Augmenter):
    """Recolour cell value v as `perm[v]`; `perm` permutes 0-9 and keeps 0 (background) fixed."""

    perm: tuple[int, ...]

    def __post_init__(self) -> None:
        if sorted(self.perm) != list(range(10)) or self.perm[0] != 0:
            raise ValueError(f"not a permutation of 0-9 fixing 0: {self.perm!r}")

    @property
    def name(self) -> str:
        return "colours_" + "".join(str(v) for v in self.perm)

    def apply(self, grid: Grid) -> Grid:
        return tuple(tuple(self.perm[v] for v in row) for row in grid)

    def inverse(self, grid: Grid) -> Grid | None:
        inv = [0] * 10
        for i, v in enumerate(self.perm):
            inv[v] = i
        return tuple(tuple(inv[v] for v in row) for row in grid)

    @classmethod
    def random(cls, rng: random.Random) -> ColourPermutation:
        """A uniformly random permutation of colours 1-9 (0 fixed)."""
        rest = list(range(1, 10))
        rng.shuffle(rest)
        return cls((0, *rest))


@dataclass(frozen=True)
class Compose(Augmenter):
    """Apply `steps` left to right; the inverse undoes them right to left (None propagates)."""

    steps: tuple[Augmenter, ...]

    @property
    def name(self) -> str:
        return "+".join(s.name for s in self.steps)

    def apply(self, grid: Grid) -> Grid:
        for step in self.steps:
            grid = step.apply(grid)
        return grid

    def inverse(self, grid: Grid) -> Grid | None:
        out: Grid | None = grid
        for step in reversed(self.steps):
            if out is None:
                return None
            out = step.inverse(out)
        return out


def augment_pairs(aug: Augmenter, pairs: Iterable[Pair], max_side: int = 30) -> list[Pair] | None:
    """Apply `aug` to every input and output grid; None if any result has a side over
    `max_side` (the whole task is dropped rather than a grid silently cropped)."""
    out: list[Pair] = []
    for inp, outp in pairs:
        a, b = aug.apply(inp), aug.apply(outp)
        if not (fits(a, max_side) and fits(b, max_side)):
            return None
        out.append((a, b))
    return out


def augment_task(aug: Augmenter, task: Task, max_side: int = 30) -> Task | None:
    """The task with `aug` applied to every grid (demonstrations, test inputs, and test outputs
    when known), keeping its id; None if any result has a side over `max_side`."""
    train = augment_pairs(aug, task.train, max_side)
    if train is None:
        return None
    test_inputs = [aug.apply(g) for g in task.test_inputs]
    test_outputs = None
    if task.test_outputs is not None:
        test_outputs = tuple(aug.apply(g) for g in task.test_outputs)
    if not all(fits(g, max_side) for g in [*test_inputs, *(test_outputs or ())]):
        return None
    return Task(task.id, tuple(train), tuple(test_inputs), test_outputs)


def permute_order(pairs: Sequence[Pair], rng: random.Random) -> list[Pair]:
    """The pairs in a random order drawn from `rng` (example-order permutation)."""
    out = list(pairs)
    rng.shuffle(out)
    return out


def basic_augmenters(rng: random.Random | None = None) -> list[Augmenter]:
    """The basic family: 7 non-identity dihedral ops, 4 mirrors, and one random `Roll`
    (its shift drawn from `rng`, default seed 0)."""
    rng = rng if rng is not None else random.Random(0)
    dihedral: list[Augmenter] = [Dihedral(op) for op in DIHEDRAL_OPS if op != "identity"]
    mirrors: list[Augmenter] = [Mirror(ax, rev) for ax in (0, 1) for rev in (False, True)]
    return [*dihedral, *mirrors, Roll.random(rng)]


def size_augmenters() -> list[Augmenter]:
    """The size family: resolution x2, height x2, width x2."""
    return [Upscale(2, 2), Upscale(2, 1), Upscale(1, 2)]


def chain_augmenters() -> list[Augmenter]:
    """The chain family: each non-identity dihedral op followed by resolution x2."""
    return [Compose((Dihedral(op), Upscale(2, 2))) for op in DIHEDRAL_OPS if op != "identity"]


def repeat_augmenters() -> list[Augmenter]:
    """The repeat family: tile x2 vertically, horizontally, and in both directions."""
    return [Tile(0), Tile(1), Tile(2)]


def augmenters_for(families: Iterable[str], seed: int | random.Random = 0) -> list[Augmenter]:
    """The augmenters of the named families (keys of `FAMILIES`), in a fixed order.

    `seed` fixes the random translation of the basic family. Unknown family names raise
    ValueError. An empty set gives an empty list (the un-augmented tasks only).
    """
    wanted = set(families)
    unknown = wanted - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown augmentation families {sorted(unknown)}; expected {FAMILIES}")
    rng = seed if isinstance(seed, random.Random) else random.Random(seed)
    out: list[Augmenter] = []
    if "use_basic_augmentations" in wanted:
        out += basic_augmenters(rng)
    if "use_size_augmentations" in wanted:
        out += size_augmenters()
    if "use_chain_augmentations" in wanted:
        out += chain_augmenters()
    if "use_repeat_augmentations" in wanted:
        out += repeat_augmenters()
    return out


def dihedral_transforms() -> list[Augmenter]:
    """The 8 dihedral transforms, identity first."""
    return [Dihedral(op) for op in DIHEDRAL_OPS]


def prediction_transforms(colour_perms: int = 0, seed: int = 0) -> list[Augmenter]:
    """Invertible transforms for prediction voting: the 8 dihedral transforms (identity first),
    then `colour_perms` random colour permutations (seeded by `seed`).

    Each keeps grids within 30x30 and has an inverse defined on every grid, so a prediction
    made on a transformed task can always be mapped back to the original orientation/colours.
    """
    rng = random.Random(seed)
    out = dihedral_transforms()
    out += [ColourPermutation.random(rng) for _ in range(colour_perms)]
    return out
