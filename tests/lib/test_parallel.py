"""PrefetchPool and worker counts: results in order, a job's error as raised, a killed worker, the caps."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from phenocoder_lib.parallel import MAX_WORKERS_ENV, MIN_JOBS_FOR_POOL, PrefetchPool, process_cores, worker_count


def square_pid(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def fail_on(x: int, bad: int) -> int:
    if x == bad:
        raise KeyError(f"job {x} has no such key")
    return x


def die_on(x: int, bad: int) -> int:
    if x == bad:
        os._exit(3)  # a worker killed (out of memory, a signal)
    return x


def test_results_come_back_in_order_from_worker_processes():
    jobs = {f"w{i}": {"x": i} for i in range(10)}
    with PrefetchPool(square_pid, jobs, workers=2) as pool:
        results = [pool.take(key) for key in jobs]
        assert pool.take("w3") == (False, None)  # taken already: the caller's to run
        assert pool.take("nope") == (False, None)
    assert [r[1][0] for r in results] == [i * i for i in range(10)]
    assert all(done for done, _ in results)
    pids = {pid for _, (_, pid) in results}
    assert os.getpid() not in pids and 1 <= len(pids) <= 2


def test_a_jobs_error_is_raised_by_take_and_the_others_carry_on():
    jobs = {i: {"x": i, "bad": 2} for i in range(5)}
    with PrefetchPool(fail_on, jobs, workers=2) as pool:
        assert pool.take(0) == (True, 0) and pool.take(1) == (True, 1)
        with pytest.raises(KeyError, match="job 2 has no such key"):
            pool.take(2)
        assert pool.take(3) == (True, 3) and pool.take(4) == (True, 4)


def test_a_killed_worker_hands_the_remaining_jobs_back_to_the_caller(caplog):
    jobs = {i: {"x": i, "bad": 3} for i in range(8)}
    got = []
    with PrefetchPool(die_on, jobs, workers=2, lookahead=8) as pool:
        for key, job in jobs.items():
            done, result = pool.take(key)
            got.append(result if done else job["x"])  # what the caller runs itself
        assert pool.broken and "BrokenProcessPool" in pool.broken
    assert got == list(range(8))
    assert "worker pool broken" in caplog.text


def test_a_key_taken_before_it_was_submitted_is_not_run_by_the_pool():
    jobs = {i: {"x": i} for i in range(6)}
    with PrefetchPool(square_pid, jobs, workers=1, lookahead=1) as pool:
        assert pool.take(5) == (False, None)  # not submitted yet: the caller runs it, the pool never does
        assert [pool.take(i)[1][0] for i in range(5)] == [0, 1, 4, 9, 16]
        assert pool.take(5) == (False, None)


def test_worker_count_defaults_and_caps(monkeypatch):
    monkeypatch.delenv(MAX_WORKERS_ENV, raising=False)
    assert worker_count(None, MIN_JOBS_FOR_POOL - 1) == 1  # a small plate: no pool
    assert worker_count(None, 100) == process_cores()
    assert worker_count(None, 3, worth_a_pool=True) == min(3, process_cores())  # the caller's estimate wins
    assert worker_count(None, 100, worth_a_pool=False) == 1 and worker_count(2, 100, worth_a_pool=False) == 2
    assert worker_count(4, 3) == 3 and worker_count(1, 100) == 1
    monkeypatch.setenv(MAX_WORKERS_ENV, "1")
    assert worker_count(4, 100) == 1
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="workers="):
            worker_count(bad, 10)
    monkeypatch.setenv(MAX_WORKERS_ENV, "many")
    with pytest.raises(ValueError, match=MAX_WORKERS_ENV):
        worker_count(2, 10)


SCRIPT = """
import os, sys
with open(os.environ["RUNS_LOG"], "a") as log:  # top level, no __main__ guard: a worker must not run it
    log.write("run\\n")
from phenocoder_lib.parallel import PrefetchPool
import test_parallel
jobs = {i: {"x": i} for i in range(6)}
with PrefetchPool(test_parallel.square_pid, jobs, workers=2) as pool:
    results = [pool.take(i) for i in jobs]
assert pool.broken is None, pool.broken
assert all(done for done, _ in results) and [r[0] for _, r in results] == [0, 1, 4, 9, 16, 25]
assert os.getpid() not in {r[1] for _, r in results}
print("ok")
"""


@pytest.mark.parametrize("how", ["script", "stdin"])
def test_workers_never_run_the_callers_unguarded_script(tmp_path, how):
    """A user's script without ``if __name__ == "__main__"`` (or code piped to ``python -``) runs once."""
    log = tmp_path / "runs.log"
    env = {**os.environ, "RUNS_LOG": str(log),
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    if how == "script":
        (tmp_path / "user_script.py").write_text(SCRIPT)
        proc = subprocess.run([sys.executable, "user_script.py"], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
    else:
        proc = subprocess.run([sys.executable, "-"], input=SCRIPT, cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    assert log.read_text().splitlines() == ["run"]
    assert "Traceback" not in proc.stderr and "broken" not in proc.stderr


def test_a_function_of_main_is_refused():
    fn = type(square_pid)(square_pid.__code__, {"os": os}, "job")
    fn.__module__ = "__main__"
    with pytest.raises(ValueError, match="importable module"):
        PrefetchPool(fn, {0: {"x": 1}}, workers=1)
