//! `crm.analytics.v1.AnalyticsService`: each KPI read from the rollups the
//! consumer maintains (ANA-7), combined with the formulas of
//! [`crate::domain`]. Every answer says how fresh it is (the time of the
//! newest event reflected).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use chrono::{DateTime, Duration, TimeZone, Utc};
use chrono_tz::Tz;
use crm_kit::fields::{self, to_timestamp};
use crm_kit::{ApiError, FieldViolations, IntoGrpc};
use crm_proto::analytics::v1 as pb;
use crm_proto::analytics::v1::analytics_service_server::AnalyticsService;
use crm_proto::common::v1::{Channel, Freshness, Money, Tier, TimeRange};
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::SERVICE;
use crate::bits::{Bitmap, Span};
use crate::domain::customer::{Month, day_of, month_of, month_start};
use crate::domain::{kpi, stats};
use crate::ingest::{PROGRAMME, category_name};

type Reply<T> = Result<Response<T>, Status>;

/// Reporting currency of amounts (minor units), as the demo and SPEC use.
const CURRENCY: &str = "CNY";

/// The gRPC API over analytics' tables.
#[derive(Debug, Clone)]
pub struct AnalyticsApi {
    pool: PgPool,
    tz: Tz,
    /// Seen complete once (crate::bits::built); they stay so.
    bitmaps_built: Arc<AtomicBool>,
}

fn money(amount_minor: i64) -> Option<Money> {
    Some(Money { amount_minor, currency: CURRENCY.into() })
}

fn rate(numerator: i64, denominator: i64) -> Option<pb::Rate> {
    Some(pb::Rate { value: kpi::rate(numerator, denominator), numerator, denominator })
}

fn level(v: &mut FieldViolations, given: f64) -> f64 {
    if given == 0.0 {
        0.95
    } else if given > 0.5 && given < 1.0 {
        given
    } else {
        v.add("confidence", "must be between 0.5 and 1 (e.g. 0.95), or 0 for 0.95");
        0.95
    }
}

fn interval(c: &stats::Comparison, level: f64) -> Option<pb::Interval> {
    Some(pb::Interval {
        low: if c.low.is_finite() { c.low } else { 0.0 },
        high: if c.high.is_finite() { c.high } else { 0.0 },
        level,
    })
}

impl AnalyticsApi {
    /// An API over the pool, reporting in `tz`.
    pub fn new(pool: PgPool, tz: Tz) -> Self {
        Self { pool, tz, bitmaps_built: Arc::new(AtomicBool::new(false)) }
    }

    async fn freshness(&self) -> Result<Option<Freshness>, ApiError> {
        let as_of: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT as_of FROM freshness").fetch_optional(&self.pool).await?;
        Ok(Some(Freshness { as_of: as_of.map(to_timestamp), computed_at: Some(to_timestamp(Utc::now())) }))
    }

    /// A time range's bounds, with a default span before now.
    fn bounds(
        &self,
        v: &mut FieldViolations,
        field: &str,
        r: Option<&TimeRange>,
        default: Duration,
    ) -> (DateTime<Utc>, DateTime<Utc>) {
        let (start, end) = fields::time_range(v, field, r);
        let end = end.unwrap_or_else(Utc::now);
        (start.unwrap_or(end - default), end)
    }

