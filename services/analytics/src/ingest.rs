//! ANA-1: every service's events into analytics' facts and rollups,
//! set-based: a batch of events is decoded into one list per kind and each
//! list is applied with a statement or two (ANA-7: 20 000 events/s).
//!
//! Facts are keyed by their natural ids (transaction, message, ticket,
//! survey answer...) and each outcome is set once, so replaying events
//! changes nothing; every rollup increment comes from a row that was new or
//! a flag that was newly set. Customer rollups change by the difference of
//! the customer's contributions ([`crate::domain::customer::delta`]), which
//! keeps them exact under late, out-of-order and moved history. Merges,
//! unmerges and erasures are applied one by one between the bulk parts, in
//! stream order.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use chrono::{DateTime, Duration, Utc};
use chrono_tz::Tz;
use crm_kit::consumer::{Event, EventHandler, HandlerError, erased_ids, payload_id, payload_time};
use crm_proto::feedback::v1 as fb;
use crm_proto::outreach::v1 as out;
use crm_proto::profiles::v1 as pf;
use crm_proto::segmentation::v1 as sg;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::SERVICE;
use crate::domain::customer::{Amounts, Cell, Facts, Purchase, day_of};
use crate::domain::kpi;

/// The analytics consumer of profiles', segmentation's, outreach's and feedback's events.
#[derive(Debug, Clone)]
pub struct Ingest {
    /// Reporting time zone (days, months).
    pub tz: Tz,
    /// Attribution window after a campaign assignment (OUT-8, ANA-3).
    pub window: Duration,
}

fn time_or(t: Option<&prost_types::Timestamp>, fallback: DateTime<Utc>) -> DateTime<Utc> {
    payload_time(t).unwrap_or(fallback)
}

/// The events of a bulk part, by kind.
#[derive(Default)]
struct Bulk {
    created: Vec<(Uuid, Option<DateTime<Utc>>)>,
    purchases: Vec<(String, Uuid, DateTime<Utc>, i64, bool)>,
    interactions: Vec<(String, Uuid, DateTime<Utc>)>,
    tiers: Vec<(Uuid, Uuid, DateTime<Utc>, i16, i16)>,
    grids: Vec<(Uuid, i16, i16)>,
    memberships: Vec<(Uuid, Uuid, bool)>,
    assignments: Vec<(Uuid, Uuid, String, i16, DateTime<Utc>)>,
    sent: Vec<Sent>,
    outcomes: Vec<Outcome>,
    feedback: Vec<(Uuid, Uuid, i16, DateTime<Utc>)>,
    opened: Vec<(Uuid, Uuid, i16, bool, DateTime<Utc>)>,
    resolved: Vec<(Uuid, i64, i64, DateTime<Utc>)>,
    verified: Vec<(Uuid, bool)>,
    breached: Vec<Uuid>,
    surveys: Vec<(Uuid, Uuid, i16, i16, DateTime<Utc>)>,
}

impl Bulk {
    fn is_empty(&self) -> bool {
        self.created.is_empty()
            && self.purchases.is_empty()
            && self.interactions.is_empty()
            && self.tiers.is_empty()
            && self.grids.is_empty()
            && self.memberships.is_empty()
            && self.assignments.is_empty()
            && self.sent.is_empty()
            && self.outcomes.is_empty()
            && self.feedback.is_empty()
            && self.opened.is_empty()
            && self.resolved.is_empty()
            && self.verified.is_empty()
            && self.breached.is_empty()
            && self.surveys.is_empty()
    }
}

/// A MessageSent (OUT-1): sent, or decided otherwise.
struct Sent {
    message: Uuid,
    campaign: Uuid,
    customer: Uuid,
    variant: String,
    channel: i16,
    contacted: bool,
    cost: i64,
    at: DateTime<Utc>,
}

/// A DeliveryOutcome (OUT-8).
struct Outcome {
    message: Uuid,
    customer: Uuid,
    campaign: Uuid,
    variant: String,
    channel: i16,
    kind: i32,
    revenue: i64,
    attributed: bool,
    at: DateTime<Utc>,
}

/// A message whose outcome was newly set, with its rollup keys.
#[derive(sqlx::FromRow)]
struct OutcomeHit {
    campaign_id: Uuid,
    variant: String,
    channel: i16,
    tier: i16,
    day: Option<i32>,
    revenue: i64,
    at: DateTime<Utc>,
}

/// Events applied one at a time, between bulk parts.
enum Structural {
    Merged(Uuid, Uuid),
    Unmerged(Uuid, Uuid, Vec<String>, Vec<String>),
    Erased(Vec<Uuid>, String, String),
}

/// Rollup increments collected over a bulk part, written once.
#[derive(Default)]
struct Deltas {
    rollups: BTreeMap<Cell, Amounts>,
    cells: BTreeMap<(Uuid, String, i16, i16, i32), [i64; 8]>,
    lift: BTreeMap<(Uuid, String), [i64; 4]>,
    service: BTreeMap<(i32, &'static str, String), (i64, f64)>,
}

const TARGETED: usize = 0;
const CONTACTED: usize = 1;
const DELIVERED: usize = 2;
const RESPONDED: usize = 3;
const CONVERTED: usize = 4;
const COST: usize = 5;
const REVENUE: usize = 6;
const ATTEMPTS: usize = 7;

impl Deltas {
    fn cell(&mut self, key: (Uuid, String, i16, i16, i32), i: usize, v: i64) {
        self.cells.entry(key).or_insert([0; 8])[i] += v;
    }
    fn lift(&mut self, campaign: Uuid, grp: &str, i: usize, v: i64) {
        self.lift.entry((campaign, grp.to_string())).or_insert([0; 4])[i] += v;
    }
    fn service(&mut self, day: i32, metric: &'static str, key: String, n: i64, total: f64) {
        let e = self.service.entry((day, metric, key)).or_insert((0, 0.0));
        e.0 += n;
        e.1 += total;
    }
}

/// Memberships created by the current batch.
struct NewMembers {
    campaign: std::collections::HashSet<(Uuid, Uuid)>,
    programme: std::collections::HashSet<Uuid>,
}

/// The programme's pseudo-campaign in `lift_groups` (ANA-8: treated vs global control).
pub const PROGRAMME: Uuid = Uuid::nil();

impl EventHandler for Ingest {
    fn set_based(&self) -> bool {
        true
    }

    async fn handle(&self, tx: &mut PgConnection, event: &Event) -> Result<(), HandlerError> {
        self.handle_batch(tx, std::slice::from_ref(event)).await
    }

