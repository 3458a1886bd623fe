"""Alembic and Django migrations through `dbgov proxy` against a real PostgreSQL (issue 10).

Migration tools are what a platform team meets first: a proxy that refuses the standard
`updated_at` trigger or `alembic_version` bookkeeping cannot be installed in front of a service
that migrates at start-up. Each migration runs twice, through the proxy and directly, into
databases of their own, and the resulting schemas (information_schema and pg_catalog) and data
must be equal. A policy in `enforce` that allows DDL lets every migration through (and masks a
column the ORM then reads); the same DDL-blocking rules in `dry-run` let everything through and
audit the would-be refusals; in `enforce` they fail the migration with the policy's 42501 naming
the rule, and PostgreSQL's transactional DDL leaves `alembic_version` and the data as they were.
"""

from __future__ import annotations

import contextlib
import functools
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from test_proxy_session_truth import _engine

import pg
from conftest import RunningProxy
from dbgov_sidecar import policy_port

pytestmark = pytest.mark.integration

REFUSED = "dbgov: statement refused by"
AUTHORS = [(1, "Ada", "ada.lovelace@example.com"), (2, "Grace", "grace.hopper@example.org")]

# ---------------------------------------------------------------------------------------------
# Policies


def _rules(*, mode: str, block_ddl: bool, masks: list[dict[str, str]]) -> policy_port.EnginePolicy:
    """Transactions and reads/writes of `public` (and the catalogs SQLAlchemy and Alembic
    inspect) allowed; DDL refused by `no-ddl` when ``block_ddl``, else allowed as `migrations`."""
    ddl: dict[str, Any] = {"name": "no-ddl", "verdict": "block", "statements": ["ddl"]}
    if not block_ddl:  # a DEFAULT nextval(...) counts as a call of nextval: it changes state
        ddl = {"name": "migrations", "verdict": "allow", "statements": ["ddl", "call"]}
    return _engine(
        {
            "mode": mode,
            "default": "block",
            "rules": [
                {"name": "transactions", "verdict": "allow", "statements": ["tcl"]},
                ddl,
                {
                    "name": "app-data",
                    "verdict": "allow",
                    "statements": ["select", "insert", "update", "delete"],
                    "tables": ["public.*", "pg_catalog.*", "information_schema.*"],
                },
            ],
            "masks": masks,
        }
    )


def allowing_ddl() -> policy_port.EnginePolicy:
    """What a migration job runs under: DDL allowed, nothing masked (a masked table's definition
    cannot change: `guardrail:mask-unprovable`)."""
    return _rules(mode="enforce", block_ddl=False, masks=[])


def masking(table: str) -> policy_port.EnginePolicy:
    """What the application runs under once migrated: DDL allowed, ``table``.email masked."""
    return _rules(
        mode="enforce",
        block_ddl=False,
        masks=[{"table": f"public.{table}", "column": "email", "strategy": "email"}],
    )


def blocking_ddl(mode: str) -> policy_port.EnginePolicy:
    return _rules(mode=mode, block_ddl=True, masks=[])


def _masked(email: str) -> str:
    local, at, domain = email.partition("@")
    return "*" * len(local) + at + domain


# ---------------------------------------------------------------------------------------------
# Databases and the schema dump


@pytest.fixture
def databases(pg_server: pg.PgServer) -> Iterator[Callable[[str], str]]:
    """Makes empty scratch databases owned by `app`; all dropped afterwards."""
    with contextlib.ExitStack() as stack:

        def make(prefix: str) -> str:
            return stack.enter_context(pg.scratch_database(pg_server, prefix, "SELECT 1"))

        yield make


def _direct_dsn(server: pg.PgServer, dbname: str) -> str:
    return server.dsn(user="app", dbname=dbname)


