//! A customer's facts (ANA-2, ANA-4) and what they contribute to the
//! rollups, as pure functions.
//!
//! Rollups are sums of per-customer contributions. When a customer's facts
//! change (a purchase, a tier move, a merge), the rollups change by
//! `contributions(new) - contributions(old)` ([`delta`]): so a purchase that
//! arrives late, out of order or twice, a merge that moves history, or a tier
//! move all keep every rollup exactly equal to a recount from the facts.

use std::collections::BTreeMap;

use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use chrono_tz::Tz;

/// A month as an index (months since January 1970) in the reporting zone.
pub type Month = i32;
/// A day as an index (days since 1 January 1970) in the reporting zone.
pub type Day = i32;

/// The month index of an instant in `tz`.
pub fn month_of(t: DateTime<Utc>, tz: Tz) -> Month {
    let d = t.with_timezone(&tz).date_naive();
    (d.year() - 1970) * 12 + d.month0() as i32
}

/// The day index of an instant in `tz`.
pub fn day_of(t: DateTime<Utc>, tz: Tz) -> Day {
    let d = t.with_timezone(&tz).date_naive();
    (d - NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default()).num_days() as i32
}

/// The first day of a month index.
pub fn month_start(m: Month) -> NaiveDate {
    NaiveDate::from_ymd_opt(1970 + m.div_euclid(12), m.rem_euclid(12) as u32 + 1, 1).unwrap_or_default()
}

/// The date of a day index.
pub fn day_date(d: Day) -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default() + Duration::days(i64::from(d))
}

/// One purchase or refund.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Purchase {
    /// When.
    pub at: DateTime<Utc>,
    /// Minor units; negative for a refund.
    pub amount: i64,
    /// A refund changes revenue only, not activity.
    pub refund: bool,
}

/// What analytics knows about a customer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// First purchase.
    pub first_purchase: Option<DateTime<Utc>>,
    /// Second purchase (the earliest after the first; may be the same instant).
    pub second_purchase: Option<DateTime<Utc>>,
    /// Last purchase.
    pub last_purchase: Option<DateTime<Utc>>,
    /// Purchases.
    pub orders: i64,
    /// Net revenue (purchases minus refunds), minor units.
    pub revenue: i64,
    /// By month: purchases and net revenue (refunds included). A month is
    /// active when it has a purchase.
    pub months: BTreeMap<Month, (i64, i64)>,
    /// Tier (contract enum number; 0 unknown).
    pub tier: i16,
    /// Value-potential grid cell (contract enum number; 0 unknown).
    pub grid: i16,
}

impl Facts {
    /// The facts after `purchases` more (each applied once: the caller
    /// deduplicates by transaction id).
    pub fn with_purchases(&self, purchases: &[Purchase], tz: Tz) -> Facts {
        let mut f = self.clone();
        for p in purchases {
            f.revenue += p.amount;
            let month = f.months.entry(month_of(p.at, tz)).or_insert((0, 0));
            month.1 += p.amount;
            if p.refund {
                // A refund changes revenue, not activity.
                continue;
            }
            month.0 += 1;
            f.orders += 1;
            // The two earliest purchases.
            match (f.first_purchase, f.second_purchase) {
                (None, _) => f.first_purchase = Some(p.at),
                (Some(first), second) if p.at < first => {
                    f.second_purchase = Some(first.min(second.unwrap_or(first)));
                    f.first_purchase = Some(p.at);
                }
                (Some(_), None) => f.second_purchase = Some(p.at),
                (Some(_), Some(second)) if p.at < second => f.second_purchase = Some(p.at),
                _ => {}
            }
            f.last_purchase = Some(f.last_purchase.map_or(p.at, |l| l.max(p.at)));
        }
        f
    }

    /// The facts of a purchase history from scratch (after a merge or unmerge).
    pub fn from_history(purchases: &[Purchase], tier: i16, grid: i16, tz: Tz) -> Facts {
        Facts { tier, grid, ..Facts::default() }.with_purchases(purchases, tz)
    }
}

/// A rollup cell: which rollup and its keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cell {
    /// Rollup name.
    pub rollup: &'static str,
    /// First key (a month or day index, or 0).
    pub k1: i32,
    /// Second key (a month offset, or 0).
    pub k2: i32,
    /// Tag (a tier name, a grid cell name, or "").
    pub tag: &'static str,
}

/// What a cell gets: a count and an amount (minor units).
pub type Amounts = (i64, i64);

/// Tier names used as tags (contract enum order).
pub const TIERS: [&str; 6] = ["", "DIAMOND", "GOLD", "SILVER", "POTENTIAL", "DORMANT"];
/// Grid cell names used as tags (contract enum order).
pub const GRID_CELLS: [&str; 10] = [
    "",
    "CORE",
    "MATURE_STABLE",
    "MAINTAIN",
    "GROWTH",
    "REGULAR",
    "OBSERVE",
    "OPPORTUNITY",
    "LOW_VALUE_STABLE",
    "CHURN_WARNING",
];

