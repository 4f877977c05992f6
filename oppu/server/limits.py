"""Per-user limits: how many requests of one class a user may have in flight, and how fast they
may send them (a token bucket per user and route class). Pure logic: no clock, no I/O.

    limits = Limits({"generate": Limit(rate=50, burst=100, concurrent=8)})
    got = limits.admit("u1", "generate", now=time.monotonic())
    if isinstance(got, Refused): ...           # 429, Retry-After: got.retry_after_s (whole seconds, >= 1)
    else: try: ... finally: limits.release(got)

A refusal costs the refused user nothing else and the others nothing at all: a user past their
budget gets 429 at once, their requests never queue in front of anyone. Idle users' buckets are
forgotten (a full bucket is the same as a new one), so memory follows the active users.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

ROUTE_CLASSES = ("generate", "export", "train", "history", "read", "account")


@dataclass(frozen=True)
class Limit:
    rate: float          # requests per second, sustained
    burst: float         # requests at once after an idle spell (the bucket's size)
    concurrent: int      # requests in flight at once

    def __post_init__(self) -> None:
        if not (self.rate > 0 and self.burst >= 1 and self.concurrent >= 1):
            raise ValueError(f"a limit needs rate > 0, burst >= 1, concurrent >= 1; got {self}")


DEFAULT_LIMITS = {
    "generate": Limit(rate=50, burst=100, concurrent=8),
    "export": Limit(rate=0.2, burst=3, concurrent=1),     # export and import: a full scrypt each
    "train": Limit(rate=1, burst=5, concurrent=1),
    "history": Limit(rate=10, burst=40, concurrent=2),
    "read": Limit(rate=100, burst=200, concurrent=8),      # user info, versions, job polling
    "account": Limit(rate=1, burst=5, concurrent=1),      # token rotation, rollback, delete
}


@dataclass(frozen=True)
class Ticket:
    key: tuple[str, str]


@dataclass(frozen=True)
class Refused:
    reason: str
    retry_after_s: int


@dataclass
class _State:
    tokens: float
    stamp: float
    in_flight: int = 0


class Limits:
    def __init__(self, limits: dict[str, Limit] | None = None, max_idle_users: int = 100_000):
        self.limits = {**DEFAULT_LIMITS, **(limits or {})}
        unknown = sorted(set(self.limits) - set(ROUTE_CLASSES))
        if unknown:
            raise ValueError(f"unknown route class(es) {unknown}; valid: {', '.join(ROUTE_CLASSES)}")
        self.max_idle_users = max_idle_users
        self._state: dict[tuple[str, str], _State] = {}
        self._lock = threading.Lock()

    def admit(self, user: str, cls: str, now: float) -> Ticket | Refused:
        """A ticket (release it when the request ends) or why not and when to retry."""
        lim = self.limits[cls]
        key = (user, cls)
        with self._lock:
            st = self._state.get(key)
            if st is None:
                self._prune(now)
                st = self._state[key] = _State(tokens=lim.burst, stamp=now)
            st.tokens = min(lim.burst, st.tokens + (now - st.stamp) * lim.rate)
            st.stamp = now
            if st.in_flight >= lim.concurrent:
                return Refused(f"too many concurrent {cls} requests of this user (limit {lim.concurrent})", 1)
            if st.tokens < 1:
                wait = (1 - st.tokens) / lim.rate
                return Refused(f"{cls} rate limit of this user exceeded ({lim.rate:g}/s, burst {lim.burst:g})",
                               max(1, math.ceil(wait)))
            st.tokens -= 1
            st.in_flight += 1
            return Ticket(key)

    def release(self, ticket: Ticket) -> None:
        with self._lock:
            st = self._state.get(ticket.key)
            if st is not None:
                st.in_flight = max(0, st.in_flight - 1)

    def forget(self, user: str) -> None:
        """Drop a (deleted) user's state."""
        with self._lock:
            for key in [k for k in self._state if k[0] == user and self._state[k].in_flight == 0]:
                del self._state[key]

    def _prune(self, now: float) -> None:
        """Forget buckets that are full again and idle, once there are too many."""
        if len(self._state) < self.max_idle_users:
            return
        for key, st in list(self._state.items()):
            lim = self.limits[key[1]]
            if st.in_flight == 0 and st.tokens + (now - st.stamp) * lim.rate >= lim.burst:
                del self._state[key]
