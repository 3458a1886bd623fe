"""Policy document → `CompiledPolicy`, or every problem with its field path.

The local policy file is exactly the `spec` of a DatabaseAccessPolicy, so the same function
serves `dbgov check`, the sidecar and the operator's validating webhook. It never stops at
the first problem: a person fixing a policy wants the whole list at once.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import yaml

from dbgov_policy import classes, model, names

if TYPE_CHECKING:  # compose decides with engines, whose decide module imports this one
    from dbgov_policy import compose

SPEC_FIELDS = frozenset({"mode", "default", "rules", "guardrails", "masks", "authentication"})
#: Fields of a DatabaseAccessPolicy spec that the operator reads; accepted and not judged here.
CLUSTER_FIELDS = frozenset({"subjects", "databaseRef", "credentials", "audit", "description"})
RULE_FIELDS = frozenset({"name", "verdict", "statements", "tables", "subjects", "description"})
RULE_SUBJECT_FIELDS = frozenset({"users", "issuers", "claims"})
AUTHENTICATION_FIELDS = frozenset({"jwt"})
JWT_FIELDS = frozenset({"issuers"})
ISSUER_FIELDS = frozenset(
    {
        *("issuer", "audiences", "algorithms", "jwksUri", "discovery", "publicKeys", "secretFile"),
        *("claims", "leewaySeconds", "caFile", "allowHttp", "cacheSeconds", "refreshCooldownSeconds"),
    }
)
#: An issuer's key sources; exactly one is given.
KEY_SOURCES = ("jwksUri", "discovery", "publicKeys", "secretFile")
GUARDRAIL_FIELDS = frozenset(
    {
        "requireWhere",
        "maxRowsAffected",
        "maxRowsReturned",
        "deniedFunctions",
        "allowedFunctions",
        "allowedSettings",
    }
)
MASK_FIELDS = frozenset({"table", "column", "strategy", "keepLast", "writable"})
REQUIRE_WHERE_CLASSES = frozenset({"update", "delete", "merge"})
#: Settings a policy may open up through `allowedSettings`; the engine tracks their effect.
GUARDED_SETTINGS = frozenset({"search_path"})


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One thing wrong with a policy document."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class PolicyInvalid(ValueError):
    """A policy document that cannot take effect; `problems` lists every reason."""

    def __init__(self, problems: Sequence[Problem], *, source: str = "policy") -> None:
        self.problems = tuple(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source} is invalid ({len(self.problems)} problem(s)):\n{lines}")


class _Collector:
    def __init__(self) -> None:
        self.problems: list[Problem] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path=path, message=message))


def load_policy_text(text: str, *, source: str = "policy", mask_key: str = "") -> model.CompiledPolicy:
    """Parse YAML (a spec, or a whole DatabaseAccessPolicy) and compile it."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PolicyInvalid([Problem(path="", message=f"not valid YAML: {err}")], source=source) from err
    return compile_policy(doc, source=source, mask_key=mask_key)


def compile_policy(doc: Any, *, source: str = "policy", mask_key: str = "") -> model.CompiledPolicy:
    """Check a policy document and compile it; raise `PolicyInvalid` listing every problem."""
    out = _Collector()
    spec, prefix = _unwrap(doc, out)
    if spec is None:
        raise PolicyInvalid(out.problems, source=source)
    _unknown_fields(spec, SPEC_FIELDS | CLUSTER_FIELDS, prefix.rstrip("."), out)
    mode = _choice(spec, "mode", allowed=model.MODES, default="enforce", prefix=prefix, out=out)
    default = _choice(spec, "default", allowed=model.VERDICTS, default="block", prefix=prefix, out=out)
    rules = _rules(spec.get("rules", []), f"{prefix}rules", out)
    guardrails = _guardrails(spec.get("guardrails", {}), f"{prefix}guardrails", out)
    masks = _masks(spec.get("masks", []), f"{prefix}masks", out)
    issuers = _authentication(spec.get("authentication", {}), f"{prefix}authentication", out)
    if out.problems:
        raise PolicyInvalid(out.problems, source=source)
    return model.CompiledPolicy(
        mode=cast(model.Mode, mode),
        default=cast(model.RuleVerdict, default),
        rules=rules,
        guardrails=guardrails,
        masks=masks,
        mask_key=mask_key,
        jwt_issuers=issuers,
    )


