"""Prometheus metrics derived from audit events, served with /healthz and /readyz.

Every statement already produces an event with its class, decision, duration and rows, so the
counters are updated from the same events the audit log gets: one source of truth.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
from collections.abc import Callable

from dbgov_sidecar import audit

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Counters and a latency histogram in Prometheus text format."""

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
        """Called first by ``render``: whoever counts in batches (the compiled lanes) catches up."""
        self.gauges: dict[str, Callable[[], float]] = {}

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
        """The exposition text."""
        for produce in self.producers:
            produce()
        lines = [
            "# TYPE dbgov_statements_total counter",
            *(
                f'dbgov_statements_total{{class="{c}",decision="{d}"}} {n}'
                for (c, d), n in sorted(self.statements.items())
            ),
            "# TYPE dbgov_refusals_total counter",
            *(f'dbgov_refusals_total{{rule="{r}"}} {n}' for r, n in sorted(self.refusals.items())),
            "# TYPE dbgov_masked_columns_total counter",
            f"dbgov_masked_columns_total {self.masked_columns}",
            "# TYPE dbgov_proxy_masked_columns_total counter",
            f"dbgov_proxy_masked_columns_total {self.proxy_masked}",
            "# TYPE dbgov_lane_statements_total counter",
            f"dbgov_lane_statements_total {self.lane_statements}",
            "# TYPE dbgov_sessions_active gauge",
            f"dbgov_sessions_active {self.sessions_active}",
            "# TYPE dbgov_sessions_total counter",
            f"dbgov_sessions_total {self.sessions_total}",
            "# TYPE dbgov_statement_duration_seconds histogram",
        ]
        cumulative = 0
        for bound, count in zip((*BUCKETS, "+Inf"), self.latency, strict=True):
            cumulative += count
            lines.append(f'dbgov_statement_duration_seconds_bucket{{le="{bound}"}} {cumulative}')
        lines.append(f"dbgov_statement_duration_seconds_sum {self.latency_sum}")
        lines.append(f"dbgov_statement_duration_seconds_count {self.latency_count}")
        for name, read in sorted(self.gauges.items()):
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {read()}")
        return "\n".join(lines) + "\n"


async def serve(
    metrics: Metrics, *, host: str | None, port: int, unready: Callable[[], str | None]
) -> asyncio.Server:
    """Serve GET /metrics, /healthz and /readyz over plain HTTP/1.0.

    ``unready`` says why the proxy should not get traffic (503 with that reason), or None (200):
    the kubelet's startup and readiness probes read it.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            path = request.split(b" ", 2)[1].decode(errors="replace") if b" " in request else ""
            if path == "/metrics":
                status, body = "200 OK", metrics.render()
            elif path == "/healthz":
                status, body = "200 OK", "ok\n"
            elif path == "/readyz":
                reason = unready()
                status, body = (
                    ("200 OK", "ready\n")
                    if reason is None
                    else ("503 Service Unavailable", f"not ready: {reason}\n")
                )
            else:
                status, body = "404 Not Found", "not found\n"
            payload = body.encode()
            writer.write(
                f"HTTP/1.0 {status}\r\nContent-Type: text/plain; version=0.0.4\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
