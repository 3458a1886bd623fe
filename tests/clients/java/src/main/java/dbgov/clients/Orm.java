package dbgov.clients;

import jakarta.persistence.LockModeType;
import jakarta.persistence.criteria.CriteriaBuilder;
import jakarta.persistence.criteria.CriteriaQuery;
import jakarta.persistence.criteria.Root;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.hibernate.SessionFactory;
import org.hibernate.cfg.Configuration;

/**
 * Hibernate ORM on pgjdbc: persist a batch of entities with sequence ids, flush, query with JPQL
 * and Criteria, update, delete by id, read an entity whose column the policy masks (also through
 * a join); identity ids, optimistic and pessimistic locking, pagination and a native query. The
 * schema is the test's (hbm2ddl none); the scenario deletes the rows it wrote.
 */
final class Orm {
    private Orm() {}

    static Map<String, Object> run(String url, String user, String password, String schema) {
        try (SessionFactory factory = configuration(url, user, password, schema).buildSessionFactory()) {
            return scenario(factory);
        }
    }

    /** hbm2ddl.auto=validate: Hibernate reads the tables, columns and sequences through DatabaseMetaData. */
    static Map<String, Object> validate(String url, String user, String password, String schema) {
        Configuration cfg = configuration(url, user, password, schema).setProperty("hibernate.hbm2ddl.auto", "validate");
        Map<String, Object> out = new LinkedHashMap<>();
        try (SessionFactory factory = cfg.buildSessionFactory()) {
            out.put("validated", factory.isOpen());
        } catch (RuntimeException err) {
            Throwable cause = err;
            while (cause.getCause() != null) {
                cause = cause.getCause();
            }
            out.put("error", err.getClass().getSimpleName() + ": " + cause.getMessage());
        }
        return out;
    }

    private static Configuration configuration(String url, String user, String password, String schema) {
        return new Configuration()
                .addAnnotatedClass(Person.class)
                .addAnnotatedClass(Note.class)
                .addAnnotatedClass(Tag.class)
                .setProperty("hibernate.connection.url", url)
                .setProperty("hibernate.connection.username", user)
                .setProperty("hibernate.connection.password", password)
                .setProperty("hibernate.connection.pool_size", "1")
                .setProperty("hibernate.default_schema", schema)
                .setProperty("hibernate.hbm2ddl.auto", "none")
                .setProperty("hibernate.jdbc.batch_size", "10")
                .setProperty("hibernate.order_inserts", "true")
                .setProperty("hibernate.order_updates", "true");
    }