def compile_jwt_issuers(doc: Any, *, source: str = "issuers") -> tuple[model.JwtIssuer, ...]:
    """A stand-alone issuers document (``DBGOV_JWT_ISSUERS_FILE``): what a policy's
    ``authentication.jwt`` holds, ``{issuers: [...]}``; raise `PolicyInvalid` listing every problem."""
    out = _Collector()
    if not isinstance(doc, Mapping):
        out.add("", f"must be a mapping with an issuers list, got {_kind(doc)}")
        raise PolicyInvalid(out.problems, source=source)
    issuers = _jwt(doc, "", out)
    if out.problems:
        raise PolicyInvalid(out.problems, source=source)
    return issuers


def _authentication(value: Any, path: str, out: _Collector) -> tuple[model.JwtIssuer, ...]:
    if not isinstance(value, Mapping):
        out.add(path, f"must be a mapping, got {_kind(value)}")
        return ()
    _unknown_fields(value, AUTHENTICATION_FIELDS, path, out)
    jwt = value.get("jwt", {})
    if not isinstance(jwt, Mapping):
        out.add(f"{path}.jwt", f"must be a mapping, got {_kind(jwt)}")
        return ()
    return _jwt(jwt, f"{path}.jwt", out)


def _jwt(value: Mapping[str, Any], path: str, out: _Collector) -> tuple[model.JwtIssuer, ...]:
    _unknown_fields(value, JWT_FIELDS, path, out)
    ipath = f"{path}.issuers" if path else "issuers"
    issuers: list[model.JwtIssuer] = []
    seen: dict[str, int] = {}
    for i, entry_path, raw in _entries(
        value.get("issuers", []), ipath, what="issuer", fields=ISSUER_FIELDS, out=out
    ):
        issuer = _issuer(raw, entry_path, out)
        if issuer is None:
            continue
        if issuer.issuer in seen:
            out.add(f"{entry_path}.issuer", f"duplicate issuer (also issuers[{seen[issuer.issuer]}])")
            continue
        seen[issuer.issuer] = i
        issuers.append(issuer)
    return tuple(issuers)