#: What a migration leaves behind, read from the catalogs, in an order of its own.
DUMP = {
    "columns": "SELECT table_name, column_name, data_type, is_nullable, column_default"
    " FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
    "constraints": "SELECT conrelid::regclass::text, conname, contype, pg_get_constraintdef(oid)"
    " FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY 1, 2",
    "sequences": "SELECT sequence_name, data_type, start_value, increment"
    " FROM information_schema.sequences WHERE sequence_schema = 'public' ORDER BY 1",
    "triggers": "SELECT event_object_table, trigger_name, event_manipulation, action_timing,"
    " action_orientation, action_statement FROM information_schema.triggers"
    " WHERE trigger_schema = 'public' ORDER BY 1, 2, 3",
    "functions": "SELECT proname, pg_get_function_result(p.oid), prosrc, l.lanname"
    " FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang"
    " WHERE pronamespace = 'public'::regnamespace ORDER BY 1",
    "relations": "SELECT relname, relkind FROM pg_class"
    " WHERE relnamespace = 'public'::regnamespace ORDER BY 1",
}


def dump(server: pg.PgServer, dbname: str, *, data: tuple[str, ...] = ()) -> dict[str, list[tuple[Any, ...]]]:
    """The schema of ``dbname`` (and the rows of the ``data`` queries), read directly."""
    with psycopg.connect(_direct_dsn(server, dbname), autocommit=True) as conn:
        out = {name: conn.execute(sql).fetchall() for name, sql in DUMP.items()}
        for sql in data:
            out[sql] = conn.execute(sql).fetchall()
    return out


# ---------------------------------------------------------------------------------------------
# Alembic

ENV_PY = """
from alembic import context
from sqlalchemy import create_engine, pool



def run(connection):
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()


given = context.config.attributes.get("connection")
if given is not None:  # the test's own connection, to go on using it after a failure
    run(given)
else:
    engine = create_engine(context.config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            run(connection)
    finally:
        engine.dispose()
"""

REVISIONS = {
    "0001_tables.py": '''
        """Tables with a foreign key, an index and a sequence."""
        import sqlalchemy as sa
        from alembic import op

        revision = "0001"
        down_revision = None


        def upgrade():
            op.execute(sa.schema.CreateSequence(sa.Sequence("invoice_numbers", start=1000)))
            op.create_table(
                "authors",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("name", sa.Text, nullable=False),
                sa.Column("email", sa.Text, nullable=False, unique=True),
                sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
            )
            op.create_table(
                "books",
                sa.Column("id", sa.Integer, primary_key=True),
                sa.Column("author_id", sa.Integer, sa.ForeignKey("authors.id", ondelete="CASCADE"), nullable=False),
                sa.Column("title", sa.Text, nullable=False),
                sa.Column("invoice", sa.BigInteger, server_default=sa.text("nextval('invoice_numbers')")),
                sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
            )
            op.create_index("ix_books_author_title", "books", ["author_id", "title"])


        def downgrade():
            op.drop_index("ix_books_author_title", table_name="books")
            op.drop_table("books")
            op.drop_table("authors")
            op.execute(sa.schema.DropSequence(sa.Sequence("invoice_numbers")))
    ''',
    "0002_updated_at.py": '''
        """The standard updated_at trigger."""
        from alembic import op

        revision = "0002"
        down_revision = "0001"


        def upgrade():
            op.execute(
                """
                CREATE OR REPLACE FUNCTION set_updated_at() RETURNS trigger AS $$
                BEGIN
                    NEW.updated_at = now();
                    RETURN NEW;
                END;
                $$ LANGUAGE plpgsql;
                """
            )
            op.execute(
                "CREATE TRIGGER books_updated_at BEFORE UPDATE ON books"
                " FOR EACH ROW EXECUTE FUNCTION set_updated_at()"
            )


        def downgrade():
            op.execute("DROP TRIGGER books_updated_at ON books")
            op.execute("DROP FUNCTION set_updated_at()")
    ''',
    "0003_data.py": '''
        """Data first (bulk insert, an UPDATE with WHERE), then ALTER TABLE."""
        import sqlalchemy as sa
        from alembic import op

        revision = "0003"
        down_revision = "0002"

        authors = sa.table("authors", sa.column("id", sa.Integer), sa.column("name", sa.Text), sa.column("email", sa.Text))
        books = sa.table("books", sa.column("id", sa.Integer), sa.column("author_id", sa.Integer), sa.column("title", sa.Text))


        def upgrade():
            op.bulk_insert(authors, AUTHORS)
            op.bulk_insert(books, [
                {"id": 1, "author_id": 1, "title": "Notes on the Analytical Engine"},
                {"id": 2, "author_id": 2, "title": "cobol"},
                {"id": 3, "author_id": 2, "title": "Compilers"},
            ])
            op.execute(books.update().where(books.c.title == "cobol").values(title="COBOL"))
            op.add_column("books", sa.Column("pages", sa.Integer, nullable=True))
            op.execute("UPDATE books SET pages = 100 + id WHERE author_id = 2")
            op.alter_column("books", "title", new_column_name="name", type_=sa.String(200))


        def downgrade():
            op.alter_column("books", "name", new_column_name="title", type_=sa.Text)
            op.drop_column("books", "pages")
            op.execute("DELETE FROM books WHERE id IN (1, 2, 3)")
            op.execute(authors.delete().where(authors.c.id.in_([1, 2])))
    ''',
}

