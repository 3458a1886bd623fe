"""`dbgov demo` / `make demo`: show what dbgov decides for an AI agent's statements.

Runs the example policy against a scripted agent session and explains every decision, with
no database needed. (The proxy demo, with an embedded PostgreSQL, builds on this.)
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from collections.abc import Sequence

from dbgov_policy import engine
from dbgov_sidecar import check_cli, policyfile

EXAMPLE_POLICY = pathlib.Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"

AGENT_SESSION: tuple[tuple[str, str], ...] = (
    ("an allowed read", "SELECT id, product_id, quantity FROM shop.orders WHERE customer_id = 42"),
    ("PII comes back masked", "SELECT name, email, ssn FROM shop.customers WHERE id = 42"),
    (
        "masking survives aliases and whole-row references",
        "SELECT row_to_json(c) FROM shop.customers AS c",
    ),
    (
        "a predicate oracle on a masked column only sees masked values",
        "SELECT count(*) FROM shop.customers WHERE ssn LIKE '123%'",
    ),
    ("a DROP is refused", "DROP TABLE shop.orders"),
    ("an unbounded DELETE is refused", "DELETE FROM shop.orders WHERE 1 = 1"),
    ("a bounded DELETE is fine", "DELETE FROM shop.orders WHERE id = 17"),
    (
        "changing customer data needs a human",
        "UPDATE shop.customers SET email = 'new@example.com' WHERE id = 42",
    ),
    ("no privilege games", "SET ROLE postgres"),
    ("no reading server files", "SELECT pg_read_file('/etc/passwd')"),
    (
        "a statement hidden in a CTE is judged as itself",
        "WITH gone AS (DELETE FROM shop.orders RETURNING *) SELECT count(*) FROM gone",
    ),
)


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("demo", help="run the scripted AI-agent demo against the example policy")
    p.add_argument(
        "--policy", default=str(EXAMPLE_POLICY), help="policy file (default: examples/policy.yaml)"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    policy = policyfile.load_policy_file(args.policy, mask_key="demo-key")
    eng = engine.Engine(policy)
    session = engine.SessionContext()
    print(f"dbgov demo: an AI agent's session judged by {args.policy}\n")
    for title, sql in AGENT_SESSION:
        print(f"# {title}")
        print(check_cli.explain(sql, eng.decide(sql, session=session), abbreviate=True), end="")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dbgov-demo")
    parser.add_argument("--policy", default=str(EXAMPLE_POLICY))
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
