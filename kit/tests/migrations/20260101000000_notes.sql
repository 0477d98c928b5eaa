CREATE TABLE notes (
    note_id    UUID PRIMARY KEY,
    note       TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Effects of consumed events: deliberately no unique key, so a double
-- application would show up as two rows.
CREATE TABLE effects (
    event_id   UUID NOT NULL,
    note       TEXT NOT NULL
);
