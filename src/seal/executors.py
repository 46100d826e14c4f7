"""Where inner loops run. The outer loop hands an executor a list of jobs and a callback; the
executor calls back with each result as soon as it exists, and the callback writes it to the
run directory — so a distributed executor can replace the in-process one without the loop
changing, and resume works the same for both."""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

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
        """The model's weights are about to change (a generator update): drop anything
        derived from them."""

    def model_updated(self, update: dict | None) -> None:
        """The scored model received `update` (see rest_em.read_generator_update): workers
        holding their own copy of the model apply it; one sharing the driver's model has it."""

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
        for chunk in chunks_by_position(jobs, self.runner.capacity, skip):
            results = self.runner.run(chunk)
            on_results(chunk, results)
            if progress is not None:
                progress(len(chunk))

    def model_changed(self) -> None:
        self.close()

    def model_updated(self, update: dict | None) -> None:
        pass  # the runner wraps the driver's own model, which is already updated

    def close(self) -> None:
        if self._runner is not None:
            self._runner.close()
            self._runner = None


def chunks_by_position(jobs: list[Job], cap: int, skip) -> list[list[Job]]:
    """Cut jobs into chunks of `cap` by their position in the full list ordered by cost,
    then drop finished ones: a resumed run (and every executor) batches the remaining jobs
    exactly as an uninterrupted in-process run would, so results are equal bit for bit."""
    out = []
    for idx in chunks_of_similar_cost([j.cost for j in jobs], cap):
        chunk = [jobs[i] for i in idx if jobs[i].key not in skip]
        if chunk:
            out.append(chunk)
    return out


def chunks_of_similar_cost(costs: list[float], cap: int) -> list[list[int]]:
    """Indices 0..n-1 cut into chunks of `cap`, cheapest first (ties in list order).

    The adapters of one chunk train in the same passes until the last one finishes, and a
    pass with fewer adapters left costs nearly as much: on a GPU a pass is host-bound, on a
    CPU its matrices get thinner. Chunking jobs of similar length together shortens that
    tail: 24 demo self-edits (9 to 15 training sequences) in chunks of 8 take 39 passes an
    epoch instead of 43. Each adapter trains exactly as alone, so results do not change."""
    order = sorted(range(len(costs)), key=lambda i: costs[i])
    return [order[s : s + cap] for s in range(0, len(order), cap)]


# --------------------------------------------------------------------------------------------
# Ray


RAY_INSTALL = "pip install 'seal-lm[ray]'  (or: pip install ray==2.60.0)"


class ExecutorError(RuntimeError):
    """Inner-loop jobs failed on every worker they were tried on."""


class MissingDependency(ImportError):
    """An optional dependency (Ray) is needed but not installed; the message says how."""


@dataclass
class WorkerSpec:
    """What a worker needs to build its own runner: plain data plus a module-level factory
    (`make_runner(lm) -> Runner`), so it pickles to any node of a cluster."""

    model: str
    device: str
    dtype: str
    make_runner: Callable[[Any], Runner]
    updates: list = field(default_factory=list)  # generator updates to apply, in order


def _import_ray():
    try:
        import ray
    except ImportError:
        raise MissingDependency(
            f"executor 'ray' needs Ray, which is not installed. Install it with:\n  {RAY_INSTALL}"
        ) from None
    return ray


class _Worker:
    """One inner-loop worker (a Ray actor): loads the base model once, applies generator
    updates as they come, and runs chunks of jobs with the batched multi-adapter loop."""

    def __init__(self, spec: WorkerSpec, update_refs: list):
        import torch

        from seal.models import load_model

        self.spec = spec
        # Ray sets OMP_NUM_THREADS to the actor's CPUs; torch must follow it.
        n = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        if n > 0:
            torch.set_num_threads(n)
        self.lm = load_model(spec.model, spec.device, spec.dtype, progress=lambda *_: None)
        ray = _import_ray()
        for u in [*spec.updates, *ray.get(list(update_refs))]:
            self._apply(u)
        self.runner = spec.make_runner(self.lm)

    def _apply(self, update) -> None:
        from seal.rest_em import apply_generator_update

        apply_generator_update(self.lm, update)

    def info(self) -> dict:
        import torch

        return {
            "pid": os.getpid(),
            "capacity": self.runner.capacity,
            "device": str(self.lm.device),
            "threads": torch.get_num_threads(),
        }

    def run(self, jobs: list[Job]) -> list[Result]:
        from seal.runs import failpoint

        failpoint("worker_run")
        return self.runner.run(jobs)

    def update(self, update) -> None:
        self.runner.close()  # unwrap adapters before the weights change
        self._apply(update)
        self.runner = self.spec.make_runner(self.lm)

    def close(self) -> None:
        self.runner.close()


