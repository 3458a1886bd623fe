# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, infer_types=False
"""The steady-state lane: one whole round trip of an already-decided statement shape, compiled.

Most of a busy session's traffic is the same few statement shapes over and over, each sent
alone and answered by rows, a command tag and ReadyForQuery. The session (``session.py``)
handles every byte correctly but spends ~15 µs of Python per statement on it; this lane does
the same for exactly that case in a few µs, and hands over to the session for anything else.

It is sans-I/O like the session: ``client()`` says whether the bytes a client sent may go
upstream unchanged, ``server()`` whether the server's bytes may go to the client unchanged;
the shell (``proxy.py``) writes them. Between the two the lane owns one statement in flight.
It never decides anything itself: it only takes statements whose text the session has already
seen decided "allow" by the policy engine's cache (the same shape, policy and search_path), and
produces exactly the audit line and metrics the session would (a differential test drives both
with random traffic and compares every byte, line and counter). Everything it does not accept
it leaves untouched: the shell then calls ``Session.adopt_lane()``, which turns a statement in
flight into the session's own state, and the session reads the bytes as always.

Accepted from the client while armed and idle: one whole Query; Parse(unnamed) + Bind +
[Describe] + Execute + Sync; Bind + [Describe] + Execute + Sync of a prepared statement; every
message checked at least as strictly as the session's decoders check it.
Accepted from the server: the whole answer in one read, only ParseComplete, BindComplete,
CloseComplete, NoData, RowDescription, DataRow, CommandComplete, notices, notifications and
ParameterStatus, ending with ReadyForQuery.
"""

from libc.string cimport memchr, memcpy
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_DecodeASCII

cdef extern from "Python.h":
    const char* PyBytes_AS_STRING(object o)
    Py_ssize_t PyBytes_GET_SIZE(object o)


