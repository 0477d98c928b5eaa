//! Synthetic data for the demo, tests and benchmarks (SPEC DX-4).
//!
//! Deterministic for a given seed. The population is shaped like a real
//! retail base:
//! - spend follows a Pareto law (about 20 % of buyers bring about 70-80 % of revenue);
//! - purchases are seasonal (Chinese New Year, 618, Singles' Day 11.11 and December peaks);
//! - archetypes: loyal, regular, occasional, new, churning (bought, then stopped
//!   at least 120 days before the horizon) and silent (registered, never bought);
//! - about 3 % of purchases are partly refunded;
//! - interactions follow activity: logins, visits, inquiries, responses, complaints.
//!
//! Customers stream out one at a time, so a million of them need no memory.

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};
use crm_proto::common::v1::{Channel, Date, Money};
use crm_proto::profiles::v1::{
    Customer, CustomerKind, Direction, ExternalId, Gender, Interaction, InteractionKind, Transaction, TransactionKind,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The source system name used for external ids of generated rows.
pub const SOURCE: &str = "datagen";

/// Behavioural archetype of a generated customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Archetype {
    /// Buys often, all year.
    Loyal,
    /// Buys every month or two.
    Regular,
    /// Buys a few times a year, mostly at peaks.
    Occasional,
    /// Registered in the last 60 days; first purchases.
    New,
    /// Used to buy; stopped at least 120 days before the horizon.
    Churning,
    /// Registered, never bought.
    Silent,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Config {
    /// Random seed; same seed, same data.
    pub seed: u64,
    /// Number of customers.
    pub customers: usize,
    /// End of the simulated history (exclusive).
    pub horizon: DateTime<Utc>,
    /// Length of the history in days.
    pub history_days: i64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            seed: 42,
            customers: 1000,
            horizon: Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).single().unwrap_or_else(Utc::now),
            history_days: 730,
        }
    }
}

/// One customer with their history.
#[derive(Debug, Clone)]
pub struct Generated {
    /// Zero-based index.
    pub index: usize,
    /// Archetype.
    pub archetype: Archetype,
    /// The record (no `customer_id`: profiles assigns it; the external id
    /// `datagen:<index>` identifies it).
    pub customer: Customer,
    /// Purchases and refunds, oldest first, `customer_id` empty (use the external id).
    pub transactions: Vec<Transaction>,
    /// Interactions, oldest first, `customer_id` empty.
    pub interactions: Vec<Interaction>,
}

impl Generated {
    /// The external id linking this customer's rows.
    pub fn external_id(&self) -> ExternalId {
        ExternalId { source: SOURCE.into(), id: self.index.to_string() }
    }

    /// Marketing consent as customers give it (PRF-7): SMS granted by about
    /// 80 %, explicitly refused by 5 %; WeChat granted by 60 %, e-mail by 50 %.
    /// Derived from the index alone, so adding consent changed no other data.
    pub fn consents(&self) -> Vec<crm_proto::profiles::v1::ConsentGrant> {
        use crm_proto::common::v1::Purpose;
        let mut x = (self.index as u64).wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut roll = || {
            // splitmix64
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) % 100
        };
        let grant = |channel: Channel, granted: bool| crm_proto::profiles::v1::ConsentGrant {
            channel: channel as i32,
            purpose: Purpose::Marketing as i32,
            granted,
            source: "datagen".into(),
            ..Default::default()
        };
        let mut out = Vec::new();
        match roll() {
            0..=79 => out.push(grant(Channel::Sms, true)),
            80..=84 => out.push(grant(Channel::Sms, false)),
            _ => {}
        }
        if roll() < 60 {
            out.push(grant(Channel::Wechat, true));
        }
        if roll() < 50 {
            out.push(grant(Channel::Email, true));
        }
        out
    }
}

/// Streams generated customers.
pub struct Generator {
    config: Config,
    rng: StdRng,
    next: usize,
    start: DateTime<Utc>,
}

