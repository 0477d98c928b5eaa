//! SEG-7: the set-based recompute, in three forms that score a customer the
//! same way:
//!
//! - **Full** (hourly and on demand): one pass over the per-customer
//!   aggregates that the read model keeps as events arrive (`customer_facts`,
//!   one short row per customer, no scan of the transactions); re-ranks the
//!   base for RFM (SEG-1) and re-scores everyone.
//! - **Calibration** (monthly and on demand): a full recompute that also
//!   re-draws the spend cut points behind the tiers (SEG-2) and the value
//!   bands (SEG-3), so tiers stay put between calibrations unless a
//!   customer's own facts move them.
//! - **Incremental** (as events arrive): the customers the read model marked
//!   dirty, claimed by any replica with `FOR UPDATE SKIP LOCKED`, scored
//!   against the stored base distribution ([`Calibration`]).
//!
//! The rules are the pure functions of [`crate::domain`]. A row is written
//! back only when its scores changed (a digest of them is stored); a tier
//! move is recorded with its reason and emitted as TierChanged (SEG-2); a
//! change of churn level as ChurnRiskChanged (SEG-5). Recomputing without new
//! facts writes and emits nothing. A full recompute holds the recompute lock
//! exclusively, incremental batches share it, so no two writers ever score
//! one customer at once (no duplicate history rows).

use chrono::{DateTime, Duration, TimeZone, Utc};
use crm_kit::ApiError;
use crm_kit::outbox;
use crm_proto::common::v1::{ChurnRiskLevel, Tier};
use crm_proto::segmentation::v1 as pb;
use prost::Message;
use sqlx::{PgConnection, PgPool, Row};
use tokio_stream::StreamExt;
use uuid::Uuid;

use crate::SERVICE;
use crate::domain::{Thresholds, churn, grid, lifecycle, rfm, tiers};
use crate::read_model::month_of;

/// Rows written back per statement.
const BATCH: usize = 10_000;
/// A distribution of up to this many + 1 customers is kept whole; a larger
/// one as this many + 1 evenly spaced quantiles (0.01 % resolution).
pub const POINTS: usize = 10_000;
/// The advisory lock a full recompute holds exclusively and incremental
/// batches share.
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext('segmentation:recompute'))";
const LOCK_SHARED: &str = "SELECT pg_advisory_xact_lock_shared(hashtext('segmentation:recompute'))";

/// What a recompute did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Customers scored.
    pub customers: usize,
    /// Score rows written (new or changed).
    pub written: usize,
    /// Tier moves recorded (and TierChanged events).
    pub tier_moves: usize,
    /// Churn level changes (and ChurnRiskChanged events).
    pub churn_changes: usize,
    /// Time spent reading the inputs (a full recompute).
    pub reading: std::time::Duration,
    /// Time spent ranking and scoring (a full recompute).
    pub scoring: std::time::Duration,
}

/// Which full recompute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Re-rank RFM, keep the tier and value-band cut points.
    Full,
    /// Re-draw every cut point too (monthly).
    Calibration,
}

/// A sorted distribution of one feature over the base: the values
/// themselves, or evenly spaced quantiles of them for a large base.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Distribution {
    /// Size of the base.
    pub n: usize,
    /// Ascending values (all of them when `n <= POINTS + 1`).
    pub points: Vec<i64>,
}

impl Distribution {
    /// The distribution of `values`.
    pub fn of(mut values: Vec<i64>) -> Self {
        values.sort_unstable();
        let n = values.len();
        if n <= POINTS + 1 {
            return Self { n, points: values };
        }
        let points = (0..=POINTS).map(|j| values[j * (n - 1) / POINTS]).collect();
        Self { n, points }
    }

    fn scale(&self) -> f64 {
        if self.points.len() == self.n { 1.0 } else { (self.n - 1) as f64 / POINTS as f64 }
    }

    /// How many of the base are below `x` (exact for a whole base).
    pub fn below(&self, x: i64) -> f64 {
        self.points.partition_point(|v| *v < x) as f64 * self.scale()
    }

    /// How many of the base are above `x` (exact for a whole base).
    pub fn above(&self, x: i64) -> f64 {
        (self.points.len() - self.points.partition_point(|v| *v <= x)) as f64 * self.scale()
    }

    /// SQL's `percent_rank` of `x` in the base, 0 to 100.
    pub fn percent_rank(&self, x: i64) -> f64 {
        if self.n <= 1 { 0.0 } else { (100.0 * self.below(x) / (self.n - 1) as f64).min(100.0) }
    }

    /// Share of the base above `x`: 0.0 for the top.
    pub fn share_above(&self, x: i64) -> f64 {
        if self.n == 0 { 0.0 } else { (self.above(x) / self.n as f64).min(1.0) }
    }
}

