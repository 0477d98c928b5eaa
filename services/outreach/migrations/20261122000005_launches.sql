-- OUT-3: a campaign's audience is launched in chunks, each committed on its
-- own; the cursor lets any replica continue where another stopped.
CREATE TABLE campaign_launches (
    campaign_id     UUID PRIMARY KEY,
    after_customer  UUID        NOT NULL,
    assigned        BIGINT      NOT NULL DEFAULT 0,
    done            BOOLEAN     NOT NULL DEFAULT false,
    started_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
