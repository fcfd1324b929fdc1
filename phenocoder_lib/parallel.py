"""Per-well jobs in worker processes, ahead of a consumer that takes their results one by one, in order.

Ingest is Python-bound (zarr v3 metadata, anndata's writer, PNG decoding: about 0.5 CPU-s per 5,000-object
well, and a single process keeps about one core busy), and every well is independent: a plate therefore runs
its wells in a pool of worker processes. :class:`PrefetchPool` keeps up to ``2 * workers`` jobs submitted
ahead of the consumer, who takes each result where its sequential loop would have computed it
(``take(key)``); a job the pool cannot give (never submitted, already taken, the pool broken by a killed
worker) is the consumer's to run itself, so the sequential code path stays the only fallback.

Workers start from a forkserver that has imported ``preload`` once (about 1.3 s here for SpatialData), or are
spawned where the platform has no forkserver; they never fork the consumer (its threads: zarr's I/O loop,
Dagster's). Worker processes hold one job's data at a time: peak memory is ``workers`` times a well's.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import types
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

logger = logging.getLogger(__name__)

#: Environment variable capping the worker processes of every pool (for a machine shared with other jobs).
MAX_WORKERS_ENV = "PHENOCODER_MAX_WORKERS"
#: What starting worker processes raises where the system cannot run them (no POSIX semaphores in some
#: sandboxes, no process creation): the callers then run the jobs themselves.
POOL_START_ERRORS = (OSError, NotImplementedError)
#: Below this many jobs ``workers=None`` runs them in the calling process (unless the caller knows better, see
#: :func:`worker_count`): starting a pool costs about 1.3 s of one core here (the forkserver's imports).
MIN_JOBS_FOR_POOL = 8


def process_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where there is none).

    Returns
    -------
    int
        The number of cores (at least 1).
    """
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_count(workers: int | None, n_jobs: int, *, worth_a_pool: bool | None = None) -> int:
    """Worker processes for ``n_jobs`` jobs: ``workers``, or by default one per core where a pool pays.

    Parameters
    ----------
    workers
        ``None``: one per usable core (:func:`process_cores`) where a pool pays for its start, else 1; an
        integer >= 1: that many. Capped by ``n_jobs`` and by ``$PHENOCODER_MAX_WORKERS``.
    n_jobs
        Jobs to run.
    worth_a_pool
        Whether the jobs are worth a pool (the caller's estimate of their work); ``None``: at least
        :data:`MIN_JOBS_FOR_POOL` jobs.

    Returns
    -------
    int
        The number of processes; 1 means "run the jobs in the calling process".

    Raises
    ------
    ValueError
        ``workers`` < 1, or ``$PHENOCODER_MAX_WORKERS`` is not a positive integer.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"workers={workers!r} must be a positive integer (1: no worker processes) or None "
                         "(one per core where the work pays for a pool).")
    if worth_a_pool is None:
        worth_a_pool = n_jobs >= MIN_JOBS_FOR_POOL
    n = (process_cores() if worth_a_pool else 1) if workers is None else workers
    cap = os.environ.get(MAX_WORKERS_ENV)
    if cap:
        try:
            limit = int(cap)
        except ValueError:
            limit = 0
        if limit < 1:
            raise ValueError(f"{MAX_WORKERS_ENV}={cap!r} must be a positive integer; unset it for no cap.")
        n = min(n, limit)
    return max(1, min(n, n_jobs))


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """Start worker processes that do not import the caller's ``__main__``.

    A spawned or forkserver child first runs the parent's main script as ``__mp_main__``, so a script without an
    ``if __name__ == "__main__":`` guard (or code piped to ``python -``) would run again in every worker, or break
    it. The jobs here are functions of importable modules, so while the workers start, ``__main__`` is an empty
    module: nothing of the caller's script is run in them.
    """
    main = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if main is None:
            sys.modules.pop("__main__", None)
        else:
            sys.modules["__main__"] = main


def _context(preload: Sequence[str]) -> Any:
    import multiprocessing as mp

    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(list(preload))  # no effect where this process's forkserver already runs
        return ctx
    return mp.get_context("spawn")


class PrefetchPool:
    """Run ``fn(**jobs[key])`` in worker processes ahead of a consumer that takes the results by key.

    Parameters
    ----------
    fn
        A function of an importable module, not of ``__main__`` (workers import it by name and never run the
        caller's script); its keyword arguments and its result must pickle.
    jobs
        Keyword arguments of each job, by key, in the order the consumer will take them.
    workers
        Worker processes (>= 1).
    preload
        Modules the forkserver imports once for all workers.
    lookahead
        Jobs kept submitted beyond those taken (default ``2 * workers``, at least ``workers``): bounds what waits
        for the consumer.
    on_broken
        Called once with the reason when the pool breaks (besides this module's warning).

    Notes
    -----
    Use it as a context manager: leaving the block cancels the jobs not started and waits for the running
    ones. A job's exception is raised by :meth:`take`, as it was raised in the worker.
    """

    def __init__(self, fn: Callable[..., Any], jobs: Mapping[Hashable, Mapping[str, Any]], *, workers: int,
                 preload: Iterable[str] = (), lookahead: int | None = None,
                 on_broken: Callable[[str], None] | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers={workers!r} must be >= 1.")
        if getattr(fn, "__module__", None) in (None, "__main__"):
            raise ValueError(f"fn={fn!r} must be a function of an importable module (not of __main__): the worker "
                             "processes import it by name.")
        self._fn = fn
        self._jobs = dict(jobs)
        self._order = list(self._jobs)
        self._next = 0
        self._futures: dict[Hashable, Future] = {}
        self._lookahead = max(int(lookahead or 2 * workers), workers)  # every worker starts in __init__
        self.workers = workers
        self.broken: str | None = None
        self._on_broken = on_broken
        self._pool: ProcessPoolExecutor | None = ProcessPoolExecutor(max_workers=workers,
                                                                      mp_context=_context(tuple(preload)))
        with _without_main_module():  # the workers start with the first submissions (one per submission)
            self._top_up()

    def _top_up(self) -> None:
        while self._pool is not None and self._next < len(self._order) and len(self._futures) < self._lookahead:
            key = self._order[self._next]
            self._next += 1
            try:
                self._futures[key] = self._pool.submit(self._fn, **self._jobs.pop(key))
            except BrokenProcessPool as err:
                self._break(err)

    def _break(self, err: BaseException) -> None:
        self.broken = f"{type(err).__name__}: {err}"
        logger.warning("worker pool broken (%s); the remaining jobs run in this process", self.broken)
        if self._on_broken is not None:
            self._on_broken(self.broken)
        self._futures.clear()
        self.close()

    def take(self, key: Hashable) -> tuple[bool, Any]:
        """The result of ``key``'s job, waiting for it; jobs submitted after it keep running meanwhile.

        Parameters
        ----------
        key
            The job's key.

        Returns
        -------
        tuple
            ``(True, result)``, or ``(False, None)`` where the caller must run the job itself: a key that was
            never a job, was already taken, or whose pool broke (a worker was killed: out of memory, a signal).

        Raises
        ------
        Exception
            The job's own exception.
        """
        if key in self._jobs and key not in self._futures and self._pool is not None:  # taken out of order
            self._order = [k for k in self._order if k != key]
            self._jobs.pop(key)
            return False, None
        future = self._futures.pop(key, None)
        if future is None:
            return False, None
        try:
            result = future.result()
        except BrokenProcessPool as err:
            self._break(err)
            return False, None
        finally:
            self._top_up()
        return True, result

    def close(self) -> None:
        """Cancel the jobs not started, wait for the running ones, stop the workers."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> PrefetchPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
