"""Where the per-shard work runs: in this process, a local process pool, or Ray tasks on a cluster.

The shard tools (make_shards, index_shards) hand `run_tasks` one pure function and a list of tasks,
one per shard; each task writes its shard to the shared output folder and returns only small
metadata. Every engine runs the same function on the same tasks, so the output bytes do not depend
on the engine, the number of workers or the order in which tasks finish.

Inside a task, each video is worked on by a `VideoRunner`: a child process that a task can stop.
A video that hangs the decoder past its time limit, or crashes it, becomes a reject of that video
(`timeout`, `crashed`) instead of a stuck or failed task. So only infrastructure failures reach
the engine: on Ray a task whose worker died (killed, out of memory, node lost) or that raised an
OSError (an NFS hiccup) is run again, up to `RAY_MAX_RETRIES` times; it redoes the same
deterministic work and renames the same bytes into place.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import importlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from mae_scale.hardware import usable_cores

ENGINES = ("pool", "ray")
RAY_MISSING = "--engine ray needs Ray: pip install 'mae-scale[cluster]' (or: pip install 'ray>=2.40,<3')"
RAY_MAX_RETRIES = 3
CHILD_START_TIMEOUT_S = 300.0  # a child that has not imported its function by then is an infrastructure fault


class EngineError(RuntimeError):
    """The engine cannot run, or a task failed for a reason that is not one video's fault."""


def require_ray():
    """The ray module, or EngineError with the install command (checked before any work starts)."""
    try:
        import ray
    except ImportError as exc:
        raise EngineError(RAY_MISSING) from exc
    return ray


def run_tasks(
    fn: Callable[[Any], dict],
    tasks: Iterable[Any],
    *,
    engine: str = "pool",
    workers: int = 0,
    ray_address: str | None = None,
) -> Iterator[dict]:
    """`fn(task)` for every task, yielded as they finish (in any order).

    pool: `workers` processes (0: one after the other in this process). ray: a local Ray instance
    with `workers` CPUs when `ray_address` is None (an instance already started in this process,
    e.g. by tests, is used as it is), else the cluster at `ray_address` (`auto`: the one `ray start`
    made on this node); at most `workers` tasks at a time (0: as many as the cluster has CPUs).
    """
    tasks = list(tasks)
    if engine == "pool":
        yield from _pool(fn, tasks, workers)
    elif engine == "ray":
        yield from _ray(fn, tasks, workers, ray_address)
    else:
        raise EngineError(f"engine must be one of {ENGINES}, got {engine!r}")


def _pool(fn: Callable, tasks: list, workers: int) -> Iterator[dict]:
    if workers <= 0:
        for task in tasks:
            yield fn(task)
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        futures = [pool.submit(fn, task) for task in tasks]
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    yield future.result()
                except concurrent.futures.process.BrokenProcessPool as exc:
                    raise EngineError(
                        f"a worker process died ({exc}); run the same command again: finished shards are kept"
                    ) from exc
        finally:
            for future in futures:
                future.cancel()


def _ray(fn: Callable, tasks: list, workers: int, address: str | None) -> Iterator[dict]:
    ray = require_ray()
    started, pending = False, {}  # pending: object ref -> task
    if not ray.is_initialized():
        quiet = dict(include_dashboard=False, logging_level="warning", configure_logging=True)
        if address:
            ray.init(address=address, **quiet)
        else:
            ray.init(num_cpus=workers or usable_cores(), **quiet)
        started = True
    try:
        limit = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        remote = ray.remote(num_cpus=1, max_retries=RAY_MAX_RETRIES, retry_exceptions=[OSError])(fn)
        todo = iter(tasks)
        while True:
            while len(pending) < limit and (task := next(todo, None)) is not None:
                pending[remote.remote(task)] = task
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                task = pending.pop(ref)
                try:
                    yield ray.get(ref)
                except ray.exceptions.RayTaskError as exc:
                    raise EngineError(f"{_name(task)}: {exc.cause!r}") from exc.cause
                except ray.exceptions.RayError as exc:
                    raise EngineError(
                        f"{_name(task)}: {type(exc).__name__} after {RAY_MAX_RETRIES} retries ({exc}); "
                        "run the same command again: finished shards are kept"
                    ) from exc
    finally:
        for ref in pending:  # left when a task failed or the caller stopped early
            ray.cancel(ref, force=True)
        if started:
            ray.shutdown()