class RayExecutor:
    """Inner loops on a pool of Ray actors, one model copy each.

    `ray.init()` starts a local cluster unless `address` names one ("auto" joins the cluster
    this machine belongs to). One actor per GPU when the cluster has GPUs, else `workers`
    actors of `cpus_per_worker` CPUs. Jobs are cut into the same chunks as in-process (by
    position, `capacity` each), so results equal the in-process executor's; each chunk goes
    to the next idle actor and its results are handed to `on_results` (which writes them to
    the run directory) as soon as they arrive. A chunk whose actor dies is retried on another
    actor (a replacement is started), at most `max_retries` times; then ExecutorError names
    the jobs and the worker's error. Generator updates travel through the object store."""

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int = 0,
        address: str = "",
        cpus_per_worker: float = 0,
        gpus_per_worker: float = -1,
        max_retries: int = 2,
        log: Callable[[str], None] = print,
    ):
        ray = self._ray = _import_ray()
        self.spec, self.max_retries, self.log = spec, max_retries, log
        if not ray.is_initialized():
            ray.init(
                address=address or None,
                include_dashboard=False,
                logging_level="WARNING",
                log_to_driver=False,
                configure_logging=True,
            )
        res = ray.cluster_resources()
        n_gpus = int(res.get("GPU", 0))
        if gpus_per_worker < 0:
            gpus_per_worker = 1 if n_gpus else 0
        if workers <= 0:
            workers = max(1, int(n_gpus // gpus_per_worker)) if gpus_per_worker else 1
        if cpus_per_worker <= 0:
            cpus_per_worker = max(1, int(res.get("CPU", 1) // workers))
        self.workers = workers
        self._opts = {"num_cpus": cpus_per_worker, "num_gpus": gpus_per_worker}
        # Generator updates (restored on resume, then one per round) live in the object store;
        # a worker started later (a replacement) applies them all, in order.
        self._updates: list = [ray.put(u) for u in spec.updates]
        self.spec = spec = WorkerSpec(spec.model, spec.device, spec.dtype, spec.make_runner)
        self._actors = [self._start() for _ in range(workers)]
        infos = ray.get([a.info.remote() for a in self._actors])
        self.capacity = min(i["capacity"] for i in infos)
        self.restarts = 0
        log(
            f"[seal] ray executor: {workers} worker(s) x {cpus_per_worker} CPU"
            + (f" x {gpus_per_worker} GPU" if gpus_per_worker else "")
            + f" on {infos[0]['device']}, {self.capacity} inner loops per chunk"
        )

    def _start(self):
        # SEAL_* variables (cache directory, test hooks) follow the driver to every worker.
        env = {k: v for k, v in os.environ.items() if k.startswith("SEAL_")}
        actor_cls = self._ray.remote(_Worker).options(
            **self._opts, max_restarts=0, runtime_env={"env_vars": env}
        )
        return actor_cls.remote(self.spec, list(self._updates))

    def pids(self) -> list[int]:
        return [i["pid"] for i in self._ray.get([a.info.remote() for a in self._actors])]

    def run(self, jobs, on_results, progress=None, skip=frozenset()) -> None:
        ray = self._ray
        pending = deque(enumerate(chunks_by_position(jobs, self.capacity, skip)))
        tries: dict[int, int] = {}
        idle = list(range(len(self._actors)))
        in_flight: dict = {}  # object ref -> (chunk index, chunk, actor index)
        while pending or in_flight:
            while pending and idle:
                i, chunk = pending.popleft()
                a = idle.pop(0)
                in_flight[self._actors[a].run.remote(chunk)] = (i, chunk, a)
            [ref], _ = ray.wait(list(in_flight), num_returns=1)
            i, chunk, a = in_flight.pop(ref)
            try:
                results = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as e:
                tries[i] = tries.get(i, 0) + 1
                died = isinstance(e, ray.exceptions.RayActorError)
                keys = ", ".join(j.key for j in chunk)
                if tries[i] > self.max_retries:
                    raise ExecutorError(
                        f"inner-loop jobs [{keys}] failed {tries[i]} times; last worker error: "
                        f"{e.__class__.__name__}: {e}"
                    ) from e
                self.log(
                    f"[seal] ray worker {a} {'died' if died else 'failed'} on jobs [{keys}] "
                    f"({e.__class__.__name__}); retrying them on another worker"
                )
                if died:
                    self._replace(a)
                pending.appendleft((i, chunk))
                idle.append(a)  # the others go first: idle is served front to back
                continue
            on_results(chunk, results)
            if progress is not None:
                progress(len(chunk))
            idle.insert(0, a)

    def _replace(self, a: int) -> None:
        self._ray.kill(self._actors[a], no_restart=True)
        self._actors[a] = self._start()
        self.restarts += 1

    def model_changed(self) -> None:
        pass  # the workers hold their own copies of the model

    def model_updated(self, update: dict | None) -> None:
        if update is None:
            return
        ray = self._ray
        ref = ray.put(update)
        self._updates.append(ref)
        ray.get([a.update.remote(ref) for a in self._actors])

    def close(self) -> None:
        ray = self._ray
        for a in self._actors:
            ray.kill(a, no_restart=True)
        self._actors = []


def build_executor(kind: str, make_runner: Callable[[], Runner], spec=None, **kw) -> Executor:
    """`inprocess` runs jobs on the driver's model; `ray` on Ray actors built from `spec`
    (a WorkerSpec); keyword arguments go to RayExecutor."""
    if kind == "inprocess":
        return InProcessExecutor(make_runner)
    if kind == "ray":
        if spec is None:
            raise ValueError("executor 'ray' needs a WorkerSpec")
        return RayExecutor(spec, **kw)
    raise ValueError(f"unknown executor {kind!r}; use inprocess or ray")
