"""grants.compile_grants as data: a policy spec and the catalog → the group role's privileges.

Each case is a policy spec (compiled by dbgov_policy.compile, as the operator does) and the
privileges expected on the catalog below, written the way `Privilege.__str__` prints them.
Adding a case is adding an entry. The real database enforcing these grants is
tests/integration/test_credentials_apply.py.
"""

from __future__ import annotations

from typing import Any

import pytest

from dbgov_operator import grants
from dbgov_policy import compile as policy_compile
from dbgov_policy import mask, model

KEY = "unit-test-key"
GROUP = "dbgov_g_0123456789abcdef0123456789abcdef"
CATALOG = grants.Catalog(
    schemas=("information_schema", "pg_catalog", "public", "shop", "dbgov_masked"),
    tables=(
        grants.Table(
            schema="shop",
            name="orders",
            columns=("id", "qty"),
            sequences=(model.QualifiedName(schema="shop", name="orders_id_seq"),),
        ),
        grants.Table(schema="shop", name="customers", columns=("id", "email", "ssn")),
        grants.Table(schema="public", name="notes", columns=("id", "body")),
        grants.Table(schema="pg_catalog", name="pg_class", columns=("oid", "relname")),
        grants.Table(schema="dbgov_masked", name="hmac_keys", columns=("group_role", "ipad", "opad")),
    ),
)
ALL_TABLE = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")


def _table(rel: str, *privs: str) -> list[str]:
    return [f"{p} on table {rel}" for p in privs]