    async fn handle_batch(&self, tx: &mut PgConnection, events: &[Event]) -> Result<(), HandlerError> {
        let mut bulk = Bulk::default();
        let mut newest: Option<DateTime<Utc>> = None;
        for e in events {
            let at = payload_time(e.envelope.occurred_at.as_ref()).unwrap_or_else(Utc::now);
            newest = Some(newest.map_or(at, |n| n.max(at)));
            if let Some(s) = self.decode(e, at, &mut bulk)? {
                if !bulk.is_empty() {
                    self.apply(tx, std::mem::take(&mut bulk)).await?;
                }
                self.structural(tx, s).await?;
            }
        }
        if !bulk.is_empty() {
            self.apply(tx, bulk).await?;
        }
        if let Some(t) = newest {
            sqlx::query(
                "INSERT INTO freshness (id, as_of) VALUES (true, $1) ON CONFLICT (id) DO UPDATE SET as_of = GREATEST(freshness.as_of, $1)",
            )
            .bind(t)
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }
}

impl Ingest {
    /// Sorts one event into the bulk lists, or returns it as structural.
    fn decode(&self, e: &Event, at: DateTime<Utc>, b: &mut Bulk) -> Result<Option<Structural>, HandlerError> {
        match e.envelope.event_type.rsplit('.').next().unwrap_or("") {
            "CustomerCreated" => {
                if let Some(c) = e.payload::<pf::CustomerCreated>()? {
                    b.created.push((payload_id(&c.customer_id)?, payload_time(c.registered_at.as_ref())));
                }
            }
            "TransactionRecorded" => {
                if let Some(t) = e.payload::<pf::TransactionRecorded>()?.and_then(|t| t.transaction) {
                    let amount = t.amount.map(|m| m.amount_minor).unwrap_or(0);
                    let refund = t.kind == pf::TransactionKind::Refund as i32;
                    let signed = if refund { -amount.abs() } else { amount };
                    let when = time_or(t.occurred_at.as_ref(), at);
                    b.purchases.push((t.transaction_id, payload_id(&t.customer_id)?, when, signed, refund));
                }
            }
            "InteractionRecorded" => {
                if let Some(x) = e.payload::<pf::InteractionRecorded>()?.and_then(|i| i.interaction)
                    && x.direction != pf::Direction::Outbound as i32
                {
                    b.interactions.push((
                        x.interaction_id,
                        payload_id(&x.customer_id)?,
                        time_or(x.occurred_at.as_ref(), at),
                    ));
                }
            }
            "CustomerMerged" => {
                if let Some(m) = e.payload::<pf::CustomerMerged>()? {
                    return Ok(Some(Structural::Merged(payload_id(&m.survivor_id)?, payload_id(&m.loser_id)?)));
                }
            }
            "CustomerUnmerged" => {
                if let Some(m) = e.payload::<pf::CustomerUnmerged>()? {
                    return Ok(Some(Structural::Unmerged(
                        payload_id(&m.survivor_id)?,
                        payload_id(&m.restored_id)?,
                        m.moved_transaction_ids,
                        m.moved_interaction_ids,
                    )));
                }
            }
            "CustomerErased" => {
                if let Some(m) = e.payload::<pf::CustomerErased>()? {
                    return Ok(Some(Structural::Erased(erased_ids(&m)?, m.customer_id, e.envelope.request_id.clone())));
                }
            }
            "TierChanged" => {
                if let Some(t) = e.payload::<sg::TierChanged>()? {
                    let mv = t.r#move.unwrap_or_default();
                    let id = payload_id(&e.envelope.event_id)?;
                    b.tiers.push((
                        id,
                        payload_id(&t.customer_id)?,
                        time_or(mv.move_time.as_ref(), at),
                        mv.from_tier as i16,
                        mv.to_tier as i16,
                    ));
                }
            }
            "SegmentationChanged" => {
                if let Some(s) = e.payload::<sg::SegmentationChanged>()? {
                    b.grids.push((payload_id(&s.customer_id)?, s.tier as i16, s.grid_cell as i16));
                }
            }
            "SegmentMembershipChanged" => {
                if let Some(s) = e.payload::<sg::SegmentMembershipChanged>()? {
                    b.memberships.push((payload_id(&s.segment_id)?, payload_id(&s.customer_id)?, s.joined));
                }
            }
            "CampaignAssignment" => {
                if let Some(a) = e.payload::<out::CampaignAssignment>()? {
                    let when = time_or(a.assign_time.as_ref(), at);
                    b.assignments.push((
                        payload_id(&a.campaign_id)?,
                        payload_id(&a.customer_id)?,
                        a.group,
                        a.tier as i16,
                        when,
                    ));
                }
            }
            "MessageSent" => {
                if let Some(m) = e.payload::<out::MessageSent>()?.and_then(|m| m.message) {
                    let campaign = if m.campaign_id.is_empty() { PROGRAMME } else { payload_id(&m.campaign_id)? };
                    let variant =
                        if m.campaign_id.is_empty() { format!("trigger:{}", m.trigger) } else { m.variant.clone() };
                    let contacted =
                        m.state == out::MessageState::Sent as i32 || m.state == out::MessageState::Delivered as i32;
                    let cost = m.cost.map(|c| c.amount_minor).unwrap_or(0);
                    let when =
                        payload_time(m.send_time.as_ref()).or(payload_time(m.create_time.as_ref())).unwrap_or(at);
                    b.sent.push(Sent {
                        message: payload_id(&m.message_id)?,
                        campaign,
                        customer: payload_id(&m.customer_id)?,
                        variant,
                        channel: m.channel as i16,
                        contacted,
                        cost,
                        at: when,
                    });
                }
            }
            "DeliveryOutcome" => {
                if let Some(o) = e.payload::<out::DeliveryOutcome>()? {
                    let campaign = if o.campaign_id.is_empty() { PROGRAMME } else { payload_id(&o.campaign_id)? };
                    let revenue = o.revenue.map(|r| r.amount_minor).unwrap_or(0);
                    b.outcomes.push(Outcome {
                        message: payload_id(&o.message_id)?,
                        customer: payload_id(&o.customer_id)?,
                        campaign,
                        variant: o.variant,
                        channel: o.channel as i16,
                        kind: o.outcome,
                        revenue,
                        attributed: o.attributed,
                        at: time_or(o.occurred_at.as_ref(), at),
                    });
                }
            }
            "FeedbackReceived" => {
                if let Some(f) = e.payload::<fb::FeedbackReceived>()? {
                    b.feedback.push((
                        payload_id(&f.feedback_id)?,
                        payload_id(&f.customer_id)?,
                        f.category as i16,
                        time_or(f.receive_time.as_ref(), at),
                    ));
                }
            }
            "TicketOpened" => {
                if let Some(t) = e.payload::<fb::TicketOpened>()?.and_then(|t| t.ticket) {
                    b.opened.push((
                        payload_id(&t.ticket_id)?,
                        payload_id(&t.customer_id)?,
                        t.category as i16,
                        !t.repeat_of_ticket_id.is_empty(),
                        time_or(t.create_time.as_ref(), at),
                    ));
                }
            }
            "TicketResolved" => {
                if let Some(t) = e.payload::<fb::TicketResolved>()? {
                    b.resolved.push((
                        payload_id(&t.ticket_id)?,
                        t.first_response_seconds,
                        t.resolution_seconds,
                        time_or(t.resolve_time.as_ref(), at),
                    ));
                }
            }
            "TicketVerified" => {
                if let Some(t) = e.payload::<fb::TicketVerified>()? {
                    b.verified.push((payload_id(&t.ticket_id)?, t.confirmed));
                }
            }
            "SlaBreached" => {
                if let Some(t) = e.payload::<fb::SlaBreached>()? {
                    b.breached.push(payload_id(&t.ticket_id)?);
                }
            }
            "SurveyAnswered" => {
                if let Some(r) = e.payload::<fb::SurveyAnswered>()?.and_then(|s| s.response) {
                    b.surveys.push((
                        payload_id(&r.survey_response_id)?,
                        payload_id(&r.customer_id)?,
                        r.kind as i16,
                        r.score as i16,
                        time_or(r.create_time.as_ref(), at),
                    ));
                }
            }
            _ => {}
        }
        Ok(None)
    }

