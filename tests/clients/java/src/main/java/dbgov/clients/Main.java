package dbgov.clients;

import java.io.StringReader;
import java.io.StringWriter;
import java.math.BigDecimal;
import java.sql.CallableStatement;
import java.sql.Types;
import java.util.UUID;
import java.net.URLEncoder;
import java.nio.charset.StandardCharsets;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DatabaseMetaData;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.ResultSetMetaData;
import java.sql.SQLException;
import java.sql.Savepoint;
import java.sql.Statement;
import java.sql.Timestamp;
import java.time.LocalDateTime;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.Properties;
import java.util.logging.Level;
import java.util.logging.Logger;
import org.postgresql.PGConnection;
import org.postgresql.PGStatement;
import org.postgresql.copy.CopyManager;
import org.postgresql.util.PSQLException;
import org.postgresql.util.ServerErrorMessage;

/**
 * Runs one scenario with pgjdbc (or Hibernate on top of it) and prints what it saw as JSON.
 *
 * <p>Usage: java -jar dbgov-java-client.jar JDBC_URL USER PASSWORD SCENARIO SCHEMA
 *
 * <p>The integration tests run each scenario through the dbgov proxy and directly against
 * PostgreSQL and compare the two outputs, so a scenario leaves SCHEMA's tables as it found them
 * and prints nothing that differs between two runs (no sequence values, no OIDs, no times of day).
 * A statement's error is part of the output (its SQLSTATE, server message and exception class),
 * never a crash: the test decides whether it was expected.
 */
public final class Main {
    /** The tables' fixed contents, as the test creates them: items 1..3. */
    private static final int ITEMS = 3;

    private final String url;
    private final String user;
    private final String password;
    private final String schema;

    private Main(String url, String user, String password, String schema) {
        this.url = url;
        this.user = user;
        this.password = password;
        this.schema = schema;
    }

    public static void main(String[] args) throws Exception {
        Logger.getLogger("").setLevel(Level.WARNING); // Hibernate's INFO banner is not output
        if (args.length != 5) {
            System.err.println("usage: java -jar dbgov-java-client.jar JDBC_URL USER PASSWORD SCENARIO SCHEMA"
                    + " (scenarios: prepared batch metadata transactions read_only_always settings driver cancel masked refused hibernate hibernate_validate)");
            System.exit(2);
        }
        Main main = new Main(args[0], args[1], args[2], args[4]);
        Map<String, Object> result = switch (args[3]) {
            case "prepared" -> main.prepared();
            case "batch" -> main.batch();
            case "metadata" -> main.metadata();
            case "transactions" -> main.transactions();
            case "read_only_always" -> main.readOnlyAlways();
            case "settings" -> main.settings();
            case "driver" -> main.driver();
            case "cancel" -> main.cancel();
            case "masked" -> main.masked();
            case "refused" -> main.refused();
            case "hibernate" -> Orm.run(main.url, main.user, main.password, main.schema);
            case "hibernate_validate" -> Orm.validate(main.url, main.user, main.password, main.schema);
            default -> {
                System.err.println("unknown scenario " + args[3]);
                System.exit(2);
                yield null;
            }
        };
        System.out.println(Json.write(result));
    }

    // ---- connections and results -------------------------------------------------------------

    /** The URL with extra parameters (already encoded) appended. */
    static String withParams(String base, String params) {
        return base + (base.contains("?") ? "&" : "?") + params;
    }

    private Connection connect(String params) throws SQLException {
        Properties props = new Properties();
        props.setProperty("user", user);
        props.setProperty("password", password);
        return DriverManager.getConnection(params.isEmpty() ? url : withParams(url, params), props);
    }

    private String t(String table) {
        return schema + "." + table;
    }

    static Object value(Object value) {
        if (value instanceof Timestamp ts) {
            return ts.toLocalDateTime().toString();
        }
        if (value instanceof java.sql.Date date) {
            return date.toLocalDate().toString();
        }
        if (value instanceof java.sql.Array array) {
            return array.toString();
        }
        return value;
    }

    static List<Object> rows(ResultSet rs) throws SQLException {
        List<Object> out = new ArrayList<>();
        ResultSetMetaData meta = rs.getMetaData();
        while (rs.next()) {
            Map<String, Object> row = new LinkedHashMap<>();
            for (int i = 1; i <= meta.getColumnCount(); i++) {
                row.put(meta.getColumnLabel(i), value(rs.getObject(i)));
            }
            out.add(row);
        }
        rs.close();
        return out;
    }

