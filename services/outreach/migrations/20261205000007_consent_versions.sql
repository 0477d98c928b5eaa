-- REL-6, OUT-5: when profiles changed each consent. Events of one customer
-- may be applied out of order (a dead consumer's event is claimed by another
-- after newer ones were applied); an older change never overrides a newer one.
-- NULL: copied before this column existed, or from an event without the time.
ALTER TABLE consents ADD COLUMN updated_at TIMESTAMPTZ;
