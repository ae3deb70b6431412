"""Dynamic batching: concurrent requests coalesced into one Predictor call, each answer sent back to its own request.

Requests wait in an asyncio queue. One loop takes the first waiting request, then keeps taking
more until the batch holds ``max_batch_size`` texts or ``max_wait`` seconds have passed, and
runs the whole batch as one ``predictor(texts, heads=..., return_embedding=...)`` call in a single model
thread (so the event loop keeps accepting requests and Predictor calls never overlap). While a
batch runs, new requests pile up in the queue and form the next one, so the batch size follows
the load by itself.

    B requests, n_1 .. n_B texts  ->  one call on n_1 + ... + n_B <= max_batch_size texts
    (a request is never split; one larger than max_batch_size runs alone)

The wait is spent only when the previous batch showed concurrency (it held more than one
request): a lone client never waits for company that is not coming, so at concurrency 1 the
latency is the forward pass alone. And it ends early once requests stop arriving for ``QUIET``
seconds: the clients of the last batch send their next requests in a burst that the event loop
reads in a few milliseconds, and waiting out ``max_wait`` after the burst only idles the
backbone (at concurrency 8 and 32 a batch never fills the default 64 texts).

The call asks for the union of the requests' heads (all of them if any request asked for all)
and for embeddings if any request did; each request gets back only what it asked for. A head's
answer on a text does not depend on which other heads ride along, so this changes nothing.

Each request is answered as soon as the backbone batch holding its last text is done (the
Predictor's ``on_rows`` callback), not when the whole call returns: a call on 32 texts runs as
a few length-sorted backbone batches, and the clients answered after the first ones send their
next requests while the rest run, so the next call finds them waiting.

When a batch of several requests fails, each request not yet answered is run again alone, so a
request that breaks the Predictor fails by itself and its neighbours still get their answers.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

QUIET = 0.002  # seconds without a new request that close a batch before max_wait


def model_thread() -> ThreadPoolExecutor:
    """The one thread that runs every torch operation of a server: load the Predictor on it
    (``model_thread().submit(Predictor, runs).result()``) and hand it to the Batcher.

    Why one thread: with OpenMP (torch's CPU threads), each thread that runs a parallel region
    gets a team of threads of its own, and once a process holds more OpenMP threads than cores,
    libgomp stops spin-waiting between regions and puts its threads to sleep after each one. A
    model loaded and warmed on the main thread, then run on a worker, made every single-text
    call about twice as slow on 2 cores (33 ms against 15-24 ms, MiniLM; docs/serve.md)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="adl-predict")


@dataclass
class Job:
    """One request waiting for its answer: ``heads`` None means every head."""

    texts: list[str]
    heads: list[str] | None
    embedding: bool
    future: asyncio.Future = field(repr=False)


@dataclass(frozen=True)
class Answer:
    """What a request gets back: per text a {head: result} dict, and embeddings if asked."""

    results: list[dict[str, Any]]
    embeddings: list[list[float]] | None