def _issuer(raw: Mapping[str, Any], path: str, out: _Collector) -> model.JwtIssuer | None:
    before = len(out.problems)
    iss = raw.get("issuer")
    if not isinstance(iss, str) or not iss.strip():
        out.add(f"{path}.issuer", "required: the exact iss claim of the issuer's tokens")
        iss = ""
    audiences = [t for _, t in _str_list(raw.get("audiences"), f"{path}.audiences", out) or []]
    if "audiences" in raw and not audiences and isinstance(raw.get("audiences"), list):
        out.add(
            f"{path}.audiences", "must name at least one audience (tokens for other services are refused)"
        )
    algorithms = [t for _, t in _str_list(raw.get("algorithms"), f"{path}.algorithms", out) or []]
    sources = [k for k in KEY_SOURCES if k in raw and raw[k] not in (None, False)]
    if len(sources) != 1:
        given = f"got {', '.join(sources)}" if sources else "got none"
        out.add(path, f"needs exactly one key source of {', '.join(KEY_SOURCES)} ({given})")
    hmac = "secretFile" in sources
    for j, alg in enumerate(algorithms):
        apath = f"{path}.algorithms[{j}]"
        if alg.lower() == "none":
            out.add(apath, "alg none means unsigned tokens: never accepted")
        elif alg in model.JWT_HMAC and not hmac:
            out.add(
                apath,
                f"{alg} is a shared-secret algorithm: only with secretFile, never with public keys "
                "(a public key used as an HMAC secret lets anyone forge tokens)",
            )
        elif alg in model.JWT_ALGORITHMS and hmac:
            out.add(apath, f"{alg} needs public keys; secretFile only serves {', '.join(model.JWT_HMAC)}")
        elif alg not in model.JWT_ALGORITHMS and alg not in model.JWT_HMAC:
            out.add(
                apath, f"unknown algorithm; use one of {', '.join(model.JWT_ALGORITHMS + model.JWT_HMAC)}"
            )
    uri = raw.get("jwksUri")
    if uri is not None and (not isinstance(uri, str) or not uri.startswith(("https://", "http://"))):
        out.add(f"{path}.jwksUri", f"must be an https:// URL, got {uri!r}")
    discovery = raw.get("discovery", False)
    if not isinstance(discovery, bool):
        out.add(f"{path}.discovery", f"must be true or false, got {discovery!r}")
    elif discovery and not iss.startswith(("https://", "http://")):
        out.add(f"{path}.discovery", "OIDC discovery needs an issuer that is an https:// URL")
    keys = [t for _, t in _str_list(raw.get("publicKeys", []), f"{path}.publicKeys", out) or []]
    if "publicKeys" in raw and not keys and isinstance(raw.get("publicKeys"), list):
        out.add(f"{path}.publicKeys", "must hold at least one key (PEM, a PEM file path, or a JWK)")
    secret = raw.get("secretFile")
    if secret is not None and (not isinstance(secret, str) or not secret.strip()):
        out.add(f"{path}.secretFile", "must be the path of a file holding the HMAC secret")
    claims = [t for _, t in _str_list(raw.get("claims", []), f"{path}.claims", out) or []]
    numbers = {}
    for key, default in (("leewaySeconds", 30.0), ("cacheSeconds", 300.0), ("refreshCooldownSeconds", 30.0)):
        number = raw.get(key, default)
        if isinstance(number, bool) or not isinstance(number, int | float) or not 0 <= number <= 86400:
            out.add(f"{path}.{key}", f"must be a number of seconds from 0 to 86400, got {number!r}")
            number = default
        numbers[key] = float(number)
    for flag in ("allowHttp",):
        if not isinstance(raw.get(flag, False), bool):
            out.add(f"{path}.{flag}", f"must be true or false, got {raw.get(flag)!r}")
    ca = raw.get("caFile")
    if ca is not None and (not isinstance(ca, str) or not ca.strip()):
        out.add(f"{path}.caFile", "must be the path of a PEM CA bundle")
    if len(out.problems) > before:
        return None
    return model.JwtIssuer(
        issuer=iss,
        audiences=tuple(audiences),
        algorithms=tuple(algorithms),
        jwks_uri=uri,
        discovery=bool(discovery),
        public_keys=tuple(keys),
        secret_file=secret,
        claims=tuple(claims),
        leeway=numbers["leewaySeconds"],
        ca_file=ca,
        allow_http=bool(raw.get("allowHttp", False)),
        cache_seconds=numbers["cacheSeconds"],
        refresh_cooldown=numbers["refreshCooldownSeconds"],
    )


_NOBODY = model.Subjects(users=())
"""What an invalid ``subjects`` compiles to while the problems are collected (shadows nothing)."""


def _subjects(value: Any, path: str, out: _Collector) -> model.Subjects:
    if not isinstance(value, Mapping):
        out.add(path, f"must be a mapping of users, issuers and/or claims, got {_kind(value)}")
        return _NOBODY
    _unknown_fields(value, RULE_SUBJECT_FIELDS, path, out)
    if not value:
        out.add(path, "matches nobody: name users, issuers and/or claims, or omit subjects to match everyone")
        return _NOBODY
    users = (
        [t for _, t in _str_list(value["users"], f"{path}.users", out) or []] if "users" in value else None
    )
    issuers = (
        [t for _, t in _str_list(value["issuers"], f"{path}.issuers", out) or []]
        if "issuers" in value
        else None
    )
    claims: list[tuple[str, tuple[str, ...]]] = []
    raw_claims = value.get("claims", {})
    if not isinstance(raw_claims, Mapping):
        out.add(f"{path}.claims", f"must map a claim name to the values it may have, got {_kind(raw_claims)}")
    else:
        for name, wanted in raw_claims.items():
            cpath = f"{path}.claims.{name}"
            items = _str_list(wanted, cpath, out)
            if items is not None and not items:
                out.add(cpath, "an empty list matches nobody")
            claims.append((str(name), tuple(t for _, t in items or [])))
    for field, got in (("users", users), ("issuers", issuers)):
        if got is not None and not got:
            out.add(f"{path}.{field}", "an empty list matches nobody")
    return model.Subjects(
        users=None if users is None else tuple(users),
        issuers=None if issuers is None else tuple(issuers),
        claims=tuple(sorted(claims)),
    )


