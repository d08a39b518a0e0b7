"""A bounded, ordered read / compute / write pipeline (what the streaming engine runs its tensors through).

:func:`run_ordered` moves a sequence of keys (tensor names) through three stages at once:

* a **reader** thread calls ``read(key)`` in order (the engine: fetch the zero-copy views and start their pages'
  read-ahead), after taking the key's place in an :class:`InFlight` budget;
* the calling thread hands each read value to ``submit(key, value, pool)``, which schedules the key's work on a
  :class:`Pool` of worker threads (inline for one worker) and returns a future of its **parts**: a list whose
  entries are lists of output pieces, or futures of such lists (work that a job schedules itself);
* a **writer** thread resolves the parts strictly in key order, calls ``write(key, piece)`` for every piece and
  then ``finish(key, value)``, and gives the key's place in the budget back.

So at most ``InFlight.max_tensors`` keys (and about ``max_bytes`` of them) are alive between being read and
being written, whatever the model's size. An exception anywhere (a ``read``, a job, a ``write``) travels with
its key and is raised, the same object, from :func:`run_ordered` once every earlier key is written, as a
sequential loop would raise it; the threads are stopped and joined before it returns or raises, so nothing
writes afterwards. Jobs never wait for each other (a job that needs more work submits it and returns its
futures), so the pool cannot deadlock.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["IN_FLIGHT_BYTES", "InFlight", "Pool", "done", "failed", "run_ordered"]

#: Default byte bound of the keys in flight (their inputs and outputs, as ``size`` counts them).
IN_FLIGHT_BYTES = 256 << 20


class InFlight:
    """At most `max_tensors` keys, and `max_bytes` bytes of them, between being read and being written.

    A key larger than `max_bytes` is let in alone (when nothing else is in flight), so any model passes.
    ``alive`` counts the keys in flight now, ``peak`` the most at once (for tests and measurements).
    `max_tensors` None: the pipeline picks ``2 * workers + 2``.
    """

    def __init__(self, max_tensors: int | None = None, max_bytes: int = IN_FLIGHT_BYTES) -> None:
        if max_tensors is not None and max_tensors < 1:
            raise ValueError(f"max_tensors must be at least 1, got {max_tensors}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.max_tensors = max_tensors
        self.max_bytes = max_bytes
        self.alive = 0
        self.bytes = 0
        self.peak = 0
        self._cv = threading.Condition()
        self._stopped = False

    def acquire(self, nbytes: int) -> bool:
        """Wait for room for a key of `nbytes`; False when the pipeline is stopping instead."""
        limit = self.max_tensors or 1
        with self._cv:
            while not self._stopped and self.alive > 0 and (
                self.alive >= limit or self.bytes + nbytes > self.max_bytes
            ):
                self._cv.wait()
            if self._stopped:
                return False
            self.alive += 1
            self.bytes += nbytes
            self.peak = max(self.peak, self.alive)
            return True

    def release(self, nbytes: int) -> None:
        with self._cv:
            self.alive -= 1
            self.bytes -= nbytes
            self._cv.notify_all()

    def stop(self) -> None:
        """Wake every waiter; acquire() answers False from now on."""
        with self._cv:
            self._stopped = True
            self._cv.notify_all()

    def reset(self) -> None:
        """Ready for a new run: not stopping, nothing in flight, the peak counted afresh."""
        with self._cv:
            self._stopped = False
            self.alive = self.bytes = self.peak = 0


def done(value: Any) -> Future:
    """A future that already holds `value`."""
    f: Future = Future()
    f.set_result(value)
    return f


def failed(error: BaseException) -> Future:
    """A future that already holds `error`."""
    f: Future = Future()
    f.set_exception(error)
    return f


class Pool:
    """`workers` threads running jobs (a ``ThreadPoolExecutor``), or, for one worker, the calling thread itself.

    :meth:`submit` returns a future either way; an ``Exception`` of an inline job is kept in its future like a
    thread's, other ``BaseException`` s (KeyboardInterrupt) propagate at once.
    """

    def __init__(self, workers: int, name: str = "hf-atm-merge") -> None:
        self.workers = max(1, int(workers))
        self._executor = ThreadPoolExecutor(self.workers, thread_name_prefix=name) if self.workers > 1 else None

    @property
    def parallel(self) -> bool:
        return self._executor is not None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._executor is not None:
            return self._executor.submit(fn, *args)
        try:
            return done(fn(*args))
        except Exception as e:  # noqa: BLE001 - kept in the future, raised in order by the writer
            return failed(e)

    def shutdown(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)


class _Stop(Exception):
    """Internal: the pipeline is stopping (another stage failed)."""


_END = object()


def _uninterrupted(fn: Callable[[], None]) -> None:
    """Run `fn` to its end even if KeyboardInterrupts (SIGINT, SIGTERM made one) arrive meanwhile, then raise
    the first of them: the stages' threads must be joined before the interpreter exits, or one still inside
    torch's C++ code when it does aborts the process ("terminate called without an active exception")."""
    pending: BaseException | None = None
    while True:
        try:
            fn()
            break
        except KeyboardInterrupt as e:  # fn is idempotent: run it again to its end
            pending = pending or e
    if pending is not None:
        raise pending


