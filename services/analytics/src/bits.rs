//! Who bought when, and who is in a segment, as bitmaps (ANA-6, ANA-7).
//!
//! Every customer row has a dense number (`customers.idx`). A row of
//! `activity_bits` holds, for one day or one month of the reporting zone and
//! one chunk of [`CHUNK`] customer numbers, the customers who bought (not a
//! refund) then; `segment_bits` holds a segment's members the same way. "Who
//! bought between two dates" is then an OR of a few dozen rows per chunk
//! ([`Span`]: whole months plus the days at either end) instead of a scan of
//! the purchases, and a before/after test is a handful of popcounts.
//!
//! The bitmaps follow the facts exactly: a new purchase sets its bits
//! ([`mark_bought`]); a merge or its undoing moves purchases between the
//! customers involved only, so clearing those customers' bits on the days of
//! their purchases and setting them again from the purchases they have now
//! ([`resync`]) gives the state a rebuild would; erasure keeps the customer's
//! number (only the id is replaced).

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Datelike, NaiveDate, TimeZone, Utc};
use chrono_tz::Tz;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::domain::customer::{Day, Month, day_date, day_of, month_start};

/// Customer numbers per bitmap row (PostgreSQL `BIT(8192)`, 1 KiB).
pub const CHUNK: i32 = 8192;
const BYTES: usize = CHUNK as usize / 8;
/// Grain of an `activity_bits` row whose period is a day index.
const DAY: i16 = 0;
/// Grain of an `activity_bits` row whose period is a month index.
const MONTH: i16 = 1;
/// An empty inclusive range.
const NONE: (i32, i32) = (1, 0);

/// Writers of the bitmaps hold this lock shared for their transaction, the
/// build ([`backfill`]) holds it exclusive: a build never races a consumer
/// batch (which waits for it, then applies on top of the built bitmaps).
async fn writing(tx: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtext('crm.analytics.bitmaps'))").execute(&mut *tx).await?;
    Ok(())
}

/// A set of customer numbers: chunk -> its bytes, most significant bit first
/// (bit 0 of a chunk is the high bit of its first byte, as PostgreSQL stores BIT).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bitmap(BTreeMap<i32, Vec<u8>>);

impl Bitmap {
    /// The set of `numbers`.
    pub fn of(numbers: impl IntoIterator<Item = i32>) -> Bitmap {
        let mut b = Bitmap::default();
        for n in numbers.into_iter().filter(|n| *n >= 0) {
            let bytes = b.0.entry(n / CHUNK).or_insert_with(|| vec![0; BYTES]);
            let i = (n % CHUNK) as usize;
            bytes[i / 8] |= 0x80 >> (i % 8);
        }
        b
    }

    /// How many customers.
    pub fn len(&self) -> u64 {
        self.0.values().flatten().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Whether no customer is in the set.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Customers in both sets.
    pub fn and(&self, other: &Bitmap) -> Bitmap {
        Bitmap(
            self.0
                .iter()
                .filter_map(|(c, a)| {
                    let b = other.0.get(c)?;
                    Some((*c, a.iter().zip(b).map(|(x, y)| x & y).collect()))
                })
                .collect(),
        )
    }

    /// Customers in this set and not in `other`.
    pub fn and_not(&self, other: &Bitmap) -> Bitmap {
        Bitmap(
            self.0
                .iter()
                .map(|(c, a)| match other.0.get(c) {
                    Some(b) => (*c, a.iter().zip(b).map(|(x, y)| x & !y).collect()),
                    None => (*c, a.clone()),
                })
                .collect(),
        )
    }

    /// The customer numbers, ascending.
    pub fn numbers(&self) -> impl Iterator<Item = i32> + '_ {
        self.0.iter().flat_map(|(c, bytes)| {
            bytes.iter().enumerate().flat_map(move |(i, byte)| {
                (0..8).filter(move |bit| byte & (0x80 >> bit) != 0).map(move |bit| c * CHUNK + (i * 8 + bit) as i32)
            })
        })
    }

