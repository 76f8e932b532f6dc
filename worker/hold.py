"""A worker process's hold on one row: its fencing token, and how long it may act alone.

A lease in Redis says which process works on a row (worker/state.py); it cannot stop a
process that was frozen (SIGSTOP, a paused VM, a throttled container) or cut off from
Redis past its lease, while another process took the row over, from carrying on with
what it holds in memory. Two guards stop it:

- **The epoch** (``Hold.epoch``): the row's fencing token when this process took it.
  Every change of hands moves the row's epoch on, and every write that matters names
  this one: the provider's memory (worker/pipeline.py: ``RowMemory``), the check before
  results are uploaded, the terminal record. Redis refuses a stale epoch in the same
  round trip as the write, and the holder raises ``Stale``: it drops the row at once.
- **The clock** (``Hold.guard``): a process knows when it last renewed its lease. Once
  half a lease has gone by without a renewal (heartbeats failing, or the process was
  not running), the lease may be close to lapsing, so it does nothing visible outside
  the process (``Unsure``) until it has re-checked with Redis. This covers the instants
  after the epoch's check: the guard runs again right before each paid request and each
  upload, so a holder that was frozen in between cannot act on a lapsed lease.

Neither is a row error (worker/errors.py): the row did nothing wrong, it just is not
this process's to act on any more, or not yet again.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

# A renewal keeps a lease for ``row_lease_s`` on Redis's clock; acting stops after half
# of it, so the process stops well before another process may take the row over.
GUARD_FRACTION = 0.5


class HoldLost(Exception):
    """This process may not act on the row now (not a row error)."""


class Stale(HoldLost):
    """The row changed hands (a new epoch): drop it and do nothing more with it."""


class Unsure(HoldLost):
    """The lease has not been renewed for long enough that it may lapse: re-check first."""


@dataclass
class Hold:
    """This process's hold on one row (made by ``begin``, renewed by the heartbeat)."""

    batch_id: str
    index: int
    epoch: int
    lease_s: float
    # When the last renewal that succeeded was *sent* (the clock below): the lease runs
    # from when Redis ran it, which is later, so this errs on the safe side.
    renewed_at: float
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)

    @property
    def guard_s(self) -> float:
        return self.lease_s * GUARD_FRACTION

    def renewed(self, sent_at: float) -> None:
        self.renewed_at = max(self.renewed_at, sent_at)

    def fresh(self) -> bool:
        return self.clock() - self.renewed_at < self.guard_s

    def guard(self) -> None:
        """Raise ``Unsure`` unless this process may still act on the row alone."""
        if not self.fresh():
            raise Unsure(
                f"row {self.batch_id}:{self.index}: lease not renewed for "
                f"{self.clock() - self.renewed_at:.1f}s"
            )