    fn month_time(&self, m: Month) -> prost_types::Timestamp {
        let d = month_start(m);
        let local = self.tz.from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default()).earliest();
        to_timestamp(local.map(|t| t.with_timezone(&Utc)).unwrap_or_default())
    }

    fn day_time(&self, day: i32) -> prost_types::Timestamp {
        let d = crate::domain::customer::day_date(day);
        let local = self.tz.from_local_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default()).earliest();
        to_timestamp(local.map(|t| t.with_timezone(&Utc)).unwrap_or_default())
    }

    async fn rollup(
        &self,
        name: &str,
        k1_from: i32,
        k1_to: i32,
    ) -> Result<Vec<(i32, i32, String, i64, i64)>, ApiError> {
        Ok(sqlx::query_as("SELECT k1, k2, tag, n, amount FROM rollups WHERE rollup = $1 AND k1 BETWEEN $2 AND $3")
            .bind(name)
            .bind(k1_from)
            .bind(k1_to)
            .fetch_all(&self.pool)
            .await?)
    }

    // ---- ANA-2 -----------------------------------------------------------

    async fn retention(&self, req: pb::GetRetentionRequest) -> Result<pb::RetentionReport, ApiError> {
        let mut v = FieldViolations::new();
        let (start, end) = self.bounds(&mut v, "cohort_range", req.cohort_range.as_ref(), Duration::days(365));
        v.into_result()?;
        let (m0, m1) = (month_of(start, self.tz), month_of(end, self.tz));
        let mut matrix: BTreeMap<i32, BTreeMap<i32, i64>> = BTreeMap::new();
        for (cohort, offset, _, n, _) in self.rollup("cohort", m0, m1).await? {
            *matrix.entry(cohort).or_default().entry(offset).or_default() += n;
        }
        let cohorts = matrix
            .into_iter()
            // A cohort emptied by merges is no cohort.
            .filter(|(_, cells)| cells.get(&0).copied().unwrap_or(0) > 0)
            .map(|(cohort, cells)| {
                let last = cells.keys().max().copied().unwrap_or(0).max(0);
                let active: Vec<i64> = (0..=last).map(|k| cells.get(&k).copied().unwrap_or(0)).collect();
                pb::CohortRow {
                    cohort_start: Some(self.month_time(cohort)),
                    size: active.first().copied().unwrap_or(0),
                    retention: kpi::cohort_retention(&active),
                }
            })
            .collect();
        // Dn counts only customers whose first purchase is at least n days old.
        let (d0, today) = (day_of(start, self.tz), day_of(end.min(Utc::now()), self.tz));
        let days: HashMap<String, Vec<(i32, i64)>> = {
            let rows: Vec<(String, i32, i64)> = sqlx::query_as(
                "SELECT rollup, k1, n FROM rollups WHERE rollup IN ('first_day', 'd1', 'd7', 'd30') AND k1 BETWEEN $1 AND $2",
            )
            .bind(d0)
            .bind(day_of(end, self.tz))
            .fetch_all(&self.pool)
            .await?;
            let mut m: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
            for (r, day, n) in rows {
                m.entry(r).or_default().push((day, n));
            }
            m
        };
        let dn = |name: &str, n: i32| {
            let sum = |r: &str| {
                days.get(r).map(|v| v.iter().filter(|(d, _)| *d + n <= today).map(|(_, c)| c).sum()).unwrap_or(0)
            };
            rate(sum(name), sum("first_day"))
        };
        Ok(pb::RetentionReport {
            d1: dn("d1", 1),
            d7: dn("d7", 7),
            d30: dn("d30", 30),
            cohorts,
            freshness: self.freshness().await?,
        })
    }

    async fn churn(&self, req: pb::GetChurnAndRepurchaseRequest) -> Result<pb::ChurnAndRepurchaseReport, ApiError> {
        let mut v = FieldViolations::new();
        let (start, end) = self.bounds(&mut v, "range", req.range.as_ref(), Duration::days(365));
        match pb::Period::try_from(req.period) {
            Ok(pb::Period::Unspecified | pb::Period::Month) => {}
            Ok(_) => v.add("period", "churn and repurchase are kept by month: use PERIOD_MONTH"),
            Err(_) => v.add("period", "unknown value"),
        }
        let dimension = req.dimension.as_ref().and_then(|d| d.by.clone());
        let segment = match &dimension {
            Some(pb::dimension::By::SegmentId(s)) => {
                v.check("dimension.segment_id", Uuid::parse_str(s).map_err(|_| "must be an id (UUID)"))
            }
            Some(pb::dimension::By::Channel(true)) => {
                v.add("dimension.channel", "churn and repurchase are by customer: use tier or segment_id");
                None
            }
            _ => None,
        };
        v.into_result()?;
        let by_tier = matches!(dimension, Some(pb::dimension::By::Tier(true)));
        let (m0, m1) = (month_of(start, self.tz), month_of(end, self.tz));
        // Monthly counts per group: active, retained, repeat; and cohort sizes up to m1.
        let mut counts: BTreeMap<(String, &str, i32), i64> = BTreeMap::new();
        match segment {
            None => {
                for name in ["active", "retained", "repeat"] {
                    for (m, _, tag, n, _) in self.rollup(name, m0 - 1, m1).await? {
                        let group = if by_tier { tag } else { String::new() };
                        *counts.entry((group, name, m)).or_default() += n;
                    }
                }
                for (m, _, tag, n, _) in self.rollup("first", i32::MIN, m1).await? {
                    let group = if by_tier { tag } else { String::new() };
                    *counts.entry((group, "first", m)).or_default() += n;
                }
            }
            Some(segment) => {
                // Members vs the rest, from the members' facts.
                let members: Vec<sqlx::types::Json<Vec<(i32, i64, i64)>>> = sqlx::query_scalar(
                    "SELECT c.months FROM segment_members s JOIN customers c ON c.customer_id = s.customer_id \
                     WHERE s.segment_id = $1 AND c.orders > 0",
                )
                .bind(segment)
                .fetch_all(&self.pool)
                .await?;
                for months in members {
                    let active: BTreeMap<i32, i64> = months.0.iter().filter(|m| m.1 > 0).map(|m| (m.0, m.1)).collect();
                    let first = active.keys().next().copied().unwrap_or(0);
                    *counts.entry(("members".into(), "first", first)).or_default() += 1;
                    for m in active.keys() {
                        *counts.entry(("members".into(), "active", *m)).or_default() += 1;
                        if active.contains_key(&(m - 1)) {
                            *counts.entry(("members".into(), "retained", *m)).or_default() += 1;
                        }
                        if *m > first {
                            *counts.entry(("members".into(), "repeat", *m)).or_default() += 1;
                        }
                    }
                }
                // The rest: everyone minus the members.
                let mut all: BTreeMap<(&str, i32), i64> = BTreeMap::new();
                for name in ["active", "retained", "repeat"] {
                    for (m, _, _, n, _) in self.rollup(name, m0 - 1, m1).await? {
                        *all.entry((name, m)).or_default() += n;
                    }
                }
                for (m, _, _, n, _) in self.rollup("first", i32::MIN, m1).await? {
                    *all.entry(("first", m)).or_default() += n;
                }
                for ((name, m), n) in all {
                    let mine = counts.get(&("members".to_string(), name, m)).copied().unwrap_or(0);
                    counts.insert(("rest".into(), name, m), n - mine);
                }
            }
        }
        let groups: std::collections::BTreeSet<String> = counts.keys().map(|k| k.0.clone()).collect();
        let get = |g: &str, name: &str, m: i32| counts.get(&(g.to_string(), name, m)).copied().unwrap_or(0);
        let mut points = Vec::new();
        for g in &groups {
            for m in m0..=m1 {
                let base: i64 =
                    counts.iter().filter(|((gg, n, mm), _)| gg == g && *n == "first" && *mm < m).map(|(_, c)| c).sum();
                let active_before = get(g, "active", m - 1);
                let retained = get(g, "retained", m);
                points.push(pb::ChurnRepurchasePoint {
                    period_start: Some(self.month_time(m)),
                    group: g.clone(),
                    churn: rate(active_before - retained, active_before),
                    repurchase: rate(get(g, "repeat", m), base),
                });
            }
        }
        if groups.is_empty() {
            for m in m0..=m1 {
                points.push(pb::ChurnRepurchasePoint {
                    period_start: Some(self.month_time(m)),
                    group: String::new(),
                    churn: rate(0, 0),
                    repurchase: rate(0, 0),
                });
            }
        }
        Ok(pb::ChurnAndRepurchaseReport { points, freshness: self.freshness().await? })
    }

    // ---- ANA-3 -----------------------------------------------------------

    async fn performance(
        &self,
        req: pb::GetCampaignPerformanceRequest,
    ) -> Result<pb::CampaignPerformanceReport, ApiError> {
        let mut v = FieldViolations::new();
        let campaign = fields::optional_id(&mut v, "campaign_id", &req.campaign_id);
        let (start, end) = fields::time_range(&mut v, "range", req.range.as_ref());
        let group_by = if req.group_by.is_empty() { "campaign" } else { req.group_by.as_str() };
        let key = match group_by {
            "campaign" => "campaign_id::text",
            "variant" => "variant",
            "channel" => "channel::text",
            "tier" => "tier::text",
            _ => {
                v.add("group_by", "must be campaign, variant, channel or tier");
                "campaign_id::text"
            }
        };
        v.into_result()?;
        let (d0, d1) = (
            start.map(|s| day_of(s, self.tz)).unwrap_or(i32::MIN),
            end.map(|e| day_of(e, self.tz)).unwrap_or(i32::MAX),
        );
        // Control groups are targeted but never contacted: they count only under their own variant.
        let control = if group_by == "variant" { "" } else { "AND variant NOT IN ('holdout', 'global_control')" };
        let targeted = if group_by == "channel" { "sum(attempts)" } else { "sum(targeted)" };
        let rows: Vec<PerformanceSums> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {key} AS grp, {targeted}::bigint AS targeted, sum(contacted)::bigint AS contacted, sum(delivered)::bigint AS delivered, \
             sum(responded)::bigint AS responded, sum(converted)::bigint AS converted, sum(cost_minor)::bigint AS cost, \
             sum(revenue_minor)::bigint AS revenue FROM campaign_cells \
             WHERE ($1::uuid IS NULL OR campaign_id = $1) AND day BETWEEN $2 AND $3 {control} \
             {} GROUP BY 1 ORDER BY 1",
            if group_by == "channel" { "AND channel <> 0" } else { "" }
        )))
        .bind(campaign)
        .bind(d0)
        .bind(d1)
        .fetch_all(&self.pool)
        .await?;
        let rows =
            rows.into_iter()
                .map(|r| {
                    let PerformanceSums {
                        grp: group,
                        targeted,
                        contacted,
                        delivered,
                        responded,
                        converted,
                        cost,
                        revenue,
                    } = r;
                    let (roi, warning) = kpi::roi(revenue, cost);
                    let group = match group_by {
                        "campaign" if group == PROGRAMME.to_string() => "triggers".to_string(),
                        "channel" => group
                            .parse::<i32>()
                            .ok()
                            .and_then(|c| Channel::try_from(c).ok())
                            .map(|c| c.as_str_name().to_string())
                            .unwrap_or(group),
                        "tier" => group
                            .parse::<i32>()
                            .ok()
                            .and_then(|t| Tier::try_from(t).ok())
                            .map(|t| t.as_str_name().to_string())
                            .unwrap_or(group),
                        _ => group,
                    };
                    pb::PerformanceRow {
                        group,
                        targeted,
                        reach: rate(contacted, targeted),
                        delivery: rate(delivered, contacted),
                        response: rate(responded, delivered),
                        conversion: rate(converted, delivered),
                        cost: money(cost),
                        revenue: money(revenue),
                        roi,
                        roi_warning: warning,
                    }
                })
                .collect();
        Ok(pb::CampaignPerformanceReport { rows, freshness: self.freshness().await? })
    }

    async fn lift(&self, req: pb::GetLiftRequest) -> Result<pb::LiftReport, ApiError> {
        let mut v = FieldViolations::new();
        let campaign = fields::optional_id(&mut v, "campaign_id", &req.campaign_id).unwrap_or(PROGRAMME);
        let column = match req.metric.as_str() {
            "" | "conversion" | "repurchase" => "converted",
            "response" => "responded",
            _ => {
                v.add("metric", "must be conversion, response or repurchase");
                "converted"
            }
        };
        let level = level(&mut v, req.confidence);
        v.into_result()?;
        let rows: Vec<(String, i64, i64, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT grp, members, {column}, revenue_minor FROM lift_groups WHERE campaign_id = $1"
        )))
        .bind(campaign)
        .fetch_all(&self.pool)
        .await?;
        if rows.is_empty() && campaign != PROGRAMME {
            return Err(ApiError::not_found("campaign", campaign.to_string()));
        }
        // A campaign's treated groups are its variants; its control is the holdout.
        // The programme's are "treated" and "control" (the global control group, ANA-8).
        let is_control = |g: &str| if campaign == PROGRAMME { g == "control" } else { g == "holdout" };
        let excluded = |g: &str| campaign != PROGRAMME && g == "global_control";
        let (mut t, mut c) = ((0i64, 0i64, 0i64), (0i64, 0i64, 0i64));
        for (grp, members, hits, revenue) in rows {
            if excluded(&grp) {
                continue;
            }
            let target = if is_control(&grp) { &mut c } else { &mut t };
            target.0 += members;
            target.1 += hits;
            target.2 += revenue;
        }
        let cmp = stats::two_proportions(t.1 as u64, t.0 as u64, c.1 as u64, c.0 as u64, level);
        let per = |rev: i64, n: i64| if n == 0 { 0.0 } else { rev as f64 / n as f64 };
        let incremental = ((per(t.2, t.0) - per(c.2, c.0)) * t.0 as f64).round() as i64;
        Ok(pb::LiftReport {
            treated: rate(t.1, t.0),
            control: rate(c.1, c.0),
            absolute_lift: cmp.difference,
            relative_lift: if cmp.estimate2 == 0.0 { 0.0 } else { cmp.difference / cmp.estimate2 },
            interval: interval(&cmp, level),
            p_value: cmp.p_value,
            significant: cmp.significant,
            incremental_revenue: money(incremental),
            freshness: self.freshness().await?,
        })
    }

    // ---- ANA-4 -----------------------------------------------------------

    async fn value(&self, req: pb::GetCustomerValueRequest) -> Result<pb::CustomerValueReport, ApiError> {
        let mut v = FieldViolations::new();
        let from = req
            .from_time
            .as_ref()
            .and_then(|t| v.check("from_time", fields::timestamp(t).ok_or("is not a valid time")));
        let to =
            req.to_time.as_ref().and_then(|t| v.check("to_time", fields::timestamp(t).ok_or("is not a valid time")));
        if let (Some(f), Some(t)) = (from, to)
            && t < f
        {
            v.add("to_time", "is before from_time");
        }
        v.into_result()?;
        let mut totals: HashMap<String, (i64, i64)> = HashMap::new();
        let mut tiers: HashMap<String, i64> = HashMap::new();
        let mut grid: HashMap<String, i64> = HashMap::new();
        let rows: Vec<(String, String, i64, i64)> =
            sqlx::query_as("SELECT rollup, tag, n, amount FROM rollups WHERE rollup IN ('buyers', 'orders', 'tier', 'grid') AND k1 = 0")
                .fetch_all(&self.pool)
                .await?;
        for (rollup, tag, n, amount) in rows {
            match rollup.as_str() {
                "tier" if n != 0 => {
                    tiers.insert(format!("TIER_{tag}"), n);
                }
                "grid" if n != 0 => {
                    grid.insert(format!("GRID_CELL_{tag}"), n);
                }
                _ => {
                    let e = totals.entry(rollup).or_insert((0, 0));
                    e.0 += n;
                    e.1 += amount;
                }
            }
        }
        let (buyers, revenue) = totals.get("buyers").copied().unwrap_or((0, 0));
        let orders = totals.get("orders").copied().unwrap_or((0, 0)).0;
        // Monthly churn over the last 12 complete months, for the lifetime estimate.
        let now_m = month_of(Utc::now(), self.tz);
        let mut active: HashMap<i32, i64> = HashMap::new();
        let mut retained: HashMap<i32, i64> = HashMap::new();
        for (m, _, _, n, _) in self.rollup("active", now_m - 13, now_m - 1).await? {
            *active.entry(m).or_default() += n;
        }
        for (m, _, _, n, _) in self.rollup("retained", now_m - 12, now_m - 1).await? {
            *retained.entry(m).or_default() += n;
        }
        let churns: Vec<f64> = (now_m - 12..now_m)
            .filter(|m| active.get(&(m - 1)).copied().unwrap_or(0) > 0)
            .map(|m| kpi::churn_rate(active[&(m - 1)], retained.get(&m).copied().unwrap_or(0)))
            .collect();
        let monthly_churn = if churns.is_empty() { 0.0 } else { churns.iter().sum::<f64>() / churns.len() as f64 };
        let first_month: Option<i32> =
            sqlx::query_scalar("SELECT min(k1) FROM rollups WHERE rollup = 'first' AND n > 0")
                .fetch_one(&self.pool)
                .await?;
        let observed_years = first_month.map(|m| ((now_m - m + 1).max(1)) as f64 / 12.0).unwrap_or(0.0);
        let predicted = kpi::predicted_ltv(revenue, orders, buyers, observed_years, monthly_churn, 10.0);
        // Cohorts: LTV and net revenue retention (months 12-23 over months 0-11).
        let mut cohorts: BTreeMap<i32, (i64, i64, i64)> = BTreeMap::new();
        for (cohort, offset, _, n, amount) in self.rollup("cohort", i32::MIN, i32::MAX).await? {
            let e = cohorts.entry(cohort).or_default();
            if offset == 0 {
                e.0 += n;
            }
            if offset < 12 {
                e.1 += amount;
            } else if offset < 24 {
                e.2 += amount;
            }
        }
        let cohort_rows = cohorts
            .into_iter()
            .filter(|(_, (size, _, _))| *size > 0)
            .map(|(m, (size, first_year, second_year))| pb::CohortValue {
                cohort_start: Some(self.month_time(m)),
                ltv: money(if size == 0 { 0 } else { (first_year + second_year) / size }),
                net_revenue_retention: if first_year > 0 && now_m - m >= 24 {
                    second_year as f64 / first_year as f64
                } else {
                    0.0
                },
            })
            .collect();
        let migration = match (from, to) {
            (Some(from), Some(to)) => {
                let rows: Vec<(i16, i16, i64)> = sqlx::query_as(
                    "WITH a AS (SELECT DISTINCT ON (customer_id) customer_id, to_tier FROM tier_moves WHERE move_time <= $1 ORDER BY customer_id, move_time DESC), \
                          b AS (SELECT DISTINCT ON (customer_id) customer_id, to_tier FROM tier_moves WHERE move_time <= $2 ORDER BY customer_id, move_time DESC) \
                     SELECT COALESCE(a.to_tier, 0::smallint), b.to_tier, count(*) FROM b LEFT JOIN a USING (customer_id) GROUP BY 1, 2 ORDER BY 1, 2",
                )
                .bind(from)
                .bind(to)
                .fetch_all(&self.pool)
                .await?;
                rows.into_iter()
                    .map(|(f, t, n)| pb::MigrationCell { from_tier: i32::from(f), to_tier: i32::from(t), count: n })
                    .collect()
            }
            _ => Vec::new(),
        };
        Ok(pb::CustomerValueReport {
            historical_ltv: money(if buyers == 0 { 0 } else { revenue / buyers }),
            predicted_ltv: money(predicted.round() as i64),
            tier_distribution: tiers.into_iter().collect(),
            migration,
            grid_counts: grid.into_iter().collect(),
            cohorts: cohort_rows,
            freshness: self.freshness().await?,
        })
    }

    // ---- ANA-5 -----------------------------------------------------------

    async fn quality(&self, req: pb::GetServiceQualityRequest) -> Result<pb::ServiceQualityReport, ApiError> {
        let mut v = FieldViolations::new();
        let (start, end) = self.bounds(&mut v, "range", req.range.as_ref(), Duration::days(90));
        let period = match pb::Period::try_from(req.period) {
            Ok(p) => p,
            Err(_) => {
                v.add("period", "unknown value");
                pb::Period::Month
            }
        };
        let segment = fields::optional_id(&mut v, "segment_id", &req.segment_id);
        v.into_result()?;
        let (d0, d1) = (day_of(start, self.tz), day_of(end, self.tz));
        let daily: Vec<(i32, String, String, i64, f64)> = match segment {
            None => {
                sqlx::query_as("SELECT day, metric, key, n, total FROM service_daily WHERE day BETWEEN $1 AND $2")
                    .bind(d0)
                    .bind(d1)
                    .fetch_all(&self.pool)
                    .await?
            }
            Some(s) => self.segment_daily(s, d0, d1).await?,
        };
        let mut sums: HashMap<(&str, String), (i64, f64)> = HashMap::new();
        let mut series: BTreeMap<i32, (i64, i64, i64, i64, f64)> = BTreeMap::new();
        for (day, metric, key, n, total) in &daily {
            let metric: &str = metric.as_str();
            let e = sums.entry((metric_name(metric), key.clone())).or_insert((0, 0.0));
            e.0 += n;
            e.1 += total;
            let p = period_start(*day, period);
            let s = series.entry(p).or_default();
            match (metric, key.as_str()) {
                ("nps", "promoter") => s.0 += n,
                ("nps", "passive") => s.1 += n,
                ("nps", "detractor") => s.2 += n,
                ("csat", _) => {
                    s.3 += n;
                    s.4 += total;
                }
                _ => {}
            }
        }
        let n = |metric: &str, key: &str| sums.get(&(metric_name(metric), key.to_string())).map(|v| v.0).unwrap_or(0);
        let hist = |metric: &str| -> Vec<(i32, i64)> {
            sums.iter()
                .filter(|((m, _), _)| *m == metric)
                .filter_map(|((_, k), v)| k.parse().ok().map(|b| (b, v.0)))
                .collect()
        };
        let percentiles = |metric: &str| {
            let h = hist(metric);
            Some(pb::DurationPercentiles {
                p50: kpi::percentile(&h, 0.5),
                p90: kpi::percentile(&h, 0.9),
                p99: kpi::percentile(&h, 0.99),
            })
        };
        let csat = sums.get(&("csat", String::new())).copied().unwrap_or((0, 0.0));
        let tickets = n("tickets", "");
        Ok(pb::ServiceQualityReport {
            nps: kpi::nps(n("nps", "promoter"), n("nps", "passive"), n("nps", "detractor")),
            csat: if csat.0 == 0 { 0.0 } else { csat.1 / csat.0 as f64 },
            first_response: percentiles("first_response_hist"),
            resolution: percentiles("resolution_hist"),
            sla_compliance: rate(tickets - n("breached", ""), tickets),
            closed_loop: rate(n("verified", ""), n("resolved", "")),
            repeat_complaints: rate(n("repeat_complaints", ""), n("complaints", "")),
            category_mix: sums
                .iter()
                .filter(|((m, _), _)| *m == "feedback")
                .map(|((_, k), v)| (k.clone(), v.0))
                .collect(),
            series: series
                .into_iter()
                .map(|(p, (pro, pas, det, cn, ct))| pb::ServiceQualityPoint {
                    period_start: Some(self.day_time(p)),
                    nps: kpi::nps(pro, pas, det),
                    csat: if cn == 0 { 0.0 } else { ct / cn as f64 },
                    nps_responses: pro + pas + det,
                })
                .collect(),
            freshness: self.freshness().await?,
        })
    }

    /// The service metrics of a segment's members, by day, from the facts.
    async fn segment_daily(
        &self,
        segment: Uuid,
        d0: i32,
        d1: i32,
    ) -> Result<Vec<(i32, String, String, i64, f64)>, ApiError> {
        Ok(sqlx::query_as(
            "WITH m AS (SELECT customer_id FROM segment_members WHERE segment_id = $1) \
             SELECT day, 'nps', CASE WHEN score >= 9 THEN 'promoter' WHEN score >= 7 THEN 'passive' ELSE 'detractor' END, count(*), sum(score)::float8 \
               FROM surveys JOIN m USING (customer_id) WHERE kind = 1 AND day BETWEEN $2 AND $3 GROUP BY 1, 2, 3 \
             UNION ALL SELECT day, 'csat', '', count(*), sum(score)::float8 FROM surveys JOIN m USING (customer_id) \
               WHERE kind = 2 AND day BETWEEN $2 AND $3 GROUP BY 1 \
             UNION ALL SELECT day, 'tickets', '', count(*), 0 FROM tickets JOIN m USING (customer_id) WHERE day BETWEEN $2 AND $3 GROUP BY 1 \
             UNION ALL SELECT day, 'breached', '', count(*), 0 FROM tickets JOIN m USING (customer_id) WHERE breached AND day BETWEEN $2 AND $3 GROUP BY 1 \
             UNION ALL SELECT day, 'resolved', '', count(*), 0 FROM tickets JOIN m USING (customer_id) WHERE resolved AND day BETWEEN $2 AND $3 GROUP BY 1 \
             UNION ALL SELECT day, 'verified', '', count(*), 0 FROM tickets JOIN m USING (customer_id) WHERE verified AND day BETWEEN $2 AND $3 GROUP BY 1 \
             UNION ALL SELECT day, 'complaints', '', count(*), 0 FROM tickets JOIN m USING (customer_id) WHERE category = 2 AND day BETWEEN $2 AND $3 GROUP BY 1 \
             UNION ALL SELECT day, 'repeat_complaints', '', count(*), 0 FROM tickets JOIN m USING (customer_id) WHERE category = 2 AND repeat AND day BETWEEN $2 AND $3 GROUP BY 1 \
             UNION ALL SELECT day, 'feedback', category::text, count(*), 0 FROM feedback_items JOIN m USING (customer_id) WHERE day BETWEEN $2 AND $3 GROUP BY 1, 3",
        )
        .bind(segment)
        .bind(d0)
        .bind(d1)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .map(|(day, metric, key, n, total): (i32, String, String, i64, f64)| {
            let key = if metric == "feedback" { key.parse::<i16>().map(category_name).unwrap_or(key) } else { key };
            (day, metric, key, n, total)
        })
        .chain(self.segment_durations(segment, d0, d1).await?)
        .collect())
    }

    async fn segment_durations(
        &self,
        segment: Uuid,
        d0: i32,
        d1: i32,
    ) -> Result<Vec<(i32, String, String, i64, f64)>, ApiError> {
        let rows: Vec<(i32, Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT t.day, t.first_response_s, t.resolution_s FROM tickets t JOIN segment_members m ON m.customer_id = t.customer_id \
             WHERE m.segment_id = $1 AND t.resolved AND t.day BETWEEN $2 AND $3",
        )
        .bind(segment)
        .bind(d0)
        .bind(d1)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::new();
        for (day, fr, res) in rows {
            if let Some(fr) = fr {
                out.push((day, "first_response_hist".to_string(), kpi::bucket_of(fr).to_string(), 1, fr as f64));
            }
            if let Some(res) = res {
                out.push((day, "resolution_hist".to_string(), kpi::bucket_of(res).to_string(), 1, res as f64));
            }
        }
        Ok(out)
    }

    // ---- ANA-6 -----------------------------------------------------------

    async fn compare(&self, req: pb::CompareKpiRequest) -> Result<pb::KpiComparison, ApiError> {
        let mut v = FieldViolations::new();
        const KPIS: &[&str] = &["repurchase_rate", "churn_rate", "nps", "csat", "conversion_rate", "average_spend"];
        if req.kpi.is_empty() {
            v.required("kpi");
        } else if !KPIS.contains(&req.kpi.as_str()) {
            v.add("kpi", format!("must be one of {}", KPIS.join(", ")));
        }
        let segment = fields::optional_id(&mut v, "segment_id", &req.segment_id);
        let mut period = |field: &str, r: &Option<TimeRange>| -> Option<(DateTime<Utc>, DateTime<Utc>)> {
            match r {
                None => {
                    v.required(field);
                    None
                }
                Some(r) => match fields::time_range(&mut v, field, Some(r)) {
                    (Some(s), Some(e)) => Some((s, e)),
                    _ => {
                        v.add(field, "needs start_time and end_time");
                        None
                    }
                },
            }
        };
        let before = period("before", &req.before);
        let after = period("after", &req.after);
        let level = level(&mut v, req.confidence);
        v.into_result()?;
        let (before, after) = before.zip(after).ok_or_else(|| ApiError::internal("checked above"))?;
        if !self.bitmaps_built.load(std::sync::atomic::Ordering::Relaxed) {
            if !crate::bits::built(&self.pool, self.tz).await? {
                return Err(ApiError::Unavailable(
                    "before/after comparisons start once the activity bitmaps are built from the stored purchases \
                     (after an upgrade or a change of ANALYTICS_TIMEZONE); retry in a minute"
                        .into(),
                ));
            }
            self.bitmaps_built.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let members = match segment {
            Some(id) => Some(crate::bits::segment(&self.pool, id).await?),
            None => None,
        };
        let (cmp, test) = match req.kpi.as_str() {
            "nps" | "csat" => {
                let kind = if req.kpi == "nps" { 1i16 } else { 2 };
                let a = self.survey_sample(segment, kind, after).await?;
                let b = self.survey_sample(segment, kind, before).await?;
                (stats::welch(a, b, level), "Welch t-test".to_string())
            }
            "average_spend" => {
                let ((a, a_of), (b, b_of)) = tokio::try_join!(
                    self.spend_sample(members.as_ref(), after),
                    self.spend_sample(members.as_ref(), before)
                )?;
                let test = if a.n < a_of as f64 || b.n < b_of as f64 {
                    format!(
                        "Welch t-test on uniform samples of {} of {a_of} and {} of {b_of} buying customers",
                        a.n, b.n
                    )
                } else {
                    "Welch t-test".to_string()
                };
                (stats::welch(a, b, level), test)
            }
            kpi => {
                let ((x1, n1), (x2, n2)) = tokio::try_join!(
                    self.proportion(kpi, segment, members.as_ref(), after),
                    self.proportion(kpi, segment, members.as_ref(), before)
                )?;
                (stats::two_proportions(x1, n1, x2, n2, level), "two-proportion z-test".to_string())
            }
        };
        Ok(pb::KpiComparison {
            before: cmp.estimate2,
            after: cmp.estimate1,
            change: cmp.difference,
            interval: interval(&cmp, level),
            p_value: cmp.p_value,
            significant: cmp.significant,
            test,
            freshness: self.freshness().await?,
        })
    }

    async fn survey_sample(
        &self,
        segment: Option<Uuid>,
        kind: i16,
        period: (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<stats::Sample, ApiError> {
        let (first, last) = crate::bits::period_days(period, self.tz);
        let scores: Vec<i16> = sqlx::query_scalar(
            "SELECT score FROM surveys WHERE kind = $1 AND day BETWEEN $2 AND $3 \
             AND ($4::uuid IS NULL OR customer_id IN (SELECT customer_id FROM segment_members WHERE segment_id = $4))",
        )
        .bind(kind)
        .bind(first)
        .bind(last)
        .bind(segment)
        .fetch_all(&self.pool)
        .await?;
        Ok(stats::Sample::of(
            scores.into_iter().map(|s| if kind == 1 { kpi::nps_value(i32::from(s)) } else { f64::from(s) }),
        ))
    }

    /// Net spend per customer who bought in a period (whole days of the
    /// reporting zone), for a uniform sample of at most [`SPEND_SAMPLE`] of
    /// them; and how many bought.
    async fn spend_sample(
        &self,
        members: Option<&Bitmap>,
        period: (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<(stats::Sample, u64), ApiError> {
        let (first, last) = crate::bits::period_days(period, self.tz);
        let mut buyers = crate::bits::bought(&self.pool, Span::days(first, last)).await?;
        if let Some(m) = members {
            buyers = buyers.and(m);
        }
        let drawn = buyers.sample(SPEND_SAMPLE);
        let spends: Vec<i64> = sqlx::query_scalar(
            "SELECT sum(p.amount_minor)::bigint FROM customers c JOIN purchases p ON p.customer_id = c.customer_id \
             WHERE c.idx = ANY($1) AND p.occurred_at >= $2 AND p.occurred_at < $3 GROUP BY c.idx",
        )
        .bind(&drawn)
        .bind(crate::bits::day_start(first, self.tz))
        .bind(crate::bits::day_start(last + 1, self.tz))
        .fetch_all(&self.pool)
        .await?;
        Ok((stats::Sample::of(spends.into_iter().map(|s| s as f64 / 100.0)), buyers.len()))
    }

    /// (successes, trials) of a rate KPI in a period.
    async fn proportion(
        &self,
        kpi: &str,
        segment: Option<Uuid>,
        members: Option<&Bitmap>,
        period: (DateTime<Utc>, DateTime<Utc>),
    ) -> Result<(u64, u64), ApiError> {
        let (first, last) = crate::bits::period_days(period, self.tz);
        let within = |b: Bitmap| match members {
            Some(m) => b.and(m),
            None => b,
        };
        match kpi {
            // Customers who had bought before the period; those who bought again in it.
            "repurchase_rate" => {
                let (earlier, during) = tokio::try_join!(
                    crate::bits::bought(&self.pool, Span::before(first)),
                    crate::bits::bought(&self.pool, Span::days(first, last))
                )?;
                let earlier = within(earlier);
                Ok((earlier.and(&during).len(), earlier.len()))
            }
            // Customers who bought in the 90 days before the period; those who did not buy in it.
            "churn_rate" => {
                let (active, during) = tokio::try_join!(
                    crate::bits::bought(&self.pool, Span::days(first - 90, first - 1)),
                    crate::bits::bought(&self.pool, Span::days(first, last))
                )?;
                let active = within(active);
                Ok((active.and_not(&during).len(), active.len()))
            }
            // Campaign members assigned in the period (contacted groups); those who converted.
            _ => {
                let (x, n): (i64, i64) = sqlx::query_as(
                    "SELECT count(*) FILTER (WHERE converted_at IS NOT NULL), count(*) FROM campaign_members \
                     WHERE assigned_at >= $1 AND assigned_at < $2 AND grp NOT IN ('holdout', 'global_control') \
                     AND ($3::uuid IS NULL OR customer_id IN (SELECT customer_id FROM segment_members WHERE segment_id = $3))",
                )
                .bind(crate::bits::day_start(first, self.tz))
                .bind(crate::bits::day_start(last + 1, self.tz))
                .bind(segment)
                .fetch_one(&self.pool)
                .await?;
                Ok((x.max(0) as u64, n.max(0) as u64))
            }
        }
    }
}

/// Buying customers a before/after test of average spend reads per period at
/// most (a uniform sample beyond that; its size is in the test's name).
pub const SPEND_SAMPLE: u64 = 2_000;

/// Sums of campaign cells for one group.
#[derive(sqlx::FromRow)]
struct PerformanceSums {
    grp: String,
    targeted: i64,
    contacted: i64,
    delivered: i64,
    responded: i64,
    converted: i64,
    cost: i64,
    revenue: i64,
}

/// Metric names as static strings (for the sums' keys).
fn metric_name(m: &str) -> &'static str {
    match m {
        "nps" => "nps",
        "csat" => "csat",
        "tickets" => "tickets",
        "breached" => "breached",
        "resolved" => "resolved",
        "verified" => "verified",
        "reopened" => "reopened",
        "complaints" => "complaints",
        "repeat_complaints" => "repeat_complaints",
        "feedback" => "feedback",
        "first_response_hist" => "first_response_hist",
        "resolution_hist" => "resolution_hist",
        _ => "other",
    }
}

/// The first day of the period a day falls in (days since 1970-01-01, a Thursday).
fn period_start(day: i32, period: pb::Period) -> i32 {
    match period {
        pb::Period::Day => day,
        // ISO weeks start on Monday; day 4 (1970-01-05) was a Monday.
        pb::Period::Week => day - (day - 4).rem_euclid(7),
        pb::Period::Quarter => {
            let d = crate::domain::customer::day_date(day);
            let m = (d.year_index() * 12) + (d.month0_index() / 3) * 3;
            (month_start(m) - crate::domain::customer::day_date(0)).num_days() as i32
        }
        _ => {
            let d = crate::domain::customer::day_date(day);
            (month_start(d.year_index() * 12 + d.month0_index()) - crate::domain::customer::day_date(0)).num_days()
                as i32
        }
    }
}

trait MonthIndex {
    fn year_index(&self) -> i32;
    fn month0_index(&self) -> i32;
}

impl MonthIndex for chrono::NaiveDate {
    fn year_index(&self) -> i32 {
        use chrono::Datelike;
        self.year() - 1970
    }
    fn month0_index(&self) -> i32 {
        use chrono::Datelike;
        self.month0() as i32
    }
}

#[tonic::async_trait]
impl AnalyticsService for AnalyticsApi {
    async fn get_retention(&self, r: Request<pb::GetRetentionRequest>) -> Reply<pb::RetentionReport> {
        self.retention(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn get_churn_and_repurchase(
        &self,
        r: Request<pb::GetChurnAndRepurchaseRequest>,
    ) -> Reply<pb::ChurnAndRepurchaseReport> {
        self.churn(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn get_campaign_performance(
        &self,
        r: Request<pb::GetCampaignPerformanceRequest>,
    ) -> Reply<pb::CampaignPerformanceReport> {
        self.performance(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn get_lift(&self, r: Request<pb::GetLiftRequest>) -> Reply<pb::LiftReport> {
        self.lift(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn get_customer_value(&self, r: Request<pb::GetCustomerValueRequest>) -> Reply<pb::CustomerValueReport> {
        self.value(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn get_service_quality(&self, r: Request<pb::GetServiceQualityRequest>) -> Reply<pb::ServiceQualityReport> {
        self.quality(r.into_inner()).await.into_grpc(SERVICE)
    }
    async fn compare_kpi(&self, r: Request<pb::CompareKpiRequest>) -> Reply<pb::KpiComparison> {
        self.compare(r.into_inner()).await.into_grpc(SERVICE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_start_on_mondays_months_and_quarters() {
        let day = |y, m, d| {
            (chrono::NaiveDate::from_ymd_opt(y, m, d).unwrap() - chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap())
                .num_days() as i32
        };
        // Wednesday 2026-12-02: week from Monday 11-30, month from 12-01, quarter from 10-01.
        assert_eq!(period_start(day(2026, 12, 2), pb::Period::Week), day(2026, 11, 30));
        assert_eq!(period_start(day(2026, 11, 30), pb::Period::Week), day(2026, 11, 30));
        assert_eq!(period_start(day(2026, 12, 2), pb::Period::Month), day(2026, 12, 1));
        assert_eq!(period_start(day(2026, 12, 2), pb::Period::Quarter), day(2026, 10, 1));
        assert_eq!(period_start(day(2026, 12, 2), pb::Period::Day), day(2026, 12, 2));
    }
}