    /// A uniform sample of about `size` of the customers (all of them when
    /// there are no more than `size`): a customer is in it when a hash of its
    /// number falls below a threshold, so the same customers are drawn every
    /// time and the draw does not follow the numbering (which follows
    /// registration order).
    pub fn sample(&self, size: u64) -> Vec<i32> {
        let n = self.len();
        if n <= size {
            return self.numbers().collect();
        }
        let threshold = ((size as f64 / n as f64) * 4_294_967_296.0) as u64;
        self.numbers().filter(|x| u64::from(spread(*x)) < threshold).collect()
    }

    fn from_rows(rows: Vec<(i32, Vec<u8>)>) -> Result<Bitmap, sqlx::Error> {
        let mut out = BTreeMap::new();
        for (chunk, sent) in rows {
            // bit_send: the length in bits (4 bytes), then the bits.
            let bytes = sent.get(4..).filter(|b| b.len() == BYTES).ok_or_else(|| {
                sqlx::Error::Decode(format!("bitmap of chunk {chunk} has {} bytes", sent.len()).into())
            })?;
            out.insert(chunk, bytes.to_vec());
        }
        Ok(Bitmap(out))
    }
}

/// The SQL select-list items `chunk, mask` of customer numbers `idx` (an
/// aggregate: the one-hot bits of each group's numbers OR-ed per chunk).
fn one_hot(idx: &str) -> String {
    format!("{idx} / {CHUNK} AS chunk, bit_or(B'1'::bit({CHUNK}) >> ({idx} % {CHUNK})) AS mask")
}

/// A multiplicative hash that spreads consecutive numbers over `u32`.
fn spread(x: i32) -> u32 {
    (x as u32).wrapping_mul(0x9E37_79B1).rotate_right(7).wrapping_mul(0x85EB_CA6B)
}

fn month_of_day(d: Day) -> Month {
    let date = day_date(d);
    (date.year() - 1970) * 12 + date.month0() as i32
}

fn first_day(m: Month) -> Day {
    (month_start(m) - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default()).num_days() as Day
}

/// Days as the `activity_bits` rows that cover them: at most two runs of days
/// (the ends of partial months) and one run of whole months.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    /// Inclusive day ranges (empty when start > end).
    pub days: [(Day, Day); 2],
    /// Inclusive month range.
    pub months: (Month, Month),
}

impl Span {
    /// The days `first..=last` (nothing when `last < first`).
    pub fn days(first: Day, last: Day) -> Span {
        let mut span = Span { days: [NONE; 2], months: NONE };
        if last < first {
            return span;
        }
        let mut d = first;
        if first_day(month_of_day(d)) != d {
            let end = last.min(first_day(month_of_day(d) + 1) - 1);
            span.days[0] = (d, end);
            d = end + 1;
        }
        while d <= last && first_day(month_of_day(d) + 1) - 1 <= last {
            let m = month_of_day(d);
            span.months = if span.months == NONE { (m, m) } else { (span.months.0, m) };
            d = first_day(m + 1);
        }
        if d <= last {
            span.days[1] = (d, last);
        }
        span
    }

    /// Every day before `day`.
    pub fn before(day: Day) -> Span {
        let m = month_of_day(day);
        Span { days: [(first_day(m), day - 1), NONE], months: (i32::MIN, m - 1) }
    }
}

/// The days of a period `[start, end)` in `tz`: from the day of `start` to
/// the day of the last instant before `end`.
pub fn period_days((start, end): (DateTime<Utc>, DateTime<Utc>), tz: Tz) -> (Day, Day) {
    (day_of(start, tz), day_of(end - chrono::Duration::nanoseconds(1), tz))
}

/// The instant a day starts in `tz`.
pub fn day_start(d: Day, tz: Tz) -> DateTime<Utc> {
    let midnight = day_date(d).and_hms_opt(0, 0, 0).unwrap_or_default();
    tz.from_local_datetime(&midnight).earliest().map(|t| t.with_timezone(&Utc)).unwrap_or_else(|| midnight.and_utc())
}

/// Customers who bought on a day of `span`.
pub async fn bought(pool: &PgPool, span: Span) -> Result<Bitmap, sqlx::Error> {
    let rows: Vec<(i32, Vec<u8>)> = sqlx::query_as(
        "SELECT chunk, bit_send(bit_or(bits)) FROM activity_bits \
         WHERE (grain = 0 AND (period BETWEEN $1 AND $2 OR period BETWEEN $3 AND $4)) OR (grain = 1 AND period BETWEEN $5 AND $6) \
         GROUP BY chunk",
    )
    .bind(span.days[0].0)
    .bind(span.days[0].1)
    .bind(span.days[1].0)
    .bind(span.days[1].1)
    .bind(span.months.0)
    .bind(span.months.1)
    .fetch_all(pool)
    .await?;
    Bitmap::from_rows(rows)
}

