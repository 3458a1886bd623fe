"""The metrics collector and the /metrics, /healthz, /readyz server, read back with
prometheus-client's own parser (the proxy end to end: tests/integration/test_proxy_metrics.py)."""

from __future__ import annotations

import asyncio

import prometheus_client
from prometheus_client import exposition, metrics_core, parser

from dbgov_sidecar import metrics


def _families(text: str) -> dict[str, metrics_core.Metric]:
    return {family.name: family for family in parser.text_string_to_metric_families(text)}


def _counted() -> metrics.Metrics:
    m = metrics.Metrics()
    m.observe({"type": "session_start"})
    m.observe({"type": "session_start"})
    m.observe({"type": "session_end"})
    for ms in (0.2, 0.7, 3.0, 40.0, 20_000.0):
        m.observe({"type": "statement", "classes": ["select"], "enforced": "allow", "duration_ms": ms})
    m.observe(
        {
            "type": "statement",
            "classes": ["select"],
            "enforced": "mask",
            "masked_columns": ["shop.customers.email", "shop.customers.ssn"],
            "duration_ms": 1,
        }
    )
    m.observe({"type": "statement", "classes": ["ddl"], "enforced": "block", "rule": 'say "no"\\\n'})
    return m


def test_families_types_and_values() -> None:
    families = _families(_counted().render())
    assert families["dbgov_statements"].type == "counter"
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert values[("dbgov_statements_total", (("class", "select"), ("decision", "allow")))] == 5
    assert values[("dbgov_statements_total", (("class", "select"), ("decision", "mask")))] == 1
    # A label value with a quote, a backslash and a newline survives the exposition.
    assert values[("dbgov_refusals_total", (("rule", 'say "no"\\\n'),))] == 1
    assert values[("dbgov_masked_columns_total", ())] == 2
    assert values[("dbgov_sessions_total", ())] == 2
    assert values[("dbgov_sessions_active", ())] == 1
    assert families["dbgov_sessions_active"].type == "gauge"


def test_histogram_buckets_are_cumulative_and_end_at_the_count() -> None:
    family = _families(_counted().render())["dbgov_statement_duration_seconds"]
    assert family.type == "histogram"
    buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]
    assert [le for le, _ in buckets] == [*(repr(b) for b in metrics.BUCKETS), "+Inf"]
    assert dict(buckets)["0.0005"] == 2  # 0.2 ms and the refusal's 0
    assert dict(buckets)["0.001"] == 4  # and 0.7 ms, 1 ms (a bound is inclusive)
    assert dict(buckets)["10.0"] == 6  # 20 s only in +Inf
    counts = [value for _, value in buckets]
    assert counts == sorted(counts)
    (count,) = (s.value for s in family.samples if s.name.endswith("_count"))
    assert buckets[-1] == ("+Inf", 7) and count == 7


def test_values_read_at_scrape_time() -> None:
    m = metrics.Metrics()
    dropped = [0]
    m.gauges["dbgov_audit_dropped_total"] = lambda: dropped[0]
    m.gauges["dbgov_queue_depth"] = lambda: 7
    dropped[0] = 3
    families = _families(m.render())
    assert families["dbgov_audit_dropped"].type == "counter"  # a _total only grows
    assert families["dbgov_audit_dropped"].samples[0].value == 3
    assert families["dbgov_audit_dropped"].documentation == metrics.READ_OUT_HELP["dbgov_audit_dropped_total"]
    assert families["dbgov_queue_depth"].type == "gauge"


def test_producers_catch_up_once_per_scrape() -> None:
    m = metrics.Metrics()
    calls: list[int] = []

    def produce() -> None:  # what a lane's drain does: add its batched counts
        calls.append(1)
        m.lane_statements += 10

    m.producers.append(produce)
    served = metrics.registry(m)
    text = exposition.generate_latest(served).decode()
    assert calls == [1]
    assert "dbgov_lane_statements_total 10.0" in text
    exposition.generate_latest(served)
    assert calls == [1, 1]


def test_served_registry_adds_process_and_python_families() -> None:
    m = _counted()
    served = _families(exposition.generate_latest(metrics.registry(m)).decode())
    own = _families(m.render())
    assert set(own) < set(served)
    for name in (
        "process_cpu_seconds",
        "process_resident_memory_bytes",
        "python_info",
        "python_gc_collections",
    ):
        assert name in served and name not in own, name
    assert not any(name.startswith(("process_", "python_")) for name in own)


async def _get(port: int, path: str) -> tuple[str, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert int(headers["Content-Length"]) == len(body)
    return status, headers, body


def test_server_paths_and_content_types() -> None:
    async def scenario() -> None:
        why: list[str | None] = [None]
        server = await metrics.serve(_counted(), host="127.0.0.1", port=0, unready=lambda: why[0])
        port = server.sockets[0].getsockname()[1]
        try:
            status, headers, body = await _get(port, "/metrics")
            assert status == "HTTP/1.0 200 OK"
            assert headers["Content-Type"] == prometheus_client.CONTENT_TYPE_LATEST
            assert "dbgov_statements" in _families(body.decode())
            assert await _get(port, "/healthz") == (
                "HTTP/1.0 200 OK",
                {"Content-Type": "text/plain; charset=utf-8", "Content-Length": "3"},
                b"ok\n",
            )
            assert (await _get(port, "/readyz"))[2] == b"ready\n"
            why[0] = "policy not loaded"
            status, _, body = await _get(port, "/readyz")
            assert status == "HTTP/1.0 503 Service Unavailable" and body == b"not ready: policy not loaded\n"
            assert (await _get(port, "/nope"))[0] == "HTTP/1.0 404 Not Found"
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())
