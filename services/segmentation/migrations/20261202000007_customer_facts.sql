-- Issue 4 deliverable 1, SEG-7: per-customer aggregates kept by the read
-- model as each event arrives, so a recompute reads one short row per
-- customer instead of every transaction. The month arrays are subscripted by
-- absolute month number (year * 12 + month - 1, UTC); a month without facts
-- inside a customer's span is NULL.
CREATE TABLE customer_facts (
    customer_id       UUID PRIMARY KEY,
    spend             BIGINT[]  NOT NULL DEFAULT '{}',   -- net spend per month (refunds negative), minor units
    purchases         INTEGER[] NOT NULL DEFAULT '{}',   -- purchases per month
    first_purchase    TIMESTAMPTZ,
    last_purchase     TIMESTAMPTZ,
    activity          INTEGER[] NOT NULL DEFAULT '{}',   -- interactions per month
    inquiries         INTEGER[] NOT NULL DEFAULT '{}',   -- inquiries per month
    last_interaction  TIMESTAMPTZ,
    last_login        TIMESTAMPTZ,
    responses         INTEGER NOT NULL DEFAULT 0,
    contacts          INTEGER NOT NULL DEFAULT 0
);

CREATE FUNCTION month_of(t TIMESTAMPTZ) RETURNS INTEGER LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (extract(year FROM t AT TIME ZONE 'UTC') * 12 + extract(month FROM t AT TIME ZONE 'UTC') - 1)::int
$$;

-- Rebuilds the facts of the given customers (all when NULL) from their
-- transactions and interactions, set-based: after a merge or an unmerge, and
-- to backfill. Gives exactly what the per-event updates give.
CREATE FUNCTION rebuild_customer_facts(ids UUID[]) RETURNS VOID LANGUAGE sql AS $$
DELETE FROM customer_facts WHERE ids IS NULL OR customer_id = ANY (ids);
INSERT INTO customer_facts (customer_id, spend, purchases, first_purchase, last_purchase,
                            activity, inquiries, last_interaction, last_login, responses, contacts)
WITH tm AS MATERIALIZED (
    SELECT customer_id, month_of(occurred_at) AS m,
           sum(CASE WHEN kind = 2 THEN -amount_minor ELSE amount_minor END)::bigint AS spend,
           (count(*) FILTER (WHERE kind = 1))::int AS purchases,
           min(occurred_at) FILTER (WHERE kind = 1) AS first_p,
           max(occurred_at) FILTER (WHERE kind = 1) AS last_p
    FROM transactions WHERE ids IS NULL OR customer_id = ANY (ids) GROUP BY 1, 2),
tb AS (SELECT customer_id, min(m) AS lo, max(m) AS hi, min(first_p) AS first_p, max(last_p) AS last_p
       FROM tm GROUP BY 1),
t AS (
    SELECT tb.customer_id, tb.first_p, tb.last_p,
           ('[' || tb.lo || ':' || tb.hi || ']=' || array_agg(tm.spend ORDER BY g)::text)::bigint[] AS spend,
           ('[' || tb.lo || ':' || tb.hi || ']=' || array_agg(tm.purchases ORDER BY g)::text)::int[] AS purchases
    FROM tb CROSS JOIN LATERAL generate_series(tb.lo, tb.hi) AS g
    LEFT JOIN tm ON tm.customer_id = tb.customer_id AND tm.m = g
    GROUP BY tb.customer_id, tb.lo, tb.hi, tb.first_p, tb.last_p),
im AS MATERIALIZED (
    SELECT customer_id, month_of(occurred_at) AS m,
           count(*)::int AS activity,
           (count(*) FILTER (WHERE kind = 3))::int AS inquiries,
           (count(*) FILTER (WHERE kind = 4))::int AS responses,
           (count(*) FILTER (WHERE direction = 2))::int AS contacts,
           max(occurred_at) AS last_i,
           max(occurred_at) FILTER (WHERE kind = 1) AS last_l
    FROM interactions WHERE ids IS NULL OR customer_id = ANY (ids) GROUP BY 1, 2),
ib AS (SELECT customer_id, min(m) AS lo, max(m) AS hi, max(last_i) AS last_i, max(last_l) AS last_l,
              sum(responses)::int AS responses, sum(contacts)::int AS contacts
       FROM im GROUP BY 1),
i AS (
    SELECT ib.customer_id, ib.last_i, ib.last_l, ib.responses, ib.contacts,
           ('[' || ib.lo || ':' || ib.hi || ']=' || array_agg(im.activity ORDER BY g)::text)::int[] AS activity,
           ('[' || ib.lo || ':' || ib.hi || ']=' || array_agg(im.inquiries ORDER BY g)::text)::int[] AS inquiries
    FROM ib CROSS JOIN LATERAL generate_series(ib.lo, ib.hi) AS g
    LEFT JOIN im ON im.customer_id = ib.customer_id AND im.m = g
    GROUP BY ib.customer_id, ib.lo, ib.hi, ib.last_i, ib.last_l, ib.responses, ib.contacts)
SELECT COALESCE(t.customer_id, i.customer_id), COALESCE(t.spend, '{}'), COALESCE(t.purchases, '{}'), t.first_p, t.last_p,
       COALESCE(i.activity, '{}'), COALESCE(i.inquiries, '{}'), i.last_i, i.last_l,
       COALESCE(i.responses, 0), COALESCE(i.contacts, 0)
FROM t FULL JOIN i ON i.customer_id = t.customer_id;
$$;

SELECT rebuild_customer_facts(NULL);

-- SEG-7 incremental recompute: customers whose facts changed since they were
-- last scored; any replica claims a batch with FOR UPDATE SKIP LOCKED.
CREATE TABLE dirty_customers (
    customer_id  UUID PRIMARY KEY,
    since        TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX dirty_customers_since ON dirty_customers (since);

-- The base distribution scores are ranked against: RFM percentiles and the
-- activity average from the last full recompute; the spend cut points of the
-- tiers and the value bands from the last calibration (monthly). Each list is
-- the sorted base itself, or evenly spaced quantiles of it for a large base.
CREATE TABLE calibration (
    singleton      BOOLEAN PRIMARY KEY DEFAULT true CHECK (singleton),
    rfm_at         TIMESTAMPTZ NOT NULL,
    base_size      BIGINT      NOT NULL,
    recency        BIGINT[]    NOT NULL,   -- last purchase, epoch seconds (the smallest BIGINT: never bought)
    frequency      BIGINT[]    NOT NULL,   -- purchases in the window
    monetary       BIGINT[]    NOT NULL,   -- spend in the window
    activity_mean  FLOAT8      NOT NULL,
    as_of          TIMESTAMPTZ,            -- newest event reflected by the last full recompute
    tiers_at       TIMESTAMPTZ NOT NULL,
    spenders       BIGINT      NOT NULL,
    spend          BIGINT[]    NOT NULL    -- spend in the window of those who spent, ascending
);

-- A digest of each score row, so a recompute writes back only what changed.
ALTER TABLE customer_scores ADD COLUMN digest BIGINT NOT NULL DEFAULT 0;
