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

from libc.stdlib cimport calloc, free, malloc, realloc
from libc.string cimport memchr, memcmp, memcpy, memset, strlen
from cpython.unicode cimport PyUnicode_DecodeUTF8, PyUnicode_DecodeASCII

cdef extern from "Python.h":
    const char* PyBytes_AS_STRING(object o)
    Py_ssize_t PyBytes_GET_SIZE(object o)
    const char* PyUnicode_AsUTF8AndSize(object o, Py_ssize_t* size) except NULL

    char* PyOS_double_to_string(double val, char format_code, int precision, int flags, int* ptype) except NULL
    double PyOS_string_to_double(const char* s, char** endptr, void* overflow_exception) except? -1.0
    void PyMem_Free(void* p)

cdef extern from "openssl/sha.h":
    # The one-shot SHA256() fetches the algorithm from a provider (locks, allocations) on every
    # call in OpenSSL 3; the low-level calls hash directly. Same function, same digest.
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX* c) nogil
    int SHA256_Update(SHA256_CTX* c, const void* data, size_t n) nogil
    int SHA256_Final(unsigned char* md, SHA256_CTX* c) nogil

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void* buf, size_t n, int flags)
    enum: MSG_DONTWAIT
    enum: MSG_NOSIGNAL

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clock_id, timespec* tp)
    enum: CLOCK_REALTIME

cdef const char* HEX = b"0123456789abcdef"

import os
import time as _time

from dbgov_sidecar.audit import Healthy


