"""Prometheus metrics in TF Serving's names, rendered as exposition text.

Served at `/monitoring/prometheus/metrics` on the REST port, as TF Serving does
with `prometheus_config { enable: true }` in `--monitoring_config_file`.
"""

import bisect
import threading

# Latency buckets in microseconds (TF Serving reports request latency in us).
LATENCY_BUCKETS_US = [100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000, 500000,
                      1000000, 2500000, 5000000]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]

REQUEST_COUNT = ":tensorflow:serving:request_count"
REQUEST_LATENCY = ":tensorflow:serving:request_latency"
BATCH_SIZE = ":tensorflow:serving:batching_session:processed_batch_size"
PADDING_SIZE = ":tensorflow:serving:batching_session:padding_size"
LOAD_COUNT = ":tensorflow:cc:saved_model:load_attempt_count"


def _labels(labels):
    if not labels:
        return ""
    body = ",".join(f'{k}="{str(v)}"'.replace("\n", " ") for k, v in labels)
    return "{" + body + "}"


class Metrics:
    """Thread-safe counters and histograms keyed by (name, labels)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._counters = {}
        self._histograms = {}
        self._help = {
            REQUEST_COUNT: ("counter", "The total number of requests, by model, API and status."),
            REQUEST_LATENCY: ("histogram", "Request latency in microseconds, by model, API and entrypoint."),
            BATCH_SIZE: ("histogram", "Rows in each batch run by the batching layer."),
            PADDING_SIZE: ("histogram", "Padding rows added to reach an allowed batch size."),
            LOAD_COUNT: ("counter", "Model version load attempts, by model and status."),
        }
        self._buckets = {REQUEST_LATENCY: LATENCY_BUCKETS_US, BATCH_SIZE: BATCH_BUCKETS, PADDING_SIZE: BATCH_BUCKETS}

    def increment(self, name, amount=1, **labels):
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + amount

    def observe(self, name, value, **labels):
        key = (name, tuple(sorted(labels.items())))
        buckets = self._buckets[name]
        with self._lock:
            counts = self._histograms.get(key)
            if counts is None:
                counts = self._histograms[key] = [[0] * (len(buckets) + 1), 0.0, 0]
            counts[0][bisect.bisect_left(buckets, value)] += 1
            counts[1] += value
            counts[2] += 1

    def request(self, model, api, entrypoint, status, seconds):
        self.increment(REQUEST_COUNT, model_name=model, API=api, entrypoint=entrypoint, status=status)
        self.observe(REQUEST_LATENCY, seconds * 1e6, model_name=model, API=api, entrypoint=entrypoint)

    def counter_value(self, name, **labels):
        with self._lock:
            return sum(v for (n, key), v in self._counters.items()
                       if n == name and all((k, str(val)) in {(a, str(b)) for a, b in key} for k, val in labels.items()))

    def render(self):
        """Prometheus text exposition format (version 0.0.4)."""
        lines = []
        with self._lock:
            counters = dict(self._counters)
            histograms = {k: ([*v[0]], v[1], v[2]) for k, v in self._histograms.items()}
        for name in sorted({n for n, _ in counters} | {n for n, _ in histograms}):
            kind, text = self._help.get(name, ("untyped", name))
            lines.append(f"# HELP {name} {text}")
            lines.append(f"# TYPE {name} {kind}")
            for (n, labels), value in sorted(counters.items()):
                if n == name:
                    lines.append(f"{name}{_labels(labels)} {value}")
            for (n, labels), (counts, total, count) in sorted(histograms.items()):
                if n != name:
                    continue
                running = 0
                for bound, bucket_count in zip([*self._buckets[name], "+Inf"], counts):
                    running += bucket_count
                    lines.append(f"{name}_bucket{_labels([*labels, ('le', bound)])} {running}")
                lines.append(f"{name}_sum{_labels(labels)} {total:g}")
                lines.append(f"{name}_count{_labels(labels)} {count}")
        return "\n".join(lines) + "\n"