    /// Applies a bulk part.
    async fn apply(&self, tx: &mut PgConnection, b: Bulk) -> Result<(), HandlerError> {
        let mut d = Deltas::default();
        // Customers: registration; every customer a fact refers to gets a row.
        let mut known: BTreeSet<Uuid> = b.created.iter().map(|c| c.0).collect();
        known.extend(b.purchases.iter().map(|p| p.1));
        known.extend(b.tiers.iter().map(|t| t.1));
        known.extend(b.grids.iter().map(|g| g.0));
        let (ids, regs): (Vec<Uuid>, Vec<Option<DateTime<Utc>>>) = {
            let reg: HashMap<Uuid, Option<DateTime<Utc>>> = b.created.iter().copied().collect();
            known.iter().map(|id| (*id, reg.get(id).copied().flatten())).unzip()
        };
        if !ids.is_empty() {
            // New customers only: an INSERT that meets a conflict still draws
            // a number (customers.idx), and the bitmaps need dense numbers.
            sqlx::query(
                "INSERT INTO customers (customer_id, registered_at) \
                 SELECT t.id, t.reg FROM UNNEST($1::uuid[], $2::timestamptz[]) AS t(id, reg) \
                 WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = t.id) \
                 ON CONFLICT (customer_id) DO UPDATE SET registered_at = COALESCE(EXCLUDED.registered_at, customers.registered_at)",
            )
            .bind(&ids)
            .bind(&regs)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE customers c SET registered_at = t.reg FROM UNNEST($1::uuid[], $2::timestamptz[]) AS t(id, reg) \
                 WHERE c.customer_id = t.id AND t.reg IS NOT NULL AND c.registered_at IS DISTINCT FROM t.reg",
            )
            .bind(&ids)
            .bind(&regs)
            .execute(&mut *tx)
            .await?;
        }
        let live = live_ids(tx, &ids).await?;
        let live_of = |id: &Uuid| live.get(id).copied().unwrap_or(*id);

        // Purchases, new ones only.
        let fresh = self.purchases(tx, &b, &live_of).await?;
        let mut history: BTreeMap<Uuid, Vec<Purchase>> = BTreeMap::new();
        for (customer, p) in &fresh {
            history.entry(*customer).or_default().push(*p);
        }
        // Tier and grid moves, the latest of the batch per customer.
        let mut tier_of: BTreeMap<Uuid, i16> = BTreeMap::new();
        let mut grid_of: BTreeMap<Uuid, i16> = BTreeMap::new();
        self.tier_moves(tx, &b, &live_of, &mut tier_of).await?;
        for (c, tier, grid) in &b.grids {
            if *tier != 0 {
                tier_of.insert(live_of(c), *tier);
            }
            if *grid != 0 {
                grid_of.insert(live_of(c), *grid);
            }
        }
        let affected: BTreeSet<Uuid> = history.keys().chain(tier_of.keys()).chain(grid_of.keys()).copied().collect();
        self.update_facts(tx, &affected, &mut d, |id, f| {
            let mut next = match history.get(id) {
                Some(ps) => f.with_purchases(ps, self.tz),
                None => f.clone(),
            };
            if let Some(t) = tier_of.get(id) {
                next.tier = *t;
            }
            if let Some(g) = grid_of.get(id) {
                next.grid = *g;
            }
            next
        })
        .await?;
        self.memberships(tx, &b, &live_of).await?;
        // Campaign windows: new purchases and responses count for the
        // memberships already known; then new memberships look back at every
        // purchase and response known (so nothing counts twice).
        let buys: Vec<(Uuid, DateTime<Utc>, i64)> =
            fresh.iter().filter(|(_, p)| !p.refund).map(|(c, p)| (*c, p.at, p.amount)).collect();
        self.windows(tx, "converted_at", &buys, None, &mut d).await?;
        let responses = self.interactions(tx, &b, &live_of).await?;
        self.windows(tx, "responded_at", &responses, None, &mut d).await?;
        self.assignments(tx, &b, &mut d).await?;
        self.messages(tx, &b, &mut d).await?;
        self.outcomes(tx, &b, &mut d).await?;
        self.service(tx, &b, &mut d).await?;
        // The shared rows last (bitmap chunks, then rollups, each in key
        // order): a concurrent batch waits on them only until this commits.
        let bought: Vec<(Uuid, DateTime<Utc>)> =
            fresh.iter().filter(|(_, p)| !p.refund).map(|(c, p)| (*c, p.at)).collect();
        crate::bits::mark_bought(tx, &bought, self.tz).await?;
        write_deltas(tx, d).await
    }

    async fn purchases(
        &self,
        tx: &mut PgConnection,
        b: &Bulk,
        live_of: &impl Fn(&Uuid) -> Uuid,
    ) -> Result<Vec<(Uuid, Purchase)>, HandlerError> {
        if b.purchases.is_empty() {
            return Ok(Vec::new());
        }
        let mut seen = BTreeSet::new();
        let rows: Vec<&(String, Uuid, DateTime<Utc>, i64, bool)> =
            b.purchases.iter().filter(|p| seen.insert(p.0.clone())).collect();
        let fresh: Vec<(Uuid, DateTime<Utc>, i64, bool)> = sqlx::query_as(
            "INSERT INTO purchases (transaction_id, customer_id, occurred_at, amount_minor, refund, in_bits) \
             SELECT *, true FROM UNNEST($1::text[], $2::uuid[], $3::timestamptz[], $4::bigint[], $5::bool[]) \
             ON CONFLICT DO NOTHING RETURNING customer_id, occurred_at, amount_minor, refund",
        )
        .bind(rows.iter().map(|p| p.0.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|p| live_of(&p.1)).collect::<Vec<_>>())
        .bind(rows.iter().map(|p| p.2).collect::<Vec<_>>())
        .bind(rows.iter().map(|p| p.3).collect::<Vec<_>>())
        .bind(rows.iter().map(|p| p.4).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        Ok(fresh.into_iter().map(|(c, at, amount, refund)| (c, Purchase { at, amount, refund })).collect())
    }

    async fn tier_moves(
        &self,
        tx: &mut PgConnection,
        b: &Bulk,
        live_of: &impl Fn(&Uuid) -> Uuid,
        tier_of: &mut BTreeMap<Uuid, i16>,
    ) -> Result<(), HandlerError> {
        if b.tiers.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO tier_moves (event_id, customer_id, move_time, from_tier, to_tier) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::smallint[], $5::smallint[]) ON CONFLICT DO NOTHING",
        )
        .bind(b.tiers.iter().map(|t| t.0).collect::<Vec<_>>())
        .bind(b.tiers.iter().map(|t| live_of(&t.1)).collect::<Vec<_>>())
        .bind(b.tiers.iter().map(|t| t.2).collect::<Vec<_>>())
        .bind(b.tiers.iter().map(|t| t.3).collect::<Vec<_>>())
        .bind(b.tiers.iter().map(|t| t.4).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        for (_, c, _, _, to) in &b.tiers {
            tier_of.insert(live_of(c), *to);
        }
        Ok(())
    }

