"""Masking by source rewrite: every read of a masked table becomes a masking subquery.

A reference such as `FROM customers c` is replaced in the query text by

    (SELECT m.* FROM ONLY public.customers AS src
       CROSS JOIN LATERAL jsonb_populate_record(src, jsonb_build_object('ssn', <mask>)) AS m) c

so the masked value is the only value the rest of the query can see: aliases, expressions,
casts, aggregates, whole-row references, set operations, sub-queries, CTEs, WHERE and ORDER
BY oracles, `INSERT ... SELECT` and `COPY (query)` all operate on masked data, and a cast
error can only echo a masked value. `jsonb_populate_record` keeps every other column and the
table's row type exactly, without needing the catalog. Mask expressions keep the value's
length (so varchar(n) and char(n) still fit) and yield NULL for non-text columns, which is
valid for every type.

When the session knows the table's columns (the proxy reads them from the catalog at login),
the subquery names them instead:

    (SELECT src.id, src.name, (jsonb_populate_record(src, jsonb_build_object('ssn', <mask>))).ssn
       AS ssn FROM ONLY public.customers AS src) c

The masked column keeps its type the same way, and every other column is a plain column of the
table, so PostgreSQL flattens the subquery: a `WHERE id = 5` uses the index on `id` instead of
masking every row of the table first (which the form above makes it do).

With minted credentials (docs/credentials.md) the workload's role may not read a masked
table's masked columns, and ``jsonb_populate_record(src, ...)`` needs the whole row: there the
rewrite reads the table through the operator's masking view instead (``views``: table → view
name in schema ``dbgov_masked``), which applies the same masks already:

    (SELECT src.id, src.name, (jsonb_populate_record(NULL::public.customers,
       jsonb_build_object('ssn', src.ssn))).ssn AS ssn FROM dbgov_masked."<view>" AS src) c

The view returns masked columns as text; ``jsonb_populate_record`` over a NULL of the table's
row type turns them back into the column's type (NULL where the mask yields NULL), exactly as
the default form does, so both modes return the same values and types. A row type needs no
privilege on the table. ONLY cannot be honoured through a view (it reads the descendants too),
so ``FROM ONLY t`` of a masked table with descendants is refused in this mode.

Splicing works on UTF-8 bytes because libpg_query reports byte offsets.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import json
from collections.abc import Mapping, Sequence

from pglast import parser as pg_parser

from dbgov_policy import analyze, model

TEXT_TYPES = "ARRAY['text','character varying','character','name','citext']::pg_catalog.text[]"
SRC = "__dbgov_src"
OUT = "__dbgov_m"
VIEW_SCHEMA = "dbgov_masked"
"""The operator's schema of masking views (``dbgov_operator.grants.MASKED_SCHEMA``)."""


class RewriteError(ValueError):
    """The query text could not be rewritten safely (→ block)."""


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _hmac_pads(key: str) -> tuple[str, str]:
    raw = key.encode()
    if len(raw) > 64:
        raw = hashlib.sha256(raw).digest()
    raw = raw.ljust(64, b"\0")
    ipad = bytes(b ^ 0x36 for b in raw).hex()
    opad = bytes(b ^ 0x5C for b in raw).hex()
    return ipad, opad


def _op(left: str, op: str, right: str) -> str:
    return f"{left} OPERATOR(pg_catalog.{op}) {right}"


