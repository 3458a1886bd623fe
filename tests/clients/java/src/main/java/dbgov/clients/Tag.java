package dbgov.clients;

import jakarta.persistence.Entity;
import jakarta.persistence.GeneratedValue;
import jakarta.persistence.GenerationType;
import jakarta.persistence.Id;
import jakarta.persistence.Table;
import jakarta.persistence.Version;
import java.util.LinkedHashMap;
import java.util.Map;

/** A row of `tags`: an identity id (INSERT ... RETURNING) and a version column (optimistic lock). */
@Entity
@Table(name = "tags")
public class Tag {
    @Id
    @GeneratedValue(strategy = GenerationType.IDENTITY)
    private Integer id;

    private String name;

    @Version
    private Integer version;

    protected Tag() {}

    Tag(String name) {
        this.name = name;
    }

    public Integer getId() {
        return id;
    }

    public void setName(String name) {
        this.name = name;
    }

    /** The tag without its id (identity values differ between two runs); ``first`` is the run's first id. */
    Map<String, Object> json(int first) {
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("offset", id - first);
        out.put("name", name);
        out.put("version", version);
        return out;
    }
}
