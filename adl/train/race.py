"""Racing `adl train`'s candidates: stop one once it cannot catch the leader on validation.

The candidates train cheapest first (the concat probe, the pooled head, then the tokens head),
so the costly one runs against a known leader score ``s*``. After epoch e, with b_e the
candidate's best validation score so far and r its recent rate of progress,

    r = (b_e - b_{e-W}) / W                  (W = WINDOW epochs)
    stop when  e > W  and  b_e + r * H < s* - MARGIN

H is the candidate's own patience (the epochs it would wait for an improvement anyway): the
candidate is stopped once even its recent pace, kept up for that long, would leave it behind
the leader. A stopped candidate keeps its best epoch and is still scored and mixed
(``adl.train.ensemble``): racing saves time, it does not drop the candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WINDOW = 3  # epochs over which the pace is measured
MARGIN = 0.0  # how far behind the projection may end and still go on


@dataclass
class Race:
    leader: float  # the leader's validation score s*
    horizon: int  # H, epochs
    best: list[float] = field(default_factory=list)  # b_1 .. b_e

    def behind(self, score: float) -> bool:
        """Record epoch e's validation ``score``; True when the candidate should stop."""
        self.best.append(max(score, self.best[-1]) if self.best else score)
        if len(self.best) <= WINDOW:
            return False
        pace = (self.best[-1] - self.best[-1 - WINDOW]) / WINDOW
        return self.best[-1] + pace * self.horizon < self.leader - MARGIN