def mask_expression(mask: model.Mask, column_sql: str, *, key: str) -> str:
    """SQL for the masked value of `column_sql`, as text or NULL.

    Every function, operator and type is schema-qualified: a session whose search_path puts a
    schema before pg_catalog must not be able to swap in its own `repeat` or `||`.
    """
    c = f"{column_sql}::pg_catalog.text"
    n = f"pg_catalog.char_length({c})"
    stars = "pg_catalog.repeat('*', {})".format
    if mask.strategy == "null":
        return "NULL"
    if mask.strategy == "redact":
        body = stars(n)
    elif mask.strategy == "email":
        at = f"pg_catalog.strpos({c}, '@')"
        kept = _op(stars(_op(at, "-", "1")), "||", f"pg_catalog.substr({c}, {at})")
        body = f"CASE WHEN {_op(at, '>', '0')} THEN {kept} ELSE {stars(n)} END"
    elif mask.strategy == "partial":
        k = mask.keep_last
        kept = _op(stars(_op(n, "-", str(k))), "||", f"pg_catalog.right({c}, {k})")
        body = f"CASE WHEN {_op(n, '>', str(k))} THEN {kept} ELSE {stars(n)} END"
    else:  # hash: HMAC-SHA256 with the deployment's key, hex, cut to the value's length
        if not key:
            # Keyless, the hash of a low-entropy value (an SSN, a phone number) is reversed
            # offline by hashing every candidate: refuse rather than mask reversibly.
            raise RewriteError(
                f"the hash mask of {mask.table}.{mask.column} has no key: set DBGOV_MASK_KEY "
                "(in a cluster the operator's masking views hash with its key instead)"
            )
        ipad, opad = _hmac_pads(key)
        data = f"pg_catalog.convert_to({c}, 'UTF8')"
        ipad_sql = "E'\\\\x" + ipad + "'::pg_catalog.bytea"
        opad_sql = "E'\\\\x" + opad + "'::pg_catalog.bytea"
        inner = f"pg_catalog.sha256({_op(ipad_sql, '||', data)})"
        outer = f"pg_catalog.sha256({_op(opad_sql, '||', inner)})"
        body = f"pg_catalog.left(pg_catalog.encode({outer}, 'hex'), GREATEST({n}, 1))"
    is_text = _op(f"pg_catalog.pg_typeof({column_sql})::pg_catalog.text", "=", f"ANY ({TEXT_TYPES})")
    return f"CASE WHEN {is_text} THEN {body} END"


def mask_text(mask: model.Mask, text: str, *, key: str) -> str | None:
    """What ``mask_expression`` makes of a text value, computed here: for masking a value the
    proxy finds unmasked in a result (defense in depth), identical to the database's output."""
    n = len(text)  # char_length: characters, as PostgreSQL counts them
    if mask.strategy == "null":
        return None
    if mask.strategy == "email":
        at = text.find("@")
        return "*" * at + text[at:] if at >= 0 else "*" * n
    if mask.strategy == "partial":
        k = mask.keep_last
        return "*" * (n - k) + (text[n - k :] if k > 0 else "") if n > k else "*" * n
    if mask.strategy == "hash":
        if not key:  # never a keyless (reversible) hash: NULL, as a failed mask
            return None
        digest = hmac.new(key.encode(), text.encode(), hashlib.sha256).hexdigest()
        return digest[: max(n, 1)]
    return "*" * n  # redact


def masking_subquery(
    rel: model.QualifiedName,
    masks: Sequence[model.Mask],
    *,
    only: bool,
    key: str,
    columns: Sequence[str] | None = None,
    view: str | None = None,
) -> str:
    """The subquery that stands for ``rel``; ``columns``, the table's columns in order when the
    catalog is known, make it one PostgreSQL flattens (see the module docstring); ``view``, the
    name of ``rel``'s masking view in ``dbgov_masked``, reads that instead of the table."""
    if view is not None:
        return view_subquery(rel, masks, view=view, columns=columns)
    source = f"{'ONLY ' if only else ''}{quote_ident(rel.schema)}.{quote_ident(rel.name)}"
    masked = {m.column: m for m in masks}
    if columns is not None and masked.keys() <= set(columns):
        fields = []
        for column in columns:
            mask = masked.get(column)
            if mask is None:
                fields.append(f"{SRC}.{quote_ident(column)}")
                continue
            value = mask_expression(mask, f"{SRC}.{quote_ident(column)}", key=key)
            record = f"pg_catalog.jsonb_populate_record({SRC}, pg_catalog.jsonb_build_object({quote_literal(column)}, {value}))"
            fields.append(f"({record}).{quote_ident(column)} AS {quote_ident(column)}")
        return f"(SELECT {', '.join(fields)} FROM {source} AS {SRC})"
    pairs = ", ".join(
        f"{quote_literal(m.column)}, {mask_expression(m, f'{SRC}.{quote_ident(m.column)}', key=key)}"
        for m in masks
    )
    return (
        f"(SELECT {OUT}.* FROM {source} AS {SRC} CROSS JOIN LATERAL "
        f"pg_catalog.jsonb_populate_record({SRC}, pg_catalog.jsonb_build_object({pairs})) AS {OUT})"
    )


