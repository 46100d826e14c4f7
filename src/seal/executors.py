"""Where inner loops run. The outer loop hands an executor a list of jobs and a callback; the
executor calls back with each result as soon as it exists, and the callback writes it to the
run directory — so a distributed executor can replace the in-process one without the loop
changing, and resume works the same for both."""

from __future__ import annotations

import contextlib
import os
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
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


def _count_failure(tries, i, chunk, worker, died, error, max_retries, log) -> None:
    """Chunk i failed on `worker` (`died`: the worker is gone; else it raised `error`):
    ExecutorError naming its jobs and the last error once it has failed more than
    `max_retries` times, else a line in the log (the caller retries it)."""
    tries[i] = tries.get(i, 0) + 1
    keys = ", ".join(j.key for j in chunk)
    if tries[i] > max_retries:
        raise ExecutorError(
            f"inner-loop jobs [{keys}] failed {tries[i]} times; last worker error: {error}"
        )
    log(
        f"[seal] {worker} {'died' if died else 'failed'} on jobs [{keys}] "
        f"({error.splitlines()[0]}); retrying them on another worker"
    )


class _WorkerCore:
    """What every out-of-process worker does: loads the base model once (on `threads` CPU
    threads when given), applies generator updates as they come, and runs chunks of jobs
    with the batched multi-adapter loop."""

    def __init__(self, spec: WorkerSpec, updates: list, threads: int = 0):
        import torch

        from seal.models import load_model

        self.spec = spec
        if threads > 0:
            torch.set_num_threads(threads)
        self.lm = load_model(spec.model, spec.device, spec.dtype, progress=lambda *_: None)
        for u in [*spec.updates, *updates]:
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


class _Worker(_WorkerCore):
    """One inner-loop worker as a Ray actor."""

    def __init__(self, spec: WorkerSpec, update_refs: list):
        ray = _import_ray()
        # Ray sets OMP_NUM_THREADS to the actor's CPUs; torch must follow it.
        threads = int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
        super().__init__(spec, ray.get(list(update_refs)), threads)


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
                died = isinstance(e, ray.exceptions.RayActorError)
                err = f"{e.__class__.__name__}: {e}"
                _count_failure(tries, i, chunk, f"ray worker {a}", died, err, self.max_retries,
                               self.log)  # fmt: skip
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


# --------------------------------------------------------------------------------------------
# Local worker processes


def default_workers(device: str) -> int:
    """Worker processes when none are asked for: one per CPU core this process may run on,
    for a CPU device; one for a GPU (several GPUs: the Ray executor)."""
    import torch

    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return len(os.sched_getaffinity(0)) if on_cpu else 1