/// A segment's members.
pub async fn segment(pool: &PgPool, segment: Uuid) -> Result<Bitmap, sqlx::Error> {
    let rows: Vec<(i32, Vec<u8>)> =
        sqlx::query_as("SELECT chunk, bit_send(bits) FROM segment_bits WHERE segment_id = $1")
            .bind(segment)
            .fetch_all(pool)
            .await?;
    Bitmap::from_rows(rows)
}

/// Sets the bits of purchases (customer, time), refunds left out by the caller.
pub async fn mark_bought(tx: &mut PgConnection, bought: &[(Uuid, DateTime<Utc>)], tz: Tz) -> Result<(), sqlx::Error> {
    if bought.is_empty() {
        return Ok(());
    }
    writing(tx).await?;
    set_bought(tx, bought, tz).await
}

/// [`mark_bought`] for a caller that holds the writers' lock already.
async fn set_bought(tx: &mut PgConnection, bought: &[(Uuid, DateTime<Utc>)], tz: Tz) -> Result<(), sqlx::Error> {
    let rows: BTreeSet<(Uuid, Day)> = bought.iter().map(|(c, at)| (*c, day_of(*at, tz))).collect();
    if rows.is_empty() {
        return Ok(());
    }
    let (customers, days): (Vec<Uuid>, Vec<Day>) = rows.into_iter().unzip();
    let months: Vec<Month> = days.iter().map(|d| month_of_day(*d)).collect();
    // Rows in key order, so that two consumers lock them in the same order.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO activity_bits (grain, period, chunk, bits) \
         SELECT g.grain, g.period, {} \
         FROM UNNEST($1::uuid[], $2::int[], $3::int[]) AS t(customer_id, day, month) \
         JOIN customers c ON c.customer_id = t.customer_id \
         CROSS JOIN LATERAL (VALUES (0::smallint, t.day), (1::smallint, t.month)) AS g(grain, period) \
         GROUP BY 1, 2, 3 ORDER BY 1, 2, 3 \
         ON CONFLICT (grain, period, chunk) DO UPDATE SET bits = activity_bits.bits | EXCLUDED.bits",
        one_hot("c.idx")
    )))
    .bind(&customers)
    .bind(&days)
    .bind(&months)
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Makes the bits of `customers` match `history`, their purchases (not
/// refunds) after a merge or an unmerge moved purchases among them: their
/// bits are cleared on every day and month of those purchases (the only rows
/// where any of them can have a bit, since the purchases only moved among
/// them), then set again.
pub async fn resync(
    tx: &mut PgConnection,
    customers: &[Uuid],
    history: &[(Uuid, DateTime<Utc>)],
    tz: Tz,
) -> Result<(), sqlx::Error> {
    writing(tx).await?;
    let days: BTreeSet<Day> = history.iter().map(|(_, at)| day_of(*at, tz)).collect();
    let mut grains = Vec::new();
    let mut periods = Vec::new();
    for d in &days {
        grains.push(DAY);
        periods.push(*d);
    }
    for m in days.iter().map(|d| month_of_day(*d)).collect::<BTreeSet<Month>>() {
        grains.push(MONTH);
        periods.push(m);
    }
    if !grains.is_empty() {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE activity_bits a SET bits = a.bits & ~m.mask \
             FROM (SELECT {} \
                   FROM customers WHERE customer_id = ANY($1) GROUP BY 1) m, \
                  UNNEST($2::smallint[], $3::int[]) AS r(grain, period) \
             WHERE a.grain = r.grain AND a.period = r.period AND a.chunk = m.chunk",
            one_hot("idx")
        )))
        .bind(customers)
        .bind(&grains)
        .bind(&periods)
        .execute(&mut *tx)
        .await?;
    }
    set_bought(tx, history, tz).await
}