def view_subquery(
    rel: model.QualifiedName, masks: Sequence[model.Mask], *, view: str, columns: Sequence[str] | None
) -> str:
    """The subquery that stands for ``rel`` read through its masking view ``view`` (the view has
    masked the values already; they only get their column's type back)."""
    source = f"{quote_ident(VIEW_SCHEMA)}.{quote_ident(view)}"
    row_type = f"NULL::{quote_ident(rel.schema)}.{quote_ident(rel.name)}"
    masked = {m.column for m in masks}
    if columns is not None and masked <= set(columns):
        fields = []
        for column in columns:
            value = f"{SRC}.{quote_ident(column)}"
            if column in masked:
                record = f"pg_catalog.jsonb_populate_record({row_type}, pg_catalog.jsonb_build_object({quote_literal(column)}, {value}))"
                value = f"({record}).{quote_ident(column)} AS {quote_ident(column)}"
            fields.append(value)
        return f"(SELECT {', '.join(fields)} FROM {source} AS {SRC})"
    return (
        f"(SELECT {OUT}.* FROM {source} AS {SRC} CROSS JOIN LATERAL "
        f"pg_catalog.jsonb_populate_record({row_type}, pg_catalog.to_jsonb({SRC})) AS {OUT})"
    )


def _code_tokens(sql: str) -> list[pg_parser.Token]:
    """Scanner tokens without comments, with byte offsets (pglast's scan counts characters)."""
    tokens = [t for t in pg_parser.scan(sql) if t.name not in {"C_COMMENT", "SQL_COMMENT"}]
    if sql.isascii():
        return tokens
    offsets = [0]
    for ch in sql:
        offsets.append(offsets[-1] + len(ch.encode()))
    return [t._replace(start=offsets[t.start], end=offsets[t.end + 1] - 1) for t in tokens]


def _skip_uescape(tokens: Sequence[pg_parser.Token], k: int) -> int:
    """The last token of the identifier at `k`: a U&"..." name may carry `UESCAPE 'c'`."""
    if k + 2 < len(tokens) and tokens[k + 1].name == "UESCAPE":
        return k + 2
    return k


def _name_span(tokens: Sequence[pg_parser.Token], idx: int, *, with_columns: bool) -> tuple[int, int]:
    """Byte span [start, end) of the relation name at token `idx`, with ONLY and parentheses."""
    parens, j = 0, idx - 1
    while j >= 0 and tokens[j].name == "ASCII_40":  # '('
        parens += 1
        j -= 1
    if j >= 0 and tokens[j].name == "ONLY":
        start = tokens[j].start
    else:
        start, parens = tokens[idx].start, 0
    k = _skip_uescape(tokens, idx)
    while k + 2 < len(tokens) and tokens[k + 1].name == "ASCII_46":  # '.'
        k = _skip_uescape(tokens, k + 2)
    end = tokens[k].end + 1
    for _ in range(parens):
        k += 1
        if k >= len(tokens) or tokens[k].name != "ASCII_41":  # ')'
            raise RewriteError("unbalanced parentheses around a relation name")
        end = tokens[k].end + 1
    if parens == 0 and k + 1 < len(tokens) and tokens[k + 1].name == "ASCII_42":  # `name *`
        k += 1
        end = tokens[k].end + 1
    if with_columns and k + 1 < len(tokens) and tokens[k + 1].name == "ASCII_40":
        depth = 0
        for m in range(k + 1, len(tokens)):
            if tokens[m].name == "ASCII_40":
                depth += 1
            elif tokens[m].name == "ASCII_41":
                depth -= 1
                if depth == 0:
                    end = tokens[m].end + 1
                    break
    return start, end


def _sample_span(tokens: Sequence[pg_parser.Token], idx: int, end: int) -> tuple[int, int] | None:
    """The byte span of a TABLESAMPLE clause following the relation name at token ``idx`` that
    ends at byte ``end`` (after its alias and column aliases, if any), or None."""
    k = next((i for i in range(idx, len(tokens)) if tokens[i].start >= end), len(tokens))
    if k < len(tokens) and tokens[k].name == "AS":
        k += 1
    if k < len(tokens) and tokens[k].name not in ("TABLESAMPLE", "ASCII_40", "ASCII_44", "ASCII_41"):
        k += 1  # the alias
    k = _after_parens(tokens, k)
    if k >= len(tokens) or tokens[k].name != "TABLESAMPLE":
        return None
    start = tokens[k].start
    k = _after_parens(tokens, k + 2)  # TABLESAMPLE method ( args )
    if k < len(tokens) and tokens[k].name == "REPEATABLE":
        k = _after_parens(tokens, k + 1)
    return start, tokens[k - 1].end + 1


