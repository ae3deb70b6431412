"""Admission limits, and every way a queued request can end other than with its answer.

Raised by the Batcher (adl/serve/batcher.py); the server answers each with its HTTP status
(``FAILURES`` in adl/serve/server.py).
"""

from __future__ import annotations

from dataclasses import dataclass


class Overloaded(Exception):
    """``max_requests`` requests are admitted already (HTTP 429)."""


class TimedOut(Exception):
    """Not started within the timeout: dropped from the queue, never computed (HTTP 503)."""


class ClientGone(Exception):
    """The client went away before its request started: dropped, never computed."""


class ShuttingDown(Exception):
    """The server is stopping and the request was not answered in time (HTTP 503)."""


class LoopDied(Exception):
    """The batching loop ended on an error: nothing can be answered any more (HTTP 500)."""


class TooLong(Exception):
    """A text over the model's max_length, with truncation refused by the request (HTTP 413)."""


@dataclass(frozen=True)
class Limits:
    """Admission: requests admitted at once (waiting or running), and seconds one may wait to start."""

    max_requests: int = 512
    timeout: float = 30.0