#: The data the migrations leave, and which the trigger touched (the UPDATE fired it).
DATA = (
    "SELECT version_num FROM alembic_version",
    "SELECT id, name, email FROM authors ORDER BY id",
    "SELECT id, author_id, name, pages, invoice >= 1000 FROM books ORDER BY id",
)


@pytest.fixture(scope="module")
def alembic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migration environment as `alembic init` would leave it, with three revisions."""
    root = tmp_path_factory.mktemp("alembic")
    (root / "versions").mkdir()
    (root / "env.py").write_text(ENV_PY)
    authors = repr([{"id": i, "name": n, "email": e} for i, n, e in AUTHORS])
    for name, text in REVISIONS.items():
        source = textwrap.dedent(text).replace("AUTHORS)", f"{authors})")
        (root / "versions" / name).write_text(source)
    return root


def alembic(
    directory: Path, url: str, *steps: tuple[str, str], connection: sa.Connection | None = None
) -> None:
    """Run ``steps`` ((upgrade|downgrade, revision), ...) as the alembic command line would
    (on ``connection`` when given, else on a connection of its own to ``url``)."""
    config = Config()
    config.attributes["connection"] = connection
    config.set_main_option("script_location", str(directory))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    for verb, revision in steps:
        getattr(command, verb)(config, revision)


def proxy_url(proxy: RunningProxy, dbname: str) -> str:
    return f"postgresql+psycopg://app@127.0.0.1:{proxy.port}/{dbname}?sslmode=disable"


def direct_url(server: pg.PgServer, dbname: str) -> str:
    password = quote(pg.APP_PASSWORD, safe="")
    return f"postgresql+psycopg://app:{password}@{server.host}:{server.port}/{dbname}?sslmode=disable"


CYCLE = (("upgrade", "head"), ("downgrade", "base"), ("upgrade", "head"))


def test_alembic_cycle_through_enforce_is_as_direct(
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    databases: Callable[[str], str],
    alembic_dir: Path,
) -> None:
    through, direct = databases("alembic_proxy"), databases("alembic_direct")
    proxy = make_proxy(policy=allowing_ddl())
    alembic(alembic_dir, proxy_url(proxy, through), *CYCLE)
    alembic(alembic_dir, direct_url(pg_server, direct), *CYCLE)
    got, want = dump(pg_server, through, data=DATA), dump(pg_server, direct, data=DATA)
    assert got == want
    assert want[DATA[0]] == [("0003",)]
    assert want[DATA[1]] == list(AUTHORS)
    assert want[DATA[2]] == [
        (1, 1, "Notes on the Analytical Engine", None, True),
        (2, 2, "COBOL", 102, True),
        (3, 2, "Compilers", 103, True),
    ]
    assert [name for name, *_ in want["functions"]] == ["set_updated_at"]
    assert not [e for e in proxy.events if e.get("decision") != "allow" and e.get("type") == "statement"]
    judged = [e["statement"] for e in proxy.events if e.get("rule") == "migrations"]
    assert any("CREATE OR REPLACE FUNCTION set_updated_at()" in s for s in judged)
    # The application, under its own policy: email masked, and the trigger keeps updated_at.
    reader = make_proxy(policy=masking("authors"))
    engine = _engine_for(proxy_url(reader, through))
    try:
        with engine.begin() as conn:
            rows = conn.execute(sa.text("SELECT id, name, email FROM authors ORDER BY id")).all()
            conn.execute(sa.text("UPDATE books SET pages = 7 WHERE id = :id"), {"id": 1})
        with engine.connect() as conn:
            stamps = conn.execute(sa.text("SELECT id, updated_at FROM books ORDER BY id")).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in rows] == [(i, n, _masked(e)) for i, n, e in AUTHORS]
    assert stamps[0].updated_at > stamps[1].updated_at == stamps[2].updated_at


def _engine_for(url: str) -> sa.Engine:
    return sa.create_engine(url, poolclass=sa.pool.NullPool)


def test_alembic_dry_run_lets_ddl_through_and_audits_would_be_refusals(
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    databases: Callable[[str], str],
    alembic_dir: Path,
) -> None:
    through, direct = databases("alembic_dry"), databases("alembic_direct")
    proxy = make_proxy(policy=blocking_ddl("dry-run"))
    alembic(alembic_dir, proxy_url(proxy, through), *CYCLE)
    alembic(alembic_dir, direct_url(pg_server, direct), *CYCLE)
    assert dump(pg_server, through, data=DATA) == dump(pg_server, direct, data=DATA)
    would = [e for e in proxy.events if e.get("rule") == "no-ddl"]
    assert would and all((e["decision"], e["enforced"]) == ("block", "allow") for e in would)
    judged = " ".join(str(e.get("statement")) for e in would)
    for ddl in (
        "CREATE TABLE alembic_version",
        "CREATE TABLE authors",
        "CREATE INDEX ix_books_author_title",
        "CREATE OR REPLACE FUNCTION set_updated_at()",
        "CREATE TRIGGER books_updated_at",
        "ALTER TABLE books ADD COLUMN pages",
        "DROP TABLE authors",
        "DROP FUNCTION set_updated_at()",
    ):
        assert ddl in judged, ddl
    assert not [e for e in proxy.events if e.get("enforced") == "block"]
    data = [
        e for e in proxy.events if e.get("statement", "").startswith(("INSERT INTO authors", "UPDATE books"))
    ]
    assert data and all(e["decision"] == "allow" for e in data)


@pytest.mark.parametrize("start", ["base", "0002"])
def test_alembic_blocked_ddl_fails_the_migration_and_rolls_it_back(
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    databases: Callable[[str], str],
    alembic_dir: Path,
    start: str,
) -> None:
    """From 0002, revision 0003 inserts and updates rows before its ALTER TABLE is refused:
    the whole transaction goes, and with it the rows; from base even `alembic_version`."""
    db = databases("alembic_blocked")
    if start != "base":
        alembic(alembic_dir, direct_url(pg_server, db), ("upgrade", start))
    counts = ("SELECT to_regclass('alembic_version') IS NOT NULL",)
    if start != "base":
        counts += (DATA[0], "SELECT count(*) FROM authors", "SELECT count(*) FROM books")
    before = dump(pg_server, db, data=counts)
    proxy = make_proxy(policy=blocking_ddl("enforce"))
    engine = _engine_for(proxy_url(proxy, db))
    try:
        with engine.connect() as conn:
            with pytest.raises(sa.exc.ProgrammingError) as info:
                alembic(alembic_dir, "", ("upgrade", "head"), connection=conn)
            err = info.value.orig
            assert isinstance(err, psycopg.errors.InsufficientPrivilege)
            assert err.diag.sqlstate == "42501"
            assert (err.diag.message_primary or "").startswith(f'{REFUSED} rule "no-ddl"')
            first_ddl = (
                "CREATE TABLE alembic_version" if start == "base" else "ALTER TABLE books ADD COLUMN pages"
            )
            assert first_ddl in str(info.value.statement)
            assert not conn.in_transaction()  # alembic rolled its transaction back
            assert conn.execute(sa.text("SELECT 41 + 1")).scalar() == 42  # and the connection goes on
            conn.rollback()
    finally:
        engine.dispose()
    assert dump(pg_server, db, data=counts) == before
    if start != "base":
        assert before[DATA[0]] == [("0002",)] and before["SELECT count(*) FROM authors"] == [(0,)]
    refused = [e for e in proxy.events if e.get("enforced") == "block"]
    assert [e["rule"] for e in refused] == ["no-ddl"]


# ---------------------------------------------------------------------------------------------
# Django (its app: tests/integration/django_app, psycopg 3 backend)

DJANGO_DATA = (
    "SELECT app, name FROM django_migrations ORDER BY id",
    "SELECT count(*) FROM django_app_author",
)


@pytest.fixture(scope="module")
def django_db() -> Callable[..., Any]:
    """Django, configured in this process once; the returned function points its `default`
    database at a port and database name (closing the old connection)."""
    import django
    from django.conf import settings
    from django.db import connections

    if not settings.configured:
        settings.configure(
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": "postgres",
                    "USER": "app",
                    "HOST": "127.0.0.1",
                    "OPTIONS": {"sslmode": "disable"},
                }
            },
            INSTALLED_APPS=["django_app"],
            USE_TZ=True,
            DEFAULT_AUTO_FIELD="django.db.models.BigAutoField",
        )
        django.setup()

    def use(*, port: int, dbname: str, password: str = "", server_side_binding: bool = False) -> Any:
        conn = connections["default"]
        conn.close()
        conn.settings_dict.update({"PORT": str(port), "NAME": dbname, "PASSWORD": password})
        conn.settings_dict["OPTIONS"]["server_side_binding"] = server_side_binding
        return conn

    return use


def migrate(*args: str) -> None:
    from django.core.management import call_command

    call_command("migrate", "django_app", *args, verbosity=0, interactive=False)


def _django_both(
    django_db: Callable[..., Any],
    *,
    proxy: RunningProxy,
    server: pg.PgServer,
    through: str,
    direct: str,
    step: Callable[[], None],
) -> None:
    """``step`` through the proxy into ``through``, then directly into ``direct``."""
    django_db(port=proxy.port, dbname=through)
    try:
        step()
    finally:
        django_db(port=server.port, dbname=direct, password=pg.APP_PASSWORD)
    try:
        step()
    finally:
        django_db(port=server.port, dbname="postgres").close()


def _migrate_cycle() -> None:
    migrate()
    migrate("zero")
    migrate()


def test_django_migrate_through_enforce_is_as_direct(
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    databases: Callable[[str], str],
    django_db: Callable[..., Any],
) -> None:
    through, direct = databases("django_proxy"), databases("django_direct")
    proxy = make_proxy(policy=allowing_ddl())
    _django_both(
        django_db, proxy=proxy, server=pg_server, through=through, direct=direct, step=_migrate_cycle
    )
    got, want = dump(pg_server, through, data=DJANGO_DATA), dump(pg_server, direct, data=DJANGO_DATA)
    assert got == want
    assert [name for _, name in want[DJANGO_DATA[0]]] == ["0001_initial", "0002_updated_at"]
    assert [name for name, *_ in want["functions"]] == ["django_app_set_updated_at"]
    assert [t[1] for t in want["triggers"]] == ["book_updated_at"]
    assert not [e for e in proxy.events if e.get("decision") != "allow" and e.get("type") == "statement"]
    judged = " ".join(str(e.get("statement")) for e in proxy.events if e.get("rule") == "migrations")
    assert 'CREATE TABLE "django_app_author"' in judged and "CREATE TRIGGER book_updated_at" in judged


def test_django_migrate_under_dry_run_is_as_direct_and_audits_would_be_refusals(
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    databases: Callable[[str], str],
    django_db: Callable[..., Any],
) -> None:
    through, direct = databases("django_dry"), databases("django_direct")
    proxy = make_proxy(policy=blocking_ddl("dry-run"))
    _django_both(
        django_db, proxy=proxy, server=pg_server, through=through, direct=direct, step=_migrate_cycle
    )
    assert dump(pg_server, through, data=DJANGO_DATA) == dump(pg_server, direct, data=DJANGO_DATA)
    would = [e for e in proxy.events if e.get("rule") == "no-ddl"]
    assert would and all((e["decision"], e["enforced"]) == ("block", "allow") for e in would)
    judged = " ".join(str(e.get("statement")) for e in would)
    for ddl in (
        'CREATE TABLE "django_migrations"',
        'CREATE TABLE "django_app_book"',
        "CREATE OR REPLACE FUNCTION django_app_set_updated_at()",
        "CREATE TRIGGER book_updated_at",
        "ALTER TABLE django_app_book ADD CONSTRAINT book_pages_positive",
        "DROP FUNCTION django_app_set_updated_at()",
        'DROP TABLE "django_app_author"',
    ):
        assert ddl in judged, ddl
    assert not [e for e in proxy.events if e.get("enforced") == "block"]


def test_django_migrate_with_ddl_blocked_fails_and_leaves_the_database_as_it_was(
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    databases: Callable[[str], str],
    django_db: Callable[..., Any],
) -> None:
    from django.db import utils
    from django_app.models import Author

    db = databases("django_blocked")
    django_db(port=pg_server.port, dbname=db, password=pg.APP_PASSWORD)
    migrate("0001")
    before = dump(pg_server, db, data=DJANGO_DATA)
    proxy = make_proxy(policy=blocking_ddl("enforce"))
    django_db(port=proxy.port, dbname=db)
    try:
        with pytest.raises(utils.ProgrammingError) as info:
            migrate()
        cause = info.value.__cause__
        assert isinstance(cause, psycopg.errors.InsufficientPrivilege)
        assert cause.diag.sqlstate == "42501"
        assert (cause.diag.message_primary or "").startswith(f'{REFUSED} rule "no-ddl"')
        assert Author.objects.count() == 0  # the same connection goes on
    finally:
        django_db(port=pg_server.port, dbname="postgres").close()
    after = dump(pg_server, db, data=DJANGO_DATA)
    assert after == before
    assert [name for _, name in after[DJANGO_DATA[0]]] == ["0001_initial"] and after["functions"] == []
    refused = [e for e in proxy.events if e.get("enforced") == "block"]
    assert [e["rule"] for e in refused] == ["no-ddl"]
    assert "CREATE OR REPLACE FUNCTION django_app_set_updated_at()" in refused[0]["statement"]


def _seed_authors(server: pg.PgServer, dbname: str) -> None:
    """The authors, written directly: ORM writes to the masked table are another test's."""
    with psycopg.connect(_direct_dsn(server, dbname), autocommit=True) as conn:
        for i, name, email in AUTHORS:
            conn.execute(
                "INSERT INTO django_app_author (id, name, email, updated_at) VALUES (%s, %s, %s, now())",
                [i, name, email],
            )