impl Generator {
    /// A generator for `config`.
    pub fn new(config: Config) -> Self {
        let start = config.horizon - Duration::days(config.history_days);
        Self { rng: StdRng::seed_from_u64(config.seed), next: 0, start, config }
    }
}

impl Iterator for Generator {
    type Item = Generated;

    fn next(&mut self) -> Option<Generated> {
        if self.next >= self.config.customers {
            return None;
        }
        let index = self.next;
        self.next += 1;
        Some(generate_one(&mut self.rng, index, self.start, &self.config))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.config.customers - self.next;
        (left, Some(left))
    }
}

const SURNAMES: &[&str] =
    &["王", "李", "张", "刘", "陈", "杨", "黄", "赵", "吴", "周", "徐", "孙", "马", "朱", "胡", "郭"];
const GIVEN: &[&str] =
    &["伟", "芳", "娜", "敏", "静", "丽", "强", "磊", "军", "洋", "勇", "艳", "杰", "娟", "涛", "明", "超", "霞"];
const LATIN_FIRST: &[&str] =
    &["Anna", "Ben", "Chloe", "David", "Emma", "Felix", "Grace", "Henry", "Iris", "Jack", "Lily", "Max"];
const LATIN_LAST: &[&str] = &["Li", "Wang", "Smith", "Chen", "Brown", "Zhang", "Miller", "Liu", "Garcia", "Wu"];
const REGIONS: &[(&str, u32)] = &[
    ("CN-SH", 14),
    ("CN-BJ", 12),
    ("CN-GD", 18),
    ("CN-ZJ", 11),
    ("CN-JS", 10),
    ("CN-SC", 8),
    ("CN-HB", 6),
    ("CN-FJ", 6),
    ("CN-SD", 7),
    ("CN-HK", 3),
    ("SG", 3),
    ("US-CA", 2),
];
const CATEGORIES: &[(&str, i64)] = &[
    ("skincare", 26_000),
    ("cosmetics", 18_000),
    ("apparel", 32_000),
    ("shoes", 45_000),
    ("electronics", 120_000),
    ("home", 22_000),
    ("food", 8_000),
    ("baby", 15_000),
];

/// Relative purchase intensity by month (1 = January): Chinese New Year,
/// 618 mid-year sale, Singles' Day and December.
pub const SEASONALITY: [f64; 12] = [1.25, 1.15, 0.85, 0.85, 0.95, 1.35, 0.85, 0.85, 0.95, 1.0, 1.8, 1.5];

fn pick<'a, T>(rng: &mut StdRng, items: &'a [T]) -> &'a T {
    &items[rng.random_range(0..items.len())]
}

fn weighted<'a>(rng: &mut StdRng, items: &'a [(&'a str, u32)]) -> &'a str {
    let total: u32 = items.iter().map(|i| i.1).sum();
    let mut x = rng.random_range(0..total);
    for (name, w) in items {
        if x < *w {
            return name;
        }
        x -= w;
    }
    items[0].0
}

/// Pareto-distributed value multiplier (x_m = 1, alpha = 1.2, capped at 400).
fn pareto(rng: &mut StdRng) -> f64 {
    let u: f64 = rng.random_range(f64::EPSILON..1.0);
    (1.0 / u.powf(1.0 / 1.2)).min(400.0)
}

fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: 0 }
}

/// A day in [from, to) drawn with the seasonal weights.
fn seasonal_day(rng: &mut StdRng, from: DateTime<Utc>, to: DateTime<Utc>) -> DateTime<Utc> {
    let span = (to - from).num_seconds().max(1);
    loop {
        let t = from + Duration::seconds(rng.random_range(0..span));
        let w = SEASONALITY[t.month0() as usize] / 1.8;
        if rng.random_bool(w.clamp(0.0, 1.0)) {
            return t;
        }
    }
}