/// Segment membership changes: (segment, customer) joined or left.
pub async fn memberships(
    tx: &mut PgConnection,
    joined: &[(Uuid, Uuid)],
    left: &[(Uuid, Uuid)],
) -> Result<(), sqlx::Error> {
    let ids: BTreeSet<Uuid> = joined.iter().chain(left).map(|(_, c)| *c).collect();
    if ids.is_empty() {
        return Ok(());
    }
    writing(tx).await?;
    // A member whose own events have not arrived yet still needs a number.
    sqlx::query(
        "INSERT INTO customers (customer_id) SELECT id FROM UNNEST($1::uuid[]) AS t(id) \
         WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = t.id) ON CONFLICT DO NOTHING",
    )
    .bind(ids.into_iter().collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    if !joined.is_empty() {
        sqlx::query(
            sqlx::AssertSqlSafe(format!(
"INSERT INTO segment_bits (segment_id, chunk, bits) \
             SELECT t.segment_id, {} \
             FROM UNNEST($1::uuid[], $2::uuid[]) AS t(segment_id, customer_id) JOIN customers c ON c.customer_id = t.customer_id \
             GROUP BY 1, 2 ORDER BY 1, 2 \
             ON CONFLICT (segment_id, chunk) DO UPDATE SET bits = segment_bits.bits | EXCLUDED.bits",
        one_hot("c.idx")
)),
        )
        .bind(joined.iter().map(|(s, _)| *s).collect::<Vec<_>>())
        .bind(joined.iter().map(|(_, c)| *c).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    if !left.is_empty() {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE segment_bits b SET bits = b.bits & ~m.mask \
             FROM (SELECT t.segment_id, {} \
                   FROM UNNEST($1::uuid[], $2::uuid[]) AS t(segment_id, customer_id) \
                   JOIN customers c ON c.customer_id = t.customer_id GROUP BY 1, 2) m \
             WHERE b.segment_id = m.segment_id AND b.chunk = m.chunk",
            one_hot("c.idx")
        )))
        .bind(left.iter().map(|(s, _)| *s).collect::<Vec<_>>())
        .bind(left.iter().map(|(_, c)| *c).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Whether the bitmaps are complete for `tz` (see [`backfill`]); until then
/// a before/after test would miss customers, and is refused.
pub async fn built(pool: &PgPool, tz: Tz) -> Result<bool, sqlx::Error> {
    let zone: Option<String> = sqlx::query_scalar("SELECT zone FROM bitmaps_built").fetch_optional(pool).await?;
    Ok(matches!(zone.as_deref(), Some(z) if z.is_empty() || z == tz.name()))
}

/// Builds the bitmaps from the stored facts, once per reporting zone: on the
/// first start after the migration that added them to a database that had
/// purchases already, and again if `ANALYTICS_TIMEZONE` changes (days and
/// months move with it). Replicas starting together build them once (an
/// advisory lock, which also holds consumer batches back until the build has
/// committed).
/// Returns whether it built.
pub async fn backfill(pool: &PgPool, tz: Tz) -> Result<bool, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext('crm.analytics.bitmaps'))").execute(&mut *tx).await?;
    let zone: Option<String> = sqlx::query_scalar("SELECT zone FROM bitmaps_built").fetch_optional(&mut *tx).await?;
    if zone.as_deref() == Some(tz.name()) {
        return Ok(false);
    }
    if zone.as_deref() == Some("") {
        // Built from nothing, then kept by the consumer in this zone.
        sqlx::query("UPDATE bitmaps_built SET zone = $1").bind(tz.name()).execute(&mut *tx).await?;
        tx.commit().await?;
        return Ok(false);
    }
    sqlx::query("DELETE FROM activity_bits").execute(&mut *tx).await?;
    sqlx::query("DELETE FROM segment_bits").execute(&mut *tx).await?;
    // First, so that every purchase it marks is one the build below reads
    // (a later statement sees at least as much); any stored after it keeps
    // its mark for the sweep.
    sqlx::query("UPDATE purchases SET in_bits = true WHERE NOT in_bits").execute(&mut *tx).await?;
    sqlx::query(
        sqlx::AssertSqlSafe(format!(
"INSERT INTO activity_bits (grain, period, chunk, bits) \
         SELECT g.grain, g.period, {} \
         FROM (SELECT DISTINCT c.idx, (p.occurred_at AT TIME ZONE $1)::date AS day \
               FROM purchases p JOIN customers c ON c.customer_id = p.customer_id WHERE NOT p.refund) x \
         CROSS JOIN LATERAL (VALUES (0::smallint, x.day - DATE '1970-01-01'), \
             (1::smallint, (extract(year FROM x.day)::int - 1970) * 12 + extract(month FROM x.day)::int - 1)) AS g(grain, period) \
         GROUP BY 1, 2, 3 \
         ON CONFLICT (grain, period, chunk) DO UPDATE SET bits = activity_bits.bits | EXCLUDED.bits",
        one_hot("x.idx")
)),
    )
    .bind(tz.name())
    .execute(&mut *tx)
    .await?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "INSERT INTO segment_bits (segment_id, chunk, bits) \
         SELECT m.segment_id, {} \
         FROM segment_members m JOIN customers c ON c.customer_id = m.customer_id GROUP BY 1, 2 \
         ON CONFLICT (segment_id, chunk) DO UPDATE SET bits = segment_bits.bits | EXCLUDED.bits",
        one_hot("c.idx")
    )))
    .execute(&mut *tx)
    .await?;
    sqlx::query("INSERT INTO bitmaps_built (zone) VALUES ($1) ON CONFLICT (one) DO UPDATE SET zone = EXCLUDED.zone")
        .bind(tz.name())
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Sets the bits of purchases stored without them (by a replica of the
/// previous release during a rolling upgrade), a batch at a time; replicas
/// share the work (SKIP LOCKED). Returns how many purchases it marked.
pub async fn sweep(pool: &PgPool, tz: Tz) -> Result<u64, sqlx::Error> {
    let mut total = 0;
    loop {
        let mut tx = pool.begin().await?;
        let rows: Vec<(Uuid, DateTime<Utc>, bool)> = sqlx::query_as(
            "WITH picked AS (SELECT transaction_id FROM purchases WHERE NOT in_bits LIMIT 5000 FOR UPDATE SKIP LOCKED) \
             UPDATE purchases p SET in_bits = true FROM picked WHERE p.transaction_id = picked.transaction_id \
             RETURNING p.customer_id, p.occurred_at, p.refund",
        )
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(total);
        }
        let bought: Vec<(Uuid, DateTime<Utc>)> = rows.iter().filter(|r| !r.2).map(|r| (r.0, r.1)).collect();
        mark_bought(&mut tx, &bought, tz).await?;
        tx.commit().await?;
        total += rows.len() as u64;
    }
}

