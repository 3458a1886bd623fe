// Command pgxclient runs one scenario with Go's pgx driver and prints what it saw as JSON.
//
// Usage: pgxclient URL SCENARIO SCHEMA
//
// The integration tests run each scenario through the dbgov proxy and directly against
// PostgreSQL and compare the two outputs; a scenario therefore leaves SCHEMA's tables as it
// found them. A statement's error is part of the output (its SQLSTATE and message), never a
// crash: the test decides whether it was expected.
package main

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	_ "github.com/jackc/pgx/v5/stdlib"
)

type result = map[string]any

type scenario func(ctx context.Context, conn *pgx.Conn, url, schema string) (result, error)

var scenarios = map[string]scenario{
	"simple":         simple,
	"params":         params,
	"prepared":       prepared,
	"transaction":    transaction,
	"refused":        refused,
	"masked":         masked,
	"batch":          batch,
	"copyfrom":       copyFrom,
	"stdlib":         stdlib,
	"stdlib_refused": stdlibRefused,
}

func main() {
	if len(os.Args) != 4 {
		fmt.Fprintln(os.Stderr, "usage: pgxclient URL SCENARIO SCHEMA")
		os.Exit(2)
	}
	url, name, schema := os.Args[1], os.Args[2], os.Args[3]
	run, ok := scenarios[name]
	if !ok {
		fmt.Fprintf(os.Stderr, "unknown scenario %q\n", name)
		os.Exit(2)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		fail(err)
	}
	defer conn.Close(context.Background())
	out, err := run(ctx, conn, url, schema)
	if err != nil {
		fail(err)
	}
	if err := json.NewEncoder(os.Stdout).Encode(out); err != nil {
		fail(err)
	}
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "pgxclient:", err)
	os.Exit(1)
}

// pgError is a statement's failure as the test compares it: SQLSTATE and primary message.
// A nil error is JSON null: directly against PostgreSQL the statement succeeds.
func pgError(err error) result {
	if err == nil {
		return nil
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) {
		return result{"code": pgErr.Code, "message": pgErr.Message}
	}
	return result{"code": "", "message": err.Error()}
}

func rows(ctx context.Context, conn *pgx.Conn, sql string, args ...any) ([][]any, error) {
	got, err := conn.Query(ctx, sql, args...)
	if err != nil {
		return nil, err
	}
	out := [][]any{}
	for got.Next() {
		values, err := got.Values()
		if err != nil {
			got.Close()
			return nil, err
		}
		out = append(out, values)
	}
	return out, got.Err()
}

func count(ctx context.Context, conn *pgx.Conn, sql string, args ...any) (int64, error) {
	var n int64
	err := conn.QueryRow(ctx, sql, args...).Scan(&n)
	return n, err
}

func simple(ctx context.Context, conn *pgx.Conn, _, schema string) (result, error) {
	people, err := rows(ctx, conn, "SELECT id, name FROM "+schema+".people ORDER BY id", pgx.QueryExecModeSimpleProtocol)
	if err != nil {
		return nil, err
	}
	one, err := rows(ctx, conn, "SELECT 1 AS one, 'x'::text AS x", pgx.QueryExecModeSimpleProtocol)
	return result{"people": people, "constant": one}, err
}

func params(ctx context.Context, conn *pgx.Conn, _, schema string) (result, error) {
	picked, err := rows(ctx, conn, "SELECT id, name FROM "+schema+".people WHERE id IN ($1,$2) ORDER BY id", 1, 3)
	if err != nil {
		return nil, err
	}
	sum, err := rows(ctx, conn, "SELECT $1::int+$2::int AS sum", 40, 2)
	return result{"picked": picked, "sum": sum}, err
}

func prepared(ctx context.Context, conn *pgx.Conn, _, schema string) (result, error) {
	if _, err := conn.Prepare(ctx, "by_id", "SELECT name FROM "+schema+".people WHERE id=$1"); err != nil {
		return nil, err
	}
	names := []string{}
	for id := 1; id <= 5; id++ {
		var name string
		if err := conn.QueryRow(ctx, "by_id", id).Scan(&name); err != nil {
			return nil, err
		}
		names = append(names, name)
	}
	return result{"names": names}, nil
}