/// The base every score is ranked against (stored in `calibration`).
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// When the RFM distributions were drawn (the last full recompute).
    pub rfm_at: DateTime<Utc>,
    /// Last purchase, epoch seconds (`i64::MIN`: never bought).
    pub recency: Distribution,
    /// Purchases in the RFM window.
    pub frequency: Distribution,
    /// Net spend in the RFM window.
    pub monetary: Distribution,
    /// Average activity (interactions in the last 3 complete months).
    pub activity_mean: f64,
    /// Newest event reflected by the last full recompute.
    pub as_of: Option<DateTime<Utc>>,
    /// When the spend cut points were drawn (the last calibration).
    pub tiers_at: DateTime<Utc>,
    /// Net spend in the window of those who spent anything.
    pub spend: Distribution,
}

impl Calibration {
    async fn load(conn: &mut PgConnection) -> Result<Option<Self>, sqlx::Error> {
        let row = sqlx::query("SELECT * FROM calibration").fetch_optional(&mut *conn).await?;
        let Some(row) = row else { return Ok(None) };
        let n = row.try_get::<i64, _>("base_size")? as usize;
        let dist = |name: &str, n: usize| -> Result<Distribution, sqlx::Error> {
            Ok(Distribution { n, points: row.try_get(name)? })
        };
        Ok(Some(Self {
            rfm_at: row.try_get("rfm_at")?,
            recency: dist("recency", n)?,
            frequency: dist("frequency", n)?,
            monetary: dist("monetary", n)?,
            activity_mean: row.try_get("activity_mean")?,
            as_of: row.try_get("as_of")?,
            tiers_at: row.try_get("tiers_at")?,
            spend: dist("spend", row.try_get::<i64, _>("spenders")? as usize)?,
        }))
    }

