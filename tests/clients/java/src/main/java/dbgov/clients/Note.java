package dbgov.clients;

import jakarta.persistence.Column;
import jakarta.persistence.Entity;
import jakarta.persistence.GeneratedValue;
import jakarta.persistence.GenerationType;
import jakarta.persistence.Id;
import jakarta.persistence.SequenceGenerator;
import jakarta.persistence.Table;
import java.util.LinkedHashMap;
import java.util.Map;

/** A row of `notes`, written by the scenario; its id comes from the sequence notes_seq. */
@Entity
@Table(name = "notes")
public class Note {
    @Id
    @GeneratedValue(strategy = GenerationType.SEQUENCE, generator = "notes")
    @SequenceGenerator(name = "notes", sequenceName = "notes_seq", allocationSize = 50)
    private Long id;

    @Column(name = "person_id")
    private Integer personId;

    private String body;
    private Integer stars;

    protected Note() {}

    Note(Integer personId, String body, Integer stars) {
        this.personId = personId;
        this.body = body;
        this.stars = stars;
    }

    public Long getId() {
        return id;
    }

    public void setStars(Integer stars) {
        this.stars = stars;
    }

    /** The note without its id (sequence values differ between two runs); ``first`` is the run's first id. */
    Map<String, Object> json(long first) {
        Map<String, Object> out = new LinkedHashMap<>();
        out.put("offset", id - first);
        out.put("person_id", personId);
        out.put("body", body);
        out.put("stars", stars);
        return out;
    }
}