def _orm_scenario() -> dict[str, Any]:
    """Create, filter, update and delete through the ORM (books), and read the authors (whose
    email the proxy masks); what it read back."""
    from django.db import transaction
    from django_app.models import Author, Book

    ada, grace = Author.objects.get(pk=1), Author.objects.get(name="Grace")
    Book.objects.create(author=ada, title="Notes", pages=10)
    Book.objects.bulk_create(
        [Book(author=grace, title="COBOL", pages=1), Book(author=grace, title="Compilers", pages=2)]
    )
    out: dict[str, Any] = {"emails": [ada.email, grace.email]}
    out["filtered"] = list(
        Book.objects.filter(author__name="Grace", pages__gte=1)
        .order_by("title")
        .values_list("title", flat=True)
    )
    out["by_email_domain"] = list(
        Book.objects.filter(author__email__endswith="example.org")
        .order_by("id")
        .values_list("title", flat=True)
    )
    out["updated"] = Book.objects.filter(title="COBOL").update(pages=300)
    book = Book.objects.get(title="Notes")
    before = book.updated_at
    book.pages = 11
    book.save()
    book.refresh_from_db()
    out["trigger_fired"] = book.updated_at > before
    with transaction.atomic():
        Book.objects.create(author=ada, title="Draft", pages=1)
        transaction.set_rollback(True)
    out["deleted"] = Book.objects.filter(pages__lt=5).delete()[0]
    out["books"] = list(Book.objects.order_by("id").values_list("id", "title", "pages", "author__email"))
    out["authors"] = [(a.id, a.name, a.email) for a in Author.objects.order_by("id")]
    return out


