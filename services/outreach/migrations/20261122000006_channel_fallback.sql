-- OUT-3 channel plans in order of preference ("DIAMOND: agent call, then
-- WeChat"): the channels (and their templates) to try when the policy refuses
-- the message on its channel for a reason of that channel (no consent, an
-- opt-out, the channel disabled).
ALTER TABLE messages ADD COLUMN fallback_channels SMALLINT[] NOT NULL DEFAULT '{}';
ALTER TABLE messages ADD COLUMN fallback_templates UUID[] NOT NULL DEFAULT '{}';
