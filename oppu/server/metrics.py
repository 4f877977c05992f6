"""Prometheus text exposition (format 0.0.4), written by hand: request counters and histograms.

Labels carry route templates ("/v1/users/{user_id}/generate"), never concrete paths, and a
method outside HTTP_METHODS counts as "other", so no user id reaches the metrics and the series
count stays bounded whatever a client sends. Gauges (users, jobs by status, loaded
adapters) are read from the store when scraped and passed to `render`.

    m = Metrics()
    m.request("POST", "/v1/users/{user_id}/generate", 200)
    m.generate_latency.observe(0.012)
    text = m.render({"oppu_users": ("Users in the store.", [({}, 3)])})
"""
from __future__ import annotations

import bisect
import math
import threading
from typing import Mapping, Sequence

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
Gauges = Mapping[str, tuple[str, Sequence[tuple[Mapping[str, str], float]]]]


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(v: float) -> str:
    if isinstance(v, float) and math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v)) if isinstance(v, float) else str(v)


class Histogram:
    """Cumulative buckets, _sum and _count, as Prometheus expects them."""

    def __init__(self, name: str, help: str, buckets: Sequence[float]):
        self.name, self.help, self.buckets = name, help, tuple(buckets)
        self._counts = [0] * (len(self.buckets) + 1)  # last = above every bucket
        self._sum, self._lock = 0.0, threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self.buckets, value)] += 1
            self._sum += value

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        out = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        acc = 0
        for le, c in zip([*self.buckets, math.inf], counts):
            acc += c
            out.append(f'{self.name}_bucket{{le="{_num(float(le))}"}} {acc}')
        out += [f"{self.name}_sum {_num(total)}", f"{self.name}_count {acc}"]
        return out


class Metrics:
    def __init__(self) -> None:
        self._requests: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()
        self.generate_latency = Histogram("oppu_generate_latency_seconds",
                                          "End-to-end latency of generate requests that reached the batcher.",
                                          LATENCY_BUCKETS)
        self.batch_rows = Histogram("oppu_generate_batch_rows", "Rows (requests) per mixed-adapter batch.",
                                    BATCH_BUCKETS)
        self.instant_s = Histogram("oppu_instant_module_seconds",
                                   "Time to mix and publish a user's instant module (history requests).",
                                   LATENCY_BUCKETS)

    def request(self, method: str, route: str, status: int) -> None:
        key = (method if method in HTTP_METHODS else "other", route, str(status))
        with self._lock:
            self._requests[key] = self._requests.get(key, 0) + 1

    def requests(self) -> dict[tuple[str, str, str], int]:
        with self._lock:
            return dict(self._requests)

    def render(self, gauges: Gauges | None = None) -> str:
        out = ["# HELP oppu_http_requests_total HTTP requests by method, route template and status code.",
               "# TYPE oppu_http_requests_total counter"]
        for (method, route, status), n in sorted(self.requests().items()):
            out.append(f"oppu_http_requests_total{_labels({'method': method, 'route': route, 'status': status})} {n}")
        out += self.generate_latency.render() + self.batch_rows.render() + self.instant_s.render()
        for name, (help, samples) in (gauges or {}).items():
            out += [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
            out += [f"{name}{_labels(labels)} {_num(v)}" for labels, v in samples]
        return "\n".join(out) + "\n"
