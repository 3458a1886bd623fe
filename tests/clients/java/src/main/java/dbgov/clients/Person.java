package dbgov.clients;

import jakarta.persistence.Entity;
import jakarta.persistence.Id;
import jakarta.persistence.Table;
import java.math.BigDecimal;
import java.time.LocalDate;
import java.time.LocalDateTime;
import java.util.LinkedHashMap;
import java.util.Map;
import org.hibernate.annotations.Immutable;

/** A row of `people`, read only: its email is what the masking policy masks. */
@Entity
@Immutable
@Table(name = "people")
public class Person {
    @Id
    private Integer id;

    private String name;
    private String email;
    private LocalDate born;
    private LocalDateTime created;
    private BigDecimal score;

    public Integer getId() {
        return id;
    }

    public String getEmail() {
        return email;
    }

    Map<String, Object> json() {
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("id", id);
        out.put("name", name);
        out.put("email", email);
        out.put("born", born.toString());
        out.put("created", created.toString());
        out.put("score", score);
        return out;
    }
}