CASES: list[dict[str, Any]] = [
    {
        "id": "read-one-schema",
        "spec": {
            "rules": [{"name": "r", "verdict": "allow", "statements": ["select"], "tables": ["shop.*"]}]
        },
        "expect": [
            *_table("shop.orders", "SELECT"),
            *_table("shop.customers", "SELECT"),
            "USAGE on schema shop",
        ],
    },
    {
        "id": "no-tables-covers-every-user-table-not-system-schemas",
        "spec": {"rules": [{"name": "r", "verdict": "allow", "statements": ["select"]}]},
        "expect": [
            *_table("shop.orders", "SELECT"),
            *_table("shop.customers", "SELECT"),
            *_table("public.notes", "SELECT"),
            "USAGE on schema shop",
            "USAGE on schema public",
        ],
    },
    {
        "id": "block-first-removes-delete",
        "spec": {
            "rules": [
                {"name": "b", "verdict": "block", "statements": ["delete"], "tables": ["shop.customers"]},
                {
                    "name": "w",
                    "verdict": "allow",
                    "statements": ["select", "update", "delete"],
                    "tables": ["shop.*"],
                },
            ]
        },
        "expect": [
            *_table("shop.orders", "SELECT", "UPDATE", "DELETE"),
            *_table("shop.customers", "SELECT", "UPDATE"),
            "USAGE on schema shop",
        ],
    },
    {
        "id": "block-after-allow-is-shadowed-first-match-wins",
        "spec": {
            "rules": [
                {"name": "w", "verdict": "allow", "statements": ["delete"], "tables": ["shop.orders"]},
                {"name": "b", "verdict": "block", "statements": ["delete", "select"], "tables": ["shop.*"]},
            ]
        },
        "expect": [*_table("shop.orders", "DELETE"), "USAGE on schema shop"],
    },
    {
        "id": "approve-grants-nothing",
        "spec": {
            "rules": [{"name": "a", "verdict": "approve", "statements": ["insert", "update", "delete"]}]
        },
        "expect": [],
    },
    {
        "id": "default-approve-grants-nothing",
        "spec": {"default": "approve"},
        "expect": [],
    },
    {
        "id": "insert-brings-owned-sequences",
        "spec": {
            "rules": [{"name": "i", "verdict": "allow", "statements": ["insert"], "tables": ["shop.orders"]}]
        },
        "expect": [
            *_table("shop.orders", "INSERT"),
            "USAGE on sequence shop.orders_id_seq",
            "SELECT on sequence shop.orders_id_seq",
            "USAGE on schema shop",
        ],
    },
    {
        "id": "copy-classes-map-to-select-and-insert",
        "spec": {
            "rules": [
                {
                    "name": "c",
                    "verdict": "allow",
                    "statements": ["copy-to", "copy-from"],
                    "tables": ["public.notes"],
                }
            ]
        },
        "expect": [*_table("public.notes", "SELECT", "INSERT"), "USAGE on schema public"],
    },
    {
        "id": "truncate-only-when-allowed",
        "spec": {
            "rules": [
                {"name": "t", "verdict": "allow", "statements": ["truncate"], "tables": ["shop.orders"]}
            ]
        },
        "expect": [*_table("shop.orders", "TRUNCATE"), "USAGE on schema shop"],
    },
    {
        "id": "merge-alone-grants-nothing",
        "spec": {"rules": [{"name": "m", "verdict": "allow", "statements": ["merge"]}]},
        "expect": [],
    },
    {
        "id": "ddl-blocked-means-no-create",
        "spec": {
            "rules": [
                {"name": "b", "verdict": "block", "statements": ["ddl", "dcl"]},
                {"name": "r", "verdict": "allow", "statements": ["select", "insert", "update", "delete"]},
            ]
        },
        "expect": [
            *_table("shop.orders", "SELECT", "INSERT", "UPDATE", "DELETE"),
            *_table("shop.customers", "SELECT", "INSERT", "UPDATE", "DELETE"),
            *_table("public.notes", "SELECT", "INSERT", "UPDATE", "DELETE"),
            "USAGE on sequence shop.orders_id_seq",
            "SELECT on sequence shop.orders_id_seq",
            "USAGE on schema shop",
            "USAGE on schema public",
        ],
    },
    {
        "id": "create-on-a-whole-schema",
        "spec": {
            "rules": [{"name": "d", "verdict": "allow", "statements": ["create"], "tables": ["shop.*"]}]
        },
        "expect": [
            *_table("shop.orders", "REFERENCES", "TRIGGER"),
            *_table("shop.customers", "REFERENCES", "TRIGGER"),
            "USAGE on schema shop",
            "CREATE on schema shop",
        ],
    },
    {
        "id": "create-not-on-schema-when-an-earlier-rule-blocks-one-name-in-it",
        "spec": {
            "rules": [
                {"name": "b", "verdict": "block", "statements": ["ddl"], "tables": ["shop.customers"]},
                {"name": "d", "verdict": "allow", "statements": ["ddl"], "tables": ["shop.*"]},
            ]
        },
        "expect": [*_table("shop.orders", "TRUNCATE", "REFERENCES", "TRIGGER"), "USAGE on schema shop"],
    },
    {
        "id": "create-not-on-schema-for-a-single-table-pattern",
        "spec": {
            "rules": [{"name": "d", "verdict": "allow", "statements": ["create"], "tables": ["shop.orders"]}]
        },
        "expect": [*_table("shop.orders", "REFERENCES", "TRIGGER"), "USAGE on schema shop"],
    },
    {
        "id": "default-allow-grants-everything-on-user-tables",
        "spec": {"default": "allow"},
        "expect": [
            *_table("shop.orders", *ALL_TABLE),
            *_table("shop.customers", *ALL_TABLE),
            *_table("public.notes", *ALL_TABLE),
            "USAGE on sequence shop.orders_id_seq",
            "SELECT on sequence shop.orders_id_seq",
            "USAGE on schema shop",
            "USAGE on schema public",
            "CREATE on schema shop",
            "CREATE on schema public",
        ],
    },
    {
        "id": "masked-table-gets-unmasked-columns-and-a-view",
        "spec": {
            "rules": [
                {"name": "r", "verdict": "allow", "statements": ["select", "update"], "tables": ["shop.*"]}
            ],
            "masks": [{"table": "shop.customers", "column": "email", "strategy": "email"}],
        },
        "expect": [
            *_table("shop.orders", "SELECT", "UPDATE"),
            *_table("shop.customers", "UPDATE"),
            "SELECT on column shop.customers(id)",
            "SELECT on column shop.customers(ssn)",
            "USAGE on schema shop",
            "USAGE on schema dbgov_masked",
        ],
        "views": ["shop.customers"],
    },
    {
        "id": "masked-table-not-readable-gets-no-view",
        "spec": {
            "rules": [
                {"name": "r", "verdict": "allow", "statements": ["insert"], "tables": ["shop.customers"]}
            ],
            "masks": [{"table": "shop.customers", "column": "ssn", "strategy": "hash"}],
        },
        "expect": [*_table("shop.customers", "INSERT"), "USAGE on schema shop"],
    },
]


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_compile_grants(case: dict[str, Any]) -> None:
    policy = policy_compile.compile_policy(case["spec"], mask_key=KEY)
    compiled = grants.compile_grants(policy, CATALOG, group_role=GROUP)
    assert sorted(str(p) for p in compiled.privileges) == sorted(case["expect"])
    assert sorted(str(v.source) for v in compiled.views) == sorted(case.get("views", []))


def _hash_policy(strategy: str = "hash") -> grants.GroupGrants:
    spec = {
        "rules": [{"name": "r", "verdict": "allow", "statements": ["select"]}],
        "masks": [{"table": "shop.customers", "column": "ssn", "strategy": strategy}],
    }
    return grants.compile_grants(policy_compile.compile_policy(spec, mask_key=KEY), CATALOG, group_role=GROUP)