    /// Locks the facts of `customers`, computes the next facts with `next`,
    /// writes them and collects the rollup deltas.
    async fn update_facts(
        &self,
        tx: &mut PgConnection,
        customers: &BTreeSet<Uuid>,
        d: &mut Deltas,
        next: impl Fn(&Uuid, &Facts) -> Facts,
    ) -> Result<(), HandlerError> {
        if customers.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = customers.iter().copied().collect();
        let current = load_facts(tx, &ids).await?;
        let mut changed: Vec<(Uuid, Facts)> = Vec::new();
        for id in &ids {
            let old = current.get(id).cloned().unwrap_or_default();
            let new = next(id, &old);
            if new != old {
                for (cell, (n, a)) in crate::domain::customer::delta(&old, &new, self.tz) {
                    let e = d.rollups.entry(cell).or_insert((0, 0));
                    e.0 += n;
                    e.1 += a;
                }
                changed.push((*id, new));
            }
        }
        store_facts(tx, &changed).await
    }

    async fn memberships(
        &self,
        tx: &mut PgConnection,
        b: &Bulk,
        live_of: &impl Fn(&Uuid) -> Uuid,
    ) -> Result<(), HandlerError> {
        // The last change per (segment, customer) in the batch wins.
        let mut last: BTreeMap<(Uuid, Uuid), bool> = BTreeMap::new();
        for (s, c, joined) in &b.memberships {
            last.insert((*s, live_of(c)), *joined);
        }
        let (joins, leaves): (Vec<_>, Vec<_>) = last.into_iter().partition(|(_, j)| *j);
        if !joins.is_empty() {
            sqlx::query(
                "INSERT INTO segment_members SELECT * FROM UNNEST($1::uuid[], $2::uuid[]) ON CONFLICT DO NOTHING",
            )
            .bind(joins.iter().map(|((s, _), _)| *s).collect::<Vec<_>>())
            .bind(joins.iter().map(|((_, c), _)| *c).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        if !leaves.is_empty() {
            sqlx::query(
                "DELETE FROM segment_members m USING UNNEST($1::uuid[], $2::uuid[]) AS l(s, c) WHERE m.segment_id = l.s AND m.customer_id = l.c",
            )
            .bind(leaves.iter().map(|((s, _), _)| *s).collect::<Vec<_>>())
            .bind(leaves.iter().map(|((_, c), _)| *c).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        let pairs = |v: &[((Uuid, Uuid), bool)]| v.iter().map(|(k, _)| *k).collect::<Vec<_>>();
        crate::bits::memberships(tx, &pairs(&joins), &pairs(&leaves)).await?;
        Ok(())
    }

    async fn assignments(&self, tx: &mut PgConnection, b: &Bulk, d: &mut Deltas) -> Result<(), HandlerError> {
        if b.assignments.is_empty() {
            return Ok(());
        }
        let mut seen = BTreeSet::new();
        let rows: Vec<_> = b.assignments.iter().filter(|a| seen.insert((a.0, a.1))).collect();
        let fresh: Vec<(Uuid, Uuid, String, i16, DateTime<Utc>)> = sqlx::query_as(
            "INSERT INTO campaign_members (campaign_id, customer_id, grp, tier, assigned_at) \
             SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::text[], $4::smallint[], $5::timestamptz[]) \
             ON CONFLICT DO NOTHING RETURNING campaign_id, customer_id, grp, tier, assigned_at",
        )
        .bind(rows.iter().map(|a| a.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|a| a.1).collect::<Vec<_>>())
        .bind(rows.iter().map(|a| a.2.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|a| a.3).collect::<Vec<_>>())
        .bind(rows.iter().map(|a| a.4).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        for (campaign, _, grp, tier, at) in &fresh {
            d.cell((*campaign, grp.clone(), 0, *tier, day_of(*at, self.tz)), TARGETED, 1);
            d.lift(*campaign, grp, 0, 1);
        }
        // ANA-8: a customer's first assignment puts them in the programme, treated or control.
        let programme: Vec<(bool, Uuid)> = sqlx::query_as(
            "INSERT INTO programme_members (customer_id, control, assigned_at) \
             SELECT DISTINCT ON (c) c, g = 'global_control', t FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) AS x(c, g, t) \
             ORDER BY c, t ON CONFLICT DO NOTHING RETURNING control, customer_id",
        )
        .bind(fresh.iter().map(|a| a.1).collect::<Vec<_>>())
        .bind(fresh.iter().map(|a| a.2.clone()).collect::<Vec<_>>())
        .bind(fresh.iter().map(|a| a.4).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        for (control, _) in &programme {
            d.lift(PROGRAMME, if *control { "control" } else { "treated" }, 0, 1);
        }
        // Purchases and responses already known that fall in the new members' windows.
        let new = NewMembers {
            campaign: fresh.iter().map(|a| (a.0, a.1)).collect(),
            programme: programme.iter().map(|p| p.1).collect(),
        };
        let customers: Vec<Uuid> = fresh.iter().map(|a| a.1).collect::<BTreeSet<_>>().into_iter().collect();
        let buys: Vec<(Uuid, DateTime<Utc>, i64)> = sqlx::query_as(
            "SELECT customer_id, occurred_at, amount_minor FROM purchases WHERE customer_id = ANY($1) AND NOT refund",
        )
        .bind(&customers)
        .fetch_all(&mut *tx)
        .await?;
        self.windows(tx, "converted_at", &buys, Some(&new), &mut *d).await?;
        let responses: Vec<(Uuid, DateTime<Utc>, i64)> =
            sqlx::query_as("SELECT customer_id, occurred_at, 0::bigint FROM interactions WHERE customer_id = ANY($1)")
                .bind(&customers)
                .fetch_all(&mut *tx)
                .await?;
        self.windows(tx, "responded_at", &responses, Some(&new), d).await
    }

    async fn interactions(
        &self,
        tx: &mut PgConnection,
        b: &Bulk,
        live_of: &impl Fn(&Uuid) -> Uuid,
    ) -> Result<Vec<(Uuid, DateTime<Utc>, i64)>, HandlerError> {
        if b.interactions.is_empty() {
            return Ok(Vec::new());
        }
        let mut seen = BTreeSet::new();
        let rows: Vec<_> = b.interactions.iter().filter(|i| seen.insert(i.0.clone())).collect();
        Ok(sqlx::query_as(
            "INSERT INTO interactions (interaction_id, customer_id, occurred_at) \
             SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::timestamptz[]) ON CONFLICT DO NOTHING \
             RETURNING customer_id, occurred_at, 0::bigint",
        )
        .bind(rows.iter().map(|i| i.0.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|i| live_of(&i.1)).collect::<Vec<_>>())
        .bind(rows.iter().map(|i| i.2).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?)
    }

    /// ANA-3 lift: purchases (`converted_at`, with revenue) or responses
    /// (`responded_at`) within the attribution window after a member's
    /// assignment, in campaigns and in the programme. The first one sets the
    /// time (once); revenue adds up. With `only`, just those new memberships.
    async fn windows(
        &self,
        tx: &mut PgConnection,
        column: &'static str,
        facts: &[(Uuid, DateTime<Utc>, i64)],
        only: Option<&NewMembers>,
        d: &mut Deltas,
    ) -> Result<(), HandlerError> {
        if facts.is_empty() {
            return Ok(());
        }
        let revenue = column == "converted_at";
        let customers: Vec<Uuid> = facts.iter().map(|f| f.0).collect::<BTreeSet<_>>().into_iter().collect();
        // Locked in id order, so concurrent batches cannot deadlock or count twice.
        let members: Vec<(Uuid, Uuid, String, DateTime<Utc>, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT campaign_id, customer_id, grp, assigned_at, {column} IS NOT NULL FROM campaign_members \
             WHERE customer_id = ANY($1) ORDER BY campaign_id, customer_id FOR UPDATE"
        )))
        .bind(&customers)
        .fetch_all(&mut *tx)
        .await?;
        let programme: Vec<(Uuid, bool, DateTime<Utc>, bool)> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT customer_id, control, assigned_at, {column} IS NOT NULL FROM programme_members \
             WHERE customer_id = ANY($1) ORDER BY customer_id FOR UPDATE"
        )))
        .bind(&customers)
        .fetch_all(&mut *tx)
        .await?;
        let in_window = |assigned: DateTime<Utc>, at: DateTime<Utc>| at > assigned && at <= assigned + self.window;
        let mut by_customer: HashMap<Uuid, Vec<(DateTime<Utc>, i64)>> = HashMap::new();
        for (c, at, amount) in facts {
            by_customer.entry(*c).or_default().push((*at, *amount));
        }
        let mut updates: Vec<(Uuid, Uuid, DateTime<Utc>, i64)> = Vec::new();
        for (campaign, customer, grp, assigned, done) in &members {
            if only.is_some_and(|o| !o.campaign.contains(&(*campaign, *customer))) {
                continue;
            }
            let hits: Vec<&(DateTime<Utc>, i64)> = by_customer
                .get(customer)
                .map(|v| v.iter().filter(|(at, _)| in_window(*assigned, *at)).collect())
                .unwrap_or_default();
            let Some(first) = hits.iter().map(|h| h.0).min() else { continue };
            let amount: i64 = if revenue { hits.iter().map(|h| h.1).sum() } else { 0 };
            if !done {
                d.lift(*campaign, grp, if revenue { 1 } else { 2 }, 1);
            }
            d.lift(*campaign, grp, 3, amount);
            updates.push((*campaign, *customer, first, amount));
        }
        if !updates.is_empty() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE campaign_members m SET {column} = LEAST(m.{column}, u.at), revenue_minor = m.revenue_minor + u.amount \
                 FROM UNNEST($1::uuid[], $2::uuid[], $3::timestamptz[], $4::bigint[]) AS u(campaign_id, customer_id, at, amount) \
                 WHERE m.campaign_id = u.campaign_id AND m.customer_id = u.customer_id"
            )))
            .bind(updates.iter().map(|u| u.0).collect::<Vec<_>>())
            .bind(updates.iter().map(|u| u.1).collect::<Vec<_>>())
            .bind(updates.iter().map(|u| u.2).collect::<Vec<_>>())
            .bind(updates.iter().map(|u| u.3).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        let mut prog: Vec<(Uuid, DateTime<Utc>, i64)> = Vec::new();
        for (customer, control, assigned, done) in &programme {
            if only.is_some_and(|o| !o.programme.contains(customer)) {
                continue;
            }
            let hits: Vec<&(DateTime<Utc>, i64)> = by_customer
                .get(customer)
                .map(|v| v.iter().filter(|(at, _)| in_window(*assigned, *at)).collect())
                .unwrap_or_default();
            let Some(first) = hits.iter().map(|h| h.0).min() else { continue };
            let amount: i64 = if revenue { hits.iter().map(|h| h.1).sum() } else { 0 };
            let grp = if *control { "control" } else { "treated" };
            if !done {
                d.lift(PROGRAMME, grp, if revenue { 1 } else { 2 }, 1);
            }
            d.lift(PROGRAMME, grp, 3, amount);
            prog.push((*customer, first, amount));
        }
        if !prog.is_empty() {
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE programme_members m SET {column} = LEAST(m.{column}, u.at), revenue_minor = m.revenue_minor + u.amount \
                 FROM UNNEST($1::uuid[], $2::timestamptz[], $3::bigint[]) AS u(customer_id, at, amount) WHERE m.customer_id = u.customer_id"
            )))
            .bind(prog.iter().map(|u| u.0).collect::<Vec<_>>())
            .bind(prog.iter().map(|u| u.1).collect::<Vec<_>>())
            .bind(prog.iter().map(|u| u.2).collect::<Vec<_>>())
            .execute(&mut *tx)
            .await?;
        }
        Ok(())
    }

    async fn messages(&self, tx: &mut PgConnection, b: &Bulk, d: &mut Deltas) -> Result<(), HandlerError> {
        if b.sent.is_empty() {
            return Ok(());
        }
        let mut seen = BTreeSet::new();
        let rows: Vec<&Sent> = b.sent.iter().rev().filter(|m| seen.insert(m.message)).collect();
        let new_rows: Vec<(Uuid, Uuid, String, i16, i16)> = sqlx::query_as(
            "INSERT INTO messages (message_id, campaign_id, customer_id, variant, channel, tier) \
             SELECT x.id, x.campaign, x.customer, x.variant, x.channel, COALESCE(m.tier, 0) \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::smallint[]) AS x(id, campaign, customer, variant, channel) \
             LEFT JOIN campaign_members m ON m.campaign_id = x.campaign AND m.customer_id = x.customer ON CONFLICT DO NOTHING \
             RETURNING message_id, campaign_id, variant, channel, tier",
        )
        .bind(rows.iter().map(|m| m.message).collect::<Vec<_>>())
        .bind(rows.iter().map(|m| m.campaign).collect::<Vec<_>>())
        .bind(rows.iter().map(|m| m.customer).collect::<Vec<_>>())
        .bind(rows.iter().map(|m| m.variant.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|m| m.channel).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        let day_of_message = rows.iter().map(|m| (m.message, day_of(m.at, self.tz))).collect::<HashMap<_, _>>();
        for (id, campaign, variant, channel, tier) in new_rows {
            let day = day_of_message.get(&id).copied().unwrap_or_default();
            d.cell((campaign, variant, channel, tier, day), ATTEMPTS, 1);
        }
        let contacted: Vec<&&Sent> = rows.iter().filter(|m| m.contacted).collect();
        if contacted.is_empty() {
            return Ok(());
        }
        // Contacted once: the channel is the one it went out on.
        let newly: Vec<(Uuid, String, i16, i16, i32, i64)> = sqlx::query_as(
            "UPDATE messages m SET contacted_at = x.at, cost_minor = x.cost, channel = x.channel, day = x.day \
             FROM UNNEST($1::uuid[], $2::timestamptz[], $3::bigint[], $4::smallint[], $5::int[]) AS x(id, at, cost, channel, day) \
             WHERE m.message_id = x.id AND m.contacted_at IS NULL \
             RETURNING m.campaign_id, m.variant, m.channel, m.tier, m.day, m.cost_minor",
        )
        .bind(contacted.iter().map(|m| m.message).collect::<Vec<_>>())
        .bind(contacted.iter().map(|m| m.at).collect::<Vec<_>>())
        .bind(contacted.iter().map(|m| m.cost).collect::<Vec<_>>())
        .bind(contacted.iter().map(|m| m.channel).collect::<Vec<_>>())
        .bind(contacted.iter().map(|m| day_of(m.at, self.tz)).collect::<Vec<_>>())
        .fetch_all(&mut *tx)
        .await?;
        for (campaign, variant, channel, tier, day, cost) in newly {
            let key = (campaign, variant, channel, tier, day);
            d.cell(key.clone(), CONTACTED, 1);
            d.cell(key, COST, cost);
        }
        Ok(())
    }

    async fn outcomes(&self, tx: &mut PgConnection, b: &Bulk, d: &mut Deltas) -> Result<(), HandlerError> {
        if b.outcomes.is_empty() {
            return Ok(());
        }
        // An outcome before its MessageSent (another replica's batch) still counts.
        sqlx::query(
            "INSERT INTO messages (message_id, campaign_id, customer_id, variant, channel, tier) \
             SELECT x.id, x.campaign, x.customer, x.variant, x.channel, COALESCE(m.tier, 0) \
             FROM UNNEST($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::smallint[]) AS x(id, campaign, customer, variant, channel) \
             LEFT JOIN campaign_members m ON m.campaign_id = x.campaign AND m.customer_id = x.customer ON CONFLICT DO NOTHING",
        )
        .bind(b.outcomes.iter().map(|o| o.message).collect::<Vec<_>>())
        .bind(b.outcomes.iter().map(|o| o.campaign).collect::<Vec<_>>())
        .bind(b.outcomes.iter().map(|o| o.customer).collect::<Vec<_>>())
        .bind(b.outcomes.iter().map(|o| o.variant.clone()).collect::<Vec<_>>())
        .bind(b.outcomes.iter().map(|o| o.channel).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
        for (kind, column, index) in [
            (out::OutcomeKind::Delivered, "delivered_at", DELIVERED),
            (out::OutcomeKind::Responded, "responded_at", RESPONDED),
            (out::OutcomeKind::Converted, "converted_at", CONVERTED),
        ] {
            let mut seen = BTreeSet::new();
            let rows: Vec<&Outcome> =
                b.outcomes.iter().filter(|o| o.kind == kind as i32 && seen.insert(o.message)).collect();
            if rows.is_empty() {
                continue;
            }
            // OUT-8: revenue counts when outreach attributed it (within its window).
            let newly: Vec<OutcomeHit> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE messages m SET {column} = x.at, revenue_minor = m.revenue_minor + x.revenue \
                 FROM UNNEST($1::uuid[], $2::timestamptz[], $3::bigint[]) AS x(id, at, revenue) \
                 WHERE m.message_id = x.id AND m.{column} IS NULL \
                 RETURNING m.campaign_id, m.variant, m.channel, m.tier, m.day, x.revenue, x.at"
            )))
            .bind(rows.iter().map(|o| o.message).collect::<Vec<_>>())
            .bind(rows.iter().map(|o| o.at).collect::<Vec<_>>())
            .bind(rows.iter().map(|o| if o.attributed { o.revenue } else { 0 }).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
            for h in newly {
                let key = (h.campaign_id, h.variant, h.channel, h.tier, h.day.unwrap_or_else(|| day_of(h.at, self.tz)));
                d.cell(key.clone(), index, 1);
                if h.revenue != 0 {
                    d.cell(key, REVENUE, h.revenue);
                }
            }
        }
        Ok(())
    }

    async fn service(&self, tx: &mut PgConnection, b: &Bulk, d: &mut Deltas) -> Result<(), HandlerError> {
        let tz = self.tz;
        if !b.feedback.is_empty() {
            let fresh: Vec<(i16, i32)> = sqlx::query_as(
                "INSERT INTO feedback_items (feedback_id, customer_id, category, day) \
                 SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::smallint[], $4::int[]) ON CONFLICT DO NOTHING RETURNING category, day",
            )
            .bind(b.feedback.iter().map(|f| f.0).collect::<Vec<_>>())
            .bind(b.feedback.iter().map(|f| f.1).collect::<Vec<_>>())
            .bind(b.feedback.iter().map(|f| f.2).collect::<Vec<_>>())
            .bind(b.feedback.iter().map(|f| day_of(f.3, tz)).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
            for (category, day) in fresh {
                d.service(day, "feedback", category_name(category), 1, 0.0);
            }
        }
        if !b.opened.is_empty() {
            let fresh: Vec<(i16, bool, i32)> = sqlx::query_as(
                "INSERT INTO tickets (ticket_id, customer_id, category, repeat, day) \
                 SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::smallint[], $4::bool[], $5::int[]) ON CONFLICT DO NOTHING \
                 RETURNING category, repeat, day",
            )
            .bind(b.opened.iter().map(|t| t.0).collect::<Vec<_>>())
            .bind(b.opened.iter().map(|t| t.1).collect::<Vec<_>>())
            .bind(b.opened.iter().map(|t| t.2).collect::<Vec<_>>())
            .bind(b.opened.iter().map(|t| t.3).collect::<Vec<_>>())
            .bind(b.opened.iter().map(|t| day_of(t.4, tz)).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
            for (category, repeat, day) in fresh {
                d.service(day, "tickets", String::new(), 1, 0.0);
                if category == fb::Category::ServiceComplaint as i16 {
                    d.service(day, "complaints", String::new(), 1, 0.0);
                    if repeat {
                        d.service(day, "repeat_complaints", String::new(), 1, 0.0);
                    }
                }
            }
        }
        // Flags set once per ticket, counted on the day the ticket was opened.
        for (column, ids) in [
            ("breached", b.breached.clone()),
            ("verified", b.verified.iter().filter(|v| v.1).map(|v| v.0).collect::<Vec<_>>()),
        ] {
            if ids.is_empty() {
                continue;
            }
            let newly: Vec<i32> = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "UPDATE tickets SET {column} = true WHERE ticket_id = ANY($1) AND NOT {column} RETURNING day"
            )))
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
            for day in newly {
                d.service(day, column, String::new(), 1, 0.0);
            }
        }
        if !b.resolved.is_empty() {
            // The first resolution of a ticket counts, with its ANA-5 durations on the day it happened.
            let mut first: HashMap<Uuid, (i64, i64, DateTime<Utc>)> = HashMap::new();
            for (ticket, fr, res, at) in &b.resolved {
                first.entry(*ticket).or_insert((*fr, *res, *at));
            }
            let (ids, durations): (Vec<Uuid>, Vec<(i64, i64)>) = first.iter().map(|(id, r)| (*id, (r.0, r.1))).unzip();
            let newly: Vec<(Uuid, i32)> = sqlx::query_as(
                "UPDATE tickets t SET resolved = true, first_response_s = r.fr, resolution_s = r.res \
                 FROM UNNEST($1::uuid[], $2::bigint[], $3::bigint[]) AS r(id, fr, res) \
                 WHERE t.ticket_id = r.id AND NOT t.resolved RETURNING t.ticket_id, t.day",
            )
            .bind(&ids)
            .bind(durations.iter().map(|r| r.0).collect::<Vec<_>>())
            .bind(durations.iter().map(|r| r.1).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
            for (ticket, day) in newly {
                d.service(day, "resolved", String::new(), 1, 0.0);
                if let Some((fr, res, at)) = first.get(&ticket) {
                    let rday = day_of(*at, tz);
                    d.service(rday, "first_response_hist", kpi::bucket_of(*fr).to_string(), 1, *fr as f64);
                    d.service(rday, "resolution_hist", kpi::bucket_of(*res).to_string(), 1, *res as f64);
                }
            }
        }
        let rejected = b.verified.iter().filter(|v| !v.1).count();
        if rejected > 0 {
            let days: Vec<i32> = sqlx::query_scalar("SELECT day FROM tickets WHERE ticket_id = ANY($1)")
                .bind(b.verified.iter().filter(|v| !v.1).map(|v| v.0).collect::<Vec<_>>())
                .fetch_all(&mut *tx)
                .await?;
            for day in days {
                d.service(day, "reopened", String::new(), 1, 0.0);
            }
        }
        if !b.surveys.is_empty() {
            let fresh: Vec<(i16, i16, i32)> = sqlx::query_as(
                "INSERT INTO surveys (survey_response_id, customer_id, kind, score, day) \
                 SELECT * FROM UNNEST($1::uuid[], $2::uuid[], $3::smallint[], $4::smallint[], $5::int[]) ON CONFLICT DO NOTHING \
                 RETURNING kind, score, day",
            )
            .bind(b.surveys.iter().map(|s| s.0).collect::<Vec<_>>())
            .bind(b.surveys.iter().map(|s| s.1).collect::<Vec<_>>())
            .bind(b.surveys.iter().map(|s| s.2).collect::<Vec<_>>())
            .bind(b.surveys.iter().map(|s| s.3).collect::<Vec<_>>())
            .bind(b.surveys.iter().map(|s| day_of(s.4, tz)).collect::<Vec<_>>())
            .fetch_all(&mut *tx)
            .await?;
            for (kind, score, day) in fresh {
                if kind == fb::SurveyKind::Nps as i16 {
                    d.service(day, "nps", kpi::nps_group(i32::from(score)).to_string(), 1, f64::from(score));
                } else if kind == fb::SurveyKind::Csat as i16 {
                    d.service(day, "csat", String::new(), 1, f64::from(score));
                }
            }
        }
        Ok(())
    }

    async fn structural(&self, tx: &mut PgConnection, s: Structural) -> Result<(), HandlerError> {
        let mut d = Deltas::default();
        match s {
            Structural::Merged(survivor, loser) => {
                sqlx::query(
                    "INSERT INTO customers (customer_id) SELECT id FROM UNNEST(ARRAY[$1, $2]::uuid[]) AS t(id) \
                     WHERE NOT EXISTS (SELECT 1 FROM customers c WHERE c.customer_id = t.id) ON CONFLICT DO NOTHING",
                )
                .bind(survivor)
                .bind(loser)
                .execute(&mut *tx)
                .await?;
                sqlx::query("UPDATE customers SET merged_into = $1 WHERE customer_id = $2")
                    .bind(survivor)
                    .bind(loser)
                    .execute(&mut *tx)
                    .await?;
                for table in ["purchases", "interactions"] {
                    sqlx::query(sqlx::AssertSqlSafe(format!(
                        "UPDATE {table} SET customer_id = $1 WHERE customer_id = $2"
                    )))
                    .bind(survivor)
                    .bind(loser)
                    .execute(&mut *tx)
                    .await?;
                }
                self.recompute(tx, &[survivor, loser], &mut d).await?;
            }
            Structural::Unmerged(survivor, restored, transactions, interactions) => {
                sqlx::query("UPDATE customers SET merged_into = NULL WHERE customer_id = $1")
                    .bind(restored)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE purchases SET customer_id = $1 WHERE transaction_id = ANY($2)")
                    .bind(restored)
                    .bind(&transactions)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE interactions SET customer_id = $1 WHERE interaction_id = ANY($2)")
                    .bind(restored)
                    .bind(&interactions)
                    .execute(&mut *tx)
                    .await?;
                self.recompute(tx, &[survivor, restored], &mut d).await?;
            }
            Structural::Erased(ids, customer, request_id) => {
                crm_kit::idempotency::forget_customers(tx, &ids).await?;
                // PRF-8: the id is replaced by a random one everywhere; the facts
                // (and so every aggregate) stay, with no way back to the person.
                for id in ids {
                    let anonymous = Uuid::new_v4();
                    for table in [
                        "purchases",
                        "interactions",
                        "segment_members",
                        "tier_moves",
                        "campaign_members",
                        "programme_members",
                        "messages",
                        "feedback_items",
                        "tickets",
                        "surveys",
                    ] {
                        sqlx::query(sqlx::AssertSqlSafe(format!(
                            "UPDATE {table} SET customer_id = $1 WHERE customer_id = $2"
                        )))
                        .bind(anonymous)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    }
                    sqlx::query("UPDATE customers SET customer_id = $1, registered_at = NULL WHERE customer_id = $2")
                        .bind(anonymous)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                    sqlx::query("UPDATE customers SET merged_into = $1 WHERE merged_into = $2")
                        .bind(anonymous)
                        .bind(id)
                        .execute(&mut *tx)
                        .await?;
                }
                crm_kit::consumer::confirm_erasure(tx, SERVICE, &customer, &request_id).await?;
            }
        }
        write_deltas(tx, d).await
    }

    /// Recomputes customers' facts from their whole purchase history.
    async fn recompute(&self, tx: &mut PgConnection, customers: &[Uuid], d: &mut Deltas) -> Result<(), HandlerError> {
        let history: Vec<(Uuid, DateTime<Utc>, i64, bool)> = sqlx::query_as(
            "SELECT customer_id, occurred_at, amount_minor, refund FROM purchases WHERE customer_id = ANY($1)",
        )
        .bind(customers)
        .fetch_all(&mut *tx)
        .await?;
        let bought: Vec<(Uuid, DateTime<Utc>)> =
            history.iter().filter(|p| !p.3).map(|(c, at, _, _)| (*c, *at)).collect();
        crate::bits::resync(tx, customers, &bought, self.tz).await?;
        let mut by: BTreeMap<Uuid, Vec<Purchase>> = BTreeMap::new();
        for (c, at, amount, refund) in history {
            by.entry(c).or_default().push(Purchase { at, amount, refund });
        }
        let set: BTreeSet<Uuid> = customers.iter().copied().collect();
        let tz = self.tz;
        self.update_facts(tx, &set, d, |id, f| {
            Facts::from_history(by.get(id).map(Vec::as_slice).unwrap_or(&[]), f.tier, f.grid, tz)
        })
        .await
    }
}

