"""`dbgov proxy`: run the sidecar proxy until SIGTERM, reloading the policy on SIGHUP or change."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import errno
import functools
import logging
import os
import signal
import ssl
import stat
import sys
from collections.abc import Callable, Coroutine
from typing import Any, TextIO, TypeVar

from dbgov_sidecar import (
    audit,
    config,
    metrics,
    policies,
    policy_port,
    policyfile,
    proxy,
    workload_identity,
)

log = logging.getLogger("dbgov.proxy")


_FLAG_TYPES: dict[str, Any] = {
    **dict.fromkeys(config.INT_FIELDS, int),
    "drain_timeout": float,
    "auth_timeout": float,
    "audit_redact_literals": config.parse_bool,
    "lane": config.parse_bool,
}


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `proxy` on the `dbgov` command line."""
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "proxy", help="run the PostgreSQL policy proxy", description=__doc__
    )
    configure(parser)
    parser.set_defaults(func=run)
    return parser


def configure(parser: argparse.ArgumentParser) -> None:
    """Add one flag per settings field, defaulting to its DBGOV_* variable."""
    env = config.from_env()
    docs = config.field_docs()
    for f in dataclasses.fields(config.Settings):
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            type=_FLAG_TYPES.get(f.name, str),
            default=getattr(env, f.name),
            # the built-in default, never the environment's value: that may be a secret
            help=f"{docs[f.name]} Default: {_shown(f.default)}.".replace("%", "%%"),
        )


def _shown(default: object) -> str:
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return str(default).lower()
    return repr(default) if default == "" else str(default)


def settings_from(args: argparse.Namespace) -> config.Settings:
    """Settings from parsed flags (which already default to the environment)."""
    return config.Settings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config.Settings)})


