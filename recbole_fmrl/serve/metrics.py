"""Server metrics in the Prometheus text exposition format (version 0.0.4), without a client library.

Counters and histograms only grow; ``render`` reads them together with the engine's gauges.
"""
import threading
from bisect import bisect_left

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)  # seconds
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.total, self.n = tuple(buckets), [0] * (len(buckets) + 1), 0.0, 0

    def observe(self, value):
        self.counts[bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def lines(self, name, labels=""):
        sep = "," if labels else ""
        running, out = 0, []
        for bound, count in zip(self.buckets + (float("inf"),), self.counts):
            running += count
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        tail = f"{{{labels}}}" if labels else ""
        return out + [f"{name}_sum{tail} {self.total:.6f}", f"{name}_count{tail} {self.n}"]


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests = {}  # (route, status) -> count
        self.latency = {}  # route -> Histogram
        self.batch = Histogram(BATCH_BUCKETS)
        self.reloads = {"ok": 0, "refused": 0}

    def request(self, route, status, seconds):
        with self.lock:
            self.requests[(route, status)] = self.requests.get((route, status), 0) + 1
            self.latency.setdefault(route, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch_size(self, n):
        with self.lock:
            self.batch.observe(n)

    def reload(self, ok):
        with self.lock:
            self.reloads["ok" if ok else "refused"] += 1

    def render(self, engine):
        with self.lock:
            lines = ["# HELP fmrl_requests_total HTTP requests by route and status.", "# TYPE fmrl_requests_total counter"]
            lines += [f'fmrl_requests_total{{route="{r}",status="{s}"}} {n}' for (r, s), n in sorted(self.requests.items())]
            lines += ["# HELP fmrl_request_seconds Request latency in seconds.", "# TYPE fmrl_request_seconds histogram"]
            for route, hist in sorted(self.latency.items()):
                lines += hist.lines("fmrl_request_seconds", f'route="{route}"')
            lines += ["# HELP fmrl_batch_size Queries per network pass.", "# TYPE fmrl_batch_size histogram"]
            lines += self.batch.lines("fmrl_batch_size")
            lines += ["# HELP fmrl_reloads_total Artifact reloads by result.", "# TYPE fmrl_reloads_total counter"]
            lines += [f'fmrl_reloads_total{{result="{k}"}} {v}' for k, v in self.reloads.items()]
        lines += ["# HELP fmrl_sessions Open streaming sessions.", "# TYPE fmrl_sessions gauge",
                  f"fmrl_sessions {len(engine.sessions)}",
                  "# HELP fmrl_session_evictions_total Sessions evicted after their idle TTL.",
                  "# TYPE fmrl_session_evictions_total counter", f"fmrl_session_evictions_total {engine.evictions}",
                  "# HELP fmrl_artifact_generation Artifacts swapped in since start.", "# TYPE fmrl_artifact_generation gauge",
                  f"fmrl_artifact_generation {engine.generation}"]
        return "\n".join(lines) + "\n"
