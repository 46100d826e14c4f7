"""Where inner loops run. The outer loop hands an executor a list of jobs and a callback; the
executor calls back with each result as soon as it exists, and the callback writes it to the
run directory — so a distributed executor can replace the in-process one without the loop
changing, and resume works the same for both."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from seal.domains.base import Job, Result, Runner


class Executor(Protocol):
    def run(
        self,
        jobs: list[Job],
        on_results: Callable[[list[Job], list[Result]], None],
        progress: Callable[[int], None] | None = None,
        skip: set[str] = frozenset(),
    ) -> None:
        """Run every job whose key is not in `skip` (finished before a resume)."""

    def model_changed(self) -> None:
        """The model's weights changed (a generator update): drop anything derived from them."""

    def close(self) -> None: ...


class InProcessExecutor:
    """Runs jobs in this process on one model, `runner.capacity` at a time.

    Jobs are cut into chunks by their position in the full list, before finished jobs are
    skipped, so a resumed run batches the remaining jobs exactly as an uninterrupted run
    would (determinism); each chunk's results are handed over before the next chunk starts,
    so a crash loses at most the chunk in flight."""

    def __init__(self, make_runner: Callable[[], Runner]):
        self._make_runner = make_runner
        self._runner: Runner | None = None

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            self._runner = self._make_runner()
        return self._runner

    def run(self, jobs, on_results, progress=None, skip=frozenset()) -> None:
        cap = self.runner.capacity
        for start in range(0, len(jobs), cap):
            chunk = [j for j in jobs[start : start + cap] if j.key not in skip]
            if not chunk:
                continue
            results = self.runner.run(chunk)
            on_results(chunk, results)
            if progress is not None:
                progress(len(chunk))

    def model_changed(self) -> None:
        self.close()

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None


def build_executor(kind: str, make_runner: Callable[[], Runner], **kw) -> Executor:
    if kind == "inprocess":
        return InProcessExecutor(make_runner)
    if kind == "ray":
        raise NotImplementedError(
            "executor 'ray' is not available yet; use executor.kind=inprocess"
        )
    raise ValueError(f"unknown executor {kind!r}; use inprocess")
