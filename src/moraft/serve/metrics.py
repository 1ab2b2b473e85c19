"""Prometheus metrics of ``moraft serve`` (``GET /metrics``, text exposition format 0.0.4).

A few counters, gauges and histograms written out by hand: the server needs nothing more of a metrics library.
"""

from __future__ import annotations

import math
import threading
from typing import Callable, Iterable, Optional


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self.name, self.help, self.label_names = name, help, labels
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A value that only goes up, per label set."""

    kind = "counter"

    def __init__(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[tuple[str, ...], float] = {} if labels else {(): 0.0}

    def inc(self, amount: float = 1.0, *labels: str) -> None:
        with self._lock:
            self._values[labels] = self._values.get(labels, 0.0) + amount

    def value(self, *labels: str) -> float:
        with self._lock:
            return self._values.get(labels, 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.label_names, k)} {_number(v)}" for k, v in items]


class Gauge(_Metric):
    """A value set directly, or read from a function when rendered (``kind="counter"`` for a count kept elsewhere)."""

    kind = "gauge"

    def __init__(self, name: str, help: str, read: Optional[Callable[[], float]] = None, kind: str = "gauge") -> None:
        super().__init__(name, help)
        self.kind = kind
        self._value = 0.0
        self._read = read

    def set(self, value: float) -> None:
        with self._lock:
            self._value = value

    def set_max(self, value: float) -> None:
        with self._lock:
            self._value = max(self._value, value)

    def value(self) -> float:
        if self._read is not None:
            return float(self._read())
        with self._lock:
            return self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_number(self.value())}"]


class Histogram(_Metric):
    """Counts of observations at or below each bucket bound, their sum and their count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float]) -> None:
        super().__init__(name, help)
        self.bounds = sorted(buckets) + [math.inf]
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self._counts[i] += 1
                    break
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def render(self) -> list[str]:
        with self._lock:
            counts, total, n = list(self._counts), self._sum, self._count
        lines, cumulative = self.header(), 0
        for bound, c in zip(self.bounds, counts):
            cumulative += c
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        return lines + [f"{self.name}_sum {_number(total)}", f"{self.name}_count {n}"]


LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServeMetrics:
    """Every metric the server exports. ``render()`` is the ``/metrics`` body."""

    def __init__(self) -> None:
        self.requests = Counter("moraft_requests_total", "HTTP requests to the API, by endpoint and status code.",
                                ("endpoint", "status"))
        self.prompt_tokens = Counter("moraft_prompt_tokens_total", "Prompt tokens of the requests decoded.")
        self.generation_tokens = Counter("moraft_generation_tokens_total", "Tokens generated.")
        self.finished = Counter("moraft_finished_requests_total", "Requests the engine finished, by finish reason.",
                                ("reason",))
        self.latency = Histogram("moraft_request_latency_seconds",
                                 "Time from a request's arrival at the engine to its last token.", LATENCY_BUCKETS)
        self.first_token = Histogram("moraft_time_to_first_token_seconds",
                                     "Time from a request's arrival at the engine to its first token.", LATENCY_BUCKETS)
        self.batch_size = Histogram("moraft_batch_size", "Rows in each decoding step.", SIZE_BUCKETS)
        self.batch_adapters = Histogram("moraft_batch_adapters",
                                        "Distinct models (adapters, or the base) in each decoding step.", SIZE_BUCKETS)
        self.batch_adapters_max = Gauge("moraft_batch_adapters_max",
                                        "The most distinct models (adapters, or the base) decoded in one step so far.")
        self.prefill_size = Histogram("moraft_prefill_batch_size", "Requests prefilled together.", SIZE_BUCKETS)
        self.step_seconds = Histogram("moraft_decode_step_seconds", "Duration of each decoding step.",
                                      (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.running = Gauge("moraft_running_requests", "Requests in the running batch.")
        self.waiting = Gauge("moraft_waiting_requests", "Requests waiting to join the batch.")
        self._extra: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        """Register another metric (the adapter store's gauges) to be rendered."""
        self._extra.append(metric)
        return metric

    def render(self) -> str:
        metrics = [self.requests, self.prompt_tokens, self.generation_tokens, self.finished, self.latency,
                   self.first_token, self.batch_size, self.batch_adapters, self.batch_adapters_max, self.prefill_size,
                   self.step_seconds, self.running, self.waiting, *self._extra]
        return "\n".join(line for m in metrics for line in m.render()) + "\n"