class Batcher:
    """Owns the queue, the batching loop and the one model thread.

    ``predictor`` is an adl.serve.Predictor (or anything with its ``.names`` and call, returning
    ``.heads[name][i]`` and ``.embeddings[i]``); ``on_batch(texts, requests, seconds, failed)`` is
    told about every batch (metrics).
    """

    def __init__(self, predictor, max_batch_size: int, max_wait: float,
                 on_batch: Callable[[int, int, float, bool], None] | None = None,
                 pool: ThreadPoolExecutor | None = None):
        self.predictor, self.names = predictor, list(predictor.names)
        self.max_batch_size, self.max_wait = max_batch_size, max_wait
        self.on_batch = on_batch or (lambda *_: None)
        self._queue: asyncio.Queue[Job] = asyncio.Queue()
        self._carry: collections.deque[Job] = collections.deque()  # taken from the queue, runs next
        self._pool = pool or model_thread()
        self._task: asyncio.Task | None = None
        self._idle = asyncio.Event()  # set while no batch runs: every answered request's batch is counted
        self._last_requests = 1

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the model thread and wait for it (start-up work that touches torch)."""
        return self._pool.submit(fn, *args).result()

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="adl-batcher")

    async def stop(self) -> None:
        """Cancel the loop (call once no request is in flight) and join the model thread. A request
        is answered before its Predictor call returns, so first let the last call finish."""
        if self._task is not None:
            if not self._task.done():
                await self._idle.wait()
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._pool.shutdown(wait=True)

    async def submit(self, texts: list[str], heads: list[str] | None = None, embedding: bool = False) -> Answer:
        """Queue one request and wait for its answer; the Predictor's exception if its batch failed."""
        job = Job(texts, heads, embedding, asyncio.get_running_loop().create_future())
        await self._queue.put(job)
        return await job.future

    async def _next_job(self, timeout: float) -> Job | None:
        if self._carry:
            return self._carry.popleft()
        if timeout <= 0:
            return None if self._queue.empty() else self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _collect(self) -> list[Job]:
        """The next batch: the first waiting job, then more until full or the wait is over."""
        loop = asyncio.get_running_loop()
        first = self._carry.popleft() if self._carry else await self._queue.get()
        batch, n = [first], len(first.texts)
        deadline = loop.time() + (self.max_wait if self._last_requests > 1 else 0.0)
        while n < self.max_batch_size:
            job = await self._next_job(min(deadline - loop.time(), QUIET))
            if job is None:
                break
            if n + len(job.texts) > self.max_batch_size:
                self._carry.append(job)
                break
            batch.append(job)
            n += len(job.texts)
        self._last_requests = len(batch)
        return batch

    async def _loop(self) -> None:
        while True:
            self._idle.set()
            batch = await self._collect()
            self._idle.clear()
            await self._run(batch)

    async def _run(self, batch: list[Job]) -> None:
        texts = [t for job in batch for t in job.texts]
        asked = [job.heads for job in batch]
        heads = None if any(h is None for h in asked) else [n for n in self.names if any(n in h for h in asked)]
        embedding = any(job.embedding for job in batch)
        loop = asyncio.get_running_loop()
        starts = [0, *itertools.accumulate(len(job.texts) for job in batch)]
        spans = [range(a, b) for a, b in zip(starts, starts[1:])]  # each job's text positions in the call
        owner = [j for j, span in enumerate(spans) for _ in span]  # text position -> its job
        left = [len(span) for span in spans]

        def on_rows(rows, out) -> None:  # on the model thread, after each backbone batch
            for r in rows:
                j = owner[r]
                left[j] -= 1
                if left[j] == 0:  # the job's last text is done: answer it now, not after the whole call
                    loop.call_soon_threadsafe(self._answer, batch[j], out, spans[j])

        call = functools.partial(self.predictor, texts, heads=heads, return_embedding=embedding, on_rows=on_rows)
        start = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._pool, call)
        except Exception as e:  # noqa: BLE001 - a failing batch must answer its requests, never kill the loop
            self.on_batch(len(texts), len(batch), time.perf_counter() - start, True)
            unanswered = [job for job in batch if not job.future.done()]
            if len(unanswered) > 1:
                for job in unanswered:
                    await self._run([job])
            elif unanswered:
                _settle(unanswered[0], exception=e)
            return
        self.on_batch(len(texts), len(batch), time.perf_counter() - start, False)
        for job, span in zip(batch, spans):  # a job on_rows has not answered (a predictor that reports no batches)
            self._answer(job, out, span)

    def _answer(self, job: Job, out, rows: range) -> None:
        if job.future.done():  # answered already, or the client went away
            return
        try:
            _settle(job, result=_slice(out, job, rows, self.names))
        except Exception as e:  # noqa: BLE001 - an output that does not fit fails its request, not the loop
            _settle(job, exception=e)


def _slice(out, job: Job, rows: range, names: list[str]) -> Answer:
    """Rows ``rows`` of a batch's output, with only the heads (and embeddings) the job asked for."""
    names = names if job.heads is None else job.heads
    results = [{name: out.heads[name][r] for name in names} for r in rows]
    embeddings = [list(out.embeddings[r]) for r in rows] if job.embedding else None
    return Answer(results, embeddings)


def _settle(job: Job, result: Answer | None = None, exception: Exception | None = None) -> None:
    if job.future.done():  # the client went away and its request was cancelled
        return
    if exception is not None:
        job.future.set_exception(exception)
    else:
        job.future.set_result(result)