fn generate_one(rng: &mut StdRng, index: usize, start: DateTime<Utc>, config: &Config) -> Generated {
    let horizon = config.horizon;
    let archetype = match rng.random_range(0..100) {
        0..=9 => Archetype::Loyal,
        10..=34 => Archetype::Regular,
        35..=59 => Archetype::Occasional,
        60..=67 => Archetype::New,
        68..=84 => Archetype::Churning,
        _ => Archetype::Silent,
    };
    let registered = match archetype {
        Archetype::New => horizon - Duration::days(rng.random_range(1..60)),
        _ => start + Duration::days(rng.random_range(0..(config.history_days - 120).max(1))),
    };
    let chinese = rng.random_bool(0.85);
    let (name, email_local) = if chinese {
        let surname = pick(rng, SURNAMES);
        let given: String = (0..rng.random_range(1..=2)).map(|_| *pick(rng, GIVEN)).collect();
        (format!("{surname}{given}"), format!("user{index}"))
    } else {
        let first = pick(rng, LATIN_FIRST);
        let last = pick(rng, LATIN_LAST);
        (format!("{first} {last}"), format!("{}.{}{index}", first.to_lowercase(), last.to_lowercase()))
    };
    let region = weighted(rng, REGIONS).to_string();
    let timezone = match region.as_str() {
        "SG" => "Asia/Singapore",
        "US-CA" => "America/Los_Angeles",
        "CN-HK" => "Asia/Hong_Kong",
        _ => "Asia/Shanghai",
    };
    // Unique by construction: index -> 9 digits is a bijection (7919 is coprime to 10^9).
    let unique = (index as u64).wrapping_mul(7919).wrapping_add(config.seed.wrapping_mul(104_729)) % 1_000_000_000;
    let phone = if region.starts_with("CN") && region != "CN-HK" {
        format!("+861{}{unique:09}", pick(rng, &["3", "5", "8", "9"]))
    } else {
        format!("+65{}{:07}", pick(rng, &["8", "9"]), unique % 10_000_000 + (index as u64 / 10_000_000) % 10)
    };
    let email = format!("{email_local}@{}", pick(rng, &["example.com", "example.cn", "mail.example.org"]));
    let birthday =
        Date { year: rng.random_range(1955..2006), month: rng.random_range(1..=12), day: rng.random_range(1..=28) };
    let mut tags = Vec::new();
    if rng.random_bool(0.2) {
        tags.push("newsletter".to_string());
    }
    if rng.random_bool(0.1) {
        tags.push("vip-event".to_string());
    }
    let customer = Customer {
        kind: CustomerKind::Person as i32,
        name,
        phone,
        email,
        birthday: Some(birthday),
        gender: if rng.random_bool(0.55) { Gender::Female as i32 } else { Gender::Male as i32 },
        region,
        timezone: timezone.to_string(),
        preferred_channel: *pick(
            rng,
            &[Channel::Sms as i32, Channel::Wechat as i32, Channel::AppPush as i32, Channel::Email as i32],
        ),
        registered_at: Some(timestamp(registered)),
        external_ids: vec![ExternalId { source: SOURCE.into(), id: index.to_string() }],
        tags,
        ..Default::default()
    };

    // Purchases per year and the window they fall in.
    let (per_year, active_until) = match archetype {
        Archetype::Loyal => (rng.random_range(18.0..40.0), horizon),
        Archetype::Regular => (rng.random_range(6.0..14.0), horizon),
        Archetype::Occasional => (rng.random_range(1.5..4.0), horizon),
        Archetype::New => (rng.random_range(4.0..12.0), horizon),
        Archetype::Churning => {
            let stop = horizon - Duration::days(rng.random_range(120..400));
            (rng.random_range(4.0..14.0), stop.max(registered + Duration::days(30)))
        }
        Archetype::Silent => (0.0, registered),
    };
    let value = pareto(rng);
    let active_days = (active_until - registered).num_days().max(0) as f64;
    let expected = per_year * active_days / 365.0;
    let count = if archetype == Archetype::Silent {
        0
    } else {
        // At least one purchase for buyers; Poisson-ish spread around the expectation.
        let noise: f64 = rng.random_range(0.6..1.4);
        ((expected * noise).round() as usize).max(1)
    };
    let mut transactions = Vec::with_capacity(count + count / 20);
    let mut times: Vec<DateTime<Utc>> =
        (0..count).map(|_| seasonal_day(rng, registered, active_until.max(registered + Duration::days(1)))).collect();
    times.sort();
    for (n, t) in times.iter().enumerate() {
        let (category, base) = *pick(rng, CATEGORIES);
        let spread: f64 = rng.random_range(0.4..1.8);
        let amount = ((base as f64) * spread * value.sqrt()).round() as i64;
        let tx_id = format!("dg-{index}-{n}");
        let channel = *pick(
            rng,
            &[Channel::Online as i32, Channel::Online as i32, Channel::InStore as i32, Channel::Wechat as i32],
        );
        transactions.push(Transaction {
            transaction_id: tx_id.clone(),
            customer_id: String::new(),
            kind: TransactionKind::Purchase as i32,
            amount: Some(Money { amount_minor: amount.max(100), currency: "CNY".into() }),
            occurred_at: Some(timestamp(*t)),
            product_id: format!("sku-{category}-{}", rng.random_range(1..200)),
            category: category.to_string(),
            channel,
        });
        if rng.random_bool(0.03) {
            let refund_at = *t + Duration::days(rng.random_range(1..14));
            if refund_at < horizon {
                transactions.push(Transaction {
                    transaction_id: format!("{tx_id}-r"),
                    customer_id: String::new(),
                    kind: TransactionKind::Refund as i32,
                    amount: Some(Money { amount_minor: (amount / 2).max(100), currency: "CNY".into() }),
                    occurred_at: Some(timestamp(refund_at)),
                    product_id: String::new(),
                    category: category.to_string(),
                    channel,
                });
            }
        }
    }
    transactions.sort_by_key(|t| t.occurred_at.as_ref().map(|ts| ts.seconds));

    let mut interactions = Vec::new();
    let logins_per_purchase = match archetype {
        Archetype::Loyal => 4,
        Archetype::Regular | Archetype::New => 3,
        _ => 2,
    };
    for (n, t) in times.iter().enumerate() {
        for k in 0..logins_per_purchase {
            let at = *t - Duration::hours(rng.random_range(1..72) * (k + 1) as i64);
            if at > registered {
                interactions.push(interaction(index, n * 10 + k, InteractionKind::Login, Channel::Online, at));
            }
        }
        if rng.random_bool(0.15) {
            interactions.push(interaction(
                index,
                n * 10 + 7,
                InteractionKind::Inquiry,
                Channel::OnlineChat,
                *t - Duration::hours(5),
            ));
        }
        if rng.random_bool(0.02) {
            interactions.push(interaction(
                index,
                n * 10 + 8,
                InteractionKind::Complaint,
                Channel::Hotline,
                *t + Duration::days(2),
            ));
        }
        if rng.random_bool(0.25) {
            interactions.push(interaction(
                index,
                n * 10 + 9,
                InteractionKind::ContactResponse,
                Channel::Sms,
                *t - Duration::hours(30),
            ));
        }
    }
    interactions.retain(|i| i.occurred_at.as_ref().is_some_and(|ts| ts.seconds < horizon.timestamp()));
    interactions.sort_by_key(|i| i.occurred_at.as_ref().map(|ts| ts.seconds));

    Generated { index, archetype, customer, transactions, interactions }
}