    async fn save(&self, conn: &mut PgConnection) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO calibration (singleton, rfm_at, base_size, recency, frequency, monetary, activity_mean, as_of, \
               tiers_at, spenders, spend) VALUES (true, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
             ON CONFLICT (singleton) DO UPDATE SET rfm_at = $1, base_size = $2, recency = $3, frequency = $4, monetary = $5, \
               activity_mean = $6, as_of = $7, tiers_at = $8, spenders = $9, spend = $10",
        )
        .bind(self.rfm_at)
        .bind(self.recency.n as i64)
        .bind(&self.recency.points)
        .bind(&self.frequency.points)
        .bind(&self.monetary.points)
        .bind(self.activity_mean)
        .bind(self.as_of)
        .bind(self.tiers_at)
        .bind(self.spend.n as i64)
        .bind(&self.spend.points)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// The months the rules look at, as positions in the aligned month arrays
/// (`span` months, the current one last).
#[derive(Debug, Clone, Copy)]
struct Windows {
    /// Months in the arrays.
    span: usize,
    /// Months of the RFM and tier window (the current one and those before).
    window: usize,
    /// Complete months the tier moves look at.
    complete: usize,
}

impl Windows {
    fn of(t: &Thresholds) -> Self {
        let window = t.rfm_window_months.max(1);
        let complete = 13usize.max(t.promotion_months + 1).max(t.demotion_months + 1);
        Self { span: (complete + 1).max(window), window, complete }
    }
}

/// What was stored for a customer before this recompute.
#[derive(Debug, Clone)]
struct Stored {
    tier: i16,
    tier_since: DateTime<Utc>,
    stage: i16,
    stage_since: DateTime<Utc>,
    churn_level: i16,
    digest: i64,
}

/// One customer's facts as read (months aligned, the current one last).
#[derive(Debug, Clone)]
struct Input {
    id: Uuid,
    first_purchase: Option<DateTime<Utc>>,
    last_purchase: Option<DateTime<Utc>>,
    last_interaction: Option<DateTime<Utc>>,
    last_login: Option<DateTime<Utc>>,
    responses: i64,
    contacts: i64,
    /// Net spend and purchases in the RFM window (the current month and those before).
    spend_window: i64,
    purchases_window: i64,
    /// Net spend of the last 3 complete months, and of the 3 before.
    spend_3m: i64,
    spend_prev_3m: i64,
    /// Inquiries in the current month and the 2 before.
    inquiries_recent: i64,
    /// Interactions in the last 3 complete months.
    activity_3m: i64,
    /// Spend per complete month, oldest first (the tier moves).
    complete: Vec<i64>,
    open_complaint: bool,
    bad_experience: bool,
    stored: Option<Stored>,
}

/// Which customers a read covers.
#[derive(Debug, Clone, Copy)]
enum Scope<'a> {
    /// These (the incremental recompute): `$8`.
    Only(&'a [Uuid]),
    /// Ids in `($8, $9]` (a part of a full recompute).
    Range(Uuid, Uuid),
}

/// The rows of the read model a recompute reads: live customers in the
/// scope. `$1..$2` are the months of the spend array (the current one last),
/// `$3` the start of the bad-experience window; `$4` the first month of the
/// RFM window (purchases), `$5..$6` the 3 complete months of activity, `$7`
/// the first of the 3 months of inquiries: only what the rules add up is
/// sent, as the slices of the month arrays they add up. Constant SQL; a range
/// restricts every scan, so the parts of a full recompute read disjoint
/// slices of each table.
fn input_sql(scope: &Scope) -> String {
    let (c, f, s) = match scope {
        Scope::Only(_) => {
            ("AND c.customer_id = ANY ($8)", "AND f.customer_id = ANY ($8)", "AND s.customer_id = ANY ($8)")
        }
        Scope::Range(..) => (
            "AND c.customer_id > $8 AND c.customer_id <= $9",
            "AND f.customer_id > $8 AND f.customer_id <= $9",
            "AND s.customer_id > $8 AND s.customer_id <= $9",
        ),
    };
    format!(
        "SELECT c.customer_id, f.first_purchase, f.last_purchase, f.last_interaction, f.last_login, \
           COALESCE(f.responses, 0) AS responses, COALESCE(f.contacts, 0) AS contacts, \
           greatest(array_lower(f.spend, 1), $1) AS spend_from, f.spend[$1:$2] AS spend, \
           f.purchases[$4:$2] AS purchases, f.activity[$5:$6] AS activity, f.inquiries[$7:$2] AS inquiries, \
           s.tier AS old_tier, s.tier_since AS old_tier_since, s.lifecycle_stage AS old_stage, \
           s.lifecycle_since AS old_stage_since, s.churn_level AS old_churn_level, s.digest AS old_digest, \
           ct.customer_id IS NOT NULL AS open_complaint, COALESCE(be.last_at >= $3, false) AS bad_experience \
         FROM customers c LEFT JOIN customer_facts f ON f.customer_id = c.customer_id {f} \
           LEFT JOIN customer_scores s ON s.customer_id = c.customer_id {s} \
           LEFT JOIN (SELECT DISTINCT customer_id FROM complaint_tickets WHERE open) ct ON ct.customer_id = c.customer_id \
           LEFT JOIN bad_experiences be ON be.customer_id = c.customer_id \
         WHERE c.merged_into IS NULL AND c.erased_at IS NULL {c}"
    )
}

/// The sum of a month-array slice from SQL (absent months count zero).
fn total<T: Copy + Into<i64>>(values: Option<Vec<Option<T>>>) -> i64 {
    values.unwrap_or_default().into_iter().flatten().map(Into::into).sum()
}

/// A month array from SQL aligned to `span` months starting at `lo`.
fn aligned<T: Copy + Into<i64>>(from: Option<i32>, values: Option<Vec<Option<T>>>, lo: i32, span: usize) -> Vec<i64> {
    let mut out = vec![0i64; span];
    if let (Some(from), Some(values)) = (from, values) {
        let offset = (from - lo).max(0) as usize;
        for (i, v) in values.into_iter().enumerate() {
            if let (Some(slot), Some(v)) = (out.get_mut(offset + i), v) {
                *slot = v.into();
            }
        }
    }
    out
}

fn parse(row: &sqlx::postgres::PgRow, lo: i32, w: &Windows) -> Result<Input, sqlx::Error> {
    let old_tier: Option<i16> = row.try_get("old_tier")?;
    let stored = match old_tier {
        Some(tier) => Some(Stored {
            tier,
            tier_since: row.try_get("old_tier_since")?,
            stage: row.try_get("old_stage")?,
            stage_since: row.try_get("old_stage_since")?,
            churn_level: row.try_get("old_churn_level")?,
            digest: row.try_get("old_digest")?,
        }),
        None => None,
    };
    let span = w.span;
    let spend = aligned::<i64>(row.try_get("spend_from")?, row.try_get("spend")?, lo, span);
    Ok(Input {
        id: row.try_get("customer_id")?,
        first_purchase: row.try_get("first_purchase")?,
        last_purchase: row.try_get("last_purchase")?,
        last_interaction: row.try_get("last_interaction")?,
        last_login: row.try_get("last_login")?,
        responses: row.try_get::<i32, _>("responses")? as i64,
        contacts: row.try_get::<i32, _>("contacts")? as i64,
        spend_window: spend[span - w.window..].iter().sum(),
        purchases_window: total::<i32>(row.try_get("purchases")?),
        spend_3m: spend[span - 4..span - 1].iter().sum(),
        spend_prev_3m: spend[span - 7..span - 4].iter().sum(),
        inquiries_recent: total::<i32>(row.try_get("inquiries")?),
        activity_3m: total::<i32>(row.try_get("activity")?),
        complete: spend[span - 1 - w.complete..span - 1].to_vec(),
        open_complaint: row.try_get("open_complaint")?,
        bad_experience: row.try_get("bad_experience")?,
        stored,
    })
}

/// Reads the inputs of the live customers in `scope`.
async fn read(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    w: &Windows,
    scope: Scope<'_>,
    expected: usize,
) -> Result<Vec<Input>, sqlx::Error> {
    let hi = month_of(now);
    let lo = hi - (w.span as i32 - 1);
    let sql = input_sql(&scope);
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(lo)
        .bind(hi)
        .bind(now - Duration::days(90))
        .bind(hi - (w.window as i32 - 1))
        .bind(hi - 3)
        .bind(hi - 1)
        .bind(hi - 2);
    query = match scope {
        Scope::Only(ids) => query.bind(ids),
        Scope::Range(from, to) => query.bind(from).bind(to),
    };
    let mut rows = query.fetch(&mut *conn);
    let mut out = Vec::with_capacity(expected);
    while let Some(row) = rows.next().await {
        out.push(parse(&row?, lo, w)?);
    }
    Ok(out)
}

/// Parts a full recompute reads and scores at once (one connection and one
/// core each).
fn parts() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4)
}