def _unwrap(doc: Any, out: _Collector) -> tuple[Mapping[str, Any] | None, str]:
    if doc is None:
        doc = {}
    if not isinstance(doc, Mapping):
        out.add("", f"a policy must be a mapping, got {_kind(doc)}")
        return None, ""
    if "apiVersion" in doc or "kind" in doc:
        if doc.get("kind") != "DatabaseAccessPolicy":
            out.add("kind", f"expected DatabaseAccessPolicy, got {doc.get('kind')!r}")
        api = str(doc.get("apiVersion", ""))
        if not api.startswith("dbgov.io/"):
            out.add("apiVersion", f"expected dbgov.io/v1alpha1, got {api!r}")
        spec = doc.get("spec")
        if not isinstance(spec, Mapping):
            out.add("spec", f"must be a mapping, got {_kind(spec)}")
            return None, "spec."
        return spec, "spec."
    return doc, ""


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__


def _unknown_fields(obj: Mapping[str, Any], known: frozenset[str], path: str, out: _Collector) -> None:
    for key in obj:
        if key not in known:
            hint = difflib.get_close_matches(str(key), sorted(known), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else f"; known fields: {', '.join(sorted(known))}"
            out.add(f"{path}.{key}" if path else str(key), f"unknown field{extra}")


def _choice(
    obj: Mapping[str, Any],
    key: str,
    *,
    allowed: Sequence[str],
    default: str,
    prefix: str,
    out: _Collector,
) -> str:
    value = obj.get(key, default)
    if value not in allowed:
        out.add(f"{prefix}{key}", f"must be one of {', '.join(allowed)}, got {value!r}")
        return default
    return str(value)


def _str_list(value: Any, path: str, out: _Collector) -> list[tuple[str, str]] | None:
    """A list of strings as (item path, text) pairs, or None after reporting a problem."""
    if not isinstance(value, list):
        out.add(path, f"must be a list, got {_kind(value)}")
        return None
    items: list[tuple[str, str]] = []
    for i, item in enumerate(value):
        if not isinstance(item, str) or not item.strip():
            out.add(f"{path}[{i}]", f"must be a non-empty string, got {item!r}")
        else:
            items.append((f"{path}[{i}]", item.strip()))
    return items


def _statement_classes(value: Any, path: str, out: _Collector) -> frozenset[str] | None:
    items = _str_list(value, path, out)
    if items is None:
        return None
    result: set[str] = set()
    for item_path, text in items:
        name = classes.ALIASES.get(text.lower(), text.lower())
        if name not in classes.ALL:
            hint = difflib.get_close_matches(name, sorted(classes.ALL), n=1)
            extra = f"; did you mean {hint[0]!r}?" if hint else ""
            out.add(item_path, f"unknown statement class {text!r}{extra}")
        else:
            result.add(name)
    if not items:
        out.add(
            path,
            "an empty list matches no statement, so the rule can never match; omit it to match every class",
        )
    return frozenset(result)


def _table_patterns(value: Any, path: str, out: _Collector) -> tuple[model.TablePattern, ...] | None:
    items = _str_list(value, path, out)
    if items is None:
        return None
    patterns = []
    for item_path, text in items:
        try:
            schema, name = names.parse_qualified(text)
        except ValueError as err:
            out.add(item_path, str(err))
            continue
        patterns.append(model.TablePattern(schema=schema or "public", name=name, text=text))
    if not items:
        out.add(path, "an empty list covers no relation; omit it to cover every relation")
    return tuple(patterns)


def _entries(
    value: Any, path: str, *, what: str, fields: frozenset[str], out: _Collector
) -> Iterator[tuple[int, str, Mapping[str, Any]]]:
    """The mappings of a list field (index, path, entry), reporting what is not one."""
    if not isinstance(value, list):
        out.add(path, f"must be a list of {what}s, got {_kind(value)}")
        return
    for i, raw in enumerate(value):
        if not isinstance(raw, Mapping):
            out.add(f"{path}[{i}]", f"a {what} must be a mapping, got {_kind(raw)}")
            continue
        _unknown_fields(raw, fields, f"{path}[{i}]", out)
        yield i, f"{path}[{i}]", raw


def _rules(value: Any, path: str, out: _Collector) -> tuple[model.Rule, ...]:
    rules: list[model.Rule] = []
    seen: dict[str, int] = {}
    for i, rpath, raw in _entries(value, path, what="rule", fields=RULE_FIELDS, out=out):
        name = raw.get("name")
        if not isinstance(name, str) or not name.strip():
            out.add(f"{rpath}.name", "every rule needs a name (it is what audit events and errors cite)")
            name = f"rules[{i}]"
        elif name in seen:
            out.add(f"{rpath}.name", f"duplicate rule name {name!r} (also rules[{seen[name]}])")
        seen.setdefault(name, i)
        if "verdict" not in raw:
            out.add(f"{rpath}.verdict", "required: allow, approve or block")
        verdict = _choice(
            raw, "verdict", allowed=model.VERDICTS, default="block", prefix=f"{rpath}.", out=out
        )
        stmts = (
            _statement_classes(raw["statements"], f"{rpath}.statements", out) if "statements" in raw else None
        )
        tables = _table_patterns(raw["tables"], f"{rpath}.tables", out) if "tables" in raw else None
        subjects = _subjects(raw["subjects"], f"{rpath}.subjects", out) if "subjects" in raw else None
        rule = model.Rule(
            name=name,
            verdict=cast(model.RuleVerdict, verdict),
            statements=stmts,
            tables=tables,
            subjects=subjects,
        )
        for j, earlier in enumerate(rules):
            if _shadows(earlier, rule):
                out.add(
                    rpath,
                    f"rule {name!r} can never match: rules[{j}] ({earlier.name!r}) comes first "
                    "and covers every statement it would",
                )
                break
        rules.append(rule)
    return tuple(rules)


def _fine_to_coarse() -> dict[str, frozenset[str]]:
    mapping: dict[str, set[str]] = {}
    for c in classes.NODE_CLASSES.values():
        mapping.setdefault(c.fine, set()).add(c.coarse)
    extra = {
        "revoke": "dcl",
        "commit": "tcl",
        "rollback": "tcl",
        "savepoint": "tcl",
        "release": "tcl",
        "prepare-transaction": "tcl",
        "commit-prepared": "tcl",
        "rollback-prepared": "tcl",
        "reset": "session",
        "analyze": "utility",
        "move": "utility",
        "select-into": "ddl",
        "copy-from": "copy",
        "select-for-update": "update",
    }
    for fine, coarse in extra.items():
        mapping.setdefault(fine, set()).add(coarse)
    return {fine: frozenset(coarse) for fine, coarse in mapping.items()}


#: Fine class → the coarse classes it belongs to (create/alter/drop are both ddl and dcl).
FINE_TO_COARSE = _fine_to_coarse()


WRITE_CLASSES = frozenset(
    {"insert", "update", "delete", "merge", "truncate", "copy-from", "select-for-update"}
)
"""Statement classes that always write or row-lock a relation."""


def writes_only(statements: frozenset[str] | None) -> bool:
    """Whether a rule is about writes only (``[insert, update, delete]``): its tables are then
    the ones written (or row-locked), and every statement it covers touches a relation."""
    return statements is not None and statements <= WRITE_CLASSES


def _shadows(earlier: model.Rule, later: model.Rule) -> bool:
    """True when every statement `later` covers is already covered by `earlier` (for every
    session `later` applies to)."""
    if earlier.subjects is not None and earlier.subjects != later.subjects:
        return False
    if earlier.verdict == "allow" and later.verdict != "allow" and earlier.tables is not None:
        # A block or approve rule decides any statement touching one of its tables: joining
        # a table outside the earlier allow's takes the statement past it. (What a statement
        # does besides its class, a user function's call, also passes an earlier allow without
        # tables; a rule left only those is still reported: it is a misordering.)
        return False
    if earlier.statements is not None:
        if later.statements is None:
            return False
        for cls in later.statements:
            parents = FINE_TO_COARSE.get(cls, frozenset())
            if cls not in earlier.statements and not (parents and parents <= earlier.statements):
                return False
    if earlier.tables is not None:
        if later.tables is None:
            return False
        # A statement on no table at all (SELECT 1) escapes an earlier block with tables, where
        # the later allow's classes allow such statements.
        if earlier.verdict != "allow" and later.verdict == "allow" and not writes_only(later.statements):
            return False
        for pattern in later.tables:
            if not any(
                model.TablePattern.matches(e, model.QualifiedName(schema=pattern.schema, name=pattern.name))
                for e in earlier.tables
            ):
                return False
    return True


def _positive_int(value: Any, path: str, out: _Collector) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        out.add(path, f"must be a whole number ≥ 1, got {value!r}")
        return None
    return value


def _function_names(value: Any, path: str, out: _Collector) -> frozenset[str]:
    items = _str_list(value, path, out) or []
    result = set()
    for item_path, text in items:
        try:
            schema, name = names.parse_qualified(text)
        except ValueError as err:
            out.add(item_path, str(err))
            continue
        result.add(f"{schema}.{name}" if schema else name)
    return frozenset(result)


def _guardrails(value: Any, path: str, out: _Collector) -> model.Guardrails:
    if not isinstance(value, Mapping):
        out.add(path, f"must be a mapping, got {_kind(value)}")
        return model.Guardrails()
    _unknown_fields(value, GUARDRAIL_FIELDS, path, out)
    require: set[str] = set()
    for item_path, text in _str_list(value.get("requireWhere", []), f"{path}.requireWhere", out) or []:
        if text.lower() not in REQUIRE_WHERE_CLASSES:
            out.add(item_path, f"requireWhere applies to update, delete and merge, not {text!r}")
        else:
            require.add(text.lower())
    settings: dict[str, frozenset[str]] = {}
    raw_settings = value.get("allowedSettings", {})
    if not isinstance(raw_settings, Mapping):
        out.add(
            f"{path}.allowedSettings",
            f"must map a setting to its allowed values, got {_kind(raw_settings)}",
        )
    else:
        for key, vals in raw_settings.items():
            spath = f"{path}.allowedSettings.{key}"
            if str(key).lower() not in GUARDED_SETTINGS:
                out.add(
                    spath,
                    f"only {', '.join(sorted(GUARDED_SETTINGS))} can be opened up; other guarded settings stay refused",
                )
                continue
            items = _str_list(vals, spath, out) or []
            settings[str(key).lower()] = frozenset(names.normalize_setting_value(t) for _, t in items)
    return model.Guardrails(
        require_where=frozenset(require),
        max_rows_affected=_positive_int(value.get("maxRowsAffected"), f"{path}.maxRowsAffected", out),
        max_rows_returned=_positive_int(value.get("maxRowsReturned"), f"{path}.maxRowsReturned", out),
        denied_functions=_function_names(value.get("deniedFunctions", []), f"{path}.deniedFunctions", out),
        allowed_functions=_function_names(value.get("allowedFunctions", []), f"{path}.allowedFunctions", out),
        allowed_settings=settings,
    )


def _masks(value: Any, path: str, out: _Collector) -> tuple[model.Mask, ...]:
    masks: list[model.Mask] = []
    seen: dict[tuple[model.QualifiedName, str], int] = {}
    for i, mpath, raw in _entries(value, path, what="mask", fields=MASK_FIELDS, out=out):
        table = raw.get("table")
        column = raw.get("column")
        qname: model.QualifiedName | None = None
        if not isinstance(table, str) or not table.strip():
            out.add(f"{mpath}.table", "required: the table holding the column, e.g. public.customers")
        else:
            try:
                schema, name = names.parse_qualified(table)
            except ValueError as err:
                out.add(f"{mpath}.table", str(err))
            else:
                if any(ch in f"{schema or ''}{name}" for ch in "*?"):
                    out.add(f"{mpath}.table", "masks name one table; wildcards are not allowed")
                qname = model.QualifiedName(schema=schema or "public", name=name)
        col: str | None = None
        if not isinstance(column, str) or not column.strip():
            out.add(f"{mpath}.column", "required: the column to mask")
        else:
            try:
                col = names.parse_identifier(column)
            except ValueError as err:
                out.add(f"{mpath}.column", str(err))
        strategy = _choice(
            raw, "strategy", allowed=model.STRATEGIES, default="redact", prefix=f"{mpath}.", out=out
        )
        if "strategy" not in raw:
            out.add(f"{mpath}.strategy", f"required: one of {', '.join(model.STRATEGIES)}")
        keep_last = raw.get("keepLast", 4)
        if "keepLast" in raw and strategy != "partial":
            out.add(f"{mpath}.keepLast", "only the partial strategy keeps characters")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or not 0 <= keep_last <= 64:
            out.add(f"{mpath}.keepLast", f"must be a whole number from 0 to 64, got {keep_last!r}")
            keep_last = 4
        writable = raw.get("writable", False)
        if not isinstance(writable, bool):
            out.add(f"{mpath}.writable", f"must be true or false, got {writable!r}")
            writable = False
        if qname is None or col is None:
            continue
        key = (qname, col)
        if key in seen:
            out.add(mpath, f"{qname}.{col} is already masked by masks[{seen[key]}]")
            continue
        seen[key] = i
        masks.append(
            model.Mask(
                table=qname,
                column=col,
                strategy=cast(model.Strategy, strategy),
                keep_last=keep_last,
                writable=writable,
            )
        )
    return tuple(masks)


def merge_specs(specs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Combine the specs of several policies that bind one workload into one spec.

    Superseded by composition (`bundle_document`, `compile_components`, `compose`): a merged
    rule list lets the policy sorted first override the others. Kept for callers that want one
    spec for reading; the operator no longer ships it.

    Rules are concatenated in the order given (callers sort by policy name) with their names
    prefixed by the policy's, so the first matching rule across all policies decides. What
    protects is united: masks, denied functions and requireWhere; the tighter row limit wins;
    the strictest default wins; any policy in `enforce` mode makes the merge enforce.
    """
    merged: dict[str, Any] = {
        "mode": "dry-run" if specs else "enforce",
        "default": "allow",
        "rules": [],
        "masks": [],
    }
    guard: dict[str, Any] = {}
    seen_masks: set[tuple[str, str]] = set()
    for policy_name, spec in specs:
        if spec.get("mode", "enforce") == "enforce":
            merged["mode"] = "enforce"
        default = spec.get("default", "block")
        if model.STRICTNESS.get(default, 3) > model.STRICTNESS.get(merged["default"], 3):
            merged["default"] = default
        for rule in spec.get("rules", []) or []:
            merged["rules"].append({**rule, "name": f"{policy_name}/{rule.get('name', '?')}"})
        for issuer in ((spec.get("authentication") or {}).get("jwt") or {}).get("issuers") or []:
            issuers = merged.setdefault("authentication", {"jwt": {"issuers": []}})["jwt"]["issuers"]
            if all(issuer != known for known in issuers):
                issuers.append(dict(issuer))
        for mask in spec.get("masks", []) or []:
            key = (str(mask.get("table")), str(mask.get("column")))
            if key not in seen_masks:
                seen_masks.add(key)
                merged["masks"].append(dict(mask))
        g = spec.get("guardrails", {}) or {}
        for list_key in ("requireWhere", "deniedFunctions", "allowedFunctions"):
            if list_key in g:
                guard[list_key] = sorted(set(guard.get(list_key, [])) | set(g[list_key]))
        for limit_key in ("maxRowsAffected", "maxRowsReturned"):
            if limit_key in g:
                guard[limit_key] = min(guard.get(limit_key, g[limit_key]), g[limit_key])
        for setting, values in (g.get("allowedSettings") or {}).items():
            allowed = guard.setdefault("allowedSettings", {})
            allowed[setting] = sorted(set(allowed.get(setting, [])) | set(values))
    if not specs:
        merged["default"] = "block"
    if guard:
        merged["guardrails"] = guard
    return merged


BUNDLE_FIELDS = frozenset({"policies"})
"""Fields of a bundle document: ``policies``, a list of ``{name, spec}``."""


def is_bundle(doc: Any) -> bool:
    """Whether ``doc`` is a bundle (several named policy specs) rather than one policy spec."""
    return isinstance(doc, Mapping) and "policies" in doc and "apiVersion" not in doc


def bundle_document(specs: Sequence[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """The bundle the operator ships for one workload: every policy that binds it, by name and
    spec, composed by the sidecar (`compose`), never merged into one rule list."""
    return {"policies": [{"name": name, "spec": dict(spec)} for name, spec in specs]}


def compile_components(
    specs: Sequence[tuple[str, Any]], *, source: str = "bundle", mask_key: str = "", path: str = ""
) -> tuple[compose.Component, ...]:
    """Compile each named spec and check that they compose; raise `PolicyInvalid` listing every
    problem, each path naming its policy (``policies[1](baseline).rules[0]...``)."""
    from dbgov_policy import compose  # noqa: PLC0415 -- see the TYPE_CHECKING import

    out = _Collector()
    found: list[compose.Component] = []
    for i, (name, spec) in enumerate(specs):
        where = f"{path}[{i}]({name})" if path else str(name)
        try:
            compiled = compile_policy(spec, source=f"{source}: {name}", mask_key=mask_key)
        except PolicyInvalid as err:
            for problem in err.problems:
                out.add(f"{where}.{problem.path}" if problem.path else where, problem.message)
            continue
        found.append(compose.Component(name=str(name), policy=compiled))
    if found and not out.problems:  # (a bundle of no policy is valid: it refuses everything)
        try:
            compose.prepared(found)
        except compose.CompositionInvalid as err:
            for name, message in err.problems:
                out.add(name, message)
    if out.problems:
        raise PolicyInvalid(out.problems, source=source)
    return tuple(found)


def compile_bundle(doc: Any, *, source: str = "bundle", mask_key: str = "") -> tuple[compose.Component, ...]:
    """A bundle document (see `bundle_document`) → its components; `PolicyInvalid` otherwise."""
    out = _Collector()
    if not isinstance(doc, Mapping):
        out.add("", f"a bundle must be a mapping, got {_kind(doc)}")
        raise PolicyInvalid(out.problems, source=source)
    _unknown_fields(doc, BUNDLE_FIELDS, "", out)
    specs: list[tuple[str, Any]] = []
    raw = doc.get("policies")
    if not isinstance(raw, list):
        out.add("policies", f"must be a list of {{name, spec}}, got {_kind(raw)}")
        raw = []
    for i, item in enumerate(raw):
        if not isinstance(item, Mapping) or not isinstance(item.get("name"), str) or not item["name"]:
            out.add(f"policies[{i}]", "must be a mapping with a name and a spec")
            continue
        _unknown_fields(item, frozenset({"name", "spec"}), f"policies[{i}]", out)
        specs.append((item["name"], item.get("spec") or {}))
    if out.problems:
        raise PolicyInvalid(out.problems, source=source)
    if not specs:
        return ()
    return compile_components(specs, source=source, mask_key=mask_key, path="policies")


def load_text(
    text: str, *, source: str = "policy", mask_key: str = ""
) -> model.CompiledPolicy | tuple[compose.Component, ...]:
    """Parse YAML: a bundle (→ its components) or one policy (→ its compiled policy)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise PolicyInvalid([Problem(path="", message=f"not valid YAML: {err}")], source=source) from err
    if is_bundle(doc):
        return compile_bundle(doc, source=source, mask_key=mask_key)
    return compile_policy(doc, source=source, mask_key=mask_key)