/// The contract's name of a category code, e.g. "CATEGORY_SERVICE_COMPLAINT".
pub fn category_name(code: i16) -> String {
    fb::Category::try_from(i32::from(code)).unwrap_or(fb::Category::Unspecified).as_str_name().to_string()
}

/// The live id each of `ids` stands for, following merges (PRF-3).
async fn live_ids(tx: &mut PgConnection, ids: &[Uuid]) -> Result<HashMap<Uuid, Uuid>, HandlerError> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(
        "WITH RECURSIVE chain(id, cur, depth) AS ( \
             SELECT c.customer_id, c.merged_into, 1 FROM customers c WHERE c.customer_id = ANY($1) AND c.merged_into IS NOT NULL \
             UNION ALL SELECT chain.id, c.merged_into, chain.depth + 1 FROM chain JOIN customers c ON c.customer_id = chain.cur \
             WHERE c.merged_into IS NOT NULL AND chain.depth < 32) \
         SELECT DISTINCT ON (id) id, cur FROM chain ORDER BY id, depth DESC",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows.into_iter().collect())
}

#[derive(sqlx::FromRow)]
struct FactsRow {
    customer_id: Uuid,
    first_purchase_at: Option<DateTime<Utc>>,
    second_purchase_at: Option<DateTime<Utc>>,
    last_purchase_at: Option<DateTime<Utc>>,
    orders: i64,
    revenue_minor: i64,
    months: sqlx::types::Json<Vec<(i32, i64, i64)>>,
    tier: i16,
    grid_cell: i16,
}