def run(args: argparse.Namespace) -> int:
    """Run the proxy; returns the exit status."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    settings = settings_from(args)
    try:
        trust = policyfile.trust(
            key=settings.bundle_key,
            namespace=settings.pod_namespace,
            service_account=settings.service_account,
        )
    except ValueError as err:
        print(f"dbgov proxy: {err}", file=sys.stderr)
        return 2
    try:
        holder = policies.PolicyHolder(
            settings.policy,
            loader=functools.partial(policies.load, max_statement_size=settings.max_statement_size),
            trust=trust,
        )
    except Exception as err:
        for problem in policies.problems_of(err):
            print(f"dbgov proxy: invalid policy {settings.policy}: {problem}", file=sys.stderr)
        return 2
    try:
        cfg = config.proxy_config(
            settings, salt=os.urandom(16), policy_issuers=lambda: getattr(holder.current, "jwt_issuers", ())
        )
    except ValueError as err:
        print(f"dbgov proxy: {err}", file=sys.stderr)
        return 2
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 - optional speedup

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    try:
        return asyncio.run(_serve(settings, cfg, holder))
    except StartupError as err:
        print(f"dbgov proxy: {err}", file=sys.stderr)
        return 2


MAX_PIPE_BACKLOG = 8 * 1024 * 1024
"""Bytes of audit lines a slow stdout reader may fall behind before events are dropped."""


async def _audit_sink(targets: str) -> tuple[audit.Sink, Callable[[], None]] | None:
    """One sink for comma-separated ``targets`` (stdout and/or file paths; off) and its closer."""
    sinks = [await _one_sink(t.strip()) for t in targets.split(",") if t.strip() not in ("", "off")]
    if not sinks:
        return None
    if len(sinks) == 1:
        return sinks[0]

    def every_sink(text: str) -> bool:
        accepted = [sink(text) for sink, _ in sinks]  # every sink gets the batch, no short-circuit
        return all(accepted)

    def close_all() -> None:
        for _, close in sinks:
            close()

    return every_sink, close_all


async def _one_sink(target: str) -> tuple[audit.Sink, Callable[[], None]]:
    """A non-blocking sink for stdout or a file path, and how to close it."""
    if target != "stdout":
        handle = open(target, "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the proxy
        return _stream_sink(handle), handle.close
    if not _pipe_or_socket(sys.stdout):
        # A regular file, /dev/null or a terminal never stalls the way a pipe with a slow reader
        # does, and uvloop aborts the whole process (asyncio would raise) when asked to open one
        # as a pipe: plain writes.
        return _stream_sink(sys.stdout), sys.stdout.flush
    loop = asyncio.get_running_loop()
    try:  # a pipe (kubelet log capture) gets an asyncio transport: writes never block
        transport, _ = await loop.connect_write_pipe(asyncio.Protocol, sys.stdout)
    except (ValueError, OSError):
        return _stream_sink(sys.stdout), sys.stdout.flush

    def pipe_sink(text: str) -> bool:
        if transport.is_closing() or transport.get_write_buffer_size() > MAX_PIPE_BACKLOG:
            return False
        transport.write(text.encode())
        return True

    return pipe_sink, transport.close


def _pipe_or_socket(stream: TextIO) -> bool:
    """Whether ``stream`` is a FIFO or a socket, the only kinds an event loop may open as a pipe."""
    try:
        mode = os.fstat(stream.fileno()).st_mode
    except (OSError, ValueError):  # closed, or not backed by a descriptor
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def _stream_sink(stream: TextIO) -> audit.Sink:
    def sink(text: str) -> bool:
        stream.write(text)
        stream.flush()
        return True

    return sink


async def _flush_audit(audit_log: audit.AuditLog) -> None:
    while True:
        await asyncio.sleep(0.05)
        audit_log.flush()


_T = TypeVar("_T")


class StartupError(Exception):
    """The proxy cannot start as configured; the message says which setting and what to do."""


async def _serve(
    settings: config.Settings,
    cfg: proxy.ProxyConfig,
    holder: policies.PolicyHolder,
) -> int:
    # Whatever started is stopped in reverse order, on SIGTERM or when a later step fails:
    # sessions drain before the metrics server closes and the audit sink is flushed last.
    async with contextlib.AsyncExitStack() as started:
        sink = await _audit_sink(settings.audit)
        audit_log = None if sink is None else audit.AuditLog(sink[0], failure_policy=settings.audit_failure)
        if audit_log is not None and sink is not None:
            started.callback(sink[1])
            started.callback(audit_log.flush)
            flusher = asyncio.create_task(_flush_audit(audit_log))
            started.push_async_callback(_cancelled, flusher)
        identity = await _workload_identity(settings, started, audit_log)
        if identity is not None:
            # Upstream logins use the operator's minted credentials, read at each connection;
            # db_user is the role each session actually logged in as.
            cfg = dataclasses.replace(
                cfg,
                session=dataclasses.replace(cfg.session, workload=identity.audit_fields, upstream_user=None),
                upstream_source=config.minted_upstream(cfg.upstream, identity.login),
            )
        counters = metrics.Metrics()
        audit_ok = None
        if audit_log is not None and audit_log.failure_policy == "fail-closed":
            audit_ok = audit.Healthy(audit_log)
        recorder = proxy.Recorder(audit_log, counters)
        holder.attach_audit(recorder)  # bundle_rejected events, those of the first load too
        server = proxy.Proxy(cfg, policy=holder, audit=recorder, audit_ok=audit_ok)
        await _bind(server.start(), setting="listen", address=settings.listen, serves="accept clients")
        counters.gauges["dbgov_upstream_errors_total"] = lambda: server.stats["upstream_errors"]
        counters.gauges["dbgov_policy_reloads_total"] = lambda: holder.reloads
        counters.gauges["dbgov_policy_reload_failures_total"] = lambda: holder.reload_failures
        if audit_log is not None:
            counters.gauges["dbgov_audit_dropped_total"] = lambda: audit_log.dropped
        stopping = asyncio.Event()
        try:
            if settings.metrics:
                metrics_server = await _bind(
                    _serve_metrics(
                        settings.metrics, counters, lambda: _unready(stopping, holder, audit_log, identity)
                    ),
                    setting="metrics",
                    address=settings.metrics,
                    serves="serve /metrics, /healthz and /readyz",
                )
                started.push_async_callback(_closed, metrics_server)
        except StartupError:
            await server.stop(drain_timeout=0)
            raise
        started.push_async_callback(server.stop)  # runs first: /healthz and /readyz answer during the drain
        log.info("dbgov proxy listening on %s:%s", cfg.listen_host, server.port)
        await _run_until_stopped(stopping, holder)
        log.info("dbgov proxy draining (up to %ss)", cfg.drain_timeout)
    return 0


async def _workload_identity(
    settings: config.Settings, started: contextlib.AsyncExitStack, audit_log: audit.AuditLog | None = None
) -> workload_identity.WorkloadIdentity | None:
    """Cluster mode (a token file and the operator's endpoint): present the token in the
    background until the operator verifies it; sessions refuse clients until then."""
    if not settings.token_file or not settings.credential_url:
        if settings.token_file:
            log.warning(
                "DBGOV_TOKEN_FILE is set but DBGOV_CREDENTIAL_URL is not: no workload identity is "
                "verified and audit events carry none (inject the pod with a current operator)"
            )
        return None
    if not settings.credential_ca:
        raise StartupError(
            "DBGOV_CREDENTIAL_URL is set without DBGOV_CREDENTIAL_CA: the operator's certificate "
            "cannot be verified; set DBGOV_CREDENTIAL_CA to its CA bundle (PEM text or a path)"
        )
    try:
        identity = workload_identity.WorkloadIdentity(
            url=settings.credential_url,
            token_file=settings.token_file,
            ca=settings.credential_ca,
            pod_uid=settings.pod_uid or None,
            audit=None if audit_log is None else audit_log.write,
        )
    except (OSError, ssl.SSLError, ValueError) as err:
        raise StartupError(f"DBGOV_CREDENTIAL_CA is not a usable CA bundle ({err})") from err
    task = asyncio.create_task(identity.run(), name="dbgov workload identity")
    started.push_async_callback(_cancelled, task)
    return identity


async def _run_until_stopped(stopping: asyncio.Event, holder: policies.PolicyHolder) -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    loop.add_signal_handler(signal.SIGINT, stopping.set)
    loop.add_signal_handler(signal.SIGHUP, holder.reload)
    while not stopping.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), 2.0)
        if holder.changed():
            holder.reload()


async def _serve_metrics(
    address: str, counters: metrics.Metrics, unready: Callable[[], str | None]
) -> asyncio.Server:
    host, port = config.split_host_port(address, default_port=9187)
    bind: str | None = None if host == "*" else host  # "*": every interface, IPv4 and IPv6
    return await metrics.serve(counters, host=bind, port=port, unready=unready)


async def _bind(starting: Coroutine[Any, Any, _T], *, setting: str, address: str, serves: str) -> _T:
    """Await a server's start; an address that cannot be bound is a StartupError naming the
    setting (the usual cause: a second proxy on the same machine, on the same default port)."""
    flag, env = "--" + setting.replace("_", "-"), config.env_name(setting)
    try:
        return await starting
    except OSError as err:
        why = err.strerror or str(err)
        if err.errno == errno.EADDRINUSE:
            why = "the port is in use, by another dbgov proxy or another program"
        cause = f"cannot {serves} on {address} ({why})"
    except ValueError as err:
        cause = f"{env} {address!r} is not a host:port ({err})"
    advice = f"set {env} (or {flag}) to a free host:port"
    if setting == "metrics":
        advice += ", or to an empty value to serve no /metrics, /healthz or /readyz"
    raise StartupError(f"{cause}; {advice}")


async def _cancelled(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _closed(server: asyncio.Server) -> None:
    server.close()
    await server.wait_closed()


def _unready(
    stopping: asyncio.Event,
    holder: policies.PolicyHolder,
    audit_log: audit.AuditLog | None,
    identity: workload_identity.WorkloadIdentity | None = None,
) -> str | None:
    """Why the proxy should get no traffic now (it would refuse it), or None when it is ready."""
    if stopping.is_set():
        return "shutting down"
    if identity is not None and identity.current is None:
        return f"workload identity not verified by the operator ({identity.reason}); clients are refused"
    missing = None if identity is None else identity.missing()
    if missing is not None:
        return f"no database credentials ({missing}); clients are refused"
    if isinstance(holder.current, policy_port.RefuseAll):
        return f"no policy loaded ({holder.current.reason}); every statement would be refused"
    if audit_log is not None and audit_log.failure_policy == "fail-closed" and not audit_log.healthy:
        return "the audit sink is failing and the audit policy is fail-closed; statements are refused"
    return None


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: python -m dbgov_sidecar.proxy_cli."""
    parser = argparse.ArgumentParser(prog="dbgov proxy", description=__doc__)
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