@pytest.mark.parametrize("binding", ["client", "server"])
def test_django_orm_through_masking_policy_is_as_direct_but_masked(
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    databases: Callable[[str], str],
    django_db: Callable[..., Any],
    binding: str,
) -> None:
    """psycopg's client-side binding (simple queries with literals, Django's default) and
    server-side binding (`$1` parameters in the extended protocol)."""
    through, direct = databases("django_orm_proxy"), databases("django_orm_direct")
    for db in (through, direct):
        django_db(port=pg_server.port, dbname=db, password=pg.APP_PASSWORD)
        migrate()
        _seed_authors(pg_server, db)
    proxy = make_proxy(policy=masking("django_app_author"))
    results: list[dict[str, Any]] = []
    server_side = binding == "server"
    _django_both(
        functools.partial(django_db, server_side_binding=server_side),
        proxy=proxy,
        server=pg_server,
        through=through,
        direct=direct,
        step=lambda: results.append(_orm_scenario()),
    )
    got, want = results
    assert want["filtered"] == ["COBOL", "Compilers"] and want["updated"] == 1
    assert want["trigger_fired"] is True and want["deleted"] == 1
    assert want["authors"] == list(AUTHORS)
    masked = {e: _masked(e) for _, _, e in AUTHORS}
    # A filter on the masked column filters the masked values, as everything that reads it.
    assert want["by_email_domain"] == got["by_email_domain"] == ["COBOL", "Compilers"]
    assert got == {
        **want,
        "emails": [masked[e] for e in want["emails"]],
        "books": [(i, t, p, masked[e]) for i, t, p, e in want["books"]],
        "authors": [(i, n, masked[e]) for i, n, e in want["authors"]],
    }
    assert any(e.get("masked_columns") == ["public.django_app_author.email"] for e in proxy.events)
    placeholders = any("$1" in str(e.get("statement")) for e in proxy.events)
    assert placeholders is server_side