/// Reads every live customer in `parts()` id ranges at once, on their own
/// connections (the caller's transaction holds the recompute lock, so no
/// scorer writes meanwhile). Returns the parts, to be scored in parallel.
async fn read_all(pool: &PgPool, now: DateTime<Utc>, w: &Windows) -> Result<Vec<Vec<Input>>, sqlx::Error> {
    let n = parts();
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM customers").fetch_one(pool).await?;
    let mut bounds = vec![Uuid::nil()];
    for k in 1..n {
        let at: Option<Uuid> =
            sqlx::query_scalar("SELECT customer_id FROM customers ORDER BY customer_id OFFSET $1 LIMIT 1")
                .bind(total * k as i64 / n as i64)
                .fetch_optional(pool)
                .await?;
        bounds.extend(at);
    }
    bounds.push(Uuid::max());
    bounds.dedup();
    let reads = bounds.windows(2).map(|b| {
        let (from, to, pool, w) = (b[0], b[1], pool.clone(), *w);
        async move {
            let mut conn = pool.acquire().await?;
            sqlx::query("SET work_mem = '256MB'").execute(&mut *conn).await?;
            let rows = read(&mut conn, now, &w, Scope::Range(from, to), total as usize / n + 1).await;
            sqlx::query("RESET work_mem").execute(&mut *conn).await?;
            rows
        }
    });
    let mut out = Vec::with_capacity(n + 1);
    for part in futures_util::future::join_all(reads).await {
        out.push(part?);
    }
    // The nil id (never a customer's) is outside every range; read it alone.
    out.push(read(&mut *pool.acquire().await?, now, w, Scope::Only(&[Uuid::nil()]), 0).await?);
    Ok(out)
}

