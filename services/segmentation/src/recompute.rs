//! SEG-7: the set-based recompute. One SQL pass over the read model computes
//! every live customer's features and ranks (window functions, no query per
//! customer); the pure rules of [`crate::domain`] turn them into scores, in
//! batches; results are written back with one statement per batch. A tier
//! move is recorded with its reason and emitted as TierChanged (SEG-2); a
//! change of churn level as ChurnRiskChanged (SEG-5). Recomputing without
//! new facts changes nothing and emits nothing.

use std::collections::HashMap;

use chrono::{DateTime, Datelike, TimeZone, Utc};
use crm_kit::ApiError;
use crm_kit::outbox;
use crm_proto::common::v1::{ChurnRiskLevel, Tier};
use crm_proto::segmentation::v1 as pb;
use prost::Message;
use sqlx::{PgPool, Row};
use uuid::Uuid;

use crate::SERVICE;
use crate::domain::{Thresholds, churn, grid, lifecycle, rfm, tiers};

/// Months of spend history the tier rules look at (current month last).
const MONTHS: usize = 13;
const BATCH: usize = 5000;

/// What a recompute did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Customers scored.
    pub customers: usize,
    /// Tier moves recorded (and TierChanged events).
    pub tier_moves: usize,
    /// Churn level changes (and ChurnRiskChanged events).
    pub churn_changes: usize,
}

/// The first instant of the month `back` months before `now`'s month.
fn month_start(now: DateTime<Utc>, back: i32) -> DateTime<Utc> {
    let total = now.year() * 12 + now.month0() as i32 - back;
    Utc.with_ymd_and_hms(total.div_euclid(12), total.rem_euclid(12) as u32 + 1, 1, 0, 0, 0).single().unwrap_or(now)
}

/// The feature query (exposed for EXPLAIN when tuning).
pub fn features_sql() -> String {
    // Constant SQL: the month columns are generated from a fixed count, never from input.
    let signed = "CASE WHEN kind = 2 THEN -amount_minor ELSE amount_minor END";
    let months: Vec<String> = (0..MONTHS)
        .map(|i| {
            format!(
                "COALESCE(sum({signed}) FILTER (WHERE occurred_at >= ${a} AND occurred_at < ${b}), 0)::bigint AS m{i}",
                a = 2 + i,
                b = 3 + i
            )
        })
        .collect();
    format!(
        "WITH tx AS MATERIALIZED ( \
           SELECT customer_id, \
             COALESCE(sum({signed}) FILTER (WHERE occurred_at >= $1 - interval '365 days'), 0)::bigint AS spend_12m, \
             count(*) FILTER (WHERE kind = 1 AND occurred_at >= $1 - interval '365 days') AS purchases_12m, \
             max(occurred_at) FILTER (WHERE kind = 1) AS last_purchase, \
             min(occurred_at) FILTER (WHERE kind = 1) AS first_purchase, \
             COALESCE(sum({signed}) FILTER (WHERE occurred_at >= $1 - interval '90 days'), 0)::bigint AS spend_3m, \
             COALESCE(sum({signed}) FILTER (WHERE occurred_at >= $1 - interval '180 days' AND occurred_at < $1 - interval '90 days'), 0)::bigint AS spend_prev_3m, \
             {months} \
           FROM transactions WHERE occurred_at < $1 GROUP BY customer_id), \
         ix AS MATERIALIZED ( \
           SELECT customer_id, max(occurred_at) AS last_interaction, \
             count(*) FILTER (WHERE kind = 3 AND occurred_at >= $1 - interval '90 days') AS inquiries_90d, \
             count(*) FILTER (WHERE occurred_at >= $1 - interval '90 days') AS activity_90d, \
             count(*) FILTER (WHERE kind = 4) AS responses, \
             count(*) FILTER (WHERE direction = 2) AS contacts, \
             max(occurred_at) FILTER (WHERE kind = 1) AS last_login \
           FROM interactions WHERE occurred_at < $1 GROUP BY customer_id), \
         f AS ( \
           SELECT c.customer_id, c.registered_at, tx.spend_12m, tx.purchases_12m, tx.last_purchase, tx.first_purchase, \
             tx.spend_3m, tx.spend_prev_3m, {tx_months}, ix.last_interaction, ix.inquiries_90d, ix.activity_90d, ix.responses, ix.contacts, ix.last_login \
           FROM customers c LEFT JOIN tx USING (customer_id) LEFT JOIN ix USING (customer_id) \
           WHERE c.merged_into IS NULL AND c.erased_at IS NULL) \
         SELECT f.customer_id, f.registered_at, f.last_purchase, f.first_purchase, f.last_interaction, f.last_login, \
           COALESCE(f.spend_12m, 0) AS spend_12m, COALESCE(f.purchases_12m, 0) AS purchases_12m, \
           COALESCE(f.spend_3m, 0) AS spend_3m, COALESCE(f.spend_prev_3m, 0) AS spend_prev_3m, \
           COALESCE(f.inquiries_90d, 0) AS inquiries_90d, COALESCE(f.activity_90d, 0) AS activity_90d, \
           COALESCE(f.responses, 0) AS responses, COALESCE(f.contacts, 0) AS contacts, \
           COALESCE(f.activity_90d::float8 / NULLIF(avg(COALESCE(f.activity_90d, 0)) OVER (), 0), 0) AS activity_vs_base, \
           CASE WHEN COALESCE(f.spend_12m, 0) > 0 THEN (rank() OVER (ORDER BY COALESCE(f.spend_12m, 0) DESC) - 1)::float8 \
                / NULLIF(count(*) FILTER (WHERE COALESCE(f.spend_12m, 0) > 0) OVER (), 0) ELSE 1.0 END AS spend_rank_share, \
           100 * percent_rank() OVER (ORDER BY f.last_purchase ASC NULLS FIRST) AS r_pct, \
           100 * percent_rank() OVER (ORDER BY COALESCE(f.purchases_12m, 0)) AS f_pct, \
           100 * percent_rank() OVER (ORDER BY COALESCE(f.spend_12m, 0)) AS m_pct, \
           ARRAY[{month_list}]::bigint[] AS months, \
           s.tier AS old_tier, s.tier_since AS old_tier_since, s.lifecycle_stage AS old_stage, s.lifecycle_since AS old_stage_since, \
           s.churn_level AS old_churn_level, \
           EXISTS (SELECT 1 FROM complaint_tickets ct WHERE ct.customer_id = f.customer_id AND ct.open) AS open_complaint, \
           EXISTS (SELECT 1 FROM bad_experiences be WHERE be.customer_id = f.customer_id AND be.last_at >= $1 - interval '90 days') AS bad_experience \
         FROM f LEFT JOIN customer_scores s USING (customer_id)",
        months = months.join(", "),
        month_list = (0..MONTHS).map(|i| format!("COALESCE(f.m{i}, 0)")).collect::<Vec<_>>().join(", "),
        tx_months = (0..MONTHS).map(|i| format!("tx.m{i}")).collect::<Vec<_>>().join(", "),
    )
}