async fn load_facts(tx: &mut PgConnection, ids: &[Uuid]) -> Result<HashMap<Uuid, Facts>, HandlerError> {
    let rows: Vec<FactsRow> = sqlx::query_as(
        "SELECT customer_id, first_purchase_at, second_purchase_at, last_purchase_at, orders, revenue_minor, months, tier, grid_cell \
         FROM customers WHERE customer_id = ANY($1) ORDER BY customer_id FOR UPDATE",
    )
    .bind(ids)
    .fetch_all(&mut *tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let f = Facts {
                first_purchase: r.first_purchase_at,
                second_purchase: r.second_purchase_at,
                last_purchase: r.last_purchase_at,
                orders: r.orders,
                revenue: r.revenue_minor,
                months: r.months.0.into_iter().map(|(m, o, v)| (m, (o, v))).collect(),
                tier: r.tier,
                grid: r.grid_cell,
            };
            (r.customer_id, f)
        })
        .collect())
}

async fn store_facts(tx: &mut PgConnection, rows: &[(Uuid, Facts)]) -> Result<(), HandlerError> {
    if rows.is_empty() {
        return Ok(());
    }
    let months: Vec<sqlx::types::Json<Vec<(i32, i64, i64)>>> = rows
        .iter()
        .map(|(_, f)| sqlx::types::Json(f.months.iter().map(|(m, (o, v))| (*m, *o, *v)).collect()))
        .collect();
    sqlx::query(
        "UPDATE customers c SET first_purchase_at = x.f, second_purchase_at = x.s, last_purchase_at = x.l, orders = x.o, \
         revenue_minor = x.r, months = x.m, tier = x.t, grid_cell = x.g \
         FROM UNNEST($1::uuid[], $2::timestamptz[], $3::timestamptz[], $4::timestamptz[], $5::bigint[], $6::bigint[], $7::jsonb[], \
                     $8::smallint[], $9::smallint[]) AS x(id, f, s, l, o, r, m, t, g) WHERE c.customer_id = x.id",
    )
    .bind(rows.iter().map(|r| r.0).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.first_purchase).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.second_purchase).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.last_purchase).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.orders).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.revenue).collect::<Vec<_>>())
    .bind(&months)
    .bind(rows.iter().map(|r| r.1.tier).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.1.grid).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?;
    Ok(())
}

