"""The one thread that runs every torch operation of a server, and why it is one.

    pool = model_thread()
    predictor = pool.submit(Predictor, runs).result()   # loaded on the thread that will run it
    Batcher(predictor, ..., pool=pool)                    # every call runs there
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Executor, Future


class ModelThread(Executor):
    """The one thread that runs every torch operation of a server: load the Predictor on it
    (``model_thread().submit(Predictor, runs).result()``) and hand it to the Batcher.

    Why one thread: with OpenMP (torch's CPU threads), each thread that runs a parallel region
    gets a team of threads of its own, and once a process holds more OpenMP threads than cores,
    libgomp stops spin-waiting between regions and puts its threads to sleep after each one. A
    model loaded and warmed on the main thread, then run on a worker, made every single-text
    call much slower on 2 cores (measured in docs/serve.md).

    Why not a ThreadPoolExecutor: its threads are joined at interpreter exit, so a forward that
    hangs would keep a server that was told to stop from ever exiting. This thread is a daemon."""

    def __init__(self):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._work, name="adl-predict", daemon=True)
        self._thread.start()

    def submit(self, fn, /, *args, **kwargs) -> Future:
        future: Future = Future()
        self._jobs.put((future, fn, args, kwargs))
        return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._jobs.put(None)
        if wait:
            self._thread.join()

    def _work(self) -> None:
        while (item := self._jobs.get()) is not None:
            future, fn, args, kwargs = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(*args, **kwargs))
                except BaseException as e:  # noqa: BLE001 - handed to the waiting caller
                    future.set_exception(e)


def model_thread() -> ModelThread:
    """The server's model thread (see ``ModelThread``)."""
    return ModelThread()
