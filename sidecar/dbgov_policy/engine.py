"""The engine: decisions with a cache and per-session state.

Decisions are cached by libpg_query's normalized text (literals replaced by `$n`), which is
exact for everything but constants: a repeated statement shape costs a normalize and a dict
lookup. A decision that depends on a constant (SET values, set_config, COPY targets, DO and
function bodies, LIKE patterns) or on session state (EXECUTE, FETCH, PREPARE, DECLARE) is
never cached. Masked decisions cache the verdict but rebuild the rewrite for each text,
because the rewrite carries the statement's own literals. Correctness never depends on the
cache: a miss runs the full analysis.

The engine runs on the proxy's event loop, so every statement's cost must stay bounded and
close to linear in its size (a slow statement stalls every other session): texts over
``max_statement_size`` are refused before any parsing, the normalizer (whose cost grows
faster than the text) only sees texts up to ``SHAPE_MAX_SIZE``, sqlglot's second opinion
only texts up to ``crosscheck.MAX_SIZE``, and the analysis runs with the cyclic garbage
collector paused.

Decisions that depend on the session's catalog (descendants and ancestors of masked tables,
which function names a user function also has) are made by an engine derived for those facts,
with a cache of its own (``for_session``), so a cached decision is never served to a session
whose database says otherwise.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
from collections.abc import Callable, Iterable, Iterator, Mapping

from pglast import parser as pg_parser

from dbgov_policy import analyze, crosscheck, mask, model
from dbgov_policy import decide as verdicts

DEFAULT_SEARCH_PATH = ("public",)

MAX_STATEMENT_SIZE = 1 << 20
"""Default largest query text (UTF-8 bytes) the engine analyzes; longer texts are refused
(54000). Analysis costs about 1 µs and 300 bytes of memory per byte of text, on the event loop:
1 MiB is a ~1 s pause for every session and ~400 MB at peak. Bulk rows belong in
COPY ... FROM STDIN or bind parameters, which are never analyzed."""

SHAPE_MAX_SIZE = 16 * 1024
"""Longest text the decision cache normalizes (libpg_query's ``normalize``). The normalizer
fingerprints every SELECT target (~8 KB of memory each) and matches GROUP BY items against the
targets pairwise, so its cost grows faster than the text (a 600 KB ``SELECT 1,1,…``: 2.4 GB
and seconds); 16 KiB caps it at ~70 MB and ~50 ms. Longer texts are analyzed every time
(linear) and never cached, so neither the lane nor the cache ever normalizes them."""


class TooLongToShape(ValueError):
    """The text is longer than ``SHAPE_MAX_SIZE``: it has no cache key."""


def shape_key(sql: str) -> str:
    """The cache key of ``sql``: libpg_query's normalized text (literals as ``$n``).

    Raises ``TooLongToShape`` for texts over ``SHAPE_MAX_SIZE`` and pglast's ParseError for
    texts that do not parse."""
    if len(sql) > SHAPE_MAX_SIZE:
        raise TooLongToShape(f"{len(sql)} characters, more than {SHAPE_MAX_SIZE}")
    return str(pg_parser.normalize(sql))


def utf8_size(sql: str) -> int:
    """Bytes ``sql`` takes on the wire (UTF-8), without encoding an ASCII text."""
    return len(sql) if sql.isascii() else len(sql.encode("utf-8", "surrogatepass"))


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while the analysis builds its trees.

    The parse tree arrives as JSON: hundreds of thousands of dicts for a big statement, none of
    them in a reference cycle (reference counting frees them). Left on, the collector traverses
    them again and again as they are created: 3-5x the time of the analysis itself."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def statement_too_large(size: int, limit: int) -> verdicts.Decision:
    """The refusal of a text longer than the engine analyzes."""
    return verdicts.Decision(
        verdict="block",
        rule="guardrail:max-statement-size",
        reason=(
            f"the statement is {size} bytes, more than the {limit} bytes dbgov analyzes "
            "(max_statement_size, DBGOV_MAX_STATEMENT_SIZE)"
        ),
        hint=(
            "Send bulk rows with COPY ... FROM STDIN or as bind parameters, split the statement, "
            "or raise DBGOV_MAX_STATEMENT_SIZE."
        ),
        sqlstate=verdicts.LIMIT_SQLSTATE,
    )


@dataclasses.dataclass(slots=True, kw_only=True)
class SessionContext:
    """What one client session has set up that later statements rely on."""

    names: verdicts.Names = dataclasses.field(default_factory=verdicts.Names)
    search_path: tuple[str, ...] = DEFAULT_SEARCH_PATH
    columns: mask.Columns = dataclasses.field(default_factory=dict)
    """Columns of masked tables, in order, as the catalog of this session's database has them:
    masking subqueries then name them, which lets PostgreSQL use the table's indexes."""
    inherits: Inherits = dataclasses.field(default_factory=dict)
    """Descendants of masked tables in this session's database (partitions and inheritance
    children, any depth) → their masked ancestors: a read of one is masked like a read of those."""
    ancestors: Ancestors = dataclasses.field(default_factory=dict)
    """Ancestors of masked tables in this session's database (partitioned roots, inheritance
    parents, any height) → the masked columns below them they share by name: a read of one
    includes the masked tables' rows, so it is masked in those columns."""
    functions: analyze.Functions | None = None
    """Function names outside pg_catalog in this session's database, and the columns named like
    a function that takes a whole row (from the catalog at login and after DDL); None: not known
    (judged by pg_catalog's names alone, as ``dbgov check`` does)."""
    view: tuple[Inherits, Ancestors, analyze.Functions | None, Engine, Engine] | None = None
    """(``inherits``, ``ancestors``, ``functions``, engine, the engine of its that decides this
    session's statements) when any of them is not empty: set by the engine (a reloaded policy is
    another engine)."""
    masking_views: mask.Views | None = None
    """Minted credentials: masked tables are read through the operator's masking views (the
    role may not read their masked columns); None: through the tables themselves."""

    def use_views(
        self,
        names: Mapping[tuple[str, str], str],
        *,
        parents: Iterable[tuple[str, str]] = (),
        masked: Mapping[tuple[str, str], frozenset[str]] | None = None,
    ) -> None:
        """Read masked tables through these masking views ((schema, table) → view name in
        ``dbgov_masked``), from the session's catalog at login; ``parents``: those tables that
        have children (``ONLY`` of one cannot be read through its view, which reads them too);
        ``masked``: the columns each view masks."""
        self.masking_views = mask.Views(
            names={model.QualifiedName(schema=s, name=t): v for (s, t), v in names.items()},
            inherited=frozenset(model.QualifiedName(schema=s, name=t) for s, t in parents),
            masked={model.QualifiedName(schema=s, name=t): c for (s, t), c in (masked or {}).items()},
        )


def _cache_path(ctx: SessionContext) -> tuple[str, ...]:
    """The search_path part of cache keys; sessions reading through masking views key apart
    (their rewrites can refuse what the table form rewrites, ONLY of an inherited table)."""
    if ctx.masking_views is None:
        return ctx.search_path
    return (*ctx.search_path, "\0masking-views")


def _unprovable(decision: verdicts.Decision, err: mask.RewriteError) -> verdicts.Decision:
    return dataclasses.replace(
        decision,
        verdict="block",
        rule="guardrail:mask-unprovable",
        reason=f"masked columns are read but the query cannot be rewritten safely: {err}",
        hint="Simplify the statement, or select only columns that are not masked.",
        sqlstate=verdicts.POLICY_SQLSTATE,
        rewritten=None,
    )


Inherits = Mapping[model.QualifiedName, tuple[model.QualifiedName, ...]]
"""Descendant → masked ancestors, from the catalog (pg_inherits)."""

Ancestors = Mapping[model.QualifiedName, tuple[tuple[model.QualifiedName, str], ...]]
"""Ancestor → (masked table below it, masked column it also has), from the catalog."""

MAX_VIEWS = 16
"""Distinct catalog facts (descendant maps, function names) an engine keeps a derived engine for
(one per database, usually; a database's DDL makes another)."""


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    decision: verdicts.Decision
    template: mask.Template | None
    """Where to splice masking subqueries into texts of this shape; None when nothing is masked."""


@dataclasses.dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    uncacheable: int = 0


class Engine:
    """Decides query strings for one compiled policy."""

    shape_key = staticmethod(shape_key)
    """The text cache entries are keyed by (with the session's search_path)."""

    def __init__(
        self,
        policy: model.CompiledPolicy,
        *,
        cache_size: int = 8192,
        max_statement_size: int = MAX_STATEMENT_SIZE,
    ) -> None:
        self.policy = policy
        self.cache_size = cache_size
        self.max_statement_size = max_statement_size
        self.stats = CacheStats()
        self._cache: collections.OrderedDict[tuple[tuple[str, ...], str], _Entry] = collections.OrderedDict()
        self._exact: dict[tuple[tuple[str, ...], str], _Entry] = {}
        self._views: dict[tuple[frozenset[object], frozenset[object], analyze.Functions | None], Engine] = {}
        self._is_view = False
        self.functions: analyze.Functions | None = None
        """The function facts this engine's decisions (and its cache) assume (``for_session``)."""

    def for_session(self, ctx: SessionContext) -> Engine:
        """The engine that decides ``ctx``'s statements: this one, or, when the session's database
        has descendants or ancestors of masked tables, one whose policy masks them too, or when it
        has functions outside pg_catalog, one that judges their names as theirs (with a cache of
        its own, since the same text is decided differently there). Found once per session, and
        again when the session learns other facts (after DDL)."""
        if not (ctx.inherits or ctx.ancestors or ctx.functions) or self._is_view:
            return self
        view_of = ctx.view
        if (
            view_of is not None
            and view_of[0] is ctx.inherits
            and view_of[1] is ctx.ancestors
            and view_of[2] is ctx.functions
            and view_of[3] is self
        ):
            return view_of[4]
        functions = ctx.functions or None
        key = (frozenset(ctx.inherits.items()), frozenset(ctx.ancestors.items()), functions)
        view = self._views.get(key)
        if view is None:
            policy = self.policy
            if ctx.inherits or ctx.ancestors:
                policy = policy.with_descendants(ctx.inherits, ctx.ancestors)
            view = Engine(policy, cache_size=self.cache_size, max_statement_size=self.max_statement_size)
            view.stats = self.stats
            view._is_view = True
            view.functions = functions
            if len(self._views) >= MAX_VIEWS:
                self._views.clear()
            self._views[key] = view
        ctx.view = (ctx.inherits, ctx.ancestors, ctx.functions, self, view)
        return view

    def decide(self, sql: str, *, session: SessionContext | None = None) -> verdicts.Decision:
        ctx = session if session is not None else SessionContext()
        if (ctx.inherits or ctx.ancestors or ctx.functions) and not self._is_view:
            return self.for_session(ctx).decide(sql, session=ctx)
        exact = (_cache_path(ctx), sql)
        entry = self._exact.get(exact)
        key: tuple[tuple[str, ...], str] | None = None
        if entry is None:
            if len(sql) > self.max_statement_size // 4:  # (a character is at most 4 bytes)
                size = utf8_size(sql)
                if size > self.max_statement_size:
                    self.stats.uncacheable += 1
                    return statement_too_large(size, self.max_statement_size)
            try:
                key = (_cache_path(ctx), shape_key(sql))
            except (pg_parser.ParseError, ValueError, RecursionError):
                key = None
            if key is not None:
                entry = self._cache.get(key)
                if entry is not None:
                    self._cache.move_to_end(key)
                    self._remember_exact(exact, entry)
        if entry is not None:
            self.stats.hits += 1
            if entry.template is None:
                return entry.decision
            try:
                rewritten = mask.rewrite_like(
                    sql, entry.template, self.policy, ctx.columns, ctx.masking_views
                )
            except mask.RewriteError as err:
                return _unprovable(entry.decision, err)
            if rewritten is not None:
                return dataclasses.replace(entry.decision, rewritten=rewritten)
            # Same shape, other tokens (a $1 where the cached text had a constant): rewrite from
            # the analysis, and keep this text's own template for the next time it comes.
            with _gc_paused():
                decision, template = self._with_rewrite(sql, ctx, entry.decision)
            if template is not None and decision.verdict == entry.decision.verdict:
                self._remember_exact(exact, _Entry(decision=entry.decision, template=template))
            return decision
        self.stats.misses += 1
        try:
            with _gc_paused():
                decision, template, cacheable = self._first_sight(sql, ctx)
        except Exception as err:  # fail closed: an analyzer bug refuses the statement, never passes it
            reason = f"dbgov could not analyze the statement ({type(err).__name__}: {err})"
            return verdicts.blocked_unparseable(reason)
        if key is not None and cacheable:
            entry = _Entry(decision=dataclasses.replace(decision, rewritten=None), template=template)
            self._cache[key] = entry
            self._remember_exact(exact, entry)
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self.stats.uncacheable += 1
        return decision

    def cached_shape(
        self, sql: str, *, session: SessionContext | None = None
    ) -> tuple[str, verdicts.Decision] | None:
        """The shape key of ``sql`` and the decision the cache holds for it, when the cache
        decides every text of that shape with the same decision (nothing to rewrite); None when
        ``sql`` is not cached or not normalizable. Does not count as a use."""
        if (
            session is not None
            and (session.inherits or session.ancestors or session.functions)
            and not self._is_view
        ):
            return self.for_session(session).cached_shape(sql, session=session)
        found = self._peek(sql, session)
        if found is None or found[1].template is not None:
            return None
        return found[0], found[1].decision

    def cached_rewrite(
        self, sql: str, *, session: SessionContext | None = None
    ) -> tuple[str, verdicts.Decision, Callable[[str], str | None]] | None:
        """For a cached shape whose texts are rewritten (masked): its shape key, its decision
        (without a rewrite) and the rewrite of a text of that shape for this session (None when
        a text's tokens do not fit the shape's template). None when ``sql`` is not such a shape.
        Does not count as a use."""
        ctx = session if session is not None else SessionContext()
        if (ctx.inherits or ctx.ancestors or ctx.functions) and not self._is_view:
            return self.for_session(ctx).cached_rewrite(sql, session=ctx)
        found = self._peek(sql, ctx)
        template = None if found is None else found[1].template
        if found is None or template is None:
            return None
        key, entry = found
        policy, columns, views = self.policy, ctx.columns, ctx.masking_views

        def rewrite(text: str) -> str | None:
            try:
                return mask.rewrite_like(text, template, policy, columns, views)
            except mask.RewriteError:
                return None  # (the slow path decides it, and refuses it)

        return key, entry.decision, rewrite

    def _peek(self, sql: str, session: SessionContext | None) -> tuple[str, _Entry] | None:
        """The shape key of ``sql`` and its cache entry, without counting a use."""
        ctx = session if session is not None else SessionContext()
        try:
            key = shape_key(sql)
        except (pg_parser.ParseError, ValueError, RecursionError):
            return None
        entry = self._cache.get((_cache_path(ctx), key))
        return None if entry is None else (key, entry)

    def _remember_exact(self, exact: tuple[tuple[str, ...], str], entry: _Entry) -> None:
        """Texts seen verbatim before (prepared and extended-protocol traffic) skip normalizing."""
        if len(self._exact) >= self.cache_size:
            self._exact.clear()
        self._exact[exact] = entry

    def _first_sight(
        self, sql: str, ctx: SessionContext
    ) -> tuple[verdicts.Decision, mask.Template | None, bool]:
        analysis = self._analyze(sql, ctx)
        try:
            fingerprint = pg_parser.fingerprint(sql) if analysis.error is None else ""
        except pg_parser.ParseError:
            fingerprint = ""
        if analysis.error is None and analysis.units:
            problem: str | None
            try:
                texts = [t for t in pg_parser.split(sql) if t.strip()]
            except pg_parser.ParseError as err:
                texts, problem = [], f"cannot split the statements: {err}"
            else:
                # sqlglot only ever adds refusals: over its size bound it is not asked (see
                # crosscheck.MAX_SIZE), and the libpg_query analysis alone decides.
                problem = crosscheck.check(texts, analysis.units, whole=len(sql))
            if problem is not None:
                return verdicts.blocked_unparseable(problem, fingerprint), None, False
        known = dataclasses.replace(
            ctx.names,
            prepared=set(ctx.names.prepared),
            cursors=set(ctx.names.cursors),
            table_columns=ctx.columns,
        )
        decision, refs = verdicts.decide(self.policy, analysis, known=known, fingerprint=fingerprint)
        decision, template = self._rewrite(sql, decision, refs, ctx)
        if decision.verdict in {"allow", "mask"} or self.policy.mode == "dry-run":
            self._apply_effects(analysis, ctx)
        masked = self.policy.masked_tables
        stateful = any(
            u.names_used
            or u.names_defined
            or u.names_dropped
            or u.settings
            # `t.x` in a write to a masked table: a column or a function, by this database's catalog
            or (u.qualified_refs and any(t.rel in masked for t in u.targets))
            for u in analysis.units
        )
        cacheable = analysis.error is None and not analysis.literal_sensitive and not stateful
        return decision, template, cacheable

    def _analyze(self, sql: str, ctx: SessionContext) -> analyze.Analysis:
        if self.functions is None:
            return analyze.analyze(sql, search_path=ctx.search_path)
        return analyze.analyze(sql, search_path=ctx.search_path, functions=self.functions)

    def _rewrite(
        self, sql: str, decision: verdicts.Decision, refs: list[analyze.ReadRef], ctx: SessionContext
    ) -> tuple[verdicts.Decision, mask.Template | None]:
        if not refs or decision.verdict not in {"mask", "approve"}:
            return decision, None
        try:
            rewritten, template = mask.rewrite(sql, refs, self.policy, ctx.columns, ctx.masking_views)
        except mask.RewriteError as err:
            return _unprovable(decision, err), None
        return dataclasses.replace(decision, rewritten=rewritten), template

    def _with_rewrite(
        self, sql: str, ctx: SessionContext, cached: verdicts.Decision
    ) -> tuple[verdicts.Decision, mask.Template | None]:
        analysis = self._analyze(sql, ctx)
        refs = [
            ref for unit in analysis.units for ref in unit.read_refs if ref.rel in self.policy.masked_tables
        ]
        return self._rewrite(sql, cached, refs, ctx)

    def _apply_effects(self, analysis: analyze.Analysis, ctx: SessionContext) -> None:
        for unit in analysis.units:
            ctx.names.apply(unit)
            for setting in unit.settings:
                if setting.local:
                    continue  # SET LOCAL ends with the transaction; resolution falls back to the session value
                if setting.name == "*" or (setting.name == "search_path" and setting.value is None):
                    ctx.search_path = DEFAULT_SEARCH_PATH
                elif setting.name == "search_path" and setting.value not in (None, "?"):
                    schemas = tuple(
                        s
                        for s in (p.strip() for p in setting.value.split(","))
                        if s and s not in {"$user", "pg_catalog"}
                    )
                    ctx.search_path = schemas or DEFAULT_SEARCH_PATH