def test_django_save_of_a_masked_row_is_refused_and_the_connection_goes_on(
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    databases: Callable[[str], str],
    django_db: Callable[..., Any],
) -> None:
    """`save()` writes every column back, the masked email (as read, masked) included: refused,
    so masked values never overwrite real ones."""
    from django.db import transaction, utils
    from django_app.models import Author

    db = databases("django_save")
    django_db(port=pg_server.port, dbname=db, password=pg.APP_PASSWORD)
    migrate()
    _seed_authors(pg_server, db)
    proxy = make_proxy(policy=masking("django_app_author"))
    django_db(port=proxy.port, dbname=db)
    try:
        ada = Author.objects.get(pk=1)
        ada.name = "Augusta Ada"
        with pytest.raises(utils.ProgrammingError) as info, transaction.atomic():
            ada.save()
        cause = info.value.__cause__
        assert isinstance(cause, psycopg.errors.InsufficientPrivilege)
        assert (cause.diag.message_primary or "").startswith(f'{REFUSED} rule "guardrail:mask-unprovable"')
        assert Author.objects.get(pk=1).name == "Ada"
    finally:
        django_db(port=pg_server.port, dbname="postgres").close()
    assert dump(pg_server, db, data=("SELECT id, name, email FROM django_app_author ORDER BY id",))[
        "SELECT id, name, email FROM django_app_author ORDER BY id"
    ] == list(AUTHORS)


