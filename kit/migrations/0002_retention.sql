-- Retention of consumers' inboxes (SPEC 3, REL-5): the purge deletes by age.
CREATE INDEX kit_inbox_processed_at ON kit_inbox (processed_at);