func transaction(ctx context.Context, conn *pgx.Conn, _, schema string) (result, error) {
	items := schema + ".items"
	tx, err := conn.Begin(ctx)
	if err != nil {
		return nil, err
	}
	if _, err := tx.Exec(ctx, "INSERT INTO "+items+" (id, label) VALUES ($1,$2),($3,$4)", 100, "tx", 101, "tx"); err != nil {
		return nil, err
	}
	var inside int64
	if err := tx.QueryRow(ctx, "SELECT count(*) FROM "+items+" WHERE label = 'tx'").Scan(&inside); err != nil {
		return nil, err
	}
	if err := tx.Rollback(ctx); err != nil {
		return nil, err
	}
	afterRollback, err := count(ctx, conn, "SELECT count(*) FROM "+items+" WHERE label = 'tx'")
	if err != nil {
		return nil, err
	}
	err = pgx.BeginFunc(ctx, conn, func(tx pgx.Tx) error {
		_, err := tx.Exec(ctx, "INSERT INTO "+items+" (id, label) VALUES ($1,$2)", 102, "tx-commit")
		return err
	})
	if err != nil {
		return nil, err
	}
	afterCommit, err := count(ctx, conn, "SELECT count(*) FROM "+items+" WHERE label = 'tx-commit'")
	if err != nil {
		return nil, err
	}
	if _, err := conn.Exec(ctx, "DELETE FROM "+items+" WHERE label = 'tx-commit'"); err != nil {
		return nil, err
	}
	return result{"inside": inside, "after_rollback": afterRollback, "after_commit": afterCommit}, nil
}

// refused: statements the blocking policy refuses, by the extended protocol (pgx's default)
// and the simple one, outside and inside a transaction; after each the connection must still
// work. The DELETE outside a transaction hits a real row (PostgreSQL runs it: the count after
// drops by one, and the row is put back); the others touch nothing where PostgreSQL runs them.
func refused(ctx context.Context, conn *pgx.Conn, _, schema string) (result, error) {
	items := schema + ".items"
	out := result{}
	_, err := conn.Exec(ctx, "DELETE FROM "+items+" WHERE id=$1", 3)
	out["extended"] = pgError(err)
	n, err := count(ctx, conn, "SELECT count(*) FROM "+items)
	if err != nil {
		return nil, err
	}
	out["after_extended"] = n
	if _, err := conn.Exec(ctx, restoreRow(schema)); err != nil {
		return nil, err
	}
	_, err = conn.Exec(ctx, "DROP TABLE IF EXISTS "+schema+".never_created", pgx.QueryExecModeSimpleProtocol)
	out["simple"] = pgError(err)
	if n, err = count(ctx, conn, "SELECT count(*) FROM "+items); err != nil {
		return nil, err
	}
	out["after_simple"] = n
	tx, err := conn.Begin(ctx)
	if err != nil {
		return nil, err
	}
	_, err = tx.Exec(ctx, "DELETE FROM "+items+" WHERE id=$1", -1)
	out["in_transaction"] = pgError(err)
	_, err = tx.Exec(ctx, "SELECT 1")
	out["next_in_transaction"] = pgError(err)
	if err := tx.Rollback(ctx); err != nil {
		return nil, err
	}
	if n, err = count(ctx, conn, "SELECT count(*) FROM "+items); err != nil {
		return nil, err
	}
	out["after_rollback"] = n
	return out, nil
}

// restoreRow puts back the row the refusal scenarios try to delete (directly, they do).
func restoreRow(schema string) string {
	return "INSERT INTO " + schema + ".items (id, label) VALUES (3, 'three') ON CONFLICT (id) DO NOTHING"
}

func masked(ctx context.Context, conn *pgx.Conn, _, schema string) (result, error) {
	extended, err := rows(ctx, conn, "SELECT id, email FROM "+schema+".people WHERE id<=$1 ORDER BY id", 2)
	if err != nil {
		return nil, err
	}
	simpleRows, err := rows(ctx, conn, "SELECT id, email FROM "+schema+".people ORDER BY id LIMIT 2", pgx.QueryExecModeSimpleProtocol)
	if err != nil {
		return nil, err
	}
	return result{"extended": extended, "simple": simpleRows}, nil
}

