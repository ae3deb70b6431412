"""Dynamic batching: concurrent requests coalesced into one Predictor call, each answer sent back to its own request.

Requests wait in an asyncio queue. One loop takes the first waiting request, then keeps taking
more until the batch holds ``max_batch_size`` texts or ``max_wait`` seconds have passed, and
runs the whole batch as one ``predictor(texts, heads=..., return_embedding=...)`` call on the
model thread (adl/serve/model_thread.py), so the event loop keeps accepting requests and
Predictor calls never overlap.
While a batch runs, new requests pile up in the queue and form the next one, so the batch size
follows the load by itself.

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

Admission (``Limits``, adl/serve/admission.py): at most ``max_requests`` requests are admitted at once (waiting or
running), so the queue is bounded; one more is refused at once (``Overloaded``). A request not
started within ``timeout`` seconds leaves the queue (``TimedOut``), and so does one whose client
went away: neither is ever computed. If the loop itself dies, every admitted request fails with
``LoopDied`` and so does every later one (no request hangs). ``drain(seconds)`` (on SIGTERM)
lets the admitted requests finish and fails those still unanswered after ``seconds``.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

from adl.serve.admission import ClientGone, Limits, LoopDied, Overloaded, ShuttingDown, TimedOut, TooLong
from adl.serve.decode import raw_scores
from adl.serve.model_thread import model_thread

QUIET = 0.002  # seconds without a new request that close a batch before max_wait


class Observer:
    """What the batcher reports (the server's metrics); every method is a no-op here."""

    def batch(self, texts: int, requests: int, seconds: float, failed: bool, out=None) -> None:
        """One Predictor call: its texts, requests, seconds; ``out`` its Prediction (None if it failed)."""

    def started(self, waited: float) -> None:
        """A request left the queue for a batch after ``waited`` seconds."""

    def retried(self) -> None:
        """A request is run again alone after its shared batch failed."""


@dataclass(eq=False)  # hashed and compared by identity
class Job:
    """One request waiting for its answer: ``heads`` None means every head. A job with ``control``
    is not a request but work for the model thread, run in queue order between batches."""

    texts: list[str]
    heads: list[str] | None
    embedding: bool
    future: asyncio.Future = field(repr=False)
    raw_scores: bool = False
    truncate: bool = True
    queued: float = 0.0
    started: bool = False
    control: Callable[[], Any] | None = None


@dataclass(frozen=True)
class Answer:
    """What a request gets back: per text a {head: result} dict, embeddings if asked, and the
    positions of the texts cut at the model's max_length."""

    results: list[dict[str, Any]]
    embeddings: list[list[float]] | None
    truncated: list[int] = field(default_factory=list)


class Batcher:
    """Owns the queue, the batching loop and the model thread.

    ``predictor`` is an adl.serve.Predictor (or anything with its ``.names`` and call, returning
    ``.heads[name][i]``, ``.embeddings[i]``, ``.logits[name][i]`` and ``.cut``); ``observer`` is
    told about every batch (metrics).
    """

    def __init__(self, predictor, max_batch_size: int, max_wait: float, observer: Observer | None = None,
                 pool: Executor | None = None, limits: Limits = Limits()):
        self.predictor = predictor
        self.max_batch_size, self.max_wait, self.limits = max_batch_size, max_wait, limits
        self.observer = observer or Observer()
        # the queue: admission bounds it to max_requests requests (plus the rare control job); a job
        # that times out or whose client goes away is removed from it at once
        self._queue: collections.deque[Job] = collections.deque()
        self._arrived = asyncio.Event()
        self._pool = pool or model_thread()
        self._task: asyncio.Task | None = None
        self._event_loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()  # set while no batch runs: every answered request's batch is counted
        self._last_requests = 1
        self.admitted: set[Job] = set()  # requests admitted and not answered
        self.waiting = 0  # of those, not started
        self.dead: str | None = None  # why the loop ended, once it has
        self.draining = False
        self._gave_up = False

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the model thread and wait for it (start-up work that touches torch)."""
        return self._pool.submit(fn, *args).result()

    def start(self) -> None:
        self._event_loop = asyncio.get_running_loop()
        self._task = self._event_loop.create_task(self._loop(), name="adl-batcher")
        self._task.add_done_callback(self._ended)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def saturated(self) -> bool:
        return len(self.admitted) >= self.limits.max_requests

    async def stop(self, wait: float = 5.0) -> None:
        """Cancel the loop (once no request is in flight) and let the model thread go. A request is
        answered before its Predictor call returns, so first let the last call finish, for at
        most ``wait`` seconds: a call that hangs is left to the daemon thread."""
        if self._task is not None:
            if not self._task.done() and not self._gave_up:
                try:
                    await asyncio.wait_for(self._idle.wait(), wait)
                except asyncio.TimeoutError:
                    pass
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        self._fail_all(ShuttingDown("the server is shutting down"))
        self._pool.shutdown(wait=self._idle.is_set())

    def drain_soon(self, seconds: float) -> None:
        """``drain`` from another thread or a signal handler."""
        if self._event_loop is not None:
            self._event_loop.call_soon_threadsafe(self.drain, seconds)

    def drain(self, seconds: float) -> None:
        """Stop taking requests (readiness fails) and fail those still unanswered in ``seconds``."""
        self.draining = True
        asyncio.get_running_loop().call_later(max(seconds, 0.0), self._give_up, seconds)

    def _give_up(self, seconds: float) -> None:
        self._gave_up = True
        self._fail_all(ShuttingDown(f"not answered within the {seconds:g} s the server had to drain "
                                    "(--graceful-timeout-s)"))

    async def submit(self, texts: list[str], heads: list[str] | None = None, embedding: bool = False, *,
                     raw_scores: bool = False, truncate: bool = True,
                     gone: Callable[[], Awaitable] | None = None) -> Answer:
        """Queue one request and wait for its answer; the Predictor's exception if its batch failed.
        ``gone()``: returns once the client has gone away (a request not started by then is dropped)."""
        if self.dead is not None:
            raise LoopDied(f"the batching loop died ({self.dead}): restart the server")
        if self.saturated:
            raise Overloaded(f"{len(self.admitted)} requests in flight, the limit is {self.limits.max_requests}")
        loop = asyncio.get_running_loop()
        job = Job(texts, heads, embedding, loop.create_future(), raw_scores, truncate, time.perf_counter())
        self.admitted.add(job)
        self.waiting += 1
        watch = asyncio.ensure_future(gone()) if gone is not None else None
        try:
            self._put(job)
            await asyncio.wait([job.future, *([watch] if watch else [])], timeout=self.limits.timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if not job.started and not job.future.done():
                self._drop(job)
                if watch is not None and watch.done():
                    raise ClientGone("the client went away before its request started")
                raise TimedOut(f"not started within {self.limits.timeout:g} s (--request-timeout-s): the server is "
                               "busy; retry later or with fewer texts")
            return await job.future
        finally:
            if watch is not None:
                watch.cancel()
            if not job.future.done():  # cancelled (the server gave up on it): never computed if not started
                self._drop(job)
            if not job.started:
                self.waiting -= 1
            self.admitted.discard(job)

    async def control(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the model thread after every request queued before it (loading a head)."""
        job = Job([], None, False, asyncio.get_running_loop().create_future(), control=fn)
        self._put(job)
        return await job.future

    # ---- the queue ---------------------------------------------------------------------------

    def _put(self, job: Job) -> None:
        self._queue.append(job)
        self._arrived.set()

    def _drop(self, job: Job) -> None:
        """Out of the queue, unanswered: the loop never sees it."""
        job.future.cancel()
        try:
            self._queue.remove(job)
        except ValueError:
            pass  # taken by the loop already

    async def _next_job(self, timeout: float) -> Job | None:
        """The first queued job, waiting at most ``timeout`` seconds for one (None: none came)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._queue:
            self._arrived.clear()
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                await asyncio.wait_for(self._arrived.wait(), None if left == float("inf") else left)
            except asyncio.TimeoutError:
                return None
        return self._queue.popleft()

    # ---- the loop ----------------------------------------------------------------------------

    def _ended(self, task: asyncio.Task) -> None:
        if task.cancelled() or task.exception() is None:
            return
        e = task.exception()
        self.dead = f"{type(e).__name__}: {e}"
        self._fail_all(LoopDied(f"the batching loop died ({self.dead}): restart the server"))

    def _fail_all(self, error: Exception) -> None:
        for job in [*self.admitted, *self._queue]:  # control jobs too
            _settle(job, exception=error)
        self._queue.clear()

    def _start(self, job: Job) -> None:
        if job.control is None:
            job.started = True
            self.waiting -= 1
            self.observer.started(time.perf_counter() - job.queued)

    async def _collect(self) -> list[Job]:
        """The next batch: the first waiting job, then more until full or the wait is over."""
        loop = asyncio.get_running_loop()
        first = await self._next_job(float("inf"))
        self._start(first)
        batch, n = [first], len(first.texts)
        deadline = loop.time() + (self.max_wait if self._last_requests > 1 else 0.0)
        while first.control is None and n < self.max_batch_size:
            job = await self._next_job(min(deadline - loop.time(), QUIET))
            if job is None:
                break
            if job.control is not None or n + len(job.texts) > self.max_batch_size:
                self._queue.appendleft(job)  # it runs next
                break
            self._start(job)
            batch.append(job)
            n += len(job.texts)
        self._last_requests = len(batch)
        return batch

    async def _loop(self) -> None:
        while True:
            self._idle.set()
            batch = await self._collect()
            self._idle.clear()
            if batch[0].control is not None:
                await self._control(batch[0])
            else:
                await self._run(batch)

    async def _control(self, job: Job) -> None:
        try:
            result = await asyncio.get_running_loop().run_in_executor(self._pool, job.control)
        except Exception as e:  # noqa: BLE001 - its caller gets the error, the loop goes on
            _settle(job, exception=e)
        else:
            _settle(job, result=result)

    async def _run(self, batch: list[Job]) -> None:
        texts = [t for job in batch for t in job.texts]
        asked = [job.heads for job in batch]
        names = list(self.predictor.names)
        heads = None if any(h is None for h in asked) else [n for n in names if any(n in h for h in asked)]
        embedding = any(job.embedding for job in batch)
        loop = asyncio.get_running_loop()
        starts = [0, *itertools.accumulate(len(job.texts) for job in batch)]
        spans = [range(a, b) for a, b in zip(starts, starts[1:])]  # each job's text positions in the call
        owner = [j for j, span in enumerate(spans) for _ in span]  # text position -> its job
        left = [len(span) for span in spans]

        def on_rows(rows, out) -> None:  # on the model thread, after each backbone batch
            done = []
            for r in rows:
                j = owner[r]
                left[j] -= 1
                if left[j] == 0:  # the job's last text is done: answer it now, not after the whole call
                    done.append(j)
            if done:  # one wake-up of the event loop per backbone batch, not one per request
                loop.call_soon_threadsafe(self._answer_jobs, [batch[j] for j in done], out, [spans[j] for j in done],
                                          names)

        call = functools.partial(self.predictor, texts, heads=heads, return_embedding=embedding, on_rows=on_rows)
        start = time.perf_counter()
        try:
            out = await loop.run_in_executor(self._pool, call)
        except Exception as e:  # noqa: BLE001 - a failing batch must answer its requests, never kill the loop
            self.observer.batch(len(texts), len(batch), time.perf_counter() - start, True)
            unanswered = [job for job in batch if not job.future.done()]
            if len(unanswered) > 1:
                for job in unanswered:
                    self.observer.retried()
                    await self._run([job])
            elif unanswered:
                _settle(unanswered[0], exception=e)
            return
        self.observer.batch(len(texts), len(batch), time.perf_counter() - start, False, out)
        # the jobs on_rows has not answered (a predictor that reports no batches); answered ones are skipped
        self._answer_jobs(batch, out, spans, names)

    def _answer_jobs(self, jobs: list[Job], out, rows: list[range], names: list[str]) -> None:
        for job, span in zip(jobs, rows):
            self._answer(job, out, span, names)

    def _answer(self, job: Job, out, rows: range, names: list[str]) -> None:
        if job.future.done():  # answered already, or the client went away
            return
        try:
            _settle(job, result=_slice(out, job, rows, names))
        except Exception as e:  # noqa: BLE001 - an output that does not fit fails its request, not the loop
            _settle(job, exception=e)


def _slice(out, job: Job, rows: range, names: list[str]) -> Answer:
    """Rows ``rows`` of a batch's output, with only the heads (and embeddings) the job asked for."""
    cut = [i for i, r in enumerate(rows) if out.cut[r]]
    if cut and not job.truncate:
        raise TooLong(f"texts[{cut[0]}] is longer than the model's limit of tokens ({len(cut)} text(s) in all): "
                      'shorten it, or send "truncate": true to cut it')
    names = names if job.heads is None else job.heads
    if job.raw_scores:
        results = [{name: raw_scores(out.heads[name][r], out.logits[name][r]) for name in names} for r in rows]
    else:
        results = [{name: out.heads[name][r] for name in names} for r in rows]
    embeddings = [list(out.embeddings[r]) for r in rows] if job.embedding else None
    return Answer(results, embeddings, cut)


def _settle(job: Job, result: Any = None, exception: Exception | None = None) -> None:
    if job.future.done():  # the client went away and its request was cancelled
        return
    if exception is not None:
        job.future.set_exception(exception)
    else:
        job.future.set_result(result)
