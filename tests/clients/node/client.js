// Runs one scenario with node-postgres (pg) and prints what it saw as JSON.
//
// Usage: node client.js URL SCENARIO SCHEMA
//
// The integration tests run each scenario through the dbgov proxy and directly against
// PostgreSQL and compare the two outputs; a scenario therefore leaves SCHEMA's tables as it
// found them. A statement's error is part of the output (its SQLSTATE and message), never a
// crash: the test decides whether it was expected.
'use strict';

const { Client } = require('pg');

// A failed statement as the test compares it; null when it succeeded (as directly it does).
async function outcome(promise) {
  try {
    await promise;
    return null;
  } catch (err) {
    return { code: err.code || '', message: err.message };
  }
}

async function count(client, text, values) {
  const res = await client.query(text, values);
  return Number(res.rows[0].count);
}

const scenarios = {
  // No values: node-postgres sends a simple Query message.
  async simple(client, schema) {
    const people = await client.query(`SELECT id, name FROM ${schema}.people ORDER BY id`);
    const multi = await client.query('SELECT 1 AS one; SELECT 2 AS two');
    return { people: people.rows, multi: multi.map((r) => r.rows) };
  },

  async params(client, schema) {
    const picked = await client.query(
      `SELECT id, name FROM ${schema}.people WHERE id IN ($1,$2) ORDER BY id`,
      [1, 3],
    );
    const sum = await client.query('SELECT $1::int+$2::int AS sum', [40, 2]);
    return { picked: picked.rows, sum: sum.rows };
  },

  // A named query is parsed once on the connection, then bound and executed by name.
  async prepared(client, schema) {
    const names = [];
    for (let id = 1; id <= 5; id += 1) {
      const res = await client.query({
        name: 'person_by_id',
        text: `SELECT name FROM ${schema}.people WHERE id=$1`,
        values: [id],
      });
      names.push(res.rows[0].name);
    }
    return { names };
  },

  async transaction(client, schema) {
    const items = `${schema}.items`;
    await client.query('BEGIN');
    await client.query(`INSERT INTO ${items} (id, label) VALUES ($1,$2),($3,$4)`, [100, 'tx', 101, 'tx']);
    const inside = await count(client, `SELECT count(*) FROM ${items} WHERE label = 'tx'`);
    await client.query('ROLLBACK');
    const afterRollback = await count(client, `SELECT count(*) FROM ${items} WHERE label = 'tx'`);
    await client.query('BEGIN');
    await client.query(`INSERT INTO ${items} (id, label) VALUES ($1,$2)`, [102, 'tx-commit']);
    await client.query('COMMIT');
    const afterCommit = await count(client, `SELECT count(*) FROM ${items} WHERE label = 'tx-commit'`);
    await client.query(`DELETE FROM ${items} WHERE label = 'tx-commit'`);
    return { inside, after_rollback: afterRollback, after_commit: afterCommit };
  },

  // Statements the blocking policy refuses, by the extended and the simple protocol, prepared
  // and inside a transaction; after each the same connection must still work. The DELETEs
  // outside a transaction hit a real row (PostgreSQL runs them: the count after drops by one,
  // and the row is put back); the others touch nothing where PostgreSQL runs them.
  async refused(client, schema) {
    const items = `${schema}.items`;
    const restore = () => client.query(`INSERT INTO ${items} (id, label) VALUES (3, 'three') ON CONFLICT (id) DO NOTHING`);
    const out = {};
    out.extended = await outcome(client.query(`DELETE FROM ${items} WHERE id=$1`, [3]));
    out.after_extended = await count(client, `SELECT count(*) FROM ${items}`);
    await restore();
    out.prepared = await outcome(
      client.query({ name: 'refused_delete', text: `DELETE FROM ${items} WHERE id=$1`, values: [3] }),
    );
    out.after_prepared = await count(client, `SELECT count(*) FROM ${items}`);
    await restore();
    out.simple = await outcome(client.query(`DROP TABLE IF EXISTS ${schema}.never_created`));
    out.after_simple = await count(client, `SELECT count(*) FROM ${items}`);
    await client.query('BEGIN');
    out.in_transaction = await outcome(client.query(`DELETE FROM ${items} WHERE id=$1`, [-1]));
    out.next_in_transaction = await outcome(client.query('SELECT 1'));
    await client.query('ROLLBACK');
    out.after_rollback = await count(client, `SELECT count(*) FROM ${items}`);
    return out;
  },

  async masked(client, schema) {
    const simple = await client.query(`SELECT id, email FROM ${schema}.people ORDER BY id LIMIT 2`);
    const extended = await client.query(
      `SELECT id, email FROM ${schema}.people WHERE id<=$1 ORDER BY id`,
      [2],
    );
    const prepared = await client.query({
      name: 'emails',
      text: `SELECT email FROM ${schema}.people WHERE id=$1`,
      values: [3],
    });
    return { simple: simple.rows, extended: extended.rows, prepared: prepared.rows };
  },
};

async function main() {
  const [url, name, schema] = process.argv.slice(2);
  const scenario = scenarios[name];
  if (!url || !schema || !scenario) {
    process.stderr.write(`usage: node client.js URL SCENARIO SCHEMA (scenarios: ${Object.keys(scenarios)})\n`);
    process.exit(2);
  }
  const client = new Client({ connectionString: url });
  await client.connect();
  try {
    process.stdout.write(`${JSON.stringify(await scenario(client, schema))}\n`);
  } finally {
    await client.end();
  }
}

main().catch((err) => {
  process.stderr.write(`node client: ${err.stack || err}\n`);
  process.exit(1);
});