// batch: several queries pipelined in one round trip (pgx sends every Parse/Bind/Execute, then
// one Sync), with a write in the middle that the later read must see.
func batch(ctx context.Context, conn *pgx.Conn, _, schema string) (result, error) {
	items := schema + ".items"
	b := &pgx.Batch{}
	b.Queue("SELECT count(*) FROM " + items)
	b.Queue("INSERT INTO "+items+" (id, label) VALUES ($1,$2)", 200, "batch")
	b.Queue("SELECT label FROM "+items+" WHERE id=$1", 200)
	b.Queue("DELETE FROM "+items+" WHERE id=$1", 200)
	b.Queue("SELECT count(*) FROM " + items)
	br := conn.SendBatch(ctx, b)
	var before, after int64
	var label string
	if err := br.QueryRow().Scan(&before); err != nil {
		return nil, err
	}
	inserted, err := br.Exec()
	if err != nil {
		return nil, err
	}
	if err := br.QueryRow().Scan(&label); err != nil {
		return nil, err
	}
	deleted, err := br.Exec()
	if err != nil {
		return nil, err
	}
	if err := br.QueryRow().Scan(&after); err != nil {
		return nil, err
	}
	if err := br.Close(); err != nil {
		return nil, err
	}
	return result{
		"before": before, "inserted": inserted.RowsAffected(), "label": label,
		"deleted": deleted.RowsAffected(), "after": after,
	}, nil
}

// copyFrom: pgx's CopyFrom is a binary COPY ... FROM STDIN.
func copyFrom(ctx context.Context, conn *pgx.Conn, _, schema string) (result, error) {
	src := [][]any{{300, "copied"}, {301, "copied"}, {302, "copied"}}
	n, err := conn.CopyFrom(ctx, pgx.Identifier{schema, "items"}, []string{"id", "label"}, pgx.CopyFromRows(src))
	if err != nil {
		return nil, err
	}
	got, err := rows(ctx, conn, "SELECT id, label FROM "+schema+".items WHERE label = 'copied' ORDER BY id")
	if err != nil {
		return nil, err
	}
	if _, err := conn.Exec(ctx, "DELETE FROM "+schema+".items WHERE label = 'copied'"); err != nil {
		return nil, err
	}
	return result{"copied": n, "rows": got}, nil
}

// stdlib: database/sql over pgx (what most Go ORMs sit on): a pooled *sql.DB, a prepared
// *sql.Stmt, a transaction.
func stdlib(ctx context.Context, _ *pgx.Conn, url, schema string) (result, error) {
	db, err := sql.Open("pgx", url)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	var name string
	if err := db.QueryRowContext(ctx, "SELECT name FROM "+schema+".people WHERE id=$1", 2).Scan(&name); err != nil {
		return nil, err
	}
	stmt, err := db.PrepareContext(ctx, "SELECT email FROM "+schema+".people WHERE id=$1")
	if err != nil {
		return nil, err
	}
	defer stmt.Close()
	emails := []string{}
	for id := 1; id <= 3; id++ {
		var email string
		if err := stmt.QueryRowContext(ctx, id).Scan(&email); err != nil {
			return nil, err
		}
		emails = append(emails, email)
	}
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return nil, err
	}
	if _, err := tx.ExecContext(ctx, "INSERT INTO "+schema+".items (id, label) VALUES ($1,$2)", 400, "stdlib"); err != nil {
		return nil, err
	}
	var inside int64
	if err := tx.QueryRowContext(ctx, "SELECT count(*) FROM "+schema+".items WHERE label = 'stdlib'").Scan(&inside); err != nil {
		return nil, err
	}
	if err := tx.Rollback(); err != nil {
		return nil, err
	}
	var after int64
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM "+schema+".items WHERE label = 'stdlib'").Scan(&after); err != nil {
		return nil, err
	}
	return result{"name": name, "emails": emails, "inside": inside, "after_rollback": after}, nil
}

// stdlibRefused: a refusal through database/sql, then the same *sql.DB goes on working.
func stdlibRefused(ctx context.Context, _ *pgx.Conn, url, schema string) (result, error) {
	db, err := sql.Open("pgx", url)
	if err != nil {
		return nil, err
	}
	defer db.Close()
	db.SetMaxOpenConns(1) // the refused statement and the next one share one connection
	_, err = db.ExecContext(ctx, "DELETE FROM "+schema+".items WHERE id=$1", 3)
	refusal := pgError(err)
	var n int64
	if err := db.QueryRowContext(ctx, "SELECT count(*) FROM "+schema+".items WHERE id<=$1", 10).Scan(&n); err != nil {
		return nil, err
	}
	if _, err := db.ExecContext(ctx, restoreRow(schema)); err != nil {
		return nil, err
	}
	return result{"delete": refusal, "after": n}, nil
}
