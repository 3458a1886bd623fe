"""`dbgov check`: judge SQL against a policy without a database, for people writing policies."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import TextIO

from dbgov_policy import compile as policy_compile
from dbgov_policy import compose, decide, engine, model
from dbgov_sidecar import policyfile

MARK = {"allow": "ALLOW", "mask": "MASK", "approve": "APPROVE", "block": "BLOCK"}


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "check",
        help="judge SQL against a policy (no database needed)",
        description="Judge each SQL argument as one query string, as a client would send it in one "
        "simple-query message, and explain the decision. Exit 0 whatever the decisions; exit 2 "
        "when the policy or the usage is invalid.",
    )
    p.add_argument(
        "--policy",
        required=True,
        action="append",
        help="policy file: a DatabaseAccessPolicy spec, the whole resource, or an operator bundle; "
        "give it several times to judge as the composition of those policies (each judges on its "
        "own, the strictest answer wins), as when several policies bind one workload",
    )
    p.add_argument(
        "--format",
        choices=("text", "json"),
        default="text",
        help="output format (json: one object per line)",
    )
    who = p.add_argument_group(
        "identity", "judge as this end user (rules with subjects apply only to sessions they match)"
    )
    who.add_argument(
        "--identity",
        metavar="JSON",
        help='the whole identity: {"issuer": ..., "subject": ..., "claims": {...}}',
    )
    who.add_argument("--identity-sub", metavar="SUB", help="the token's subject (sub)")
    who.add_argument("--identity-issuer", metavar="ISS", default="", help="the token's issuer (iss)")
    who.add_argument(
        "--identity-claim",
        metavar="NAME=VALUE",
        action="append",
        default=[],
        help="a claim (repeat a name for a list, e.g. groups=a --identity-claim groups=b)",
    )
    p.add_argument("sql", nargs="+", help="query strings to judge ('-' reads one from standard input)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace, *, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> int:
    try:
        judge = judge_of(args.policy)
    except policy_compile.PolicyInvalid as exc:
        print(f"dbgov check: {exc}", file=err)
        return 2
    try:
        identity = identity_of(args)
    except ValueError as exc:
        print(f"dbgov check: {exc}", file=err)
        return 2
    judged = judge(identity)
    for sql in args.sql:
        text = sys.stdin.read() if sql == "-" else sql
        d = judged(text)
        if args.format == "json":
            out.write(json.dumps({"sql": text, **d.as_dict()}, ensure_ascii=False) + "\n")
        else:
            out.write(explain(text, d))
    return 0


Judge = Callable[[model.Identity | None], Callable[[str], decide.Decision]]


def judge_of(paths: Sequence[str]) -> Judge:
    """What decides for an identity: one policy file's engine, or the composition of every
    policy in the files given (a bundle's policies by their names, a file's by its path)."""
    key = os.environ.get("DBGOV_MASK_KEY", "")
    components: list[compose.Component] = []
    problems: list[policy_compile.Problem] = []
    for path in paths:
        try:
            loaded = policyfile.load_file(path, mask_key=key)
        except policy_compile.PolicyInvalid as exc:
            problems.extend(
                dataclasses.replace(p, path=f"{path}: {p.path}" if p.path else path) for p in exc.problems
            )
            continue
        if isinstance(loaded, model.CompiledPolicy):
            components.append(compose.Component(name=path, policy=loaded))
        else:
            components.extend(loaded)
    if problems:
        raise policy_compile.PolicyInvalid(problems, source=", ".join(paths))
    if len(components) == 1 and len(paths) == 1 and isinstance(loaded, model.CompiledPolicy):
        policy = components[0].policy

        def single(identity: model.Identity | None) -> Callable[[str], decide.Decision]:
            rules = tuple(r for r in policy.rules if r.subjects is None or r.subjects.matches(identity))
            eng = engine.Engine(dataclasses.replace(policy, rules=rules))
            session = engine.SessionContext()
            return lambda text: eng.decide(text, session=session)

        return single
    try:
        composed = compose.Composed(components)
    except compose.CompositionInvalid as exc:
        found = [policy_compile.Problem(path=name, message=message) for name, message in exc.problems]
        raise policy_compile.PolicyInvalid(found, source=", ".join(paths)) from exc

    def several(identity: model.Identity | None) -> Callable[[str], decide.Decision]:
        scoped = composed.for_rules(lambda r: r.subjects is None or r.subjects.matches(identity))
        session = scoped.new_context()
        return lambda text: scoped.decide(text, session=session)

    return several


def identity_of(args: argparse.Namespace) -> model.Identity | None:
    """The end user ``--identity*`` describe, or None (a session without a verified token)."""
    if getattr(args, "identity", None):
        try:
            raw = json.loads(args.identity)
            return model.Identity(
                issuer=str(raw.get("issuer", "")),
                subject=str(raw["subject"]),
                claims=dict(raw.get("claims") or {}),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(
                f'--identity must be JSON like {{"subject": "alice", "claims": {{}}}} ({exc})'
            ) from exc
    sub = getattr(args, "identity_sub", None)
    pairs = getattr(args, "identity_claim", None) or []
    if sub is None and not pairs:
        return None
    claims: dict[str, object] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise ValueError(f"--identity-claim takes NAME=VALUE, got {pair!r}")
        have = claims.get(name)
        claims[name] = value if have is None else [*(have if isinstance(have, list) else [have]), value]
    return model.Identity(issuer=args.identity_issuer or "", subject=sub or "", claims=claims)


def explain(sql: str, d: decide.Decision, *, abbreviate: bool = False) -> str:
    lines = [
        f"{MARK[d.verdict]:8} {sql.strip()}",
        f"  rule:    {d.rule or '-'}",
        f"  why:     {d.reason}",
    ]
    if d.hint:
        lines.append(f"  hint:    {d.hint}")
    if d.sqlstate:
        lines.append(f"  sqlstate: {d.sqlstate} (what the client sees)")
    for i, s in enumerate(d.statements, 1):
        parts = [f"{s.cls}/{s.fine}"]
        if s.reads:
            parts.append("reads " + ", ".join(s.reads))
        if s.writes:
            parts.append("writes " + ", ".join(s.writes))
        if s.functions:
            parts.append("calls " + ", ".join(s.functions))
        nested = " (nested)" if s.nested else ""
        lines.append(f"  [{i}]{nested} {'; '.join(parts)} -> {s.verdict} by {s.rule}")
    if d.masked_columns:
        lines.append(f"  masked:  {', '.join(d.masked_columns)}")
    if d.rewritten:
        shown = d.rewritten if not abbreviate or len(d.rewritten) < 160 else d.rewritten[:150] + " …"
        lines.append(f"  sent upstream: {shown}")
    return "\n".join(lines) + "\n\n"