cdef inline int _i32(const unsigned char* p) noexcept nogil:
    return <int>((<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (<unsigned int>p[2] << 8) | <unsigned int>p[3])


cdef inline int _i16(const unsigned char* p) noexcept nogil:
    return <short>((<unsigned int>p[0] << 8) | <unsigned int>p[1])


cdef str GENESIS = "0" * 64
cdef frozenset WRITE_TAGS = frozenset(("INSERT", "UPDATE", "DELETE", "MERGE", "COPY"))
cdef str STATUS_I = "I"
cdef str STATUS_T = "T"
cdef str STATUS_E = "E"
cdef int BATCH = 256

cdef enum:  # what is in flight
    IDLE = 0
    QUERY = 1
    PARSED = 2
    PREPARED = 3


cdef class Entry:
    """What the lane needs of one decision: it, its audit fields and its metrics key."""

    cdef readonly object decision
    cdef readonly object statement
    cdef readonly str segment
    cdef readonly object metric
    cdef readonly Py_ssize_t masked

    def __init__(self, decision, statement, str segment, metric, Py_ssize_t masked):
        self.decision = decision
        self.statement = statement
        self.segment = segment
        self.metric = metric
        self.masked = masked


cdef class Lane:
    """One session's lane. Built and armed by the session; see the module docstring."""

    cdef public bint armed
    cdef public int kind
    cdef readonly double started
    cdef readonly object sql
    cdef readonly object decision
    cdef readonly object statement

    cdef Entry _entry
    cdef object _session
    cdef object _policy_call
    cdef object _holder
    cdef object _audit_ok
    cdef object _log
    cdef object _counters
    cdef object _escape
    cdef object _sha256
    cdef object _timestamp
    cdef str _session_id
    cdef str _identity
    cdef dict _prepared
    cdef dict _portals
    cdef Py_ssize_t _max_message
    cdef double _buckets[64]
    cdef int _nbuckets
    cdef object _policy
    cdef object _search_path
    cdef object _shape_key
    cdef dict _shapes
    cdef dict _texts
    cdef dict _by_decision
    cdef Py_ssize_t _cache_size
    cdef long long _second
    cdef char _stamp[27]

    def __init__(
        self,
        session,
        *,
        policy_call,
        audit_ok,
        log,
        counters,
        escape,
        sha256,
        timestamp,
        str session_id,
        str identity,
        dict prepared,
        dict portals,
        Py_ssize_t max_message,
        buckets,
        Py_ssize_t cache_size=4096,
    ):
        self._session = session
        self._policy_call = policy_call
        # A PolicyHolder is read directly (its ``current``), sparing a Python call per statement.
        self._holder = policy_call if hasattr(policy_call, "current") else None
        self._audit_ok = audit_ok
        self._log = log
        self._counters = counters
        self._escape = escape
        self._sha256 = sha256
        self._timestamp = timestamp
        self._session_id = session_id
        self._identity = identity
        self._prepared = prepared
        self._portals = portals
        self._max_message = max_message
        if len(buckets) > 64:
            raise ValueError("at most 64 latency buckets")
        self._nbuckets = len(buckets)
        for i, b in enumerate(buckets):
            self._buckets[i] = b
        self._policy = None
        self._search_path = None
        self._shape_key = None
        self._shapes = {}
        self._texts = {}
        self._by_decision = {}
        self._cache_size = cache_size
        self._second = -1
        self.armed = False
        self.kind = IDLE

    # --- set up by the session ------------------------------------------------------------

    def arm(self, bint ready, policy=None, search_path=None, shape_key=None):
        """Arm (or disarm) the lane; a new policy or search_path forgets every learned shape."""
        self.armed = ready and self.kind == IDLE
        if not self.armed:
            return
        if policy is not self._policy or search_path != self._search_path:
            self._shapes.clear()
            self._texts.clear()
            self._policy = policy
            self._search_path = search_path
            self._shape_key = shape_key

    def learn(self, key, Entry entry, bint exact):
        """``key`` (a normalized shape, or an exact Parse text when ``exact``) decides to ``entry``
        under the policy and search_path the lane is armed with."""
        cdef dict table = self._texts if exact else self._shapes
        if len(table) >= self._cache_size:
            table.clear()
        table[key] = entry
        self.remember(entry)

    def remember(self, Entry entry):
        """The audit fields of ``entry.decision``, for executions of statements prepared with it."""
        if len(self._by_decision) >= self._cache_size:
            self._by_decision.clear()
        self._by_decision[id(entry.decision)] = entry

    def known(self, decision):
        """The entry remembered for ``decision`` (tests)."""
        cdef Entry entry = self._by_decision.get(id(decision))
        return entry if entry is not None and entry.decision is decision else None

    def take(self):
        """The statement in flight as (started, sql, decision, statement or None); the lane is idle
        and disarmed afterwards (the session now owns the statement)."""
        result = (self.started, self.sql, self.decision, self.statement)
        self.kind = IDLE
        self.armed = False
        self.sql = self.decision = self.statement = self._entry = None
        return result

    # --- client side ----------------------------------------------------------------------

    def client(self, bytes data, double now):
        """True when ``data`` goes upstream unchanged and the lane now owns its statement."""
        if not self.armed or self.kind != IDLE:
            return False
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        if n < 5 or n > self._max_message:
            return False
        if self._audit_ok is not None and not self._audit_ok():
            return False
        current = self._holder.current if self._holder is not None else self._policy_call()
        if current is not self._policy:
            return False
        cdef int t = p[0]
        if t == 81:  # Query
            return self._query(data, p, n, now)
        if t == 80:  # Parse
            return self._batch(p, n, now, True)
        if t == 66:  # Bind
            return self._batch(p, n, now, False)
        return False

    cdef bint _query(self, bytes data, const unsigned char* p, Py_ssize_t n, double now) except -1:
        if _i32(p + 1) != n - 1 or n < 6 or p[n - 1] != 0:
            return False
        if memchr(p + 5, 0, n - 6) != NULL:
            return False
        try:
            sql = PyUnicode_DecodeUTF8(<const char*>p + 5, n - 6, "strict")
        except UnicodeDecodeError:
            return False
        try:
            key = self._shape_key(sql)
        except Exception:  # the session's engine names the problem
            return False
        cdef Entry entry = self._shapes.get(key)
        if entry is None:
            return False
        self.kind = QUERY
        self._entry = entry
        self.started = now
        self.sql = sql
        self.decision = entry.decision
        self.statement = None
        return True

    cdef bint _batch(self, const unsigned char* p, Py_ssize_t n, double now, bint parse) except -1:
        """Parse + Bind + [Describe] + Execute + Sync (``parse``), or Bind + [Describe] + Execute
        + Sync; every message framed and decoded as strictly as the session's decoders do."""
        cdef Py_ssize_t pos = 0, end, length, i, count, q_end
        cdef const unsigned char* nul
        cdef int nformats, nparams, nresults, f, size
        query = None
        # Parse: unnamed statement, query, parameter types.
        if parse:
            length = _i32(p + 1)
            end = 1 + length
            if length < 4 or end > n or p[5] != 0:
                return False
            nul = <const unsigned char*>memchr(p + 6, 0, end - 6)
            if nul == NULL:
                return False
            q_end = nul - p
            if q_end + 3 > end:
                return False
            count = _i16(p + q_end + 1)
            if count < 0 or end != q_end + 3 + 4 * count:
                return False
            try:
                query = PyUnicode_DecodeUTF8(<const char*>p + 6, q_end - 6, "strict")
            except UnicodeDecodeError:
                return False
            pos = end
        # Bind: unnamed portal, statement, formats, parameters, result formats.
        if n - pos < 7 or p[pos] != 66:
            return False
        length = _i32(p + pos + 1)
        end = pos + 1 + length
        if length < 4 or end > n or p[pos + 5] != 0:
            return False
        nul = <const unsigned char*>memchr(p + pos + 6, 0, end - pos - 6)
        if nul == NULL:
            return False
        i = nul - p
        if parse and i != pos + 6:
            return False  # the statement just parsed, unnamed
        try:
            name = PyUnicode_DecodeUTF8(<const char*>p + pos + 6, i - pos - 6, "strict")
        except UnicodeDecodeError:
            return False
        i += 1
        if i + 2 > end:
            return False
        nformats = _i16(p + i)
        i += 2
        if nformats < 0 or i + 2 * nformats + 2 > end:
            return False
        for f in range(nformats):
            if _i16(p + i) not in (0, 1):
                return False
            i += 2
        nparams = _i16(p + i)
        i += 2
        if nparams < 0 or nformats not in (0, 1, nparams):
            return False
        for f in range(nparams):
            if i + 4 > end:
                return False
            size = _i32(p + i)
            i += 4
            if size == -1:
                continue
            if size < 0 or i + size > end:
                return False
            i += size
        if i + 2 > end:
            return False
        nresults = _i16(p + i)
        i += 2
        if nresults < 0 or i + 2 * nresults != end:
            return False
        for f in range(nresults):
            if _i16(p + i) not in (0, 1):
                return False
            i += 2
        pos = end
        # Describe of the portal or a statement, if any.
        if n - pos >= 5 and p[pos] == 68:
            length = _i32(p + pos + 1)
            end = pos + 1 + length
            if length < 6 or end > n or p[pos + 5] not in (83, 80) or p[end - 1] != 0:
                return False
            if memchr(p + pos + 6, 0, end - pos - 7) != NULL:
                return False
            pos = end
        # Execute of the unnamed portal.
        if n - pos != 10 + 5 or p[pos] != 69 or _i32(p + pos + 1) != 9 or p[pos + 5] != 0:
            return False
        pos += 10
        # Sync, last.
        if p[pos] != 83 or _i32(p + pos + 1) != 4:
            return False
        cdef Entry entry
        if parse:
            entry = self._texts.get(query)
            if entry is None or entry.statement is None:
                return False
            statement = entry.statement
            self._prepared[""] = statement
        else:
            statement = self._prepared.get(name)
            if statement is None or statement.verdict != "allow":
                return False
            entry = self._by_decision.get(id(statement.decision))
            if entry is None or entry.decision is not statement.decision:
                return False
        self._portals[""] = name
        self.kind = PARSED if parse else PREPARED
        self._entry = entry
        self.started = now
        self.sql = statement.sql
        self.decision = entry.decision
        self.statement = statement
        return True

    # --- server side ----------------------------------------------------------------------

    def server(self, bytes data, double now):
        """True when ``data`` is the whole plain answer to the statement in flight: it goes to
        the client unchanged and the statement is audited and counted."""
        if self.kind == IDLE:
            return False
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t pos = 0, end, rows = 0
        cdef int length, t, status = 0
        cdef list tags = None
        cdef bint audit = self._log is not None or self._counters is not None
        while pos < n:
            if status or n - pos < 5:
                return False
            t = p[pos]
            length = _i32(p + pos + 1)
            end = pos + 1 + length
            if length < 4 or end > n:
                return False
            if t == 68:  # DataRow
                rows += 1
            elif t == 67:  # CommandComplete
                if length < 5 or p[end - 1] != 0 or memchr(p + pos + 5, 0, length - 5) != NULL:
                    return False
                try:
                    tag = PyUnicode_DecodeUTF8(<const char*>p + pos + 5, length - 5, "strict")
                except UnicodeDecodeError:
                    return False
                if tags is None:
                    tags = []
                tags.append(tag)
            elif t == 90:  # ReadyForQuery
                if length != 5 or p[pos + 5] not in (73, 84, 69):
                    return False
                status = p[pos + 5]
            elif t in (84, 78, 83, 65):  # RowDescription, notices, ParameterStatus, notifications
                pass
            elif t in (49, 50, 51, 110):  # ParseComplete, BindComplete, CloseComplete, NoData
                if length != 4:
                    return False
            else:
                return False
            pos = end
        if not status:
            return False
        affected = None
        if tags:
            try:
                affected = _rows_affected(tags)
            except ValueError:  # the session fails the same way
                return False
        if audit:
            self._record(now, rows, affected)
        self._session.txn_status = STATUS_I if status == 73 else STATUS_T if status == 84 else STATUS_E
        self.kind = IDLE
        self.sql = self.decision = self.statement = self._entry = None
        return True

    cdef int _record(self, double now, Py_ssize_t rows, affected) except -1:
        cdef Entry entry = self._entry
        cdef object elapsed = (now - self.started) * 1000  # a Python float: round() as the session's
        duration_ms = round(elapsed, 3)
        cdef double seconds = duration_ms / 1000
        log = self._log
        if log is not None:
            chain = log._prev
            prev = chain.get(self._session_id, GENESIS)
            head = (
                f'{{"type":"statement","time":"{self._time(now)}","statement":{self._escape(self.sql)}'
                f'{entry.segment},"enforced":"allow","rows_returned":{rows},'
                f'"rows_affected":{"null" if affected is None else affected},"duration_ms":{duration_ms!r},'
                f'"sqlstate":null{self._identity}'
            )
            digest = self._sha256(f"{prev}{head}}}".encode()).hexdigest()
            line = f'{head},"prev_hash":"{prev}","hash":"{digest}"}}'
            chain[self._session_id] = digest
            buffer = log._buffer
            if len(buffer) >= log._max_buffer:
                log._fail(1)
            else:
                buffer.append(line)
                if len(buffer) >= BATCH:
                    log.flush()
        counters = self._counters
        if counters is not None:
            statements = counters.statements
            statements[entry.metric] = statements.get(entry.metric, 0) + 1
            if entry.masked:
                counters.masked_columns += entry.masked
            latency = counters.latency
            i = self._bucket(seconds)
            latency[i] += 1
            counters.latency_sum += seconds
            counters.latency_count += 1
        return 0

    cdef int _bucket(self, double seconds) noexcept:
        cdef int lo = 0, hi = self._nbuckets, mid
        while lo < hi:  # bisect_left
            mid = (lo + hi) // 2
            if self._buckets[mid] < seconds:
                lo = mid + 1
            else:
                hi = mid
        return lo

    cdef str _time(self, double t):
        """``audit.timestamp(t)``: the date part made by it once per second, the rest here."""
        cdef double whole = <double><long long>t
        if whole > t:
            whole -= 1
        cdef long long second = <long long>whole
        cdef bytes prefix
        if second != self._second:
            prefix = self._timestamp(t)[:20].encode("ascii")  # "2026-11-26T15:24:27."
            if len(prefix) != 20:
                raise ValueError("unexpected timestamp format")
            memcpy(self._stamp, <const char*>prefix, 20)
            self._stamp[26] = 90  # Z
            self._second = second
        cdef long long micros = <long long>((t - whole) * 1000000)
        if micros > 999999:
            micros = 999999
        cdef int i
        for i in range(25, 19, -1):
            self._stamp[i] = 48 + <char>(micros % 10)
            micros //= 10
        return PyUnicode_DecodeASCII(self._stamp, 27, NULL)


cdef object _rows_affected(list tags):
    """``session._rows_affected``: rows the write tags say were changed."""
    total = 0
    for tag in tags:
        head, _, count = tag.rpartition(" ")
        if count.isdigit() and head.split(" ", 1)[0] in WRITE_TAGS:
            total += int(count)
    return total