fn tag(names: &'static [&'static str], code: i16) -> &'static str {
    names.get(code as usize).copied().unwrap_or("")
}

/// Days of the D1/D7/D30 retention windows (ANA-2): a customer is retained at
/// Dn if they bought again within n days of their first purchase.
pub const RETENTION_DAYS: [(i64, &str); 3] = [(1, "d1"), (7, "d7"), (30, "d30")];

/// Everything a customer contributes to the rollups:
/// - `cohort` (cohort month, offset): active in the month `offset` after the first; amount = its revenue;
/// - `first` (first month, tier): cohort size by tier (the base of repurchase rates);
/// - `active` / `retained` / `repeat` (month, tier): active in the month; and in the month before; and not for the first time;
/// - `first_day` and `d1`/`d7`/`d30` (first purchase day): D-n retention;
/// - `tier` and `grid` (tag): distributions; `buyers` (amount: revenue) and `orders`: LTV.
pub fn contributions(f: &Facts, tz: Tz) -> BTreeMap<Cell, Amounts> {
    let mut out: BTreeMap<Cell, Amounts> = BTreeMap::new();
    let mut add = |rollup: &'static str, k1: i32, k2: i32, tag: &'static str, n: i64, amount: i64| {
        let e = out.entry(Cell { rollup, k1, k2, tag }).or_insert((0, 0));
        e.0 += n;
        e.1 += amount;
    };
    let tier = tag(&TIERS, f.tier);
    if f.tier != 0 {
        add("tier", 0, 0, tier, 1, 0);
    }
    if f.grid != 0 {
        add("grid", 0, 0, tag(&GRID_CELLS, f.grid), 1, 0);
    }
    let Some(first) = f.first_purchase else {
        return out;
    };
    add("buyers", 0, 0, "", 1, f.revenue);
    add("orders", 0, 0, "", f.orders, 0);
    let cohort = month_of(first, tz);
    add("first", cohort, 0, tier, 1, 0);
    let active = |m: &Month| f.months.get(m).is_some_and(|(orders, _)| *orders > 0);
    for (m, (orders, revenue)) in &f.months {
        if *orders == 0 {
            continue;
        }
        add("cohort", cohort, m - cohort, "", 1, *revenue);
        add("active", *m, 0, tier, 1, *revenue);
        if active(&(m - 1)) {
            add("retained", *m, 0, tier, 1, 0);
        }
        if *m > cohort {
            add("repeat", *m, 0, tier, 1, 0);
        }
    }
    let day = day_of(first, tz);
    add("first_day", day, 0, "", 1, 0);
    if let Some(second) = f.second_purchase {
        for (days, name) in RETENTION_DAYS {
            if second - first <= Duration::days(days) {
                add(name, day, 0, "", 1, 0);
            }
        }
    }
    out
}