    private static Map<String, Object> scenario(SessionFactory factory) {
        Map<String, Object> out = new LinkedHashMap<>();
        List<Long> ids = new ArrayList<>();
        factory.inTransaction(session -> {
            for (int i = 0; i < 6; i++) {
                Note note = new Note(1 + i % 3, "note " + i, i % 4);
                session.persist(note);
                ids.add(note.getId());
            }
            session.flush(); // one JDBC batch of six INSERTs
        });
        long first = ids.get(0);
        List<Long> offsets = new ArrayList<>();
        for (Long id : ids) {
            offsets.add(id - first);
        }
        out.put("offsets", offsets);
        out.put("jpql", factory.fromSession(session -> notes(session
                .createSelectionQuery("from Note n where n.stars >= :min order by n.body", Note.class)
                .setParameter("min", 1)
                .getResultList(), first)));
        out.put("criteria", factory.fromSession(session -> {
            CriteriaBuilder cb = session.getCriteriaBuilder();
            CriteriaQuery<Note> query = cb.createQuery(Note.class);
            Root<Note> note = query.from(Note.class);
            query.select(note).where(cb.equal(note.get("personId"), 1)).orderBy(cb.asc(note.get("body")));
            return notes(session.createSelectionQuery(query).getResultList(), first);
        }));
        out.put("aggregate", factory.fromSession(session -> {
            Object[] row = session.createSelectionQuery(
                    "select count(n), max(n.stars), sum(n.stars) from Note n", Object[].class).getSingleResult();
            return List.of(row[0], row[1], row[2]);
        }));
        factory.inTransaction(session -> session.find(Note.class, ids.get(0)).setStars(5));
        out.put("bulk_updated", factory.fromTransaction(session -> session
                .createMutationQuery("update Note n set n.stars = n.stars + 1 where n.personId = :person")
                .setParameter("person", 2)
                .executeUpdate()));
        factory.inTransaction(session -> session.remove(session.find(Note.class, ids.get(1))));
        out.put("after_delete", factory.fromSession(session -> notes(session
                .createSelectionQuery("from Note n order by n.id", Note.class).getResultList(), first)));
        out.put("deleted_is_gone", factory.fromSession(session -> session.find(Note.class, ids.get(1)) == null));
        out.put("people", factory.fromSession(session -> {
            List<Object> people = new ArrayList<>();
            for (Person person : session.createSelectionQuery("from Person p order by p.id", Person.class)
                    .getResultList()) {
                people.add(person.json());
            }
            return people;
        }));
        out.put("found_email", factory.fromSession(session -> session.find(Person.class, 3).getEmail()));
        out.put("emails_by_criteria", factory.fromSession(session -> {
            CriteriaBuilder cb = session.getCriteriaBuilder();
            CriteriaQuery<String> query = cb.createQuery(String.class);
            Root<Person> person = query.from(Person.class);
            query.select(person.get("email")).where(cb.lt(person.get("id"), 3)).orderBy(cb.asc(person.get("id")));
            return session.createSelectionQuery(query).getResultList();
        }));
        out.put("joined", factory.fromSession(session -> session.createSelectionQuery(
                "select n.body, p.email from Note n join Person p on p.id = n.personId order by n.body", Object[].class)
                .getResultList().stream().map(row -> List.of(row[0], row[1])).toList()));
        out.put("tags", tags(factory));
        out.put("cleaned", factory.fromTransaction(session -> session
                .createMutationQuery("delete from Note n where n.id in :ids")
                .setParameter("ids", ids)
                .executeUpdate()));
        return out;
    }

    private static Map<String, Object> tags(SessionFactory factory) {
        Map<String, Object> out = new LinkedHashMap<>();
        List<Integer> ids = new ArrayList<>();
        factory.inTransaction(session -> {
            for (String name : List.of("red", "green", "blue")) {
                Tag tag = new Tag(name);
                session.persist(tag); // identity: INSERT ... RETURNING id, at once
                ids.add(tag.getId());
            }
        });
        int first = ids.get(0);
        out.put("offsets", ids.stream().map(id -> id - first).toList());
        factory.inTransaction(session -> session.find(Tag.class, ids.get(1)).setName("lime")); // version 0 -> 1
        out.put("locked", factory.fromTransaction(session -> session
                .find(Tag.class, ids.get(1), LockModeType.PESSIMISTIC_WRITE).json(first)));
        out.put("page", factory.fromSession(session -> session
                .createSelectionQuery("from Tag t where t.id in :ids order by t.id", Tag.class)
                .setParameter("ids", ids)
                .setFirstResult(1)
                .setMaxResults(2)
                .getResultList().stream().map(tag -> tag.json(first)).toList()));
        out.put("native", factory.fromSession(session -> session
                .createNativeQuery("select count(*) from {h-schema}tags where version > :v", Long.class)
                .setParameter("v", 0)
                .getSingleResult()));
        out.put("removed", factory.fromTransaction(session -> {
            for (Integer id : ids) {
                session.remove(session.find(Tag.class, id)); // DELETE ... WHERE id=? AND version=?
            }
            return ids.size();
        }));
        return out;
    }

    private static List<Object> notes(List<Note> notes, long first) {
        List<Object> out = new ArrayList<>();
        for (Note note : notes) {
            out.add(note.json(first));
        }
        return out;
    }
}