cdef inline double _time_now() noexcept nogil:
    """``time.time()`` without a float object: the same clock, the same conversion."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    cdef long long ns = <long long>ts.tv_sec * 1000000000 + ts.tv_nsec
    if ns % 1000000000 == 0:
        return <double>(ns // 1000000000)
    return <double>ns / 1e9


cdef unsigned long long _SEED = int.from_bytes(os.urandom(8), "little") | 1


cdef inline unsigned long long _hash(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """A 64-bit hash of a template key, 8 bytes at a time, seeded per process; never 0 (the free
    slot). Keys are compared in full on a match, so a collision costs time, never a wrong entry."""
    cdef unsigned long long h = _SEED ^ (<unsigned long long>n * 0x9E3779B97F4A7C15ULL), w
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, s + i, 8)
        h = (h ^ w) * 0xBF58476D1CE4E5B9ULL
        h ^= h >> 31
        i += 8
    if i < n:
        w = 0
        memcpy(&w, s + i, n - i)
        h = (h ^ w) * 0x94D049BB133111EBULL
        h ^= h >> 29
    h = (h ^ (h >> 32)) * 0xBF58476D1CE4E5B9ULL
    h ^= h >> 29
    return h if h else 1


cdef inline bint _ascii(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    cdef unsigned long long w, high = 0
    cdef Py_ssize_t i = 0
    while i + 8 <= n:
        memcpy(&w, s + i, 8)
        high |= w
        i += 8
    while i < n:
        high |= s[i]
        i += 1
    return (high & 0x8080808080808080ULL) == 0


cdef inline object _text(object sql):
    """A statement text as str: a Query message (bytes, ASCII text) decoded."""
    if type(sql) is bytes:
        return PyUnicode_DecodeASCII(PyBytes_AS_STRING(sql) + 5, PyBytes_GET_SIZE(sql) - 6, NULL)
    return sql


cdef inline int _i32(const unsigned char* p) noexcept nogil:
    return <int>((<unsigned int>p[0] << 24) | (<unsigned int>p[1] << 16) | (<unsigned int>p[2] << 8) | <unsigned int>p[3])


cdef inline int _i16(const unsigned char* p) noexcept nogil:
    return <short>((<unsigned int>p[0] << 8) | <unsigned int>p[1])


cdef inline bint _word(unsigned char c) noexcept nogil:
    """A byte PostgreSQL's lexer continues an identifier or number with (or a parameter's $)."""
    return (97 <= c <= 122) or (65 <= c <= 90) or (48 <= c <= 57) or c == 95 or c == 36 or c >= 128


cdef inline bint _space(unsigned char c) noexcept nogil:
    return c == 32 or c == 9 or c == 10 or c == 13 or c == 12 or c == 11


cdef inline bint _digit(unsigned char c) noexcept nogil:
    return 48 <= c <= 57


cdef bint _binds_tighter(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    """The number at ``i`` is followed by ``::`` or ``[``, which bind tighter than a unary minus
    before it: -5::int is -(5::int), and the minus is no part of the constant."""
    while i < n and _digit(s[i]):
        i += 1
    while i < n and _space(s[i]):
        i += 1
    return i < n and (s[i] == 58 or s[i] == 91)


cdef Py_ssize_t _template(
    const unsigned char* s, Py_ssize_t n, unsigned char* key, Py_ssize_t* spans, Py_ssize_t* room
) noexcept nogil:
    """Write ``s`` with each plain constant replaced by one byte, 0x01 for a string and 0x02 for
    a number, into ``key``; return the
    key's length, or -1 when ``s`` holds anything the fast path does not read (then the engine's
    normalizer decides). ``spans`` (when not NULL) gets each constant's start and end, ``room``
    pairs at most (``room`` then holds how many were found).

    Plain constants: a run of digits standing alone (not glued to a word, a dot or an exponent),
    optionally with a minus after whitespace, ``(`` or ``,`` (unless a cast or subscript
    follows, which binds tighter than the minus); a quoted string with no quote or
    backslash inside, after whitespace or one of ``(,=<>``. The text may hold no ``$``, double
    quotes, backslashes, comments, 0x01 or 0x02. Two texts with the same key differ only in such
    constants; the lane takes a key only after checking, on a text the engine normalized, that
    the constants it found are exactly the ones the normalizer replaced (``learn``), so the key
    stands for that normalized shape. tests/unit/sidecar/test_lane.py fuzzes this against
    libpg_query.
    """
    cdef Py_ssize_t i = 0, j, k = 0, count = 0
    cdef unsigned char c, prev, kind
    while i < n:
        c = s[i]
        if c == 36 or c == 34 or c == 92 or c == 1 or c == 2:  # $ " \ 0x01 0x02
            return -1
        if (c == 45 or c == 47) and i + 1 < n and (s[i + 1] == 45 or s[i + 1] == 42) and (c == 45) == (s[i + 1] == 45):
            return -1  # -- or /* starts a comment
        prev = s[i - 1] if i > 0 else 32
        if c == 39:  # a quoted string
            if not (_space(prev) or prev == 40 or prev == 44 or prev == 61 or prev == 60 or prev == 62):
                return -1  # E'', B'', X'', N'', U&'' and friends
            j = i + 1
            while j < n and s[j] != 39:
                if s[j] == 92:
                    return -1
                j += 1
            if j >= n or (j + 1 < n and s[j + 1] == 39):
                return -1  # unterminated, or a doubled quote inside
            j += 1
            kind = 1
        elif _digit(c) or (
            c == 45
            and i + 1 < n
            and _digit(s[i + 1])
            and (_space(prev) or prev == 40 or prev == 44)
            and not _binds_tighter(s, i + 1, n)
        ):
            j = i + 1
            while j < n and _digit(s[j]):
                j += 1
            if (c != 45 and (_word(prev) or prev == 46)) or (j < n and (_word(s[j]) or s[j] == 46)):
                memcpy(key + k, s + i, j - i)  # part of a word or of another kind of number
                k += j - i
                i = j
                continue
            kind = 2
        else:
            key[k] = c
            k += 1
            i += 1
            continue
        if spans != NULL:
            if count >= room[0]:
                return -1
            spans[2 * count] = i
            spans[2 * count + 1] = j
        count += 1
        key[k] = kind
        k += 1
        i = j
    if spans != NULL:
        room[0] = count
    return k


def template(sql):
    """(key, spans) of ``sql`` as the lane reads it (``_template``), or None (tests)."""
    cdef bytes raw = sql.encode()
    cdef Py_ssize_t n = len(raw), k, i, room = n // 2 + 1
    cdef unsigned char* key = <unsigned char*>malloc(n + 1)
    cdef Py_ssize_t* spans = <Py_ssize_t*>malloc(sizeof(Py_ssize_t) * (n + 2))
    if key == NULL or spans == NULL:
        free(key)
        free(spans)
        raise MemoryError()
    try:
        k = _template(<const unsigned char*>PyBytes_AS_STRING(raw), n, key, spans, &room)
        if k < 0:
            return None
        found = [(spans[2 * i], spans[2 * i + 1]) for i in range(room)]
        return key[:k], found
    finally:
        free(key)
        free(spans)


def same_shape(sql, normalized):
    """True when the constants ``template`` finds in ``sql`` are exactly those ``normalized``
    (libpg_query's normalization of ``sql``) replaced with $1, $2, ..."""
    found = template(sql)
    if found is None:
        return False
    raw = sql.encode()
    parts = []
    last = 0
    for number, (start, end) in enumerate(found[1], 1):
        parts.append(raw[last:start])
        parts.append(b"$%d" % number)
        last = end
    parts.append(raw[last:])
    return b"".join(parts) == normalized.encode()


cdef inline int _escape_unit(unsigned char* out, unsigned int unit) noexcept nogil:
    """\\uXXXX (lowercase hex, as the JSON encoder writes it); returns 6."""
    out[0] = 92
    out[1] = 117
    out[2] = HEX[(unit >> 12) & 15]
    out[3] = HEX[(unit >> 8) & 15]
    out[4] = HEX[(unit >> 4) & 15]
    out[5] = HEX[unit & 15]
    return 6


cdef str GENESIS = "0" * 64
cdef frozenset WRITE_TAGS = frozenset(("INSERT", "UPDATE", "DELETE", "MERGE", "COPY"))
cdef str STATUS_I = "I"
cdef str STATUS_T = "T"
cdef str STATUS_E = "E"

cdef enum:
    HOLD_MAX = 256  # statements a lane may finish before it audits them

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
    cdef bytes _segment
    cdef readonly object metric
    cdef readonly Py_ssize_t masked
    cdef readonly object rewrite
    cdef bytes _enforced
    cdef Py_ssize_t _tally  # statements of this entry in the drain under way

    def __init__(self, decision, statement, str segment, metric, Py_ssize_t masked, rewrite=None):
        """``rewrite``: for a masked shape, the text to send upstream for a text of it (None:
        the session's to rewrite); such an entry's statements are enforced as "mask"."""
        self.decision = decision
        self.statement = statement
        self.segment = segment
        self._segment = segment.encode("ascii")  # what the JSON encoder writes is ASCII
        self.metric = metric
        self.masked = masked
        self.rewrite = rewrite
        self._enforced = b"mask" if rewrite is not None else b"allow"


cdef class _Writer:
    """Writes one side's bytes: straight to its socket when the event loop's transport is plain
    TCP or Unix, open and has nothing queued (the event loop would make the same send() call,
    after ~0.3 µs of bookkeeping); through ``transport.write`` otherwise, and for whatever a
    send() leaves (partial, EAGAIN, an error: the transport then queues it or reports the error
    as always). The transport's queue is empty whenever the lane writes past it, so the bytes
    keep their order."""

    cdef int fd
    cdef object write
    cdef object closing
    cdef object queued

    def __init__(self, transport, int fd):
        self.write = transport.write
        self.fd = fd
        if fd >= 0:
            self.closing = transport.is_closing
            self.queued = transport.get_write_buffer_size

    cdef int put(self, bytes data) except -1:
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data), sent
        if self.fd >= 0 and not self.closing() and self.queued() == 0:
            sent = send(self.fd, PyBytes_AS_STRING(data), n, MSG_DONTWAIT | MSG_NOSIGNAL)
            if sent == n:
                return 0
            if sent > 0:
                self.write(data[sent:])
                return 0
        self.write(data)
        return 0

    def send(self, bytes data):
        """``put`` (tests)."""
        self.put(data)


cdef class Lane:
    """One session's lane. Built and armed by the session; see the module docstring."""

    cdef public bint armed
    cdef public int kind
    cdef readonly double started
    cdef object _sql  # the statement's text: a str, or a Query message (bytes) whose text is ASCII
    cdef readonly bytes batch  # masked sessions: the client's messages of the batch in flight
    cdef readonly bytes forward  # what goes upstream for the statement just taken (its rewrite)
    cdef object _batch_statement
    cdef int _described  # its Describe: 83 (statement), 80 (portal) or 0
    cdef object _described_name
    cdef object _masked_plain
    cdef object _masked_batch
    cdef readonly object decision
    cdef readonly object statement

    cdef Entry _entry
    cdef long long _row_limit
    cdef object _clock
    cdef _Writer _to_upstream
    cdef _Writer _to_client
    cdef object _client_slow
    cdef object _server_slow
    cdef object _fail
    # Statements finished and not yet audited (``drain``): their numbers here, their entries and
    # texts in the two lists, so that finishing one allocates nothing.
    cdef list _done_entries
    cdef list _done_sql
    cdef double _done_now[HOLD_MAX]
    cdef double _done_started[HOLD_MAX]
    cdef Py_ssize_t _done_rows[HOLD_MAX]
    cdef long long _done_affected[HOLD_MAX]
    cdef Py_ssize_t _hold
    cdef bint _full
    cdef int _status_told  # the transaction status the lane last gave the session (0: none)
    cdef object _session
    cdef object _policy_call
    cdef object _holder
    cdef object _audit_ok
    cdef object _health  # the AuditLog whose ``healthy`` audit_ok returns, read without a call
    cdef bint _time_time  # the clock is time.time: read in C
    cdef object _log
    cdef object _counters
    cdef object _timestamp
    cdef str _session_id
    cdef str _identity
    cdef bytes _identity_ascii
    cdef unsigned char* _line
    cdef Py_ssize_t _line_cap
    cdef Py_ssize_t _line_len
    cdef dict _prepared
    cdef dict _portals
    cdef dict _masked
    cdef Py_ssize_t _max_message
    cdef double _buckets[64]
    cdef int _nbuckets
    cdef object _policy
    cdef object _search_path
    cdef object _shape_key
    cdef dict _shapes
    cdef unsigned long long* _t_hashes  # templates: open addressing, 0 = free slot
    cdef int* _t_slots  # index into _t_items
    cdef list _t_items  # (template key, Entry)
    cdef Py_ssize_t _t_mask
    cdef unsigned char* _key
    cdef Py_ssize_t _key_room
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
        timestamp,
        str session_id,
        str identity,
        dict prepared,
        dict portals,
        Py_ssize_t max_message,
        buckets,
        dict masked=None,
        masked_plain=None,
        masked_batch=None,
        Py_ssize_t hold=64,
        Py_ssize_t cache_size=4096,
    ):
        self._session = session
        self._policy_call = policy_call
        # A PolicyHolder is read directly (its ``current``), sparing a Python call per statement.
        self._holder = policy_call if hasattr(policy_call, "current") else None
        self._audit_ok = audit_ok
        self._health = audit_ok.log if type(audit_ok) is Healthy else None
        self._log = log
        self._counters = counters
        self._timestamp = timestamp
        self._session_id = session_id
        self._identity = identity
        self._identity_ascii = identity.encode("ascii")
        self._line = NULL
        self._line_cap = 0
        self._line_len = 0
        self._prepared = prepared
        self._portals = portals
        self._max_message = max_message
        # (table OID, attribute number) of masked columns: results showing one go to the session,
        # which masks them. The session tracks, per statement and portal, which result columns
        # come from masked ones: ``masked_plain(name)`` says whether a prepared statement's rows
        # need masking (then the session runs it), ``masked_batch(...)`` updates that tracking for
        # a batch the lane ran, as reading its messages would have.
        self._masked = masked if masked else None
        self._masked_plain = masked_plain
        self._masked_batch = masked_batch
        if self._masked is not None and (masked_plain is None or masked_batch is None):
            raise ValueError("a lane with masked columns needs masked_plain and masked_batch")
        if len(buckets) > 64:
            raise ValueError("at most 64 latency buckets")
        self._nbuckets = len(buckets)
        for i, b in enumerate(buckets):
            self._buckets[i] = b
        self._policy = None
        self._search_path = None
        self._shape_key = None
        self._shapes = {}
        self._t_hashes = NULL
        self._t_slots = NULL
        self._t_items = []
        self._t_mask = 0
        self._row_limit = -1
        self._done_entries = []
        self._done_sql = []
        if not 1 <= hold <= HOLD_MAX:
            raise ValueError(f"hold must be 1..{HOLD_MAX}")
        self._hold = hold
        self._key = NULL
        self._key_room = 0
        self._texts = {}
        self._by_decision = {}
        self._cache_size = cache_size
        self._second = -1
        self.armed = False
        self.kind = IDLE

    def __dealloc__(self):
        free(self._key)
        free(self._line)
        free(self._t_hashes)
        free(self._t_slots)

    @property
    def sql(self):
        """The text of the statement in flight (None when idle)."""
        return _text(self._sql)

    # --- templates: a small hash table of their keys, no bytes object per lookup ----------

    cdef int _forget_templates(self) except -1:
        self._t_items = []
        if self._t_hashes != NULL:
            memset(self._t_hashes, 0, (self._t_mask + 1) * sizeof(unsigned long long))
        return 0

    cdef int _add_template(self, bytes key, Entry entry) except -1:
        cdef Py_ssize_t size, slot
        cdef unsigned long long h
        if self._t_hashes == NULL:
            size = 16
            while size < 2 * self._cache_size:
                size *= 2
            self._t_hashes = <unsigned long long*>calloc(size, sizeof(unsigned long long))
            self._t_slots = <int*>malloc(size * sizeof(int))
            if self._t_hashes == NULL or self._t_slots == NULL:
                raise MemoryError()
            self._t_mask = size - 1
        if len(self._t_items) >= self._cache_size:
            self._forget_templates()
        h = _hash(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))
        slot = h & self._t_mask
        while self._t_hashes[slot] != 0:
            if self._t_hashes[slot] == h and self._t_items[self._t_slots[slot]][0] == key:
                self._t_items[self._t_slots[slot]] = (key, entry)
                return 0
            slot = (slot + 1) & self._t_mask
        self._t_hashes[slot] = h
        self._t_slots[slot] = len(self._t_items)
        self._t_items.append((key, entry))
        return 0

    cdef Entry _find_template(self, const unsigned char* key, Py_ssize_t size):
        cdef unsigned long long h = _hash(key, size)
        cdef Py_ssize_t slot = h & self._t_mask
        cdef tuple item
        while self._t_hashes[slot] != 0:
            if self._t_hashes[slot] == h:
                item = <tuple>self._t_items[self._t_slots[slot]]
                known = item[0]
                if PyBytes_GET_SIZE(known) == size and memcmp(PyBytes_AS_STRING(known), key, size) == 0:
                    return <Entry>item[1]
            slot = (slot + 1) & self._t_mask
        return None

    # --- set up by the session ------------------------------------------------------------

    def arm(self, bint ready, policy=None, search_path=None, shape_key=None, long long row_limit=-1):
        """Arm (or disarm) the lane; a new policy or search_path forgets every learned shape.
        ``row_limit``: maxRowsReturned (-1: none); an answer with more rows for a statement goes
        to the session, which refuses it."""
        self._status_told = 0
        self.armed = ready and self.kind == IDLE
        if not self.armed:
            return
        self._row_limit = row_limit
        if policy is not self._policy or search_path != self._search_path:
            self._shapes.clear()
            self._forget_templates()
            self._texts.clear()
            # Statements prepared under the old search_path are re-resolved by the server: the
            # session judges their next executions again.
            self._by_decision.clear()
            self._policy = policy
            self._search_path = search_path
            self._shape_key = shape_key

    def learn(self, key, Entry entry, bint exact, sql=None):
        """``key`` (a normalized shape, or an exact Parse text when ``exact``) decides to ``entry``
        under the policy and search_path the lane is armed with. ``sql``, a text of that shape,
        also teaches its template when its plain constants are exactly the normalized ones."""
        cdef dict table = self._texts if exact else self._shapes
        if len(table) >= self._cache_size:
            table.clear()
        table[key] = entry
        if sql is not None and not exact and same_shape(sql, key):
            self._add_template(template(sql)[0], entry)
        self.remember(entry)

    def remember(self, Entry entry):
        """The audit fields of ``entry.decision``, for executions of statements prepared with it."""
        if len(self._by_decision) >= self._cache_size:
            self._by_decision.clear()
        self._by_decision[id(entry.decision)] = entry

    def template_entry(self, sql):
        """The entry learned for the template of ``sql`` (tests)."""
        found = template(sql)
        if found is None or not self._t_items:
            return None
        key = found[0]
        return self._find_template(<const unsigned char*>PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key))

    def known(self, decision):
        """The entry remembered for ``decision`` (tests)."""
        cdef Entry entry = self._by_decision.get(id(decision))
        return entry if entry is not None and entry.decision is decision else None

    def take(self):
        """The statement in flight as (started, sql, decision, statement or None); the lane is idle
        and disarmed afterwards (the session now owns the statement). What the lane finished is
        audited first, so the session's own events follow it in the trail."""
        self.drain()
        self._status_told = 0
        result = (self.started, _text(self._sql), self.decision, self.statement)
        self.kind = IDLE
        self.armed = False
        self._sql = self.decision = self.statement = self._entry = None
        self.batch = self._batch_statement = self._described_name = None
        self.forward = None
        return result

    # --- the shell's callbacks -----------------------------------------------------------

    def bind(self, *, clock, client, upstream, client_slow, server_slow, fail, int client_fd=-1, int upstream_fd=-1):
        """Let the event loop call the lane first (``client_received`` / ``server_received``, set
        as the protocols' ``data_received``): what it takes is written to the ``upstream`` /
        ``client`` transport (straight to ``upstream_fd`` / ``client_fd`` when given: the shell
        passes them only for the event loop's plain TCP and Unix transports), the rest goes to
        ``client_slow`` / ``server_slow`` (data, now), and an exception to ``fail()``. Spares a
        Python call per read."""
        self._clock = clock
        self._time_time = clock is _time.time
        self._to_upstream = _Writer(upstream, upstream_fd)
        self._to_client = _Writer(client, client_fd)
        self._client_slow = client_slow
        self._server_slow = server_slow
        self._fail = fail

    def client_received(self, bytes data):
        """The client protocol's data_received."""
        cdef double now = _time_now() if self._time_time else self._clock()
        try:
            if self._client(data, now):
                self._to_upstream.put(self.forward)
                return
        except Exception:
            self._fail()
            return
        self._client_slow(data, now)

    def server_received(self, bytes data):
        """The upstream protocol's data_received (once it relays)."""
        cdef double now = _time_now() if self._time_time else self._clock()
        if self.kind != IDLE:
            try:
                if self._server(data, now):
                    self._to_client.put(data)
                    if self._full:  # after the answer is on its way: off the statement's latency
                        self.drain()
                    return
            except Exception:
                self._fail()
                return
        self._server_slow(data, now)

    # --- client side ----------------------------------------------------------------------

    def client(self, bytes data, double now):
        """True when the lane now owns the statement in ``data``: ``forward`` goes upstream (the
        same bytes, or a masked shape's rewrite)."""
        return self._client(data, now)

    cdef bint _client(self, bytes data, double now) except -1:
        if not self.armed or self.kind != IDLE:
            return False
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        if n < 5 or n > self._max_message:
            return False
        if self._health is not None:
            if not self._health.healthy:
                return False
        elif self._audit_ok is not None and not self._audit_ok():
            return False
        current = self._holder.current if self._holder is not None else self._policy_call()
        if current is not self._policy:
            return False
        cdef int t = p[0]
        if t == 81:  # Query
            return self._query(data, p, n, now)
        if t == 80:  # Parse
            return self._batch(data, p, n, now, True)
        if t == 66:  # Bind
            return self._batch(data, p, n, now, False)
        return False

    cdef bint _query(self, bytes data, const unsigned char* p, Py_ssize_t n, double now) except -1:
        if _i32(p + 1) != n - 1 or n < 6 or p[n - 1] != 0:
            return False
        if memchr(p + 5, 0, n - 6) != NULL:
            return False
        # An ASCII text is kept as the message itself (decoded only if the session adopts it);
        # any other is decoded now, strictly, as the session decodes it.
        text = data if _ascii(p + 5, n - 6) else None
        if text is None:
            try:
                text = PyUnicode_DecodeUTF8(<const char*>p + 5, n - 6, "strict")
            except UnicodeDecodeError:
                return False
        cdef Entry entry = None
        cdef Py_ssize_t k
        if self._t_items:
            if self._key_room < n:
                free(self._key)
                self._key = <unsigned char*>malloc(n)
                if self._key == NULL:
                    self._key_room = 0
                    raise MemoryError()
                self._key_room = n
            k = _template(p + 5, n - 6, self._key, NULL, NULL)
            if k >= 0:
                entry = self._find_template(self._key, k)
        if entry is None:
            try:
                key = self._shape_key(_text(text))
            except Exception:  # the session's engine names the problem
                return False
            entry = self._shapes.get(key)
            if entry is None:
                return False
        cdef bytes forward = data
        cdef const char* rewritten
        cdef Py_ssize_t size
        if entry.rewrite is not None:  # a masked shape: its rewrite goes upstream
            try:
                out = entry.rewrite(_text(text))
            except Exception:  # the session's engine names the problem
                return False
            if out is None:
                return False
            rewritten = PyUnicode_AsUTF8AndSize(out, &size)
            if memchr(rewritten, 0, size) != NULL:
                return False
            forward = b"Q" + (size + 5).to_bytes(4, "big") + rewritten[:size] + b"\0"
        self.forward = forward
        self.kind = QUERY
        self._entry = entry
        self.started = now
        self._sql = text
        self.decision = entry.decision
        self.statement = None
        return True

    cdef bint _batch(self, bytes data, const unsigned char* p, Py_ssize_t n, double now, bint parse) except -1:
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
        cdef int described = 0
        described_name = None
        if n - pos >= 5 and p[pos] == 68:
            length = _i32(p + pos + 1)
            end = pos + 1 + length
            if length < 6 or end > n or p[pos + 5] not in (83, 80) or p[end - 1] != 0:
                return False
            if memchr(p + pos + 6, 0, end - pos - 7) != NULL:
                return False
            described = p[pos + 5]
            if self._masked is not None:
                try:
                    described_name = PyUnicode_DecodeUTF8(<const char*>p + pos + 6, end - pos - 7, "strict")
                except UnicodeDecodeError:
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
            statement = entry.statement  # (the unnamed statement once the answer shows it parsed)
        else:
            statement = self._prepared.get(name)
            if statement is None or statement.verdict != "allow":
                return False
            entry = self._by_decision.get(id(statement.decision))
            if entry is None or entry.decision is not statement.decision:
                return False
            if self._masked is not None and not self._masked_plain(name):
                return False  # its rows need masking by what an earlier Describe showed
        self._portals[""] = name
        if self._masked is not None:  # for the session's column origins (``masked_batch``)
            self.batch = data
            self._batch_statement = name
            self._described = described
            self._described_name = described_name
        self.forward = data
        self.kind = PARSED if parse else PREPARED
        self._entry = entry
        self.started = now
        self._sql = statement.sql
        self.decision = entry.decision
        self.statement = statement
        return True

    # --- server side ----------------------------------------------------------------------

    def server(self, bytes data, double now):
        """True when ``data`` is the whole plain answer to the statement in flight: it goes to
        the client unchanged and the statement is audited and counted."""
        if not self._server(data, now):
            return False
        if self._full:
            self.drain()
        return True

    cdef bint _server(self, bytes data, double now) except -1:
        if self.kind == IDLE:
            return False
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t pos = 0, end, rows = 0, statement_rows = 0
        cdef int length, t, status = 0
        cdef bint tagged = False
        cdef bint described = False  # a RowDescription or NoData answered a Describe
        cdef long long changed = 0, count
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
                statement_rows += 1
                if 0 <= self._row_limit < statement_rows:
                    return False  # over maxRowsReturned: the session refuses it
            elif t == 67:  # CommandComplete
                statement_rows = 0
                if length < 5 or p[end - 1] != 0 or memchr(p + pos + 5, 0, length - 5) != NULL:
                    return False
                count = _tag_count(p + pos + 5, length - 5)
                if count < 0:  # read as the session reads it
                    try:
                        tag = PyUnicode_DecodeUTF8(<const char*>p + pos + 5, length - 5, "strict")
                        value = _rows_affected([tag])
                    except (UnicodeDecodeError, ValueError):  # the session fails the same way
                        return False
                    if not 0 <= value < (1 << 62):
                        return False
                    count = value
                tagged = True
                changed += count
            elif t == 90:  # ReadyForQuery
                if length != 5 or p[pos + 5] not in (73, 84, 69):
                    return False
                status = p[pos + 5]
            elif t == 84:  # RowDescription
                if self._masked is not None and not self._plain_columns(p + pos + 5, length - 4):
                    return False
                described = True
            elif t in (78, 65):  # notices, notifications (a ParameterStatus goes to the session)
                pass
            elif t in (49, 50, 51, 110):  # ParseComplete, BindComplete, CloseComplete, NoData
                if length != 4:
                    return False
                if t == 110:
                    described = True
            else:
                return False
            pos = end
        if not status:
            return False
        if changed >= (1 << 62):
            return False  # a count no server sends: the session writes it
        cdef Py_ssize_t held
        if audit:
            # Audited in batches (``drain``): sealing many lines at once is far cheaper than one
            # at a time between socket reads. The batch is bounded; the session drains it before
            # it audits anything itself, and the audit log before every flush.
            held = len(self._done_entries)
            if held >= self._hold:  # a full batch whose caller did not get to drain it
                self.drain()
                held = 0
            self._done_now[held] = now
            self._done_started[held] = self.started
            self._done_rows[held] = rows
            self._done_affected[held] = changed if tagged else -1
            self._done_entries.append(self._entry)
            self._done_sql.append(self._sql)
            self._full = held + 1 >= self._hold  # drained by the caller, once the answer is sent
        if status != self._status_told:  # (the session may have set it since: arm() forgets)
            self._session.txn_status = STATUS_I if status == 73 else STATUS_T if status == 84 else STATUS_E
            self._status_told = status
        if self.kind == PARSED:
            self._prepared[""] = self.statement
        if self.batch is not None:
            self._masked_batch(
                self.kind == PARSED, self._batch_statement, self._described if described else 0, self._described_name
            )
            self.batch = self._batch_statement = self._described_name = None
        self.kind = IDLE
        self._sql = self.decision = self.statement = self._entry = None
        self.forward = None
        return True

    cdef bint _plain_columns(self, const unsigned char* p, Py_ssize_t size) except -1:
        """A well-formed RowDescription none of whose columns comes straight from a masked one."""
        if size < 2:
            return False
        cdef int count = _i16(p), field
        cdef Py_ssize_t pos = 2
        cdef const unsigned char* nul
        cdef unsigned int table
        cdef int attnum
        if count < 0:
            return False
        for field in range(count):
            nul = <const unsigned char*>memchr(p + pos, 0, size - pos)
            if nul == NULL:
                return False
            while pos < nul - p:
                if p[pos] >= 128:  # the session decodes such names; let it
                    return False
                pos += 1
            pos += 1
            if pos + 18 > size:
                return False
            table = <unsigned int>_i32(p + pos)
            attnum = _i16(p + pos + 4)
            if (table, attnum) in self._masked:
                return False
            pos += 18
        return pos == size

    def drain(self):
        """Audit and count the statements the lane finished, in order: exactly the lines and the
        counts the session's recorder would make, one statement after the other."""
        cdef Py_ssize_t n = len(self._done_entries)
        self._full = False
        if n == 0:
            return
        # Taken out first: nothing this drain calls finds them here again.
        cdef list entries = self._done_entries, texts = self._done_sql
        self._done_entries, self._done_sql = [], []
        cdef double times[HOLD_MAX]
        cdef Py_ssize_t counts[HOLD_MAX]
        cdef long long changes[HOLD_MAX]
        cdef double seconds[HOLD_MAX]
        cdef char spelled[HOLD_MAX][32]
        cdef int lengths[HOLD_MAX]
        cdef Py_ssize_t tally[65]
        cdef double total
        cdef Py_ssize_t i, j
        cdef Entry entry
        cdef list touched
        memcpy(times, self._done_now, n * sizeof(double))
        memcpy(counts, self._done_rows, n * sizeof(Py_ssize_t))
        memcpy(changes, self._done_affected, n * sizeof(long long))
        for j in range(n):
            lengths[j] = _milliseconds((times[j] - self._done_started[j]) * 1000, spelled[j], &seconds[j])
            seconds[j] /= 1000
        log = self._log
        if log is not None:
            self._audit(log, n, entries, texts, times, counts, changes, spelled, lengths)
        counters = self._counters
        if counters is not None:
            # Tallied here, added once: the same counts (and the same float sum, added in order)
            # as the recorder's one statement at a time.
            memset(tally, 0, sizeof(tally))
            touched = []
            total = counters.latency_sum
            for j in range(n):
                entry = entries[j]
                if entry._tally == 0:
                    touched.append(entry)
                entry._tally += 1
                if entry.masked:
                    counters.masked_columns += entry.masked
                tally[self._bucket(seconds[j])] += 1
                total += seconds[j]
            statements = counters.statements
            for entry in touched:
                statements[entry.metric] = statements.get(entry.metric, 0) + entry._tally
                entry._tally = 0
            latency = counters.latency
            for i in range(self._nbuckets + 1):
                if tally[i]:
                    latency[i] += tally[i]
            counters.latency_sum = total
            counters.latency_count += n
            counters.lane_statements += n

    cdef int _audit(
        self, log, Py_ssize_t n, list entries, list texts, double* times, Py_ssize_t* counts,
        long long* changes, char (*spelled)[32], int* lengths,
    ) except -1:
        """Seal the ``n`` lines into ``log``'s buffer; each full batch goes to the sink
        (``write_out``), never through ``flush``: a flush is what drains the lanes, and a drain
        inside it would nest once per lane holding lines. A line that cannot be written (the
        chain head is not a digest, an error while sealing) is counted as dropped, as the sink
        refusing it would be, before the error goes on."""
        cdef char prev[64]
        cdef Py_ssize_t j = 0, size
        cdef Py_ssize_t batch = log._batch
        cdef const char* text
        chain = log._prev
        try:
            text = PyUnicode_AsUTF8AndSize(chain.get(self._session_id, GENESIS), &size)
            if size != 64:
                raise ValueError("audit chain head is not a SHA-256 hex digest")
            memcpy(prev, text, 64)
            while j < n:
                line = self._seal(prev, times[j], counts[j], changes[j], entries[j], texts[j], spelled[j], lengths[j])
                buffer = log._buffer  # (write_out replaces it)
                buffer.append(line)
                j += 1
                if len(buffer) >= batch:
                    log.write_out()
        except BaseException:
            log._fail(n - j)
            raise
        finally:
            if j:
                chain[self._session_id] = PyUnicode_DecodeASCII(prev, 64, NULL)
        return 0

    cdef str _seal(
        self, char* prev, double now, Py_ssize_t rows, long long affected, Entry entry, sql,
        const char* duration, int duration_len,
    ):
        """The statement's audit line, exactly as ``audit.seal`` makes it for the session's event:
        prev_hash and the JSON without its closing brace in one buffer, SHA-256 (OpenSSL's, as
        hashlib's) over them with the brace, the chain fields appended. ``prev`` (the chain's
        head, 64 hex digits) becomes this line's hash."""
        cdef Py_ssize_t size, body
        cdef const char* text
        cdef unsigned char digest[32]
        cdef SHA256_CTX hashing
        cdef int i
        self._line_len = 0
        self._put(prev, 64)
        self._put_c('{"type":"statement","time":"')
        self._put_time(now)
        self._put_c('","statement":')
        if type(sql) is bytes:  # a Query message with an ASCII text
            self._put_json(<const unsigned char*>PyBytes_AS_STRING(sql) + 5, PyBytes_GET_SIZE(sql) - 6)
        else:
            text = PyUnicode_AsUTF8AndSize(sql, &size)
            self._put_json(<const unsigned char*>text, size)
        self._put(PyBytes_AS_STRING(entry._segment), PyBytes_GET_SIZE(entry._segment))
        self._put_c(',"enforced":"')
        self._put(PyBytes_AS_STRING(entry._enforced), PyBytes_GET_SIZE(entry._enforced))
        self._put_c('","rows_returned":')
        self._put_int(rows)
        self._put_c(',"rows_affected":')
        if affected < 0:
            self._put_c("null")
        else:
            self._put_int(affected)
        self._put_c(',"duration_ms":')
        self._put(duration, duration_len)
        self._put_c(',"sqlstate":null')
        self._put(PyBytes_AS_STRING(self._identity_ascii), PyBytes_GET_SIZE(self._identity_ascii))
        body = self._line_len
        self._put_c("}")
        SHA256_Init(&hashing)
        SHA256_Update(&hashing, self._line, self._line_len)
        SHA256_Final(digest, &hashing)
        self._line_len = body
        self._put_c(',"prev_hash":"')
        self._put(<const char*>self._line, 64)
        self._put_c('","hash":"')
        for i in range(32):
            prev[2 * i] = HEX[digest[i] >> 4]
            prev[2 * i + 1] = HEX[digest[i] & 15]
        self._put(prev, 64)
        self._put_c('"}')
        return PyUnicode_DecodeASCII(<const char*>self._line + 64, self._line_len - 64, NULL)

    cdef int _room(self, Py_ssize_t more) except -1:
        cdef Py_ssize_t cap = self._line_cap
        cdef unsigned char* grown
        if self._line_len + more <= cap:
            return 0
        while cap < self._line_len + more:
            cap = cap * 2 if cap else 4096
        grown = <unsigned char*>realloc(self._line, cap)
        if grown == NULL:
            raise MemoryError()
        self._line = grown
        self._line_cap = cap
        return 0

    cdef int _put(self, const char* data, Py_ssize_t size) except -1:
        self._room(size)
        memcpy(self._line + self._line_len, data, size)
        self._line_len += size
        return 0

    cdef int _put_c(self, const char* data) except -1:
        return self._put(data, strlen(data))

    cdef int _put_int(self, long long value) except -1:
        cdef char digits[24]
        cdef int n = 0
        cdef bint negative = value < 0
        cdef unsigned long long v = <unsigned long long>(-value if negative else value)
        while True:
            digits[23 - n] = 48 + <char>(v % 10)
            n += 1
            v //= 10
            if v == 0:
                break
        if negative:
            digits[23 - n] = 45
            n += 1
        return self._put(digits + 24 - n, n)

    cdef int _put_json(self, const unsigned char* s, Py_ssize_t n) except -1:
        """``s`` (UTF-8) as the JSON string ``json.encoder.encode_basestring_ascii`` writes:
        quoted, printable ASCII as is, the rest escaped (\\uXXXX, surrogate pairs beyond the BMP)."""
        self._room(2 + 12 * n)  # at most 12 bytes per input byte (a 4-byte sequence -> 2 escapes)
        cdef unsigned char* out = self._line + self._line_len
        cdef Py_ssize_t i = 0, o = 0
        cdef unsigned int c, cp, hi, lo
        out[o] = 34
        o += 1
        while i < n:
            c = s[i]
            if 32 <= c <= 126 and c != 34 and c != 92:
                out[o] = c
                o += 1
                i += 1
                continue
            if c < 128:
                out[o] = 92
                if c == 34 or c == 92:
                    out[o + 1] = c
                elif c == 10:
                    out[o + 1] = 110
                elif c == 13:
                    out[o + 1] = 114
                elif c == 9:
                    out[o + 1] = 116
                elif c == 8:
                    out[o + 1] = 98
                elif c == 12:
                    out[o + 1] = 102
                else:
                    o += _escape_unit(out + o, c)
                    i += 1
                    continue
                o += 2
                i += 1
                continue
            if c >= 0xF0:
                cp = ((c & 0x07) << 18) | ((s[i + 1] & 0x3F) << 12) | ((s[i + 2] & 0x3F) << 6) | (s[i + 3] & 0x3F)
                i += 4
            elif c >= 0xE0:
                cp = ((c & 0x0F) << 12) | ((s[i + 1] & 0x3F) << 6) | (s[i + 2] & 0x3F)
                i += 3
            else:
                cp = ((c & 0x1F) << 6) | (s[i + 1] & 0x3F)
                i += 2
            if cp >= 0x10000:
                cp -= 0x10000
                hi = 0xD800 | (cp >> 10)
                lo = 0xDC00 | (cp & 0x3FF)
                o += _escape_unit(out + o, hi)
                o += _escape_unit(out + o, lo)
            else:
                o += _escape_unit(out + o, cp)
        out[o] = 34
        o += 1
        self._line_len += o
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

    cdef int _put_time(self, double t) except -1:
        """``audit.timestamp(t)`` into the line: the date part made by it once per second, the
        rest here."""
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
        return self._put(self._stamp, 27)


