"""Types of the compiled lane (``_lane.pyx``)."""

from collections.abc import Callable, Sequence
from typing import Any

def template(sql: str) -> tuple[bytes, list[tuple[int, int]]] | None: ...
def same_shape(sql: str, normalized: str) -> bool: ...
def tag_count(tag: bytes) -> int: ...
def milliseconds(elapsed: float) -> tuple[str, float]: ...

class _Writer:
    def __init__(self, transport: Any, fd: int) -> None: ...
    def send(self, data: bytes) -> None: ...

class Entry:
    decision: Any
    statement: Any
    segment: str
    metric: tuple[str, str]
    masked: int
    rewrite: Callable[[str], str | None] | None
    def __init__(
        self,
        decision: Any,
        statement: Any,
        segment: str,
        metric: tuple[str, str],
        masked: int,
        rewrite: Callable[[str], str | None] | None = None,
    ) -> None: ...

class Lane:
    armed: bool
    kind: int
    started: float
    sql: str | None
    batch: bytes | None
    forward: bytes | None
    decision: Any
    statement: Any
    def __init__(
        self,
        session: Any,
        *,
        policy_call: Callable[[], Any],
        audit_ok: Callable[[], bool] | None,
        log: Any,
        counters: Any,
        timestamp: Callable[[float], str],
        session_id: str,
        identity: str,
        prepared: dict[str, Any],
        portals: dict[str, str],
        max_message: int,
        buckets: Sequence[float],
        masked: dict[tuple[int, int], str] | None = ...,
        masked_plain: Callable[[str], bool] | None = ...,
        masked_batch: Callable[[bool, str, int, str | None], None] | None = ...,
        hold: int = ...,
        cache_size: int = ...,
    ) -> None: ...
    def arm(
        self,
        ready: bool,
        policy: Any = ...,
        search_path: Any = ...,
        shape_key: Any = ...,
        row_limit: int = ...,
    ) -> None: ...
    def learn(self, key: str, entry: Entry, exact: bool, sql: str | None = ...) -> None: ...
    def remember(self, entry: Entry) -> None: ...
    def template_entry(self, sql: str) -> Entry | None: ...
    def known(self, decision: Any) -> Entry | None: ...
    def take(self) -> tuple[float, str, Any, Any]: ...
    def drain(self) -> None: ...
    def bind(
        self,
        *,
        clock: Callable[[], float],
        client: Any,
        upstream: Any,
        client_slow: Callable[[bytes, float], None],
        server_slow: Callable[[bytes, float], None],
        fail: Callable[[], None],
        client_fd: int = -1,
        upstream_fd: int = -1,
    ) -> None: ...
    def client_received(self, data: bytes) -> None: ...
    def server_received(self, data: bytes) -> None: ...
    def client(self, data: bytes, now: float) -> bool: ...
    def server(self, data: bytes, now: float) -> bool: ...