fn days(now: DateTime<Utc>, t: Option<DateTime<Utc>>) -> Option<i32> {
    t.map(|t| (now - t).num_days().max(0) as i32)
}

/// Recomputes every live customer's scores as of `now`.
pub async fn run(pool: &PgPool, thresholds: &Thresholds, now: DateTime<Utc>) -> Result<Summary, ApiError> {
    let mut tx = pool.begin().await?;
    // One recompute at a time across replicas (SEG-7): the others wait for it.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('segmentation:recompute'))").execute(&mut *tx).await?;
    let as_of: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT newest_event_at FROM freshness").fetch_optional(&mut *tx).await?;
    // Month boundaries, oldest first: m0 is MONTHS-1 months ago, the last is the current month.
    let bounds: Vec<DateTime<Utc>> = (0..=MONTHS as i32).map(|i| month_start(now, MONTHS as i32 - 1 - i)).collect();
    let sql = features_sql();
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
    for b in &bounds {
        query = query.bind(*b);
    }
    let rows = query.fetch_all(&mut *tx).await?;

    let mut summary = Summary::default();
    let mut tier_events: Vec<(String, pb::TierChanged)> = Vec::new();
    let mut churn_events: Vec<(String, pb::ChurnRiskChanged)> = Vec::new();
    for chunk in rows.chunks(BATCH) {
        let mut cols: HashMap<&str, Vec<i64>> = HashMap::new();
        let mut ids = Vec::with_capacity(chunk.len());
        let mut tier_since = Vec::with_capacity(chunk.len());
        let mut tier_reasons = Vec::with_capacity(chunk.len());
        let mut stage_since = Vec::with_capacity(chunk.len());
        let mut risks = Vec::with_capacity(chunk.len());
        let mut moves: Vec<(Uuid, i16, i16, String)> = Vec::new();
        for row in chunk {
            let id: Uuid = row.try_get("customer_id")?;
            let last_purchase: Option<DateTime<Utc>> = row.try_get("last_purchase")?;
            let first_purchase: Option<DateTime<Utc>> = row.try_get("first_purchase")?;
            let last_interaction: Option<DateTime<Utc>> = row.try_get("last_interaction")?;
            let last_login: Option<DateTime<Utc>> = row.try_get("last_login")?;
            let spend_12m: i64 = row.try_get("spend_12m")?;
            let spend_3m: i64 = row.try_get("spend_3m")?;
            let spend_prev_3m: i64 = row.try_get("spend_prev_3m")?;
            let purchases_12m: i64 = row.try_get("purchases_12m")?;
            let responses: i64 = row.try_get("responses")?;
            let contacts: i64 = row.try_get("contacts")?;
            let months: Vec<i64> = row.try_get("months")?;
            let rank_share: f64 = row.try_get("spend_rank_share")?;
            let (r_pct, f_pct, m_pct): (f64, f64, f64) =
                (row.try_get("r_pct")?, row.try_get("f_pct")?, row.try_get("m_pct")?);

            let last_activity = match (last_purchase, last_interaction) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            let trend = grid::spend_trend(spend_3m, spend_prev_3m);
            let inquiries: i64 = row.try_get("inquiries_90d")?;
            let potential = grid::potential_band(trend, inquiries as i32, thresholds);
            let value = grid::value_band(rank_share, spend_12m, thresholds);
            let facts = tiers::TierFacts {
                spend_12m_minor: spend_12m,
                spend_rank_share: rank_share,
                days_since_last_activity: days(now, last_activity),
                days_since_first_purchase: days(now, first_purchase),
                monthly_spend_minor: months,
                high_potential: potential == grid::Band::High,
            };
            let old_tier: Option<i16> = row.try_get("old_tier")?;
            let current = old_tier.and_then(|t| Tier::try_from(t as i32).ok()).unwrap_or(Tier::Unspecified);
            let decision = tiers::next_tier(current, &facts, thresholds);
            let old_since: Option<DateTime<Utc>> = row.try_get("old_tier_since")?;
            if decision.tier != current {
                moves.push((id, current as i16, decision.tier as i16, decision.reason.clone()));
                tier_since.push(now);
            } else {
                tier_since.push(old_since.unwrap_or(now));
            }
            let stage = lifecycle::stage(
                &lifecycle::LifecycleFacts {
                    days_since_first_purchase: days(now, first_purchase),
                    days_since_last_purchase: days(now, last_purchase),
                    spend_trend: trend,
                },
                thresholds,
            );
            let old_stage: Option<i16> = row.try_get("old_stage")?;
            let old_stage_since: Option<DateTime<Utc>> = row.try_get("old_stage_since")?;
            stage_since.push(if old_stage == Some(stage as i16) { old_stage_since.unwrap_or(now) } else { now });
            let risk = churn::assess(
                &churn::ChurnFacts {
                    days_since_last_purchase: days(now, last_purchase),
                    response_rate: (contacts > 0).then(|| responses as f64 / contacts as f64),
                    activity_vs_base: row.try_get("activity_vs_base")?,
                    days_since_last_interaction: days(now, last_interaction),
                    spend_last_3m_minor: spend_3m,
                    spend_previous_3m_minor: spend_prev_3m,
                    days_without_login: days(now, last_login),
                    // SEG-5: from feedback's events; a bad experience counts for 90 days.
                    open_complaint: row.try_get("open_complaint")?,
                    bad_service_experience: row.try_get("bad_experience")?,
                    ..Default::default()
                },
                thresholds,
            );
            let old_level: Option<i16> = row.try_get("old_churn_level")?;
            let previous_level = old_level.map(i32::from).unwrap_or(ChurnRiskLevel::Unspecified as i32);
            if previous_level != risk.level {
                churn_events.push((
                    id.to_string(),
                    pb::ChurnRiskChanged { customer_id: id.to_string(), previous_level, risk: Some(risk.clone()) },
                ));
            }
            let (r, f, m) = (rfm::quintile(r_pct), rfm::quintile(f_pct), rfm::quintile(m_pct));
            let recency = days(now, last_purchase).unwrap_or(-1);
            for (name, v) in [
                ("tier", decision.tier as i64),
                ("recency", recency as i64),
                ("frequency", purchases_12m),
                ("monetary", spend_12m),
                ("r", r as i64),
                ("f", f as i64),
                ("m", m as i64),
                ("rp", r_pct.round() as i64),
                ("fp", f_pct.round() as i64),
                ("mp", m_pct.round() as i64),
                ("segment", rfm::segment(r, f, m) as i64),
                ("cell", grid::cell(value, potential) as i64),
                ("stage", stage as i64),
                ("churn_score", risk.score as i64),
                ("churn_level", risk.level as i64),
            ] {
                cols.entry(name).or_default().push(v);
            }
            ids.push(id);
            tier_reasons.push(decision.reason);
            risks.push(risk.encode_to_vec());
        }
        let small = |name: &str| -> Vec<i16> {
            cols.get(name).map(|v| v.iter().map(|x| *x as i16).collect()).unwrap_or_default()
        };
        let int = |name: &str| -> Vec<i32> {
            cols.get(name).map(|v| v.iter().map(|x| *x as i32).collect()).unwrap_or_default()
        };
        sqlx::query(
            "INSERT INTO customer_scores (customer_id, tier, tier_since, tier_reason, recency_days, frequency, monetary_minor, \
               r_score, f_score, m_score, r_percentile, f_percentile, m_percentile, rfm_segment, grid_cell, lifecycle_stage, \
               lifecycle_since, churn_score, churn_level, churn_risk, computed_at, as_of) \
             SELECT *, $21::timestamptz, $22::timestamptz FROM UNNEST($1::uuid[], $2::int2[], $3::timestamptz[], $4::text[], $5::int4[], \
               $6::int4[], $7::int8[], $8::int2[], $9::int2[], $10::int2[], $11::int2[], $12::int2[], $13::int2[], $14::int2[], \
               $15::int2[], $16::int2[], $17::timestamptz[], $18::int2[], $19::int2[], $20::bytea[]) \
             ON CONFLICT (customer_id) DO UPDATE SET tier = EXCLUDED.tier, tier_since = EXCLUDED.tier_since, \
               tier_reason = EXCLUDED.tier_reason, recency_days = EXCLUDED.recency_days, frequency = EXCLUDED.frequency, \
               monetary_minor = EXCLUDED.monetary_minor, r_score = EXCLUDED.r_score, f_score = EXCLUDED.f_score, \
               m_score = EXCLUDED.m_score, r_percentile = EXCLUDED.r_percentile, f_percentile = EXCLUDED.f_percentile, \
               m_percentile = EXCLUDED.m_percentile, rfm_segment = EXCLUDED.rfm_segment, grid_cell = EXCLUDED.grid_cell, \
               lifecycle_stage = EXCLUDED.lifecycle_stage, lifecycle_since = EXCLUDED.lifecycle_since, \
               churn_score = EXCLUDED.churn_score, churn_level = EXCLUDED.churn_level, churn_risk = EXCLUDED.churn_risk, \
               computed_at = EXCLUDED.computed_at, as_of = EXCLUDED.as_of",
        )
        .bind(&ids)
        .bind(small("tier"))
        .bind(&tier_since)
        .bind(&tier_reasons)
        .bind(int("recency"))
        .bind(int("frequency"))
        .bind(cols.get("monetary").cloned().unwrap_or_default())
        .bind(small("r"))
        .bind(small("f"))
        .bind(small("m"))
        .bind(small("rp"))
        .bind(small("fp"))
        .bind(small("mp"))
        .bind(small("segment"))
        .bind(small("cell"))
        .bind(small("stage"))
        .bind(&stage_since)
        .bind(small("churn_score"))
        .bind(small("churn_level"))
        .bind(&risks)
        .bind(now)
        .bind(as_of)
        .execute(&mut *tx)
        .await?;
        if !moves.is_empty() {
            let (who, from, to, why): (Vec<Uuid>, Vec<i16>, Vec<i16>, Vec<String>) = moves.iter().cloned().fold(
                (vec![], vec![], vec![], vec![]),
                |(mut a, mut b, mut c, mut d), (w, f, t, r)| {
                    a.push(w);
                    b.push(f);
                    c.push(t);
                    d.push(r);
                    (a, b, c, d)
                },
            );
            sqlx::query(
                "INSERT INTO tier_moves (customer_id, from_tier, to_tier, reason, moved_at) \
                 SELECT w, f, t, r, $5 FROM UNNEST($1::uuid[], $2::int2[], $3::int2[], $4::text[]) AS x(w, f, t, r)",
            )
            .bind(&who)
            .bind(&from)
            .bind(&to)
            .bind(&why)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            for (w, f, t, r) in moves {
                let change = pb::TierChanged {
                    customer_id: w.to_string(),
                    r#move: Some(pb::TierMove {
                        from_tier: f as i32,
                        to_tier: t as i32,
                        reason: r,
                        move_time: Some(prost_types::Timestamp { seconds: now.timestamp(), nanos: 0 }),
                    }),
                };
                tier_events.push((w.to_string(), change));
            }
        }
        summary.customers += ids.len();
    }
    summary.tier_moves = tier_events.len();
    summary.churn_changes = churn_events.len();
    outbox::enqueue_many(&mut tx, SERVICE, "customer", "", &tier_events).await?;
    outbox::enqueue_many(&mut tx, SERVICE, "customer", "", &churn_events).await?;
    tx.commit().await?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn month_starts_step_back_across_years() {
        let now = Utc.with_ymd_and_hms(2026, 2, 15, 10, 0, 0).single().expect("date");
        assert_eq!(month_start(now, 0), Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).single().expect("d"));
        assert_eq!(month_start(now, 2), Utc.with_ymd_and_hms(2025, 12, 1, 0, 0, 0).single().expect("d"));
        assert_eq!(month_start(now, -1), Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).single().expect("d"));
    }
}