/// The upkeep of a replica: the build if the bitmaps are not built for `tz`
/// (retried until it succeeds), then the sweep every `interval`, until shutdown.
pub async fn maintain(
    pool: PgPool,
    tz: Tz,
    interval: std::time::Duration,
    shutdown: crm_kit::lifecycle::ShutdownSignal,
) {
    loop {
        match backfill(&pool, tz).await {
            Ok(true) => {
                tracing::info!(zone = tz.name(), "activity bitmaps built from the stored purchases");
                break;
            }
            Ok(false) => break,
            Err(e) => tracing::warn!(error = %e, "building the activity bitmaps failed; retrying"),
        }
        if !shutdown.sleep(interval).await {
            return;
        }
    }
    loop {
        match sweep(&pool, tz).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(purchases = n, "activity bits set for purchases stored without them"),
            Err(e) => tracing::warn!(error = %e, "activity bitmap sweep failed; retrying"),
        }
        if !shutdown.sleep(interval).await {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn day(y: i32, m: u32, d: u32) -> Day {
        (NaiveDate::from_ymd_opt(y, m, d).unwrap() - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()).num_days() as Day
    }

    fn month_index(y: i32, m: u32) -> Month {
        (y - 1970) * 12 + m as i32 - 1
    }

    #[test]
    fn a_span_is_whole_months_with_the_days_at_either_end() {
        // 2026-08-02 .. 2026-10-31: the days of August after the first, then September and October whole.
        let s = Span::days(day(2026, 8, 2), day(2026, 10, 31));
        assert_eq!(s.days, [(day(2026, 8, 2), day(2026, 8, 31)), NONE]);
        assert_eq!(s.months, (month_index(2026, 9), month_index(2026, 10)));
        // Inside one month: days only.
        let s = Span::days(day(2026, 3, 5), day(2026, 3, 9));
        assert_eq!((s.days, s.months), ([(day(2026, 3, 5), day(2026, 3, 9)), NONE], NONE));
        // A whole month exactly.
        let s = Span::days(day(2026, 2, 1), day(2026, 2, 28));
        assert_eq!((s.days, s.months), ([NONE, NONE], (month_index(2026, 2), month_index(2026, 2))));
        // Partial, whole, partial; across a year end.
        let s = Span::days(day(2025, 12, 30), day(2026, 2, 3));
        assert_eq!(s.days, [(day(2025, 12, 30), day(2025, 12, 31)), (day(2026, 2, 1), day(2026, 2, 3))]);
        assert_eq!(s.months, (month_index(2026, 1), month_index(2026, 1)));
        // Empty.
        assert_eq!(Span::days(day(2026, 3, 2), day(2026, 3, 1)), Span { days: [NONE; 2], months: NONE });
    }

    #[test]
    fn every_day_of_a_span_is_covered_once() {
        let start = day(2024, 1, 1);
        for (a, b) in [(0, 0), (0, 30), (5, 400), (31, 59), (59, 60), (100, 101), (364, 365)] {
            let s = Span::days(start + a, start + b);
            for d in start - 40..start + 440 {
                let by_days = s.days.iter().filter(|(lo, hi)| (*lo..=*hi).contains(&d)).count();
                let by_month = usize::from((s.months.0..=s.months.1).contains(&month_of_day(d)));
                let inside = (start + a..=start + b).contains(&d);
                assert_eq!(by_days + by_month, usize::from(inside), "day {d} of {a}..{b}: {s:?}");
            }
        }
    }

    #[test]
    fn before_is_every_earlier_day() {
        let s = Span::before(day(2026, 8, 2));
        assert_eq!(s.days, [(day(2026, 8, 1), day(2026, 8, 1)), NONE]);
        assert_eq!(s.months, (i32::MIN, month_index(2026, 7)));
        let s = Span::before(day(2026, 8, 1));
        assert!(s.days[0].0 > s.days[0].1, "{s:?}");
    }

    #[test]
    fn set_operations_and_counts() {
        let a = Bitmap::of([0, 1, 7, 8, 8191, 8192, 10_000]);
        let b = Bitmap::of([1, 8, 8192, 9_999]);
        assert_eq!(a.len(), 7);
        assert_eq!(a.and(&b).numbers().collect::<Vec<_>>(), [1, 8, 8192]);
        assert_eq!(a.and_not(&b).numbers().collect::<Vec<_>>(), [0, 7, 8191, 10_000]);
        assert_eq!(Bitmap::default().len(), 0);
        assert!(a.and(&Bitmap::default()).is_empty());
    }

    #[test]
    fn a_sample_is_about_the_size_asked_and_spread_over_the_numbers() {
        let all = Bitmap::of(0..200_000);
        assert_eq!(Bitmap::of(0..500).sample(1_000).len(), 500);
        let s = all.sample(10_000);
        assert!((9_500..10_500).contains(&s.len()), "{}", s.len());
        // Early and late customers (registration order) are drawn alike.
        let early = s.iter().filter(|x| **x < 100_000).count();
        assert!((4_700..5_300).contains(&early), "{early}");
        assert_eq!(s, all.sample(10_000), "the same draw every time");
    }

    #[test]
    fn a_period_is_the_days_it_touches_in_the_zone() {
        let tz: Tz = "Asia/Shanghai".parse().unwrap();
        let midnight = |y, m, d| day_start(day(y, m, d), tz);
        // Local midnight to local midnight: the end day is not included.
        assert_eq!(period_days((midnight(2026, 3, 1), midnight(2026, 4, 1)), tz), (day(2026, 3, 1), day(2026, 3, 31)));
        assert_eq!(midnight(2026, 3, 1).to_rfc3339(), "2026-02-28T16:00:00+00:00");
        // A period that ends during a day includes that day.
        let noon = midnight(2026, 4, 1) + chrono::Duration::hours(12);
        assert_eq!(period_days((midnight(2026, 3, 1), noon), tz).1, day(2026, 4, 1));
    }
}