/// Scores each part on its own thread; keeps only the customers whose row
/// changed (the rest write nothing: in an hourly run that is nearly all of
/// them, and holding a million scored rows to drop them costs memory).
async fn score_all(
    parts: Vec<Vec<Input>>,
    cal: std::sync::Arc<Calibration>,
    t: &Thresholds,
    now: DateTime<Utc>,
) -> Result<Vec<Scored>, ApiError> {
    let tasks: Vec<_> = parts
        .into_iter()
        .map(|part| {
            let (cal, t) = (cal.clone(), t.clone());
            tokio::task::spawn_blocking(move || {
                part.iter()
                    .map(|x| score(x, &cal, &t, now))
                    .filter(|s| s.changed || s.moved.is_some() || s.churn.is_some())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut out = Vec::new();
    for task in tasks {
        out.extend(task.await.map_err(ApiError::internal)?);
    }
    Ok(out)
}

/// The distribution of `f` over every part, sorted on a blocking thread.
fn distribution(
    parts: &std::sync::Arc<Vec<Vec<Input>>>,
    f: fn(&Input) -> Option<i64>,
) -> tokio::task::JoinHandle<Distribution> {
    let parts = parts.clone();
    tokio::task::spawn_blocking(move || Distribution::of(parts.iter().flatten().filter_map(f).collect()))
}

fn days(now: DateTime<Utc>, t: Option<DateTime<Utc>>) -> Option<i32> {
    t.map(|t| (now - t).num_days().max(0) as i32)
}

/// FNV-1a: a stable digest of a score row, to skip unchanged writes.
fn digest(parts: &[i64], text: &str, bytes: &[u8]) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    };
    parts.iter().flat_map(|p| p.to_le_bytes()).for_each(&mut eat);
    text.bytes().chain([0xff]).for_each(&mut eat);
    bytes.iter().copied().for_each(&mut eat);
    h as i64
}

/// A customer's new scores.
#[derive(Debug, Clone)]
struct Scored {
    id: Uuid,
    /// tier, r/f/m scores, r/f/m percentiles, RFM segment, grid cell,
    /// lifecycle stage, churn score and level: the int2 columns in write order.
    small: [i16; 12],
    recency: i32,
    frequency: i32,
    monetary: i64,
    tier_since: DateTime<Utc>,
    tier_reason: String,
    stage_since: DateTime<Utc>,
    risk: Vec<u8>,
    digest: i64,
    changed: bool,
    moved: Option<(i16, i16, String)>,
    churn: Option<pb::ChurnRiskChanged>,
}

fn recency_key(t: Option<DateTime<Utc>>) -> i64 {
    t.map(|t| t.timestamp()).unwrap_or(i64::MIN)
}

/// Scores one customer against the base (pure: the SEG rules of [`crate::domain`]).
fn score(x: &Input, cal: &Calibration, t: &Thresholds, now: DateTime<Utc>) -> Scored {
    let (spend_window, purchases_window) = (x.spend_window, x.purchases_window);
    let (spend_3m, spend_prev_3m, inquiries) = (x.spend_3m, x.spend_prev_3m, x.inquiries_recent);
    let rank_share = if spend_window > 0 { cal.spend.share_above(spend_window) } else { 1.0 };
    let last_activity = match (x.last_purchase, x.last_interaction) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    let trend = grid::spend_trend(spend_3m, spend_prev_3m);
    let potential = grid::potential_band(trend, inquiries as i32, t);
    let value = grid::value_band(rank_share, spend_window, t);
    let facts = tiers::TierFacts {
        spend_12m_minor: spend_window,
        spend_rank_share: rank_share,
        days_since_last_activity: days(now, last_activity),
        days_since_first_purchase: days(now, x.first_purchase),
        monthly_spend_minor: x.complete.clone(),
        high_potential: potential == grid::Band::High,
    };
    let current = x.stored.as_ref().and_then(|s| Tier::try_from(s.tier as i32).ok()).unwrap_or(Tier::Unspecified);
    let decision = tiers::next_tier(current, &facts, t);
    let (tier_since, moved) = match &x.stored {
        Some(s) if decision.tier == current => (s.tier_since, None),
        _ if decision.tier == current => (now, None),
        _ => (now, Some((current as i16, decision.tier as i16, decision.reason.clone()))),
    };
    let stage = lifecycle::stage(
        &lifecycle::LifecycleFacts {
            days_since_first_purchase: days(now, x.first_purchase),
            days_since_last_purchase: days(now, x.last_purchase),
            spend_trend: trend,
        },
        t,
    );
    let stage_since = match &x.stored {
        Some(s) if s.stage == stage as i16 => s.stage_since,
        _ => now,
    };
    let activity_vs_base = if cal.activity_mean > 0.0 { x.activity_3m as f64 / cal.activity_mean } else { 0.0 };
    let risk = churn::assess(
        &churn::ChurnFacts {
            days_since_last_purchase: days(now, x.last_purchase),
            response_rate: (x.contacts > 0).then(|| x.responses as f64 / x.contacts as f64),
            activity_vs_base,
            days_since_last_interaction: days(now, x.last_interaction),
            spend_last_3m_minor: spend_3m,
            spend_previous_3m_minor: spend_prev_3m,
            days_without_login: days(now, x.last_login),
            // SEG-5: from feedback's events; a bad experience counts for 90 days.
            open_complaint: x.open_complaint,
            bad_service_experience: x.bad_experience,
            ..Default::default()
        },
        t,
    );
    let previous_level =
        x.stored.as_ref().map(|s| i32::from(s.churn_level)).unwrap_or(ChurnRiskLevel::Unspecified as i32);
    let (r_pct, f_pct, m_pct) = (
        cal.recency.percent_rank(recency_key(x.last_purchase)),
        cal.frequency.percent_rank(purchases_window),
        cal.monetary.percent_rank(spend_window),
    );
    let (r, f, m) = (rfm::quintile(r_pct), rfm::quintile(f_pct), rfm::quintile(m_pct));
    let recency = days(now, x.last_purchase).unwrap_or(-1);
    let small = [
        decision.tier as i16,
        r as i16,
        f as i16,
        m as i16,
        r_pct.round() as i16,
        f_pct.round() as i16,
        m_pct.round() as i16,
        rfm::segment(r, f, m) as i16,
        grid::cell(value, potential) as i16,
        stage as i16,
        risk.score as i16,
        risk.level as i16,
    ];
    let encoded = risk.encode_to_vec();
    let mut parts: Vec<i64> = small.iter().map(|v| *v as i64).collect();
    parts.extend([recency as i64, purchases_window, spend_window]);
    let digest = digest(&parts, &decision.reason, &encoded);
    let churn = (previous_level != risk.level).then(|| pb::ChurnRiskChanged {
        customer_id: x.id.to_string(),
        previous_level,
        risk: Some(risk),
    });
    let changed = x.stored.as_ref().is_none_or(|s| s.digest != digest);
    // What an unchanged row would write is dropped now: a million of them add up.
    let (tier_reason, risk) = if changed { (decision.reason, encoded) } else { (String::new(), Vec::new()) };
    Scored {
        id: x.id,
        small,
        recency,
        frequency: purchases_window.min(i32::MAX as i64) as i32,
        monetary: spend_window,
        tier_since,
        tier_reason,
        stage_since,
        risk,
        changed,
        digest,
        moved,
        churn,
    }
}

/// Writes the changed rows, the tier moves and the events (the caller counts
/// the customers it scored: `scored` may hold only the changed ones).
async fn write(
    conn: &mut PgConnection,
    scored: &[Scored],
    now: DateTime<Utc>,
    as_of: Option<DateTime<Utc>>,
) -> Result<Summary, ApiError> {
    let changed: Vec<&Scored> = scored.iter().filter(|s| s.changed).collect();
    for chunk in changed.chunks(BATCH) {
        let col = |i: usize| -> Vec<i16> { chunk.iter().map(|s| s.small[i]).collect() };
        let ids: Vec<Uuid> = chunk.iter().map(|s| s.id).collect();
        let tier_since: Vec<DateTime<Utc>> = chunk.iter().map(|s| s.tier_since).collect();
        let reasons: Vec<&str> = chunk.iter().map(|s| s.tier_reason.as_str()).collect();
        let recency: Vec<i32> = chunk.iter().map(|s| s.recency).collect();
        let frequency: Vec<i32> = chunk.iter().map(|s| s.frequency).collect();
        let monetary: Vec<i64> = chunk.iter().map(|s| s.monetary).collect();
        let stage_since: Vec<DateTime<Utc>> = chunk.iter().map(|s| s.stage_since).collect();
        let risks: Vec<&[u8]> = chunk.iter().map(|s| s.risk.as_slice()).collect();
        let digests: Vec<i64> = chunk.iter().map(|s| s.digest).collect();
        sqlx::query(
            "INSERT INTO customer_scores (customer_id, tier, tier_since, tier_reason, recency_days, frequency, monetary_minor, \
               r_score, f_score, m_score, r_percentile, f_percentile, m_percentile, rfm_segment, grid_cell, lifecycle_stage, \
               lifecycle_since, churn_score, churn_level, churn_risk, digest, computed_at, as_of) \
             SELECT *, $22::timestamptz, $23::timestamptz FROM UNNEST($1::uuid[], $2::int2[], $3::timestamptz[], $4::text[], \
               $5::int4[], $6::int4[], $7::int8[], $8::int2[], $9::int2[], $10::int2[], $11::int2[], $12::int2[], $13::int2[], \
               $14::int2[], $15::int2[], $16::int2[], $17::timestamptz[], $18::int2[], $19::int2[], $20::bytea[], $21::int8[]) \
             ON CONFLICT (customer_id) DO UPDATE SET tier = EXCLUDED.tier, tier_since = EXCLUDED.tier_since, \
               tier_reason = EXCLUDED.tier_reason, recency_days = EXCLUDED.recency_days, frequency = EXCLUDED.frequency, \
               monetary_minor = EXCLUDED.monetary_minor, r_score = EXCLUDED.r_score, f_score = EXCLUDED.f_score, \
               m_score = EXCLUDED.m_score, r_percentile = EXCLUDED.r_percentile, f_percentile = EXCLUDED.f_percentile, \
               m_percentile = EXCLUDED.m_percentile, rfm_segment = EXCLUDED.rfm_segment, grid_cell = EXCLUDED.grid_cell, \
               lifecycle_stage = EXCLUDED.lifecycle_stage, lifecycle_since = EXCLUDED.lifecycle_since, \
               churn_score = EXCLUDED.churn_score, churn_level = EXCLUDED.churn_level, churn_risk = EXCLUDED.churn_risk, \
               digest = EXCLUDED.digest, computed_at = EXCLUDED.computed_at, as_of = EXCLUDED.as_of",
        )
        .bind(&ids)
        .bind(col(0))
        .bind(&tier_since)
        .bind(&reasons)
        .bind(&recency)
        .bind(&frequency)
        .bind(&monetary)
        .bind(col(1))
        .bind(col(2))
        .bind(col(3))
        .bind(col(4))
        .bind(col(5))
        .bind(col(6))
        .bind(col(7))
        .bind(col(8))
        .bind(col(9))
        .bind(&stage_since)
        .bind(col(10))
        .bind(col(11))
        .bind(&risks)
        .bind(&digests)
        .bind(now)
        .bind(as_of)
        .execute(&mut *conn)
        .await?;
    }
    let moves: Vec<(Uuid, &(i16, i16, String))> =
        scored.iter().filter_map(|s| s.moved.as_ref().map(|m| (s.id, m))).collect();
    for chunk in moves.chunks(BATCH) {
        let who: Vec<Uuid> = chunk.iter().map(|(w, _)| *w).collect();
        let from: Vec<i16> = chunk.iter().map(|(_, m)| m.0).collect();
        let to: Vec<i16> = chunk.iter().map(|(_, m)| m.1).collect();
        let why: Vec<&str> = chunk.iter().map(|(_, m)| m.2.as_str()).collect();
        sqlx::query(
            "INSERT INTO tier_moves (customer_id, from_tier, to_tier, reason, moved_at) \
             SELECT w, f, t, r, $5 FROM UNNEST($1::uuid[], $2::int2[], $3::int2[], $4::text[]) AS x(w, f, t, r)",
        )
        .bind(&who)
        .bind(&from)
        .bind(&to)
        .bind(&why)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        let events: Vec<(String, pb::TierChanged)> = chunk
            .iter()
            .map(|(w, (f, t, r))| {
                let change = pb::TierChanged {
                    customer_id: w.to_string(),
                    r#move: Some(pb::TierMove {
                        from_tier: *f as i32,
                        to_tier: *t as i32,
                        reason: r.clone(),
                        move_time: Some(prost_types::Timestamp { seconds: now.timestamp(), nanos: 0 }),
                    }),
                };
                (w.to_string(), change)
            })
            .collect();
        outbox::enqueue_many(&mut *conn, SERVICE, "customer", "", &events).await?;
    }
    let churn: Vec<(String, pb::ChurnRiskChanged)> =
        scored.iter().filter_map(|s| s.churn.clone().map(|c| (s.id.to_string(), c))).collect();
    for chunk in churn.chunks(BATCH) {
        outbox::enqueue_many(&mut *conn, SERVICE, "customer", "", chunk).await?;
    }
    Ok(Summary { written: changed.len(), tier_moves: moves.len(), churn_changes: churn.len(), ..Default::default() })
}