fn interaction(index: usize, n: usize, kind: InteractionKind, channel: Channel, at: DateTime<Utc>) -> Interaction {
    Interaction {
        interaction_id: format!("dg-{index}-i{n}"),
        customer_id: String::new(),
        kind: kind as i32,
        channel: channel as i32,
        direction: Direction::Inbound as i32,
        occurred_at: Some(timestamp(at)),
        note: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(n: usize) -> Vec<Generated> {
        Generator::new(Config { customers: n, ..Config::default() }).collect()
    }

    fn net_spend(g: &Generated) -> i64 {
        g.transactions
            .iter()
            .map(|t| {
                let a = t.amount.as_ref().map(|m| m.amount_minor).unwrap_or(0);
                if t.kind == TransactionKind::Refund as i32 { -a } else { a }
            })
            .sum()
    }

    #[test]
    fn the_same_seed_gives_the_same_data() {
        let a = sample(200);
        let b = sample(200);
        assert_eq!(a.len(), 200);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.customer, y.customer);
            assert_eq!(x.transactions, y.transactions);
        }
        let other: Vec<_> = Generator::new(Config { seed: 7, customers: 200, ..Config::default() }).collect();
        assert_ne!(a[0].customer, other[0].customer);
    }

    #[test]
    fn spend_is_pareto_skewed() {
        let mut spend: Vec<i64> = sample(5000).iter().map(net_spend).filter(|s| *s > 0).collect();
        spend.sort_unstable_by(|a, b| b.cmp(a));
        let total: i64 = spend.iter().sum();
        let top: i64 = spend.iter().take(spend.len() / 5).sum();
        let share = top as f64 / total as f64;
        assert!(share > 0.6 && share < 0.95, "top 20% of buyers bring {share:.2} of revenue");
    }

    #[test]
    fn purchases_peak_around_singles_day_and_december() {
        // Same year, neighbouring months, so the size of the active base is comparable.
        let mut by_month = std::collections::HashMap::new();
        for g in sample(3000) {
            for t in &g.transactions {
                let ts = t.occurred_at.as_ref().expect("time");
                let d = Utc.timestamp_opt(ts.seconds, 0).single().expect("valid");
                *by_month.entry((d.year(), d.month())).or_insert(0usize) += 1;
            }
        }
        let m = |y, mo| by_month.get(&(y, mo)).copied().unwrap_or(0) as f64;
        let autumn = (m(2025, 9) + m(2025, 10)) / 2.0;
        assert!(m(2025, 11) > 1.4 * autumn, "{by_month:?}");
        assert!(m(2025, 12) > 1.2 * autumn, "{by_month:?}");
        assert!(m(2025, 6) > 1.2 * (m(2025, 4) + m(2025, 8)) / 2.0, "618 peak: {by_month:?}");
    }

    #[test]
    fn churning_and_silent_customers_behave_as_named() {
        let config = Config::default();
        let all = sample(3000);
        let churners: Vec<_> = all.iter().filter(|g| g.archetype == Archetype::Churning).collect();
        let silent: Vec<_> = all.iter().filter(|g| g.archetype == Archetype::Silent).collect();
        assert!(churners.len() > 300 && silent.len() > 300);
        let cutoff = (config.horizon - Duration::days(90)).timestamp();
        for g in churners {
            assert!(!g.transactions.is_empty());
            let last = g
                .transactions
                .iter()
                .filter(|t| t.kind == TransactionKind::Purchase as i32)
                .filter_map(|t| t.occurred_at.as_ref())
                .map(|t| t.seconds)
                .max()
                .unwrap_or(0);
            assert!(last < cutoff, "churner {} bought within the last 90 days", g.index);
        }
        assert!(silent.iter().all(|g| g.transactions.is_empty()));
    }

    #[test]
    fn identities_are_well_formed_and_unique() {
        let all = sample(20_000);
        let mut phones = std::collections::HashSet::new();
        for g in &all {
            let c = &g.customer;
            assert!(c.phone.starts_with('+') && c.phone[1..].chars().all(|d| d.is_ascii_digit()), "{}", c.phone);
            assert!((9..=16).contains(&c.phone.len()), "{}", c.phone);
            assert_eq!(c.email, c.email.to_lowercase());
            assert!(phones.insert(c.phone.clone()), "duplicate phone {}", c.phone);
            assert!(!c.name.trim().is_empty());
        }
    }
}