def _name(task: Any) -> str:
    return str(getattr(task, "name", task))


# ---- the per-video child process ---------------------------------------------------------------------


class VideoRunner:
    """Runs `fn(job)` (named "module:function") in a child process, one job at a time.

    `run(job, timeout)` returns ("ok", fn's result), ("error", what fn raised), ("timeout", detail)
    after killing the child, or ("crashed", detail) when the child died by itself twice on the job
    (it is started again and given the job once more, so a child killed from outside does not turn
    a good video into a reject).
    The child is a fresh `python` (not a fork: the caller may be a threaded Ray worker), inherits
    this process's import path, ignores SIGINT (the caller decides), and exits when its parent dies.
    """

    def __init__(self, fn: str):
        self.fn = fn
        self._proc: subprocess.Popen | None = None
        self._conn: multiprocessing.connection.Connection | None = None

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mae_scale.data.engines", str(theirs.fileno()), self.fn, str(os.getpid())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            env=env,
        )
        theirs.close()
        self._conn = multiprocessing.connection.Connection(ours.detach())
        if not self._conn.poll(CHILD_START_TIMEOUT_S):
            self.close()
            raise EngineError(f"the video worker for {self.fn} did not start in {CHILD_START_TIMEOUT_S:g} s")
        try:
            hello = self._conn.recv()
        except (EOFError, OSError) as exc:
            code = self._stop()
            raise EngineError(f"the video worker for {self.fn} failed to start (exit {code})") from exc
        if hello != "ready":
            self.close()
            raise EngineError(f"the video worker for {self.fn} failed to start: {hello}")

    def run(self, job: Any, timeout: float) -> tuple[str, Any]:
        for attempt in (1, 2):
            if self._proc is None:
                self._start()
            try:
                self._conn.send(job)
                if self._conn.poll(timeout):
                    return self._conn.recv()
            except (EOFError, OSError):
                code = self._stop()
                if attempt == 2:
                    return "crashed", f"the video worker died on it twice (exit {code})"
                continue
            self._stop()
            return "timeout", f"no result within {timeout:g} s; the video worker was killed"
        raise AssertionError("unreachable")

    def _stop(self) -> int | None:
        proc, self._proc = self._proc, None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is None:
            return None
        if proc.poll() is None:
            proc.kill()
        return proc.wait()

    def close(self) -> None:
        """Let the child finish (it exits on end of input), or kill it after 5 s."""
        proc = self._proc
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if proc is not None:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._proc = None


_RUNNERS: dict[str, VideoRunner] = {}


def video_runner(fn: str) -> VideoRunner:
    """This process's runner for `fn`, kept across tasks (a pool or Ray worker runs many shards)."""
    if fn not in _RUNNERS:
        _RUNNERS[fn] = VideoRunner(fn)
    return _RUNNERS[fn]


@atexit.register
def close_runners() -> None:
    while _RUNNERS:
        _RUNNERS.popitem()[1].close()


def import_function(name: str) -> Callable:
    module, _, attr = name.partition(":")
    return getattr(importlib.import_module(module), attr)


def _serve(fd: int, fn_name: str, parent: int) -> None:
    """The child's loop: job in, result out, until the parent closes the socket or dies."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(3)  # the parent died (killed with SIGKILL, say): do not outlive it

    threading.Thread(target=watch, daemon=True).start()
    conn = multiprocessing.connection.Connection(fd)
    try:
        fn = import_function(fn_name)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send(f"cannot import {fn_name}: {exc!r}")
        return
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        try:
            reply = ("ok", fn(job))
        except Exception as exc:  # noqa: BLE001 - the function's own bug or an odd input: the job's reject
            reply = ("error", f"{type(exc).__name__}: {exc}")
        conn.send(reply)


if __name__ == "__main__":
    _serve(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