async fn newest_event(conn: &mut PgConnection) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar("SELECT max(newest_event_at) FROM freshness").fetch_one(&mut *conn).await
}

/// A full recompute of every live customer as of `now` (re-ranks RFM).
pub async fn run(pool: &PgPool, thresholds: &Thresholds, now: DateTime<Utc>) -> Result<Summary, ApiError> {
    run_mode(pool, thresholds, now, Mode::Full).await
}

/// A full recompute that also re-draws the tier and value-band cut points.
pub async fn calibrate(pool: &PgPool, thresholds: &Thresholds, now: DateTime<Utc>) -> Result<Summary, ApiError> {
    run_mode(pool, thresholds, now, Mode::Calibration).await
}

/// A full recompute in `mode`. The first one ever calibrates.
pub async fn run_mode(
    pool: &PgPool,
    thresholds: &Thresholds,
    now: DateTime<Utc>,
    mode: Mode,
) -> Result<Summary, ApiError> {
    let started = std::time::Instant::now();
    let mut tx = pool.begin().await?;
    // One full recompute at a time across replicas, and no incremental batch meanwhile.
    sqlx::query(LOCK).execute(&mut *tx).await?;
    let as_of = newest_event(&mut tx).await?;
    let previous = Calibration::load(&mut tx).await?;
    let w = Windows::of(thresholds);
    let parts = std::sync::Arc::new(read_all(pool, now, &w).await?);
    let reading = started.elapsed();
    let count: usize = parts.iter().map(Vec::len).sum();
    let activity: i64 = parts.iter().flatten().map(|x| x.activity_3m).sum();
    let recency = distribution(&parts, |x| Some(recency_key(x.last_purchase)));
    let frequency = distribution(&parts, |x| Some(x.purchases_window));
    let monetary = distribution(&parts, |x| Some(x.spend_window));
    let spend = match previous {
        Some(p) if mode == Mode::Full => (p.spend, p.tiers_at),
        _ => (
            distribution(&parts, |x| (x.spend_window > 0).then_some(x.spend_window))
                .await
                .map_err(ApiError::internal)?,
            now,
        ),
    };
    let cal = Calibration {
        rfm_at: now,
        recency: recency.await.map_err(ApiError::internal)?,
        frequency: frequency.await.map_err(ApiError::internal)?,
        monetary: monetary.await.map_err(ApiError::internal)?,
        activity_mean: if count == 0 { 0.0 } else { activity as f64 / count as f64 },
        as_of,
        tiers_at: spend.1,
        spend: spend.0,
    };
    cal.save(&mut tx).await?;
    let parts = std::sync::Arc::try_unwrap(parts).map_err(|_| ApiError::internal("the inputs are still shared"))?;
    let scored = score_all(parts, std::sync::Arc::new(cal), thresholds, now).await?;
    let scoring = started.elapsed() - reading;
    let mut summary = write(&mut tx, &scored, now, as_of).await?;
    summary.customers = count;
    summary.reading = reading;
    summary.scoring = scoring;
    tx.commit().await?;
    // A recompute that wrote a good part of the scores (the first one of a
    // base, a re-calibration that moved many) leaves the planner with
    // estimates from before: the next recompute's read would hash-join
    // (spilling to disk) what it should merge-join. Autovacuum would get
    // there, but maybe only after the next run.
    if summary.written >= 10_000 && summary.written * 5 >= summary.customers {
        sqlx::query("ANALYZE customer_scores").execute(pool).await?;
    }
    tracing::info!(
        ?mode,
        customers = summary.customers,
        written = summary.written,
        tier_moves = summary.tier_moves,
        churn_changes = summary.churn_changes,
        reading_s = reading.as_secs_f64(),
        scoring_s = scoring.as_secs_f64(),
        total_s = started.elapsed().as_secs_f64(),
        "full recompute done"
    );
    Ok(summary)
}