def test_django_orm_writes_to_a_masked_table_pass(
    make_proxy: Callable[..., RunningProxy],
    pg_server: pg.PgServer,
    databases: Callable[[str], str],
    django_db: Callable[..., Any],
) -> None:
    """Django qualifies every column (`RETURNING "django_app_author"."id"`, `WHERE
    "django_app_author"."id" = 1`): writes that touch no masked column must pass as unqualified
    ones do, and they are refused today (guardrail:mask-unprovable; reported to the lead)."""
    from django_app.models import Author

    db = databases("django_masked_writes")
    django_db(port=pg_server.port, dbname=db, password=pg.APP_PASSWORD)
    migrate()
    proxy = make_proxy(policy=masking("django_app_author"))
    django_db(port=proxy.port, dbname=db)
    try:
        created = Author.objects.create(name="Ada", email=AUTHORS[0][2])  # INSERT ... RETURNING "t"."id"
        assert Author.objects.filter(pk=created.pk).update(name="Augusta Ada") == 1
        created.name = "Ada Lovelace"
        created.save(update_fields=["name"])  # UPDATE ... SET "name" = ... WHERE "t"."id" = ...
        assert Author.objects.get(pk=created.pk).email == _masked(AUTHORS[0][2])
        assert Author.objects.filter(pk=created.pk).delete()[0] == 1
    finally:
        django_db(port=pg_server.port, dbname="postgres").close()
