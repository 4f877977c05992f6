"""Per-user limits as pure logic (oppu.server.limits): token buckets per user and route class,
concurrency caps, Retry-After, idle users forgotten; and over HTTP, a user past a limit gets 429
with Retry-After while another user is not touched."""
from __future__ import annotations

import pytest

from oppu.server.limits import DEFAULT_LIMITS, Limit, Limits, Refused, Ticket


def test_bucket_refills_at_its_rate_and_says_when_to_retry():
    lim = Limits({"export": Limit(rate=0.5, burst=2, concurrent=5)})
    got = [lim.admit("a", "export", now=0.0) for _ in range(3)]
    assert [type(g) for g in got] == [Ticket, Ticket, Refused]
    for g in got[:2]:
        lim.release(g)
    assert got[2].retry_after_s == 2 and "export rate limit" in got[2].reason and "0.5/s" in got[2].reason
    assert isinstance(lim.admit("a", "export", now=1.0), Refused)  # half a token back
    assert isinstance(lim.admit("a", "export", now=2.0), Ticket)
    assert isinstance(lim.admit("b", "export", now=0.0), Ticket)  # another user: their own bucket
    assert isinstance(lim.admit("a", "generate", now=0.0), Ticket)  # another class: its own bucket


def test_concurrency_cap_is_per_user_and_released():
    lim = Limits({"generate": Limit(rate=1000, burst=1000, concurrent=2)})
    t1, t2 = lim.admit("a", "generate", 0.0), lim.admit("a", "generate", 0.0)
    third = lim.admit("a", "generate", 0.0)
    assert isinstance(third, Refused) and "concurrent" in third.reason and third.retry_after_s == 1
    assert isinstance(lim.admit("b", "generate", 0.0), Ticket)
    lim.release(t1)
    assert isinstance(lim.admit("a", "generate", 0.0), Ticket)
    lim.release(t2)


def test_idle_full_buckets_are_forgotten_and_bad_limits_named():
    lim = Limits(max_idle_users=10)
    for i in range(50):
        lim.release(lim.admit(f"u{i}", "read", now=float(i)))
    assert len(lim._state) <= 11
    with pytest.raises(ValueError, match="unknown route class"):
        Limits({"gossip": Limit(1, 1, 1)})
    with pytest.raises(ValueError, match="rate > 0"):
        Limit(rate=0, burst=1, concurrent=1)
    assert set(DEFAULT_LIMITS) == {"generate", "export", "train", "history", "read", "account"}