async fn write_deltas(tx: &mut PgConnection, d: Deltas) -> Result<(), HandlerError> {
    if !d.rollups.is_empty() {
        let cells: Vec<(&Cell, &Amounts)> = d.rollups.iter().collect();
        sqlx::query(
            "INSERT INTO rollups (rollup, k1, k2, tag, n, amount) \
             SELECT * FROM UNNEST($1::text[], $2::int[], $3::int[], $4::text[], $5::bigint[], $6::bigint[]) \
             ON CONFLICT (rollup, k1, k2, tag) DO UPDATE SET n = rollups.n + EXCLUDED.n, amount = rollups.amount + EXCLUDED.amount",
        )
        .bind(cells.iter().map(|(c, _)| c.rollup).collect::<Vec<_>>())
        .bind(cells.iter().map(|(c, _)| c.k1).collect::<Vec<_>>())
        .bind(cells.iter().map(|(c, _)| c.k2).collect::<Vec<_>>())
        .bind(cells.iter().map(|(c, _)| c.tag).collect::<Vec<_>>())
        .bind(cells.iter().map(|(_, v)| v.0).collect::<Vec<_>>())
        .bind(cells.iter().map(|(_, v)| v.1).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    if !d.cells.is_empty() {
        let cells: Vec<_> = d.cells.iter().collect();
        let col = |i: usize| cells.iter().map(|(_, v)| v[i]).collect::<Vec<i64>>();
        sqlx::query(
            "INSERT INTO campaign_cells (campaign_id, variant, channel, tier, day, targeted, contacted, delivered, responded, converted, cost_minor, revenue_minor, attempts) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::smallint[], $4::smallint[], $5::int[], $6::bigint[], $7::bigint[], $8::bigint[], \
                                  $9::bigint[], $10::bigint[], $11::bigint[], $12::bigint[], $13::bigint[]) \
             ON CONFLICT (campaign_id, variant, channel, tier, day) DO UPDATE SET targeted = campaign_cells.targeted + EXCLUDED.targeted, \
             contacted = campaign_cells.contacted + EXCLUDED.contacted, delivered = campaign_cells.delivered + EXCLUDED.delivered, \
             responded = campaign_cells.responded + EXCLUDED.responded, converted = campaign_cells.converted + EXCLUDED.converted, \
             cost_minor = campaign_cells.cost_minor + EXCLUDED.cost_minor, revenue_minor = campaign_cells.revenue_minor + EXCLUDED.revenue_minor, \
             attempts = campaign_cells.attempts + EXCLUDED.attempts",
        )
        .bind(cells.iter().map(|(k, _)| k.0).collect::<Vec<_>>())
        .bind(cells.iter().map(|(k, _)| k.1.clone()).collect::<Vec<_>>())
        .bind(cells.iter().map(|(k, _)| k.2).collect::<Vec<_>>())
        .bind(cells.iter().map(|(k, _)| k.3).collect::<Vec<_>>())
        .bind(cells.iter().map(|(k, _)| k.4).collect::<Vec<_>>())
        .bind(col(TARGETED))
        .bind(col(CONTACTED))
        .bind(col(DELIVERED))
        .bind(col(RESPONDED))
        .bind(col(CONVERTED))
        .bind(col(COST))
        .bind(col(REVENUE))
        .bind(col(ATTEMPTS))
        .execute(&mut *tx)
        .await?;
    }
    if !d.lift.is_empty() {
        let rows: Vec<_> = d.lift.iter().collect();
        let col = |i: usize| rows.iter().map(|(_, v)| v[i]).collect::<Vec<i64>>();
        sqlx::query(
            "INSERT INTO lift_groups (campaign_id, grp, members, converted, responded, revenue_minor) \
             SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::bigint[], $5::bigint[], $6::bigint[]) \
             ON CONFLICT (campaign_id, grp) DO UPDATE SET members = lift_groups.members + EXCLUDED.members, \
             converted = lift_groups.converted + EXCLUDED.converted, responded = lift_groups.responded + EXCLUDED.responded, \
             revenue_minor = lift_groups.revenue_minor + EXCLUDED.revenue_minor",
        )
        .bind(rows.iter().map(|(k, _)| k.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|(k, _)| k.1.clone()).collect::<Vec<_>>())
        .bind(col(0))
        .bind(col(1))
        .bind(col(2))
        .bind(col(3))
        .execute(&mut *tx)
        .await?;
    }
    if !d.service.is_empty() {
        let rows: Vec<_> = d.service.iter().collect();
        sqlx::query(
            "INSERT INTO service_daily (day, metric, key, n, total) \
             SELECT * FROM UNNEST($1::int[], $2::text[], $3::text[], $4::bigint[], $5::float8[]) \
             ON CONFLICT (day, metric, key) DO UPDATE SET n = service_daily.n + EXCLUDED.n, total = service_daily.total + EXCLUDED.total",
        )
        .bind(rows.iter().map(|(k, _)| k.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|(k, _)| k.1).collect::<Vec<_>>())
        .bind(rows.iter().map(|(k, _)| k.2.clone()).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, v)| v.0).collect::<Vec<_>>())
        .bind(rows.iter().map(|(_, v)| v.1).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}