cdef int _milliseconds(double elapsed, char* out, double* rounded) except -1:
    """``repr(round(elapsed, 3))`` into ``out`` (NUL-terminated; its length returned) and the
    rounded value into ``rounded``, without Python floats: both round the exact binary value to
    three decimals with the same correctly rounded conversion (dtoa mode 3), and below 1e12 the
    shortest repr of that value is its three-decimal spelling without trailing zeros (at most 15
    significant digits). Anything else (never a duration) takes Python's own route."""
    cdef char* spelled
    cdef Py_ssize_t n
    cdef bytes text
    if not (-1e12 < elapsed < 1e12):
        value = round(elapsed, 3)
        text = repr(value).encode("ascii")
        if len(text) > 31:
            raise ValueError("duration out of range")
        memcpy(out, <const char*>text, len(text) + 1)
        rounded[0] = value
        return len(text)
    spelled = PyOS_double_to_string(elapsed, b"f", 3, 0, NULL)
    n = strlen(spelled)
    while n > 2 and spelled[n - 1] == 48 and spelled[n - 2] != 46:  # trailing '0', not after '.'
        n -= 1
    memcpy(out, spelled, n)
    out[n] = 0
    PyMem_Free(spelled)
    rounded[0] = PyOS_string_to_double(out, NULL, NULL)
    return <int>n