def _after_parens(tokens: Sequence[pg_parser.Token], k: int) -> int:
    """The index after a balanced parenthesised group starting at ``k`` (``k`` if none)."""
    if k >= len(tokens) or tokens[k].name != "ASCII_40":
        return k
    depth = 0
    for m in range(k, len(tokens)):
        if tokens[m].name == "ASCII_40":
            depth += 1
        elif tokens[m].name == "ASCII_41":
            depth -= 1
            if depth == 0:
                return m + 1
    raise RewriteError("unbalanced parentheses after a relation name")


@dataclasses.dataclass(frozen=True, slots=True)
class Template:
    """Where one statement shape's masked references sit, by position in its token stream.

    Two texts with the same normalized form and the same sequence of token kinds differ only in
    the spelling of their constants, so the references sit at the same token positions and the
    rewrite can be spliced without analyzing the text again.
    """

    token_names: tuple[str, ...]
    slots: tuple[tuple[int, analyze.ReadRef], ...]


Columns = Mapping[model.QualifiedName, tuple[str, ...]]
"""The known columns of tables, in order (from the catalog)."""


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Views:
    """Masked tables read through the operator's masking views (minted credentials)."""

    names: Mapping[model.QualifiedName, str]
    """Masked table → the name of its view in ``dbgov_masked`` (``""``: the role may read
    several, one per policy, and none is known to apply every mask; reads are refused)."""
    inherited: frozenset[model.QualifiedName] = frozenset()
    """Tables with descendants: ``ONLY`` of one cannot be read through its view."""
    masked: Mapping[model.QualifiedName, frozenset[str]] = dataclasses.field(default_factory=dict)
    """Masked table → the columns its view computes rather than passes through (what it masks),
    from the view's definition (``view_masked_columns``): the policy's masked columns must all
    be among them, or the view would return a column raw that the policy masks."""


def view_masked_columns(definition: str) -> frozenset[str] | None:
    """The output columns of a view's query (``pg_get_viewdef``) that are not a table column
    passed through under its own name: the ones the view computes (masks). None when the text
    is not one plain SELECT (nothing is then trusted to be masked)."""
    try:
        tree = json.loads(pg_parser.parse_sql_json(definition))
        (stmt,) = tree["stmts"]
        targets = stmt["stmt"]["SelectStmt"]["targetList"]
    except (pg_parser.ParseError, ValueError, KeyError, TypeError):
        return None
    computed = set()
    for target in targets:
        res = target.get("ResTarget", {})
        ref = res.get("val", {}).get("ColumnRef")
        last = (ref or {}).get("fields", [{}])[-1].get("String", {}).get("sval")
        name = res.get("name") or last
        if name is None:
            return None
        if ref is None or last != name:
            computed.add(name)
    return frozenset(computed)


def rewrite(
    sql: str,
    refs: Sequence[analyze.ReadRef],
    policy: model.CompiledPolicy,
    columns: Columns | None = None,
    views: Views | None = None,
) -> tuple[str, Template]:
    """`sql` with every masked-table reference in `refs` replaced by its masking subquery
    (reading the table's masking view when ``views`` is given)."""
    tokens = _code_tokens(sql)
    starts = {t.start: i for i, t in enumerate(tokens)}
    slots: list[tuple[int, analyze.ReadRef]] = []
    for ref in refs:
        if not policy.masks_for(ref.rel):
            continue
        if ref.location < 0:
            raise RewriteError(f"a read of {ref.rel} has no position in the query text")
        if ref.location not in starts:
            raise RewriteError(f"no token starts at byte {ref.location}")
        slots.append((starts[ref.location], ref))
    out_text = _splice(sql, tokens, slots, policy, columns, views=views)
    try:
        if len(pg_parser.split(out_text)) != len(pg_parser.split(sql)):
            raise RewriteError("the rewrite changed the number of statements")
    except pg_parser.ParseError as err:
        raise RewriteError(f"the rewritten query does not parse: {err}") from err
    return out_text, Template(token_names=tuple(t.name for t in tokens), slots=tuple(slots))