def run_ordered(
    keys: Iterable[Any],
    *,
    size: Callable[[Any], int],
    read: Callable[[Any], Any],
    submit: Callable[[Any, Any, Pool], Future],
    write: Callable[[Any, Any], None],
    finish: Callable[[Any, Any], None] | None = None,
    workers: int = 1,
    in_flight: InFlight | None = None,
) -> InFlight:
    """Run every key through read -> submit -> write (see the module docstring); return the budget used.

    `finish(key, value)` runs in the writer thread after the key's last piece (also for a key whose work
    failed, before the error is raised, so that pages are given back).
    """
    flight = in_flight if in_flight is not None else InFlight()
    if flight.max_tensors is None:
        flight.max_tensors = 2 * max(1, workers) + 2
    flight.reset()
    pool = Pool(workers)
    read_q: queue.Queue = queue.Queue()  # bounded by the budget: the reader waits for room first
    write_q: queue.Queue = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            for key in keys:
                if stop.is_set():
                    return
                nbytes = size(key)
                if not flight.acquire(nbytes):
                    return
                try:
                    value = read(key)
                except BaseException as e:  # noqa: BLE001 - raised in order by the writer
                    read_q.put((key, nbytes, None, e))
                    return
                read_q.put((key, nbytes, value, None))
                del value  # no reference of ours outlives the key's place in the budget
        except BaseException as e:  # noqa: BLE001 - size() or the keys' iterator failed
            read_q.put((None, None, None, e))  # no place taken in the budget
        finally:
            read_q.put(_END)

    def writer() -> None:
        try:
            while True:
                item = write_q.get()
                if item is _END:
                    return
                key, nbytes, value, parts = item
                part = pieces = piece = None
                try:
                    if stop.is_set():
                        raise _Stop
                    for part in parts.result():
                        pieces = part.result() if isinstance(part, Future) else part
                        for piece in pieces:
                            if stop.is_set():
                                raise _Stop
                            write(key, piece)
                finally:
                    if finish is not None and value is not None:
                        finish(key, value)
                    del item, value, parts, part, pieces, piece  # before the key's place is given back
                    if nbytes is not None:
                        flight.release(nbytes)
        except _Stop:
            return
        except BaseException as e:  # noqa: BLE001 - the first error in key order: raised by run_ordered
            errors.append(e)
            stop.set()
            flight.stop()

    stages = {"hf-atm-read": reader, "hf-atm-write": writer}
    # Set by each thread as it starts running: a thread may be joined only once it has really started.
    running = {name: threading.Event() for name in stages}

    def entered(name: str) -> Callable[[], None]:
        def run() -> None:
            running[name].set()
            stages[name]()
        return run

    threads = [threading.Thread(target=entered(name), name=name, daemon=True) for name in stages]

    def shutdown() -> None:
        stop.set()
        flight.stop()
        write_q.put(_END)  # a writer still waiting for work ends; one resolving a part sees it cancelled
        pool.shutdown()
        for t in started:
            # a start() cut short by a signal: its thread may still be coming up (it then ends at once)
            if running[t.name].wait(1.0):
                t.join()

    started: list[threading.Thread] = []
    try:
        for t in threads:  # inside the try: a signal while one starts still stops and joins them
            started.append(t)
            t.start()
        while True:
            item = read_q.get()
            if item is _END or stop.is_set():
                break
            key, nbytes, value, error = item
            if error is not None:
                write_q.put((key, nbytes, None, failed(error)))
                break
            try:
                parts = submit(key, value, pool)
            except Exception as e:  # noqa: BLE001 - raised in order by the writer
                parts = failed(e)
            write_q.put((key, nbytes, value, parts))
            del item, value, parts  # the writer holds them now
        write_q.put(_END)
        threads[1].join()
    finally:
        _uninterrupted(shutdown)
    if errors:
        raise errors[0]
    return flight