/// How the rollups change when a customer's facts go from `old` to `new`
/// (cells that do not change are left out).
pub fn delta(old: &Facts, new: &Facts, tz: Tz) -> BTreeMap<Cell, Amounts> {
    let mut d = contributions(new, tz);
    for (cell, (n, amount)) in contributions(old, tz) {
        let e = d.entry(cell).or_insert((0, 0));
        e.0 -= n;
        e.1 -= amount;
    }
    d.retain(|_, v| *v != (0, 0));
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    const TZ: Tz = chrono_tz::Asia::Shanghai;

    fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
        TZ.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap().with_timezone(&Utc)
    }

    fn buy(y: i32, m: u32, d: u32, amount: i64) -> Purchase {
        Purchase { at: at(y, m, d), amount, refund: false }
    }

    fn sum(cells: &BTreeMap<Cell, Amounts>, rollup: &str) -> (i64, i64) {
        cells.iter().filter(|(c, _)| c.rollup == rollup).fold((0, 0), |a, (_, v)| (a.0 + v.0, a.1 + v.1))
    }

    #[test]
    fn months_and_days_follow_the_reporting_zone() {
        // 2026-01-31 20:00 UTC is already 1 February in Shanghai.
        let t = Utc.with_ymd_and_hms(2026, 1, 31, 20, 0, 0).unwrap();
        assert_eq!(month_start(month_of(t, TZ)), NaiveDate::from_ymd_opt(2026, 2, 1).unwrap());
        assert_eq!(day_date(day_of(t, TZ)), NaiveDate::from_ymd_opt(2026, 2, 1).unwrap());
        assert_eq!(month_start(-1), NaiveDate::from_ymd_opt(1969, 12, 1).unwrap());
    }

    #[test]
    fn purchases_fold_in_any_order_to_the_same_facts() {
        let history = [
            buy(2026, 1, 10, 100),
            buy(2026, 1, 12, 50),
            buy(2026, 3, 1, 70),
            Purchase { at: at(2026, 3, 5), amount: -20, refund: true },
        ];
        let forward = Facts::default().with_purchases(&history, TZ);
        let mut reversed = history;
        reversed.reverse();
        // The refund arrives first here, before the purchase of its month.
        let backward = Facts::default().with_purchases(&reversed[..1], TZ).with_purchases(&reversed[1..], TZ);
        assert_eq!(forward.first_purchase, Some(at(2026, 1, 10)));
        assert_eq!(forward.second_purchase, Some(at(2026, 1, 12)));
        assert_eq!(forward.last_purchase, Some(at(2026, 3, 1)));
        assert_eq!((forward.orders, forward.revenue), (3, 200));
        assert_eq!(forward, backward);
        assert_eq!(forward.months.values().copied().collect::<Vec<_>>(), [(2, 150), (1, 50)]);
    }

    #[test]
    fn contributions_of_a_customer_by_hand() {
        // Gold customer: January 10 and 12, then March.
        let f = Facts { tier: 2, ..Facts::default() }
            .with_purchases(&[buy(2026, 1, 10, 100), buy(2026, 1, 12, 50), buy(2026, 3, 1, 70)], TZ);
        let c = contributions(&f, TZ);
        let jan = month_of(at(2026, 1, 1), TZ);
        assert_eq!(c[&Cell { rollup: "cohort", k1: jan, k2: 0, tag: "" }], (1, 150));
        assert_eq!(c[&Cell { rollup: "cohort", k1: jan, k2: 2, tag: "" }], (1, 70));
        assert!(!c.contains_key(&Cell { rollup: "cohort", k1: jan, k2: 1, tag: "" }), "inactive in February");
        assert_eq!(sum(&c, "active"), (2, 220));
        assert_eq!(sum(&c, "retained"), (0, 0), "March follows an inactive February");
        assert_eq!(sum(&c, "repeat"), (1, 0));
        assert_eq!(c[&Cell { rollup: "first", k1: jan, k2: 0, tag: "GOLD" }], (1, 0));
        let day = day_of(at(2026, 1, 10), TZ);
        assert_eq!(c.get(&Cell { rollup: "d1", k1: day, k2: 0, tag: "" }), None, "bought again after 2 days");
        assert_eq!(c[&Cell { rollup: "d7", k1: day, k2: 0, tag: "" }], (1, 0));
        assert_eq!(c[&Cell { rollup: "d30", k1: day, k2: 0, tag: "" }], (1, 0));
        assert_eq!(c[&Cell { rollup: "buyers", k1: 0, k2: 0, tag: "" }], (1, 220));
        assert_eq!(c[&Cell { rollup: "tier", k1: 0, k2: 0, tag: "GOLD" }], (1, 0));
    }

    #[test]
    fn a_late_earlier_purchase_moves_the_customer_to_another_cohort() {
        let tz = TZ;
        let old = Facts::default().with_purchases(&[buy(2026, 3, 1, 70)], tz);
        let new = old.with_purchases(&[buy(2026, 1, 10, 100)], tz);
        let d = delta(&old, &new, tz);
        let (jan, mar) = (month_of(at(2026, 1, 1), tz), month_of(at(2026, 3, 1), tz));
        assert_eq!(d[&Cell { rollup: "cohort", k1: mar, k2: 0, tag: "" }], (-1, -70), "out of the March cohort");
        assert_eq!(d[&Cell { rollup: "cohort", k1: jan, k2: 0, tag: "" }], (1, 100));
        assert_eq!(d[&Cell { rollup: "cohort", k1: jan, k2: 2, tag: "" }], (1, 70));
        assert_eq!(d[&Cell { rollup: "buyers", k1: 0, k2: 0, tag: "" }], (0, 100), "still one buyer, more revenue");
    }

    #[test]
    fn a_tier_move_re_tags_the_customer_and_nothing_else() {
        let old = Facts { tier: 3, ..Facts::default() }.with_purchases(&[buy(2026, 1, 10, 100)], TZ);
        let new = Facts { tier: 2, ..old.clone() };
        let d = delta(&old, &new, TZ);
        assert_eq!(d[&Cell { rollup: "tier", k1: 0, k2: 0, tag: "SILVER" }], (-1, 0));
        assert_eq!(d[&Cell { rollup: "tier", k1: 0, k2: 0, tag: "GOLD" }], (1, 0));
        assert!(d.keys().all(|c| c.tag == "SILVER" || c.tag == "GOLD"), "{d:?}");
        assert!(delta(&old, &old, TZ).is_empty());
    }

    #[test]
    fn delta_sums_to_a_recount() {
        // Applying deltas step by step equals the contributions of the final facts.
        let steps = [buy(2026, 5, 1, 10), buy(2026, 2, 1, 20), buy(2026, 2, 20, 5), buy(2026, 6, 30, 8)];
        let mut facts = Facts::default();
        let mut total: BTreeMap<Cell, Amounts> = BTreeMap::new();
        for p in steps {
            let next = facts.with_purchases(&[p], TZ);
            for (c, (n, a)) in delta(&facts, &next, TZ) {
                let e = total.entry(c).or_insert((0, 0));
                e.0 += n;
                e.1 += a;
            }
            facts = next;
        }
        total.retain(|_, v| *v != (0, 0));
        assert_eq!(total, contributions(&facts, TZ));
    }
}