def rewrite_like(
    sql: str,
    template: Template,
    policy: model.CompiledPolicy,
    columns: Columns | None = None,
    views: Views | None = None,
) -> str | None:
    """Rewrite `sql` at the template's positions; None when its tokens are not the same shape."""
    tokens = _code_tokens(sql)
    if tuple(t.name for t in tokens) != template.token_names:
        return None
    return _splice(sql, tokens, template.slots, policy, columns, views=views)


def _splice(
    sql: str,
    tokens: Sequence[pg_parser.Token],
    slots: Sequence[tuple[int, analyze.ReadRef]],
    policy: model.CompiledPolicy,
    columns: Columns | None = None,
    *,
    views: Views | None = None,
) -> str:
    data = sql.encode()
    splices: list[tuple[int, int, bytes]] = []
    for idx, ref in slots:
        known = None if columns is None else columns.get(ref.rel)
        view = _view_for(ref, views, policy.masks_for(ref.rel))
        sub = _subquery_for(ref.rel, policy.masks_for(ref.rel), ref.only, policy.mask_key, known, view=view)
        if ref.copy_columns is not None:
            cols = ", ".join(quote_ident(c) for c in ref.copy_columns) or "*"
            text = f"(SELECT {cols} FROM {sub} AS {quote_ident(ref.rel.name)})"
            start, end = _name_span(tokens, idx, with_columns=True)
        else:
            start, end = _name_span(tokens, idx, with_columns=False)
            sample = _sample_span(tokens, idx, end)
            if sample is not None and view is not None:
                raise RewriteError(
                    f"TABLESAMPLE of {ref.rel} cannot be applied through its masking view (a view "
                    "cannot be sampled); sample with a WHERE on random() instead"
                )
            if sample is not None:
                # `t TABLESAMPLE …` samples the table: the clause moves into the masking
                # subquery, onto the table itself, and the rows sampled are masked as any others.
                clause = data[sample[0] : sample[1]].decode()
                sub = sub.replace(f" AS {SRC}", f" AS {SRC} {clause}", 1)
                splices.append((sample[0], sample[1], b""))
            text = sub if ref.alias is not None else f"{sub} AS {quote_ident(ref.rel.name)}"
            first = idx - 1
            while first >= 0 and tokens[first].start >= start:
                first -= 1
            if first >= 0 and tokens[first].name == "TABLE":  # `TABLE x` takes a name, not a subquery
                start = tokens[first].start
                text = f"SELECT * FROM {sub} AS {quote_ident(ref.rel.name)}"
        splices.append((start, end, text.encode()))
    for start, end, replacement in sorted(splices, reverse=True):
        data = data[:start] + replacement + data[end:]
    return data.decode()


def _view_for(ref: analyze.ReadRef, views: Views | None, masks_of: Sequence[model.Mask] = ()) -> str | None:
    """The masking view ``ref`` is read through, in views mode (None: the table itself)."""
    if views is None:
        return None
    view = views.names.get(ref.rel)
    if view is None:
        # Fail closed: the minted role cannot read this table's masked columns, and reading its
        # unmasked ones through a form that needs the whole row would fail less clearly.
        raise RewriteError(
            f"{ref.rel} is masked but the database has no masking view of it this role may read "
            "(the operator has not created it yet, or the policy and the grants differ)"
        )
    if not view:
        raise RewriteError(
            f"the role may read several masking views of {ref.rel} (one per policy binding this "
            "workload), each applying only its own policy's masks: none is known to mask every "
            "column the policies mask together"
        )
    masks = {m.column for m in masks_of}
    unmasked = sorted(masks - views.masked.get(ref.rel, frozenset()))
    if unmasked:
        raise RewriteError(
            f"the masking view of {ref.rel} passes {', '.join(unmasked)} through unmasked, which "
            "the policy masks (the operator has not applied this policy to the database yet)"
        )
    if ref.only and ref.rel in views.inherited:
        raise RewriteError(
            f"ONLY {ref.rel} cannot be read through its masking view, which also returns the rows "
            "of its descendants; read it without ONLY"
        )
    return view


@functools.lru_cache(maxsize=256)
def _subquery_for(
    rel: model.QualifiedName,
    masks: tuple[model.Mask, ...],
    only: bool,
    key: str,
    columns: tuple[str, ...] | None,
    *,
    view: str | None = None,
) -> str:
    return masking_subquery(rel, masks, only=only, key=key, columns=columns, view=view)
