-- OUT-5 "never twice per campaign" is structural: a campaign's messages are
-- created from campaign_assignments, whose primary key is (campaign_id,
-- customer_id). The extra unique index on messages cost an index entry on
-- every message update (three per message); it goes.
DROP INDEX messages_one_per_campaign;

-- OUT-3 global control group: the customer's bucket, computed once when the
-- row is written (the same SHA-256 bucket as domain::campaign::in_global_control).
ALTER TABLE customers ADD COLUMN control_bucket INT GENERATED ALWAYS AS (
    ((('x' || encode(substring(sha256('\x676c6f62616c2d636f6e74726f6c3a'::bytea || uuid_send(customer_id)) FROM 1 FOR 4), 'hex'))::bit(32)::bigint % 10000))::int
) STORED;
