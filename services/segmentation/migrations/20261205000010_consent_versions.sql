-- REL-6: when profiles changed each consent, so that an older change applied
-- late (a dead consumer's event claimed by another) never overrides a newer one.
-- NULL: copied before this column existed, or from an event without the time.
ALTER TABLE consents ADD COLUMN updated_at TIMESTAMPTZ;