def milliseconds(double elapsed):
    """``_milliseconds`` of ``elapsed`` as (text, rounded) (tests)."""
    cdef char out[32]
    cdef double rounded
    cdef int n = _milliseconds(elapsed, out, &rounded)
    return out[:n].decode("ascii"), rounded


cdef long long _tag_count(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Rows a command tag (``n`` bytes) says were changed, exactly as ``session._affected`` reads
    it ("UPDATE 3" -> 3, "SELECT 5" -> 0); -1 when the session's reading must decide (non-ASCII
    text, where str.isdigit differs, or a count of more than 18 digits)."""
    cdef Py_ssize_t i, space = -1, word
    cdef long long value = 0
    for i in range(n):
        if s[i] >= 128:
            return -1
        if s[i] == 32:
            space = i
    if space + 1 >= n:
        return 0  # no count after the last space
    for i in range(space + 1, n):
        if not _digit(s[i]):
            return 0
    word = 0
    while word < space and s[word] != 32:
        word += 1
    if not (
        (word == 6 and (memcmp(s, b"INSERT", 6) == 0 or memcmp(s, b"UPDATE", 6) == 0 or memcmp(s, b"DELETE", 6) == 0))
        or (word == 5 and memcmp(s, b"MERGE", 5) == 0)
        or (word == 4 and memcmp(s, b"COPY", 4) == 0)
    ):
        return 0
    if n - space - 1 > 18:
        return -1
    for i in range(space + 1, n):
        value = value * 10 + (s[i] - 48)
    return value


def tag_count(bytes tag):
    """``_tag_count`` of ``tag`` (tests)."""
    return _tag_count(<const unsigned char*>PyBytes_AS_STRING(tag), PyBytes_GET_SIZE(tag))


cdef object _rows_affected(list tags):
    """``session._rows_affected``: rows the write tags say were changed."""
    total = 0
    for tag in tags:
        head, _, count = tag.rpartition(" ")
        if count.isdigit() and head.split(" ", 1)[0] in WRITE_TAGS:
            total += int(count)
    return total