def balanced_capacity(n_jobs: int, capacity: int, workers: int) -> int:
    """The largest chunk size up to `capacity` that cuts `n_jobs` into as few rounds of
    `workers` chunks as `capacity` allows, all chunks as equal as can be: a worker left with
    one chunk more than the others (or none) would run its tail alone."""
    if n_jobs <= 0:
        return capacity
    rounds = -(-n_jobs // (workers * capacity))
    return max(1, -(-n_jobs // (workers * rounds)))


def exit_with_parent() -> None:
    """Have this process, started by multiprocessing, receive SIGTERM when the process that
    started it dies (Linux; elsewhere nothing). Ctrl-C reaches a whole process group, but a
    driver killed by a signal of its own (`kill PID`, the OOM killer) had left its workers
    computing on for the rest of their chunk, minutes of both cores. The signal follows the
    thread that started the process: start workers from a thread that outlives them."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes
    import multiprocessing
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _process_worker(spec: WorkerSpec, threads: int, memory_share: float, conn) -> None:
    """A worker process: builds its worker, then serves the driver's requests ("run", jobs),
    ("update", update) and ("close",) until told to close or the driver goes away. Every
    reply is ("ok", value) or ("error", the exception and its traceback as text)."""
    import signal
    import traceback

    # Ctrl-C reaches the whole process group: the driver decides, and stops its workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()
    # auto_capacity sizes adapter batches from this process's share of the free memory.
    os.environ["SEAL_MEMORY_SHARE"] = repr(memory_share)
    try:
        core = _WorkerCore(spec, [], threads)
        conn.send(("ok", core.info()))
    except Exception as e:
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
        return
    while True:
        try:
            op, *args = conn.recv()
        except EOFError:
            return
        try:
            if op == "run":
                out = core.run(*args)
            elif op == "update":
                out = core.update(*args)
            elif op == "close":
                conn.send(("ok", core.close()))
                return
            else:
                raise ValueError(f"unknown request {op!r}")
        except Exception as e:
            conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            continue
        conn.send(("ok", out))


class _WorkerDied(Exception):
    pass


class ProcessExecutor:
    """Inner loops on local worker processes (stdlib `multiprocessing`), one model copy each.

    On a CPU, a training pass of a small model is bound by per-operation costs that a second
    thread barely shares: on 2 cores, one SmolLM2 training epoch of 8 adapters took 19.5 s on
    two threads and 26 s on one, while two one-thread processes each trained their own 8 in
    26 s (docs/benchmarks.md). So by default there is one single-threaded worker per core,
    each running its own chunks of jobs with the batched multi-adapter loop and sizing its
    adapter batches from its share of the free memory.

    Jobs are cut into chunks as in-process (`chunks_by_position`), but no larger than gives
    every worker an equal number of chunks (`balanced_capacity`: 9 jobs at capacity 9 on two
    workers make chunks of 5 and 4, not one chunk and an idle worker); each chunk goes to the
    next idle worker and its results are handed to `on_results` as soon as they arrive.
    Where the chunks are the in-process executor's, the results equal its results computed on
    as many threads as a worker has (elsewhere each adapter still trains as alone; only the
    last bits of the arithmetic may differ). The chunks depend on the full job list, not on
    what a resumed run skips, so resuming gives what an uninterrupted run gives. A
    worker that dies has its chunk retried on a fresh one, at most `max_retries` times; a
    chunk that keeps failing stops the run with ExecutorError naming its jobs and the error.
    Generator updates are sent to every worker; a worker started later applies them all."""

    def __init__(
        self,
        spec: WorkerSpec,
        workers: int = 0,
        threads_per_worker: int = 0,
        max_retries: int = 2,
        log: Callable[[str], None] = print,
    ):
        import multiprocessing

        self.workers = workers or default_workers(spec.device)
        cores = len(os.sched_getaffinity(0))
        self.threads = threads_per_worker or max(1, cores // self.workers)
        self.max_retries, self.log, self.restarts = max_retries, log, 0
        # spawn, not fork: a forked copy of a process whose torch thread pool already runs
        # can hang; a fresh interpreter costs a few seconds once per worker.
        self._mp = multiprocessing.get_context("spawn")
        self._updates = list(spec.updates)
        self.spec = replace(spec, updates=[])
        self._procs: list = [None] * self.workers
        self._conns: list = [None] * self.workers
        try:
            for a in range(self.workers):
                self._start(a)
            infos = [self._ready(a) for a in range(self.workers)]
        except BaseException:
            self.close()
            raise
        self.capacity = min(i["capacity"] for i in infos)
        log(
            f"[seal] process executor: {self.workers} worker(s) x {self.threads} thread(s) "
            f"on {infos[0]['device']}, up to {self.capacity} inner loops per chunk"
        )

    def _start(self, a: int) -> None:
        parent, child = self._mp.Pipe()
        spec = replace(self.spec, updates=list(self._updates))
        proc = self._mp.Process(
            target=_process_worker,
            args=(spec, self.threads, 1.0 / self.workers, child),
            name=f"seal-worker-{a}",
            daemon=True,
        )
        proc.start()
        child.close()
        self._procs[a], self._conns[a] = proc, parent

    def _recv(self, a: int):
        """Worker a's reply: its value, or ExecutorError for an error it reported;
        _WorkerDied if it is gone."""
        try:
            status, value = self._conns[a].recv()
        except (EOFError, OSError):
            self._procs[a].join(5)
            raise _WorkerDied(f"exit code {self._procs[a].exitcode}") from None
        if status == "error":
            raise ExecutorError(value)
        return value

    def _ready(self, a: int) -> dict:
        try:
            return self._recv(a)
        except (_WorkerDied, ExecutorError) as e:
            raise ExecutorError(f"inner-loop worker {a} failed to start: {e}") from None

    def _replace(self, a: int) -> None:
        self._stop(a)
        self._start(a)
        self._ready(a)
        self.restarts += 1

    def pids(self) -> list[int]:
        """The live workers' process ids (a worker stopped by an aborted run restarts when
        next needed)."""
        return [p.pid for p in self._procs if p is not None]

    def run(self, jobs, on_results, progress=None, skip=frozenset()) -> None:
        cap = balanced_capacity(len(jobs), self.capacity, self.workers)
        pending = deque(enumerate(chunks_by_position(jobs, cap, skip)))
        tries: dict[int, int] = {}
        idle = list(range(self.workers))
        busy: dict[int, tuple[int, list[Job]]] = {}  # worker -> (chunk index, chunk)
        try:
            self._serve(pending, tries, idle, busy, on_results, progress)
        finally:
            # Stopped early (an error, Ctrl-C): a worker still busy would later answer for a
            # chunk no one waits for; it is stopped, and started afresh when next needed.
            for a in busy:
                self._kill(a)

    def _serve(self, pending, tries, idle, busy, on_results, progress) -> None:
        from multiprocessing.connection import wait

        while pending or busy:
            while pending and idle:
                a = idle.pop(0)
                try:
                    if self._procs[a] is None:  # stopped by an aborted run
                        self._replace(a)
                    self._conns[a].send(("run", pending[0][1]))
                except OSError:  # it died while idle
                    self._replace(a)
                    idle.insert(0, a)
                    continue
                busy[a] = pending.popleft()
            ready = wait([self._conns[a] for a in busy])
            for a in [a for a in list(busy) if self._conns[a] in ready]:
                i, chunk = busy.pop(a)
                try:
                    results = self._recv(a)
                except (_WorkerDied, ExecutorError) as e:
                    died = isinstance(e, _WorkerDied)
                    err = f"died ({e})" if died else str(e)
                    _count_failure(tries, i, chunk, f"worker {a}", died, err, self.max_retries,
                                   self.log)  # fmt: skip
                    if died:
                        self._replace(a)
                    pending.appendleft((i, chunk))
                    idle.append(a)  # the others go first
                    continue
                on_results(chunk, results)
                if progress is not None:
                    progress(len(chunk))
                idle.insert(0, a)

    def model_changed(self) -> None:
        pass  # the workers hold their own copies of the model

    def model_updated(self, update: dict | None) -> None:
        if update is None:
            return
        self._updates.append(update)  # a worker started later applies every update so far
        live = [a for a in range(self.workers) if self._procs[a] is not None]
        for a in live:
            with contextlib.suppress(OSError):  # dead: its reply below says so
                self._conns[a].send(("update", update))
        for a in live:
            try:
                self._recv(a)
            except _WorkerDied:
                self._replace(a)

    def _kill(self, a: int) -> None:
        if self._procs[a] is not None:
            self._procs[a].kill()
            self._procs[a].join()
            self._conns[a].close()
            self._procs[a] = self._conns[a] = None

    def _stop(self, a: int) -> None:
        """Asks worker a to close (it unwraps its adapters), then makes sure it is gone."""
        proc, conn = self._procs[a], self._conns[a]
        if proc is not None and proc.is_alive():
            try:
                conn.send(("close",))
                if conn.poll(30):
                    conn.recv()
            except (OSError, EOFError):
                pass
            proc.join(10)
        self._kill(a)

    def close(self) -> None:
        for a in range(len(self._procs)):
            self._stop(a)


def build_executor(kind: str, make_runner: Callable[[], Runner], spec=None, **kw) -> Executor:
    """`inprocess` runs jobs on the driver's model; `processes` on local worker processes and
    `ray` on Ray actors, both built from `spec` (a WorkerSpec); keyword arguments go to
    ProcessExecutor or RayExecutor."""
    if kind == "inprocess":
        return InProcessExecutor(make_runner)
    if kind == "processes":
        if spec is None:
            raise ValueError("executor 'processes' needs a WorkerSpec")
        return ProcessExecutor(spec, **kw)
    if kind == "ray":
        if spec is None:
            raise ValueError("executor 'ray' needs a WorkerSpec")
        return RayExecutor(spec, **kw)
    raise ValueError(f"unknown executor {kind!r}; use inprocess, processes or ray")