/// The incremental recompute (SEG-7): claims up to `limit` customers the
/// read model marked dirty and scores them against the stored base, with
/// their segment memberships. Returns `None` when nothing was dirty, or
/// before the first full recompute (nothing to rank against yet: the marks
/// stay).
pub async fn incremental(
    pool: &PgPool,
    thresholds: &Thresholds,
    now: DateTime<Utc>,
    limit: i64,
) -> Result<Option<Summary>, ApiError> {
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK_SHARED).execute(&mut *tx).await?;
    // A batch touches a few thousand customers of maybe millions: index
    // lookups, whatever the planner guesses about an id list's selectivity.
    sqlx::raw_sql("SET LOCAL enable_seqscan = off; SET LOCAL max_parallel_workers_per_gather = 0")
        .execute(&mut *tx)
        .await?;
    let Some(cal) = Calibration::load(&mut tx).await? else { return Ok(None) };
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "DELETE FROM dirty_customers WHERE customer_id IN \
           (SELECT customer_id FROM dirty_customers ORDER BY since LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING customer_id",
    )
    .bind(limit)
    .fetch_all(&mut *tx)
    .await?;
    if ids.is_empty() {
        return Ok(None);
    }
    let as_of = newest_event(&mut tx).await?;
    let w = Windows::of(thresholds);
    let inputs = read(&mut tx, now, &w, Scope::Only(&ids), ids.len()).await?;
    let scored: Vec<Scored> = inputs.iter().map(|x| score(x, &cal, thresholds, now)).collect();
    let mut summary = write(&mut tx, &scored, now, as_of).await?;
    summary.customers = ids.len();
    crate::segments::refresh(&mut tx, now, Some(&ids)).await?;
    tx.commit().await?;
    Ok(Some(summary))
}

