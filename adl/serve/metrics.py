"""What an operator measures: the server's Prometheus series, fed by the HTTP layer and the batcher.

    request   adl_requests_total{route,status}  adl_request_seconds{route}  adl_predict_in_flight
    admission adl_rejected_total (429)  adl_timed_out_total (503: not started in time)
              adl_abandoned_total (client gone before its request started: never computed)
              adl_queue_depth (requests waiting to start)  adl_queue_wait_seconds
    a call    adl_batch_texts  adl_batch_requests  adl_batch_seconds  adl_batch_failures_total
              adl_batch_retries_total (requests rerun alone after their shared call failed)
              adl_tokenize_seconds  adl_forward_seconds (backbone and heads)  adl_decode_seconds
    a backbone batch  adl_batch_tokens (padded tokens)
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from adl.serve.batcher import Observer

SECONDS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30)


class Metrics(Observer):
    """Prometheus series, in a registry of their own (one app, one registry)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("adl_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("adl_request_seconds", "request latency (seconds) by route", ["route"], registry=r,
                                 buckets=SECONDS)
        self.in_flight = Gauge("adl_predict_in_flight", "predict requests being answered", registry=r)
        self.rejected = Counter("adl_rejected", "requests refused with 429: --max-concurrent-requests were in "
                                "flight", registry=r)
        self.timed_out = Counter("adl_timed_out", "requests dropped with 503: not started within "
                                 "--request-timeout-s", registry=r)
        self.abandoned = Counter("adl_abandoned", "requests whose client went away before they started "
                                 "(never computed)", registry=r)
        self.queue_depth = Gauge("adl_queue_depth", "requests waiting to start", registry=r)
        self.queue_wait = Histogram("adl_queue_wait_seconds", "seconds from arrival to the start of its batch",
                                    registry=r, buckets=SECONDS)
        self.batch_texts = Histogram("adl_batch_texts", "texts per backbone call", registry=r,
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
        self.batch_requests = Histogram("adl_batch_requests", "requests per backbone call", registry=r,
                                        buckets=(1, 2, 4, 8, 16, 32, 64))
        self.batch_seconds = Histogram("adl_batch_seconds", "seconds per backbone call", registry=r, buckets=SECONDS)
        self.batch_failures = Counter("adl_batch_failures", "backbone calls that raised", registry=r)
        self.retries = Counter("adl_batch_retries", "requests run again alone after their shared call failed",
                               registry=r)
        self.tokenize = Histogram("adl_tokenize_seconds", "seconds tokenising, per call", registry=r, buckets=SECONDS)
        self.forward = Histogram("adl_forward_seconds", "seconds in the backbone and heads, per call", registry=r,
                                 buckets=SECONDS)
        self.decode = Histogram("adl_decode_seconds", "seconds decoding answers, per call", registry=r,
                                buckets=SECONDS)
        self.batch_tokens = Histogram("adl_batch_tokens", "padded tokens per backbone batch", registry=r,
                                      buckets=(64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384))

    def watch(self, batcher) -> None:
        """Read the queue depth from ``batcher`` at each scrape."""
        self.queue_depth.set_function(lambda: batcher.waiting)

    # ---- the batcher's Observer --------------------------------------------------------------

    def batch(self, texts: int, requests: int, seconds: float, failed: bool, out=None) -> None:
        self.batch_texts.observe(texts)
        self.batch_requests.observe(requests)
        self.batch_seconds.observe(seconds)
        if failed:
            self.batch_failures.inc()
        stats = getattr(out, "stats", None)
        if stats:
            self.tokenize.observe(stats["tokenize_s"])
            self.forward.observe(stats["forward_s"])
            self.decode.observe(stats["decode_s"])
            for n in stats["batch_tokens"]:
                self.batch_tokens.observe(n)

    def started(self, waited: float) -> None:
        self.queue_wait.observe(waited)

    def retried(self) -> None:
        self.retries.inc()