    static List<Object> types(ResultSet rs) throws SQLException {
        List<Object> out = new ArrayList<>();
        ResultSetMetaData meta = rs.getMetaData();
        for (int i = 1; i <= meta.getColumnCount(); i++) {
            out.add(meta.getColumnLabel(i) + ":" + meta.getColumnTypeName(i));
        }
        return out;
    }

    private static List<Object> query(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement()) {
            return rows(st.executeQuery(sql));
        }
    }

    private static long count(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return rs.getLong(1);
        }
    }

    private static Object scalar(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            rs.next();
            return value(rs.getObject(1));
        }
    }

    /** A failed statement as the test compares it; null when it succeeded. */
    static Map<String, Object> error(SQLException err) {
        Map<String, Object> out = new LinkedHashMap<>();
        SQLException cause = err;
        if (err instanceof BatchUpdateException && err.getNextException() != null) {
            cause = err.getNextException();
        }
        out.put("code", err.getSQLState());
        out.put("exception", err.getClass().getSimpleName());
        ServerErrorMessage server = cause instanceof PSQLException psql ? psql.getServerErrorMessage() : null;
        out.put("message", server != null ? server.getMessage() : cause.getMessage());
        if (server != null && server.getHint() != null) {
            out.put("hint", server.getHint());
        }
        return out;
    }

    interface Step {
        void run() throws SQLException;
    }

    static Map<String, Object> outcome(Step step) {
        try {
            step.run();
            return null;
        } catch (SQLException err) {
            return error(err);
        }
    }

    // ---- scenarios ---------------------------------------------------------------------------

    /**
     * One PreparedStatement with several parameters, run past prepareThreshold (default 5, then 1,
     * 0 and -1, which is binary from the first run) so pgjdbc switches to a named server-prepared
     * statement and binary transfer of ints, dates, timestamps and numerics; an UPDATE the same way.
     * Then preferQueryMode=simple, where pgjdbc writes the parameters into the query text.
     */
    private Map<String, Object> prepared() throws SQLException {
        Map<String, Object> out = new LinkedHashMap<>();
        for (String threshold : new String[] {"default", "1", "0", "-1", "simple"}) {
            String params = switch (threshold) {
                case "default" -> "";
                case "simple" -> "preferQueryMode=simple";
                default -> "prepareThreshold=" + threshold;
            };
            try (Connection conn = connect(params)) {
                Map<String, Object> run = new LinkedHashMap<>();
                List<Object> results = new ArrayList<>();
                List<Object> serverPrepared = new ArrayList<>();
                List<Object> updated = new ArrayList<>();
                String sql = "SELECT id, name, born, created, created_tz, score, id * ?::int8 AS times"
                        + " FROM " + t("people") + " WHERE id BETWEEN ? AND ? AND name <> ? AND created < ?"
                        + " ORDER BY id";
                try (PreparedStatement ps = conn.prepareStatement(sql)) {
                    for (int i = 0; i < 8; i++) {
                        ps.setLong(1, 1000L * i);
                        ps.setInt(2, 1 + i % 3);
                        ps.setInt(3, 3 + i % 3);
                        ps.setString(4, "nobody");
                        ps.setTimestamp(5, Timestamp.valueOf(LocalDateTime.of(2030, 1, 1, 0, 0)));
                        try (ResultSet rs = ps.executeQuery()) {
                            if (i == 0) {
                                run.put("types", types(rs));
                            }
                            results.add(rows(rs));
                        }
                        serverPrepared.add(ps.unwrap(PGStatement.class).isUseServerPrepare());
                    }
                }
                try (PreparedStatement ps = conn.prepareStatement(
                        "UPDATE " + t("items") + " SET label = ? WHERE id = ? AND id < ?")) {
                    for (int i = 0; i < 7; i++) {
                        ps.setString(1, new String[] {"one", "two", "three"}[i % 3]);
                        ps.setInt(2, 1 + i % 3);
                        ps.setInt(3, 100);
                        updated.add(ps.executeUpdate());
                    }
                }
                run.put("results", results);
                run.put("server_prepared", serverPrepared);
                run.put("updated", updated);
                run.put("items", query(conn, "SELECT id, label FROM " + t("items") + " ORDER BY id"));
                out.put("threshold_" + threshold, run);
            }
        }
        return out;
    }

    /** executeBatch of INSERTs, as they are and rewritten by pgjdbc into one multi-row VALUES. */
    private Map<String, Object> batch() throws SQLException {
        Map<String, Object> out = new LinkedHashMap<>();
        for (boolean rewrite : new boolean[] {false, true}) {
            Map<String, Object> run = new LinkedHashMap<>();
            try (Connection conn = connect("reWriteBatchedInserts=" + rewrite)) {
                try (PreparedStatement ps = conn.prepareStatement(
                        "INSERT INTO " + t("items") + " (id, label) VALUES (?, ?)")) {
                    for (int id = 1000; id < 1007; id++) {
                        ps.setInt(1, id);
                        ps.setString(2, "batch " + id);
                        ps.addBatch();
                    }
                    run.put("inserted", ps.executeBatch());
                }
                try (Statement st = conn.createStatement()) {
                    st.addBatch("INSERT INTO " + t("items") + " (id, label) VALUES (1100, 'plain')");
                    st.addBatch("UPDATE " + t("items") + " SET label = 'renamed' WHERE id >= 1000");
                    run.put("statements", st.executeBatch());
                }
                conn.setAutoCommit(false);
                try (PreparedStatement ps = conn.prepareStatement(
                        "INSERT INTO " + t("items") + " (id, label) VALUES (?, ?)")) {
                    for (int id = 1200; id < 1203; id++) {
                        ps.setInt(1, id);
                        ps.setString(2, "in transaction");
                        ps.addBatch();
                    }
                    run.put("in_transaction", ps.executeBatch());
                }
                conn.commit();
                conn.setAutoCommit(true);
                run.put("rows", query(conn, "SELECT id, label FROM " + t("items") + " WHERE id >= 1000 ORDER BY id"));
                try (Statement st = conn.createStatement()) {
                    run.put("deleted", st.executeUpdate("DELETE FROM " + t("items") + " WHERE id >= 1000"));
                }
            }
            out.put("rewrite_" + rewrite, run);
        }
        return out;
    }

    /** DatabaseMetaData: pgjdbc's catalog queries (information_schema._pg_expandarray and more). */
    private Map<String, Object> metadata() throws SQLException {
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection conn = connect("")) {
            DatabaseMetaData meta = conn.getMetaData();
            out.put("tables", rows(meta.getTables(null, schema, "%", new String[] {"TABLE", "SEQUENCE", "INDEX"})));
            out.put("columns", rows(meta.getColumns(null, schema, "people", "%")));
            out.put("primary_keys", rows(meta.getPrimaryKeys(null, schema, "orders")));
            out.put("index_info", rows(meta.getIndexInfo(null, schema, "orders", false, false)));
            out.put("imported_keys", rows(meta.getImportedKeys(null, schema, "orders")));
            out.put("exported_keys", rows(meta.getExportedKeys(null, schema, "people")));
            out.put("schemas", rows(meta.getSchemas(null, schema)));
            out.put("best_row", rows(meta.getBestRowIdentifier(null, schema, "people", DatabaseMetaData.bestRowSession, false)));
            out.put("table_privileges", rows(meta.getTablePrivileges(null, schema, "items")));
            out.put("column_privileges", rows(meta.getColumnPrivileges(null, schema, "items", "%")));
            out.put("functions", rows(meta.getFunctions(null, "pg_catalog", "upper")));
            out.put("procedure_columns", rows(meta.getProcedureColumns(null, "pg_catalog", "upper", "%")));
            out.put("type_info", rows(meta.getTypeInfo()).size() > 10);
            out.put("udts", rows(meta.getUDTs(null, schema, "%", null)));
            out.put("user", meta.getUserName());
            out.put("read_only", meta.isReadOnly());
        }
        return out;
    }

    /** setAutoCommit(false), commit, rollback, savepoints, setReadOnly, isolation levels. */
    private Map<String, Object> transactions() throws SQLException {
        Map<String, Object> out = new LinkedHashMap<>();
        String items = t("items");
        String tx = "SELECT count(*) FROM " + items + " WHERE label = 'tx'";
        try (Connection conn = connect("")) {
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.executeUpdate("INSERT INTO " + items + " VALUES (200, 'tx')");
                Savepoint first = conn.setSavepoint();
                st.executeUpdate("INSERT INTO " + items + " VALUES (201, 'tx')");
                out.put("before_savepoint_rollback", count(conn, tx));
                conn.rollback(first);
                Savepoint named = conn.setSavepoint("named");
                st.executeUpdate("INSERT INTO " + items + " VALUES (202, 'tx')");
                conn.releaseSavepoint(named);
                out.put("inside", count(conn, tx));
                conn.commit();
                out.put("after_commit", count(conn, tx));
                st.executeUpdate("INSERT INTO " + items + " VALUES (203, 'tx')");
                conn.rollback();
                out.put("after_rollback", count(conn, tx));
                out.put("duplicate", outcome(() -> st.executeUpdate("INSERT INTO " + items + " VALUES (1, 'dup')")));
                out.put("after_error", outcome(() -> count(conn, tx)));
                conn.rollback();
                st.executeUpdate("DELETE FROM " + items + " WHERE label = 'tx'");
                conn.commit();
            }
            conn.setReadOnly(true); // pgjdbc: BEGIN READ ONLY for the next transaction
            out.put("read_only_count", count(conn, "SELECT count(*) FROM " + items));
            out.put("read_only_setting", scalar(conn, "SHOW transaction_read_only"));
            out.put("read_only_write", outcome(() -> {
                try (Statement st = conn.createStatement()) {
                    st.executeUpdate("INSERT INTO " + items + " VALUES (210, 'ro')");
                }
            }));
            conn.rollback();
            conn.setReadOnly(false);
            out.put("read_write_setting", scalar(conn, "SHOW transaction_read_only"));
            conn.rollback();
            conn.setTransactionIsolation(Connection.TRANSACTION_SERIALIZABLE);
            out.put("isolation", scalar(conn, "SHOW transaction_isolation"));
            conn.commit();
            conn.setAutoCommit(true);
            conn.setTransactionIsolation(Connection.TRANSACTION_READ_COMMITTED);
            out.put("isolation_back", scalar(conn, "SHOW transaction_isolation"));
            out.put("items", count(conn, "SELECT count(*) FROM " + items));
        }
        return out;
    }

    /**
     * readOnly=true with readOnlyMode=always: pgjdbc makes the session read only (SET SESSION
     * CHARACTERISTICS AS TRANSACTION READ ONLY) and setReadOnly(false) makes it read write again.
     */
    private Map<String, Object> readOnlyAlways() throws SQLException {
        Map<String, Object> out = new LinkedHashMap<>();
        String items = t("items");
        try (Connection conn = connect("readOnly=true&readOnlyMode=always")) {
            // readOnlyMode=always: SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY
            out.put("always_setting", scalar(conn, "SHOW default_transaction_read_only"));
            out.put("always_write", outcome(() -> {
                try (Statement st = conn.createStatement()) {
                    st.executeUpdate("INSERT INTO " + items + " VALUES (211, 'ro')");
                }
            }));
            out.put("set_read_write", outcome(() -> conn.setReadOnly(false)));
            out.put("always_back", scalar(conn, "SHOW default_transaction_read_only"));
            out.put("items", count(conn, "SELECT count(*) FROM " + items));
        }
        return out;
    }

    /** currentSchema=SCHEMA and options=-c statement_timeout=5000 in the URL; setSchema. */
    private Map<String, Object> settings() throws SQLException {
        Map<String, Object> out = new LinkedHashMap<>();
        String params = "currentSchema=" + schema + "&options="
                + URLEncoder.encode("-c statement_timeout=5000", StandardCharsets.UTF_8);
        try (Connection conn = connect(params)) {
            out.put("search_path", scalar(conn, "SHOW search_path"));
            out.put("statement_timeout", scalar(conn, "SHOW statement_timeout"));
            out.put("schema", conn.getSchema());
            out.put("unqualified", query(conn, "SELECT id, name FROM people ORDER BY id"));
            List<Object> names = new ArrayList<>();
            try (PreparedStatement ps = conn.prepareStatement("SELECT name FROM people WHERE id = ?")) {
                for (int id = 1; id <= 7; id++) {
                    ps.setInt(1, 1 + id % 5);
                    try (ResultSet rs = ps.executeQuery()) {
                        rs.next();
                        names.add(rs.getString(1));
                    }
                }
            }
            out.put("prepared_unqualified", names);
            conn.setSchema("public");
            out.put("after_set_schema", scalar(conn, "SHOW search_path"));
            out.put("people_in_public", outcome(() -> count(conn, "SELECT count(*) FROM people")));
            conn.setSchema(schema);
            out.put("back", count(conn, "SELECT count(*) FROM people"));
        }
        return out;
    }

    /** A step whose value is part of the output, or its error when it fails. */
    interface Valued {
        Object get() throws SQLException;
    }

    static Object attempt(Valued step) {
        try {
            return step.get();
        } catch (SQLException err) {
            return Map.of("error", error(err));
        }
    }

    /**
     * What else pgjdbc sends on its own: isValid's empty query, RETURNING for generated keys, JDBC
     * escapes and CallableStatement, portals read in pieces (setFetchSize), setMaxRows, several
     * statements in one string, typed parameters (uuid, jsonb, arrays, bytea, interval),
     * updatable result sets, client info, CopyManager in and out. Each step's error is output.
     */
    private Map<String, Object> driver() throws SQLException {
        Map<String, Object> out = new LinkedHashMap<>();
        String items = t("items");
        try (Connection conn = connect("")) {
            out.put("is_valid", attempt(() -> conn.isValid(5)));
            out.put("generated_keys", attempt(() -> {
                try (PreparedStatement ps = conn.prepareStatement(
                        "INSERT INTO " + items + " (id, label) VALUES (?, ?)", Statement.RETURN_GENERATED_KEYS)) {
                    ps.setInt(1, 500);
                    ps.setString(2, "generated");
                    ps.executeUpdate();
                    return rows(ps.getGeneratedKeys());
                }
            }));
            out.put("generated_columns", attempt(() -> {
                try (PreparedStatement ps = conn.prepareStatement(
                        "UPDATE " + items + " SET label = ? WHERE id = ?", new String[] {"id", "label"})) {
                    ps.setString(1, "regenerated");
                    ps.setInt(2, 500);
                    ps.executeUpdate();
                    return rows(ps.getGeneratedKeys());
                }
            }));
            out.put("escapes", attempt(() -> {
                try (PreparedStatement ps = conn.prepareStatement(
                        "SELECT {fn ucase(?)} AS up, {fn length(label)} AS len, {d '2024-01-02'} AS day FROM "
                                + items + " WHERE id = ? ORDER BY {fn abs(id)}")) {
                    ps.setString(1, "shout");
                    ps.setInt(2, 1);
                    return rows(ps.executeQuery());
                }
            }));
            out.put("callable", attempt(() -> {
                try (CallableStatement call = conn.prepareCall("{? = call upper(?)}")) {
                    call.registerOutParameter(1, Types.VARCHAR);
                    call.setString(2, "called");
                    call.execute();
                    return call.getString(1);
                }
            }));
            out.put("max_rows", attempt(() -> {
                try (Statement st = conn.createStatement()) {
                    st.setMaxRows(2);
                    return rows(st.executeQuery("SELECT id FROM " + t("people") + " ORDER BY id"));
                }
            }));
            out.put("multi", attempt(() -> {
                List<Object> results = new ArrayList<>();
                try (Statement st = conn.createStatement()) {
                    boolean isResult = st.execute("SELECT 1 AS one; UPDATE " + items
                            + " SET label = label WHERE id = 1; SELECT 2 AS two");
                    while (true) {
                        if (isResult) {
                            results.add(rows(st.getResultSet()));
                        } else if (st.getUpdateCount() != -1) {
                            results.add(st.getUpdateCount());
                        } else {
                            break;
                        }
                        isResult = st.getMoreResults();
                    }
                }
                return results;
            }));
            out.put("types", attempt(() -> {
                try (PreparedStatement ps = conn.prepareStatement("SELECT ?::uuid AS u, ?::jsonb AS j,"
                        + " ?::int4[] AS a, ?::bytea AS b, ?::interval AS i, ? AS n, ?::inet AS ip")) {
                    for (int i = 0; i < 6; i++) { // past the threshold: binary arrays and uuids
                        ps.setObject(1, UUID.fromString("a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"));
                        ps.setString(2, "{\"k\": [1, 2]}");
                        ps.setArray(3, conn.createArrayOf("int4", new Integer[] {1, 2, 3}));
                        ps.setBytes(4, new byte[] {0, 1, 2, (byte) 255});
                        ps.setString(5, "1 day 2 hours");
                        ps.setNull(6, Types.INTEGER);
                        ps.setString(7, "10.1.2.3/32");
                        try (ResultSet rs = ps.executeQuery()) {
                            rs.next();
                            if (i == 5) {
                                return List.of(rs.getObject(1).toString(), rs.getString(2), rs.getString(3),
                                        java.util.HexFormat.of().formatHex(rs.getBytes(4)), rs.getString(5),
                                        String.valueOf(rs.getObject(6)), rs.getString(7));
                            }
                        }
                    }
                    return null;
                }
            }));
            out.put("client_info", attempt(() -> {
                conn.setClientInfo("ApplicationName", "dbgov-java-test");
                return scalar(conn, "SHOW application_name");
            }));
            out.put("updatable", attempt(() -> {
                try (Statement st = conn.createStatement(ResultSet.TYPE_FORWARD_ONLY, ResultSet.CONCUR_UPDATABLE);
                        ResultSet rs = st.executeQuery("SELECT id, label FROM " + items + " WHERE id = 500")) {
                    rs.next();
                    rs.updateString("label", "updated in place");
                    rs.updateRow();
                }
                return query(conn, "SELECT label FROM " + items + " WHERE id = 500");
            }));
            out.put("copy", attempt(() -> {
                CopyManager copy = conn.unwrap(PGConnection.class).getCopyAPI();
                long in;
                try {
                    in = copy.copyIn("COPY " + items + " (id, label) FROM STDIN WITH (FORMAT csv)",
                            new StringReader("600,copied\n601,copied too\n"));
                } catch (java.io.IOException err) {
                    throw new SQLException(err);
                }
                StringWriter text = new StringWriter();
                try {
                    copy.copyOut("COPY (SELECT id, label FROM " + items + " WHERE id >= 500 ORDER BY id) TO STDOUT", text);
                } catch (java.io.IOException err) {
                    throw new SQLException(err);
                }
                return List.of(in, text.toString());
            }));
            try (Statement st = conn.createStatement()) {
                out.put("cleaned", st.executeUpdate("DELETE FROM " + items + " WHERE id >= 500"));
            }
            conn.setAutoCommit(false);
            out.put("fetch_size", attempt(() -> {
                // autocommit off and a fetch size: a named portal read 2 rows at a time (PortalSuspended)
                List<Object> ids = new ArrayList<>();
                try (PreparedStatement ps = conn.prepareStatement(
                        "SELECT id FROM " + t("people") + " WHERE id > ? ORDER BY id")) {
                    ps.setFetchSize(2);
                    ps.setInt(1, 0);
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) {
                            ids.add(rs.getInt(1));
                        }
                    }
                }
                conn.commit();
                return ids;
            }));
            conn.rollback();
            conn.setAutoCommit(true);
            out.put("items", count(conn, "SELECT count(*) FROM " + items));
        }
        return out;
    }

    /** setQueryTimeout: pgjdbc cancels the statement with a CancelRequest on a new connection. */
    private Map<String, Object> cancel() throws SQLException {
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection conn = connect(""); Statement st = conn.createStatement()) {
            st.setQueryTimeout(1);
            out.put("timed_out", outcome(() -> st.executeQuery("SELECT pg_sleep(4)").close()));
            out.put("after", count(conn, "SELECT count(*) FROM " + t("items")));
        }
        return out;
    }

    /** people.email read by a plain statement, a prepared one past the threshold, unqualified. */
    private Map<String, Object> masked() throws SQLException {
        Map<String, Object> out = new LinkedHashMap<>();
        try (Connection conn = connect("")) {
            out.put("simple", query(conn, "SELECT id, email FROM " + t("people") + " ORDER BY id LIMIT 2"));
            List<Object> prepared = new ArrayList<>();
            try (PreparedStatement ps = conn.prepareStatement(
                    "SELECT id, email FROM " + t("people") + " WHERE id = ? AND score > ?")) {
                for (int i = 0; i < 7; i++) {
                    ps.setInt(1, 1 + i % 5);
                    ps.setBigDecimal(2, BigDecimal.ZERO);
                    try (ResultSet rs = ps.executeQuery()) {
                        prepared.addAll(rows(rs));
                    }
                }
            }
            out.put("prepared", prepared);
        }
        try (Connection conn = connect("currentSchema=" + schema + "&prepareThreshold=1")) {
            out.put("unqualified", query(conn, "SELECT id, email FROM people WHERE id > 3 ORDER BY id"));
            conn.setAutoCommit(false);
            try (PreparedStatement ps = conn.prepareStatement("SELECT id, email FROM people ORDER BY id")) {
                ps.setFetchSize(2); // a portal read two rows at a time
                out.put("fetched", rows(ps.executeQuery()));
            }
            conn.commit();
        }
        String startupPath = "options=" + URLEncoder.encode("-c search_path=" + schema, StandardCharsets.UTF_8);
        try (Connection conn = connect(startupPath)) { // the schema chosen in the startup packet
            out.put("startup_search_path", query(conn, "SELECT id, email FROM people WHERE id = 1"));
        }
        try (Connection conn = connect("")) {
            conn.setSchema(schema); // SET SESSION search_path
            out.put("set_schema", query(conn, "SELECT id, email FROM people WHERE id = 2"));
        }
        try (Connection conn = connect("preferQueryMode=simple")) {
            try (PreparedStatement ps = conn.prepareStatement(
                    "SELECT id, email FROM " + t("people") + " WHERE id = ?")) {
                ps.setInt(1, 2); // simple mode: pgjdbc writes the value into the query text
                out.put("simple_mode", rows(ps.executeQuery()));
            }
        }
        return out;
    }

    /**
     * Statements the blocking policy refuses (DELETE on items, DROP), by a prepared statement past
     * the threshold, a plain statement, a batch and inside a transaction; after each the same
     * connection must go on. The DELETEs outside a transaction hit a real row (directly it goes,
     * and is put back); the others touch nothing where PostgreSQL runs them.
     */
    private Map<String, Object> refused() throws SQLException {
        Map<String, Object> out = new LinkedHashMap<>();
        String items = t("items");
        String all = "SELECT count(*) FROM " + items;
        String restore = "INSERT INTO " + items + " VALUES (3, 'three') ON CONFLICT (id) DO NOTHING";
        try (Connection conn = connect("")) {
            List<Object> prepared = new ArrayList<>();
            try (PreparedStatement ps = conn.prepareStatement("DELETE FROM " + items + " WHERE id = ?")) {
                for (int i = 0; i < 7; i++) {
                    ps.setInt(1, 3);
                    prepared.add(outcome(ps::executeUpdate));
                    out.put("after_prepared", count(conn, all));
                    try (Statement st = conn.createStatement()) {
                        st.executeUpdate(restore);
                    }
                }
            }
            out.put("prepared", prepared);
            out.put("simple", outcome(() -> {
                try (Statement st = conn.createStatement()) {
                    st.execute("DROP TABLE IF EXISTS " + t("never_created"));
                }
            }));
            out.put("after_simple", count(conn, all));
            out.put("batch", outcome(() -> {
                try (Statement st = conn.createStatement()) {
                    st.addBatch("UPDATE " + items + " SET label = label WHERE id = 1");
                    st.addBatch("DELETE FROM " + items + " WHERE id = -1");
                    st.executeBatch();
                }
            }));
            out.put("after_batch", count(conn, all));
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.executeUpdate("UPDATE " + items + " SET label = label WHERE id = 2");
                out.put("in_transaction", outcome(() -> st.executeUpdate("DELETE FROM " + items + " WHERE id = -1")));
                out.put("next_in_transaction", outcome(() -> count(conn, all)));
                conn.rollback();
                out.put("after_rollback", count(conn, all));
                Savepoint savepoint = conn.setSavepoint();
                out.put("in_savepoint", outcome(() -> st.executeUpdate("DELETE FROM " + items + " WHERE id = -1")));
                conn.rollback(savepoint);
                out.put("after_savepoint", count(conn, all));
                conn.commit();
            }
            conn.setAutoCommit(true);
            out.put("after", count(conn, all));
        }
        try (Connection conn = connect("autosave=always")) {
            // pgjdbc wraps each statement in SAVEPOINT PGJDBC_AUTOSAVE and rolls back to it on an
            // error: after a refusal the transaction goes on
            conn.setAutoCommit(false);
            try (Statement st = conn.createStatement()) {
                st.executeUpdate("UPDATE " + items + " SET label = label WHERE id = 2");
                out.put("autosave", outcome(() -> st.executeUpdate("DELETE FROM " + items + " WHERE id = -1")));
                out.put("after_autosave", count(conn, all));
                conn.commit();
            }
        }
        return out;
    }
}