/// The first instant of the month `back` months before `now`'s month.
pub fn month_start(now: DateTime<Utc>, back: i32) -> DateTime<Utc> {
    let total = month_of(now) - back;
    Utc.with_ymd_and_hms(total.div_euclid(12), total.rem_euclid(12) as u32 + 1, 1, 0, 0, 0).single().unwrap_or(now)
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

    #[test]
    fn a_whole_base_ranks_exactly_like_sql_percent_rank() {
        // percent_rank over 1, 2, 2, 3, 5: 0, 25, 25, 75, 100.
        let d = Distribution::of(vec![5, 2, 3, 1, 2]);
        let ranks: Vec<f64> = [1, 2, 3, 5].iter().map(|x| d.percent_rank(*x)).collect();
        assert_eq!(ranks, vec![0.0, 25.0, 75.0, 100.0]);
        assert_eq!(d.share_above(5), 0.0, "the top has nobody above");
        assert_eq!(d.share_above(2), 0.4, "3 and 5 of five are above 2");
        assert_eq!(d.percent_rank(9), 100.0, "a newcomer above everyone is capped");
    }

    #[test]
    fn a_large_base_is_kept_as_quantiles_within_a_hundredth_of_a_percent() {
        let n = 1_000_000i64;
        let d = Distribution::of((0..n).rev().collect());
        assert_eq!(d.points.len(), POINTS + 1);
        for x in [0, 1, 12_345, 500_000, 999_999] {
            let exact = 100.0 * x as f64 / (n - 1) as f64;
            assert!((d.percent_rank(x) - exact).abs() < 0.011, "{x}: {} vs {exact}", d.percent_rank(x));
            let above = (n - 1 - x) as f64 / n as f64;
            assert!((d.share_above(x) - above).abs() < 0.0002, "{x}: {} vs {above}", d.share_above(x));
        }
    }

    #[test]
    fn month_arrays_are_aligned_to_the_window_whatever_their_bounds() {
        // An array starting before the window is sliced from the window's start;
        // one starting inside it lands at its offset; gaps are zero.
        assert_eq!(aligned::<i64>(Some(10), Some(vec![Some(1), None, Some(3)]), 10, 4), vec![1, 0, 3, 0]);
        assert_eq!(aligned::<i64>(Some(12), Some(vec![Some(7)]), 10, 4), vec![0, 0, 7, 0]);
        assert_eq!(aligned::<i64>(None, None, 10, 4), vec![0; 4]);
        // What the rules only add up arrives as a slice: gaps and absent arrays count zero.
        assert_eq!(total::<i32>(Some(vec![Some(2), None, Some(3)])), 5);
        assert_eq!(total::<i32>(Some(vec![])), 0);
        assert_eq!(total::<i32>(None), 0);
    }

    #[test]
    fn the_digest_changes_with_any_part() {
        let a = digest(&[1, 2], "r", b"x");
        assert_eq!(a, digest(&[1, 2], "r", b"x"));
        assert_ne!(a, digest(&[1, 3], "r", b"x"));
        assert_ne!(a, digest(&[1, 2], "s", b"x"));
        assert_ne!(a, digest(&[1, 2], "r", b"y"));
    }
}
