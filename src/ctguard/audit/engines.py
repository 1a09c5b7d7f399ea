"""Where the per-series work runs: a local pool of processes (default) or Ray tasks on a cluster.

Both keep a bounded number of series in flight (memory), retry a series whose worker died, and
hand every row back to the driver, which alone writes the results.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ctguard.audit.sources import SeriesRef
from ctguard.errors import InputError

ATTEMPTS = 3  # a series whose worker died is tried again (a broken pool fails all it had in flight), then recorded as an error


def _worker_died(ref: SeriesRef, model_hint: str | None) -> dict[str, Any]:
    from ctguard.audit.work import _row

    return _row(ref, model=model_hint or "?", model_version="?", pixel_hash="", verdict="error",
                error=f"its worker died {ATTEMPTS} times while screening it")


def local(refs: Iterable[SeriesRef], work: Callable[..., dict], args: tuple, workers: int, **_: Any) -> Iterator[dict[str, Any]]:
    """A pool of ``workers`` processes (spawned: each loads the detector once, on its first series)."""
    import multiprocessing as mp
    from concurrent.futures import ALL_COMPLETED, FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx = mp.get_context("spawn")
    pending = iter(refs)
    in_flight: dict[Any, tuple[SeriesRef, int]] = {}
    retry: list[tuple[SeriesRef, int]] = []
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    try:
        exhausted = False
        while True:
            submit_broke = False
            while len(in_flight) < 2 * workers and (retry or not exhausted):
                if retry:
                    ref, attempt = retry.pop()
                else:
                    ref = next(pending, None)
                    if ref is None:
                        exhausted = True
                        break
                    attempt = 1
                try:
                    in_flight[pool.submit(work, ref, *args)] = (ref, attempt)
                except BrokenProcessPool:  # a worker died since the last wait: this series never started
                    retry.append((ref, attempt))
                    submit_broke = True
                    break
            if not in_flight and not submit_broke:
                return
            # After a refused submit, every future of the dead pool settles (a result, or the pool's error).
            done, _ = wait(list(in_flight), return_when=ALL_COMPLETED if submit_broke else FIRST_COMPLETED)
            broken = submit_broke
            for fut in done:
                ref, attempt = in_flight.pop(fut)
                try:
                    yield fut.result()
                except BrokenProcessPool:
                    broken = True
                    if attempt < ATTEMPTS:
                        retry.append((ref, attempt + 1))
                    else:
                        yield _worker_died(ref, args[0])
            if broken:  # every series in flight on the dead pool is tried again on a new one
                for fut, (ref, attempt) in list(in_flight.items()):
                    in_flight.pop(fut)
                    if attempt < ATTEMPTS:
                        retry.append((ref, attempt + 1))
                    else:
                        yield _worker_died(ref, args[0])
                pool.shutdown(wait=False, cancel_futures=True)
                pool = ProcessPoolExecutor(max_workers=workers, mp_context=ctx)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def ray(refs: Iterable[SeriesRef], work: Callable[..., dict], args: tuple, workers: int, address: str | None = None,
        **_: Any) -> Iterator[dict[str, Any]]:
    """Ray tasks (``pip install 'ctguard[ray]'``): at most ``2 * workers`` series in flight; Ray
    retries a task whose worker process died (``max_retries``), and a series that still fails is an
    error row. ``address``: a running cluster (``ray://host:10001`` or ``auto``); default: a local one."""
    try:
        import ray as _ray
    except ImportError:
        raise InputError("--engine ray needs Ray: pip install 'ctguard[ray]'") from None
    if not _ray.is_initialized():
        _ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False, logging_level="ERROR",
                  log_to_driver=False)
    task = _ray.remote(num_cpus=1, max_retries=ATTEMPTS - 1, retry_exceptions=False)(work)
    pending = iter(refs)
    in_flight: dict[Any, SeriesRef] = {}
    while True:
        while len(in_flight) < 2 * workers:
            ref = next(pending, None)
            if ref is None:
                break
            in_flight[task.remote(ref, *args)] = ref
        if not in_flight:
            return
        done, _ = _ray.wait(list(in_flight), num_returns=1)
        for obj in done:
            ref = in_flight.pop(obj)
            try:
                yield _ray.get(obj)
            except (_ray.exceptions.WorkerCrashedError, _ray.exceptions.RayTaskError, _ray.exceptions.TaskCancelledError):
                yield _worker_died(ref, args[0])


ENGINES = {"local": local, "ray": ray}
