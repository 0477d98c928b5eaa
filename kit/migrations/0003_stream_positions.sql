-- REL-3, REL-7: where each published event sits in its stream, so that a
-- stream that lost entries (a Redis restart without persistence, a failover
-- to a replica that lagged) is noticed and what it lost is published again.
ALTER TABLE kit_outbox ADD COLUMN stream_ms BIGINT;
ALTER TABLE kit_outbox ADD COLUMN stream_seq BIGINT;
CREATE INDEX kit_outbox_stream_position ON kit_outbox (stream_ms, stream_seq) WHERE published_at IS NOT NULL;
