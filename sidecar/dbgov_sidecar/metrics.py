"""Prometheus metrics derived from audit events, served with /healthz and /readyz.

Every statement already produces an event with its class, decision, duration and rows, so the
counters are updated from the same events the audit log gets: one source of truth. Counting is
plain integer arithmetic on the statement path; prometheus-client (a custom collector over those
tallies, beside its process and Python collectors) turns them into the exposition text only when
/metrics is scraped.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
from collections.abc import Callable, Iterator

import prometheus_client
from prometheus_client import (
    exposition,
    gc_collector,
    metrics_core,
    platform_collector,
    process_collector,
)
from prometheus_client import registry as prometheus_registry

from dbgov_sidecar import audit

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


#: What the values ``Metrics.gauges`` reads at scrape time mean (``dbgov proxy`` registers them).
READ_OUT_HELP = {
    "dbgov_upstream_errors_total": "Connections to the upstream database that failed.",
    "dbgov_policy_reloads_total": "Policy file reloads that took effect.",
    "dbgov_policy_reload_failures_total": "Policy file reloads refused (the previous policy stays).",
    "dbgov_audit_dropped_total": "Audit lines the sink did not take (written nowhere).",
}


class Metrics:
    """Counters and a latency histogram, read out by ``Collector``."""

    def __init__(self) -> None:
        self.statements: collections.Counter[tuple[str, str]] = collections.Counter()
        self.refusals: collections.Counter[str] = collections.Counter()
        self.masked_columns = 0
        self.proxy_masked = 0
        self.sessions_active = 0
        self.sessions_total = 0
        self.latency = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.lane_statements = 0
        """Statements the compiled lane handled (counted in the rest as any other)."""
        self.producers: list[Callable[[], None]] = []
        """Called first by ``Collector.collect``: whoever counts in batches (the compiled lanes)
        catches up."""
        self.gauges: dict[str, Callable[[], float]] = {}
        """Values kept elsewhere, read at scrape time; a name ending in ``_total`` is a counter."""

    def observe(self, event: audit.Event) -> None:
        """Count one audit event."""
        if type(event) is audit.StatementEvent:  # the one kind per statement: read its fields directly
            fields = event.decision.fields
            classes = fields.get("classes") or ("unknown",)
            enforced = event.enforced
            self.statements[(str(classes[0]), enforced)] += 1
            if enforced not in ("allow", "mask"):
                self.refusals[str(fields.get("rule"))] += 1
            self.masked_columns += len(fields.get("masked_columns") or ())
            seconds = event.duration_ms / 1000
            self.latency[bisect.bisect_left(BUCKETS, seconds)] += 1
            self.latency_sum += seconds
            self.latency_count += 1
            return
        kind = event.get("type")
        if kind == "session_start":
            self.sessions_active += 1
            self.sessions_total += 1
        elif kind == "session_end":
            self.sessions_active -= 1
        elif kind == "warning":
            self.proxy_masked += len(event.get("columns") or ())
        elif kind == "statement":
            classes = event.get("classes") or ["unknown"]
            enforced = str(event.get("enforced"))
            self.statements[(str(classes[0]), enforced)] += 1
            if enforced not in ("allow", "mask"):
                self.refusals[str(event.get("rule"))] += 1
            self.masked_columns += len(event.get("masked_columns") or ())
            seconds = float(event.get("duration_ms") or 0) / 1000
            self.latency[bisect.bisect_left(BUCKETS, seconds)] += 1
            self.latency_sum += seconds
            self.latency_count += 1

    def render(self) -> str:
        """dbgov's own families in the exposition format, without the process and Python ones
        (which change between two reads): what tests compare. /metrics serves ``registry``."""
        own = prometheus_registry.CollectorRegistry()
        own.register(Collector(self))
        return exposition.generate_latest(own).decode()


class Collector(prometheus_registry.Collector):
    """Reads a ``Metrics``'s tallies at scrape time: the statement path only adds to plain
    integers, and prometheus-client builds the families (names, escaping, cumulative buckets)
    only when Prometheus asks."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[metrics_core.Metric]:
        m = self.metrics
        for produce in m.producers:  # the compiled lanes add what they counted in batches
            produce()
        statements = metrics_core.CounterMetricFamily(
            "dbgov_statements",
            "Statements judged, by their first statement class and the decision enforced.",
            labels=("class", "decision"),
        )
        for (cls, decision), n in sorted(m.statements.items()):
            statements.add_metric((cls, decision), n)
        yield statements
        refusals = metrics_core.CounterMetricFamily(
            "dbgov_refusals", "Statements refused or held, by the rule that decided.", labels=("rule",)
        )
        for rule, n in sorted(m.refusals.items()):
            refusals.add_metric((rule,), n)
        yield refusals
        yield metrics_core.CounterMetricFamily(
            "dbgov_masked_columns", "Output columns masked by the policy's rewrite.", value=m.masked_columns
        )
        yield metrics_core.CounterMetricFamily(
            "dbgov_proxy_masked_columns",
            "Masked columns whose values arrived unmasked and were masked by the proxy.",
            value=m.proxy_masked,
        )
        yield metrics_core.CounterMetricFamily(
            "dbgov_lane_statements",
            "Statements the compiled lane handled (counted in dbgov_statements_total too).",
            value=m.lane_statements,
        )
        yield metrics_core.GaugeMetricFamily(
            "dbgov_sessions_active", "Client sessions open now.", value=m.sessions_active
        )
        yield metrics_core.CounterMetricFamily(
            "dbgov_sessions", "Client sessions started.", value=m.sessions_total
        )
        yield self._latency()
        for name, read in sorted(m.gauges.items()):
            yield _read_out(name, read())

    def _latency(self) -> metrics_core.HistogramMetricFamily:
        m = self.metrics
        buckets: list[tuple[str, float]] = []
        cumulative = 0
        for bound, count in zip((*(repr(b) for b in BUCKETS), "+Inf"), m.latency, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return metrics_core.HistogramMetricFamily(
            "dbgov_statement_duration_seconds",
            "Time from a statement's arrival to its last reply, as audited.",
            buckets=buckets,
            sum_value=m.latency_sum,
        )


def _read_out(name: str, value: float) -> metrics_core.Metric:
    """One value read from elsewhere at scrape time: a name ending in ``_total`` only ever
    grows (upstream errors, reloads, dropped audit lines), so it is a counter."""
    help_text = READ_OUT_HELP.get(name, f"{name}, read at scrape time.")
    if name.endswith("_total"):
        return metrics_core.CounterMetricFamily(name, help_text, value=value)
    return metrics_core.GaugeMetricFamily(name, help_text, value=value)


def registry(metrics: Metrics) -> prometheus_registry.CollectorRegistry:
    """What /metrics serves: dbgov's families, and the process and Python ones (CPU, memory,
    open file descriptors, garbage collection, interpreter version) a Prometheus user expects,
    in a registry of their own (prometheus-client's global one is for the whole interpreter)."""
    served = prometheus_registry.CollectorRegistry()
    served.register(Collector(metrics))
    process_collector.ProcessCollector(registry=served)
    platform_collector.PlatformCollector(registry=served)
    gc_collector.GCCollector(registry=served)
    return served


async def serve(
    metrics: Metrics, *, host: str | None, port: int, unready: Callable[[], str | None]
) -> asyncio.Server:
    """Serve GET /metrics, /healthz and /readyz over plain HTTP/1.0.

    ``unready`` says why the proxy should not get traffic (503 with that reason), or None (200):
    the kubelet's startup and readiness probes read it.
    """

    served = registry(metrics)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].decode(errors="replace") if b" " in request else ""
            content_type = "text/plain; charset=utf-8"
            if path == "/metrics":
                # On the loop, not in a thread: the lanes' producers touch session state.
                status, payload = "200 OK", exposition.generate_latest(served)
                content_type = prometheus_client.CONTENT_TYPE_LATEST
            elif path == "/healthz":
                status, payload = "200 OK", b"ok\n"
            elif path == "/readyz":
                reason = unready()
                status, payload = (
                    ("200 OK", b"ready\n")
                    if reason is None
                    else ("503 Service Unavailable", f"not ready: {reason}\n".encode())
                )
            else:
                status, payload = "404 Not Found", b"not found\n"
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