def test_hash_view_reads_the_key_from_the_key_table_not_its_text() -> None:
    compiled = _hash_policy()
    (view,) = compiled.views
    pads = grants.hmac_pads(KEY)
    assert view.uses_key and compiled.pads == pads
    assert pads.ipad.hex() not in view.select_sql and pads.opad.hex() not in view.select_sql
    assert "k.ipad" in view.select_sql and "k.opad" in view.select_sql
    assert f"FROM dbgov_masked.hmac_keys WHERE group_role = '{GROUP}'" in view.select_sql
    assert pads.ipad.hex() not in repr(compiled)


def test_non_hash_view_is_the_proxys_mask_expression() -> None:
    compiled = _hash_policy("partial")
    (view,) = compiled.views
    m = model.Mask(
        table=model.QualifiedName(schema="shop", name="customers"), column="ssn", strategy="partial"
    )
    assert mask.mask_expression(m, 'src."ssn"', key=KEY) in view.select_sql
    assert not view.uses_key and compiled.pads is None
    assert view.select_sql.startswith('SELECT src."id", src."email", (')


def test_hash_mask_with_empty_key_fails_closed() -> None:
    spec = {"masks": [{"table": "shop.customers", "column": "ssn", "strategy": "hash"}], "default": "allow"}
    with pytest.raises(ValueError, match="mask key is empty"):
        grants.compile_grants(policy_compile.compile_policy(spec, mask_key=""), CATALOG, group_role=GROUP)


def test_view_names_fit_postgres_identifiers() -> None:
    long = model.QualifiedName(schema="s" * 63, name="t" * 63)
    name = grants.view_name(long, group_role=GROUP)
    assert len(name.encode()) <= 63 and name.endswith("." + GROUP.removeprefix("dbgov_g_")[:12])
    other = grants.view_name(model.QualifiedName(schema="s" * 63, name="t" * 62 + "u"), group_role=GROUP)
    assert other != name
    assert grants.view_name(model.QualifiedName(schema="shop", name="customers"), group_role=GROUP) == (
        "shop.customers.0123456789ab"
    )


def test_masks_follow_inheritance_both_ways() -> None:
    """A child of a masked table is masked like it; a parent of a masked table is masked where
    its columns hold the child's masked values (a read without ONLY returns them)."""
    parent = model.QualifiedName(schema="shop", name="people")
    masked = model.QualifiedName(schema="shop", name="customers")
    catalog = grants.Catalog(
        schemas=("shop",),
        tables=(
            grants.Table(schema="shop", name="people", columns=("id", "email")),
            grants.Table(
                schema="shop", name="customers", columns=("id", "email", "ssn"), ancestors=(parent,)
            ),
            grants.Table(
                schema="shop",
                name="customers_2026",
                columns=("id", "email", "ssn"),
                ancestors=(masked, parent),
            ),
        ),
    )
    spec = {
        "rules": [{"name": "r", "verdict": "allow", "statements": ["select"]}],
        "masks": [{"table": "shop.customers", "column": "email", "strategy": "redact"}],
    }
    compiled = grants.compile_grants(policy_compile.compile_policy(spec), catalog, group_role=GROUP)
    assert sorted(str(p) for p in compiled.privileges) == [
        "SELECT on column shop.customers(id)",
        "SELECT on column shop.customers(ssn)",
        "SELECT on column shop.customers_2026(id)",
        "SELECT on column shop.customers_2026(ssn)",
        "SELECT on column shop.people(id)",
        "USAGE on schema dbgov_masked",
        "USAGE on schema shop",
    ]
    assert sorted(v.name for v in compiled.views) == [
        "shop.customers.0123456789ab",
        "shop.customers_2026.0123456789ab",
        "shop.people.0123456789ab",
    ]


def test_definer_rights_views_over_masked_tables_get_no_select() -> None:
    customers = model.QualifiedName(schema="shop", name="customers")
    emails = model.QualifiedName(schema="shop", name="emails")
    catalog = grants.Catalog(
        schemas=("shop",),
        tables=(
            grants.Table(schema="shop", name="customers", columns=("id", "email")),
            grants.Table(
                schema="shop", name="emails", columns=("email",), reads=(customers,), definer_rights=True
            ),
            grants.Table(
                schema="shop", name="emails2", columns=("email",), reads=(emails,), definer_rights=True
            ),
            grants.Table(schema="shop", name="invoker", columns=("email",), reads=(customers,)),
            grants.Table(schema="shop", name="orders", columns=("id",)),
        ),
    )
    spec = {
        "rules": [{"name": "r", "verdict": "allow", "statements": ["select", "insert"]}],
        "masks": [{"table": "shop.customers", "column": "email", "strategy": "redact"}],
    }
    compiled = grants.compile_grants(policy_compile.compile_policy(spec), catalog, group_role=GROUP)
    selects = sorted(str(p) for p in compiled.privileges if p.privilege == "SELECT")
    assert selects == [
        "SELECT on column shop.customers(id)",
        "SELECT on table shop.invoker",
        "SELECT on table shop.orders",
    ]
    assert "INSERT on table shop.emails" in {str(p) for p in compiled.privileges}
