//! OUT-3 campaign execution, set-based: launching materialises the audience
//! (segments plus filters) into assignments and queued messages in one
//! transaction; the dispatcher then applies the contact policy to each.
//!
//! The SQL bucket is the domain's ([`crate::domain::campaign::bucket`]):
//! the first four bytes of SHA-256 over the campaign and customer ids, mod
//! 10 000, so a customer lands in the same group on every replica and rerun.

use chrono::{DateTime, Duration, Utc};
use crm_kit::{ApiError, outbox};
use crm_proto::outreach::v1 as pb;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::SERVICE;
use crate::messages::state;

/// How long a campaign message may wait (deferrals) before it is dropped as EXPIRED.
pub const MESSAGE_LIFETIME_DAYS: i64 = 7;

/// SQL for the bucket of customer `c.customer_id` in campaign `$1`.
const BUCKET: &str = "(('x' || encode(substring(sha256(uuid_send($1::uuid) || uuid_send(c.customer_id)) from 1 for 4), 'hex'))::bit(32)::bigint % 10000)";

/// The audience of a campaign spec: live, not erased customers in any of
/// the segments, with every tag, in one of the tiers. Binds $2 segments,
/// $3 tiers (empty: all), $4 tags.
const AUDIENCE: &str = "FROM customers c WHERE c.merged_into IS NULL AND c.erased_at IS NULL \
     AND EXISTS (SELECT 1 FROM segment_members m WHERE m.customer_id = c.customer_id AND m.segment_id = ANY($2)) \
     AND (cardinality($3::smallint[]) = 0 OR c.tier = ANY($3)) AND c.tags @> $4::text[]";

/// Segments, tiers and tags of a campaign's audience.
type Filters = (Vec<Uuid>, Vec<i16>, Vec<String>);

fn filters(spec: &pb::Campaign) -> Result<Filters, ApiError> {
    let segments = spec
        .segment_ids
        .iter()
        .map(|s| Uuid::parse_str(s).map_err(|_| ApiError::internal("stored campaign has a bad segment id")))
        .collect::<Result<_, _>>()?;
    Ok((segments, spec.tier_filter.iter().map(|t| *t as i16).collect(), spec.tag_filter.clone()))
}

/// Variant names and the lower edge (0..10 000) of each one's share.
fn variant_edges(spec: &pb::Campaign) -> (Vec<String>, Vec<i64>) {
    let mut edge = 0i64;
    let mut names = Vec::new();
    let mut lower = Vec::new();
    for v in &spec.variants {
        names.push(v.name.clone());
        lower.push(edge);
        edge += v.traffic_percent as i64 * 100;
    }
    (names, lower)
}

/// The bind values of [`grouped_audience`] ($1..$8), parsed from a campaign.
struct Audience {
    segments: Vec<Uuid>,
    tiers: Vec<i16>,
    tags: Vec<String>,
    holdout: i64,
    control: i64,
    names: Vec<String>,
    edges: Vec<i64>,
}

impl Audience {
    fn of(spec: &pb::Campaign, control_percent: i32) -> Result<Self, ApiError> {
        let (segments, tiers, tags) = filters(spec)?;
        let (names, edges) = variant_edges(spec);
        let (holdout, control) = (spec.holdout_percent as i64 * 100, control_percent as i64 * 100);
        Ok(Self { segments, tiers, tags, holdout, control, names, edges })
    }

    /// Binds $1 (the campaign) to $8.
    fn bind<'q, O>(
        &'q self,
        campaign: Uuid,
        q: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        q.bind(campaign)
            .bind(&self.segments)
            .bind(&self.tiers)
            .bind(&self.tags)
            .bind(self.holdout)
            .bind(self.control)
            .bind(&self.names)
            .bind(&self.edges)
    }
}

/// SQL of the audience with each member's group, as a derived table
/// `a(customer_id, tier, open_complaints, g)`: $5 holdout buckets, $6 control
/// buckets, $7 variant names, $8 their lower edges. Each bucket is computed once.
fn grouped_audience() -> String {
    grouped_audience_from("")
}

/// [`grouped_audience`] restricted by `more` (SQL appended to the audience's WHERE).
fn grouped_audience_from(more: &str) -> String {
    format!(
        "(SELECT customer_id, tier, open_complaints, \
           CASE WHEN cb < $6 THEN 'global_control' WHEN b < $5 THEN 'holdout' \
                ELSE ($7::text[])[width_bucket((b - $5) * 10000 / GREATEST(10000 - $5, 1), $8::bigint[])] END AS g \
         FROM (SELECT c.customer_id, c.tier, c.open_complaints, {BUCKET} AS b, c.control_bucket AS cb {AUDIENCE} {more}) c) a"
    )
}

/// A campaign's preview (OUT-3): audience, holdout and variant sizes, the
/// customers the policy would suppress as far as is known now (no consent,
/// an opt-out, an open complaint, the global control group), and the cost
/// of the rest on their planned channels.
pub async fn preview(
    conn: &mut PgConnection,
    id: Uuid,
    spec: &pb::Campaign,
    control_percent: i32,
) -> Result<pb::PreviewCampaignResponse, ApiError> {
    let plan = Plan::of(spec);
    let sql = format!(
        "WITH a AS (SELECT * FROM {}),          x AS (SELECT a.*, (SELECT p.ch FROM UNNEST($9::text[], $10::smallint[], $11::smallint[]) AS p(v, t, ch)                             WHERE p.v = a.g AND (p.t = a.tier OR p.t = 0) ORDER BY p.t DESC LIMIT 1) AS ch FROM a)          SELECT x.g, x.ch, count(*), count(*) FILTER (WHERE x.open_complaints > 0 OR NOT COALESCE(              (SELECT CASE WHEN $12 = 1 THEN k.granted ELSE k.granted AND (k.expires_at IS NULL OR k.expires_at > now()) END               FROM consents k WHERE k.customer_id = x.customer_id AND k.channel = x.ch AND k.purpose = $12), $12 = 1))          FROM x GROUP BY x.g, x.ch",
        grouped_audience()
    );
    let audience = Audience::of(spec, control_percent)?;
    let rows: Vec<(Option<String>, Option<i16>, i64, i64)> = audience
        .bind(id, sqlx::query_as(sqlx::AssertSqlSafe(sql)))
        .bind(&plan.variants)
        .bind(&plan.tiers)
        .bind(&plan.channels)
        .bind(purpose(spec))
        .fetch_all(&mut *conn)
        .await?;
    let channels = crate::settings::load_channels(conn).await?;
    let cost_of =
        |ch: i16| channels.iter().find(|(c, ..)| *c as i32 == ch as i32).map(|(_, cost, ..)| *cost).unwrap_or(0);
    let mut out = pb::PreviewCampaignResponse::default();
    let mut cost = 0i64;
    for (group, ch, n, suppressed) in rows {
        out.audience_size += n;
        match group.as_deref() {
            Some("holdout") => out.holdout_size += n,
            Some("global_control") => out.suppressed_estimate += n,
            Some(variant) => {
                *out.variant_sizes.entry(variant.to_string()).or_default() += n;
                out.suppressed_estimate += suppressed;
                cost += ch.map(cost_of).unwrap_or(0) * (n - suppressed);
            }
            None => {}
        }
    }
    out.cost_estimate = Some(crate::messages::cny(cost));
    Ok(out)
}

/// A campaign's channel plan as columns: (variant, tier, first channel,
/// its template); tier 0 is the variant's default plan.
struct Plan {
    variants: Vec<String>,
    tiers: Vec<i16>,
    channels: Vec<i16>,
    templates: Vec<Uuid>,
    /// The plan's further channels and templates, in order (OUT-3 "then").
    fallbacks: Vec<(Vec<i16>, Vec<Uuid>)>,
}

impl Plan {
    fn of(spec: &pb::Campaign) -> Self {
        let mut plan = Plan {
            variants: Vec::new(),
            tiers: Vec::new(),
            channels: Vec::new(),
            templates: Vec::new(),
            fallbacks: Vec::new(),
        };
        for v in &spec.variants {
            for p in &v.channel_plan {
                let steps: Vec<(i16, Uuid)> = p
                    .channels
                    .iter()
                    .filter_map(|ch| {
                        let name = crm_proto::common::v1::Channel::try_from(*ch).map(|c| c.as_str_name()).ok()?;
                        let template = p.template_ids.get(name).and_then(|t| Uuid::parse_str(t).ok())?;
                        Some((*ch as i16, template))
                    })
                    .collect();
                let Some((first, rest)) = steps.split_first() else { continue };
                plan.variants.push(v.name.clone());
                plan.tiers.push(p.tier as i16);
                plan.channels.push(first.0);
                plan.templates.push(first.1);
                plan.fallbacks.push(rest.iter().copied().unzip());
            }
        }
        plan
    }
}

fn purpose(spec: &pb::Campaign) -> i16 {
    if spec.purpose == 0 { crm_proto::common::v1::Purpose::Marketing as i16 } else { spec.purpose as i16 }
}

/// Customers per launch chunk: each chunk commits on its own, so the
/// dispatchers start on the first while later ones are still being written.
pub const LAUNCH_CHUNK: i64 = 20_000;

/// Launches a RUNNING campaign in one transaction (tests, small audiences);
/// the campaign clock uses [`launch_chunk`] with a commit per chunk.
pub async fn launch(
    tx: &mut PgConnection,
    id: Uuid,
    spec: &pb::Campaign,
    control_percent: i32,
    now: DateTime<Utc>,
) -> Result<i64, ApiError> {
    let mut after = Uuid::nil();
    let mut total = 0;
    loop {
        let (n, last) = launch_chunk(tx, id, spec, control_percent, now, after, LAUNCH_CHUNK).await?;
        total += n;
        match last {
            Some(last) if n == LAUNCH_CHUNK => after = last,
            _ => break,
        }
    }
    sqlx::query("UPDATE campaigns SET launched_at = $2 WHERE campaign_id = $1")
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    Ok(total)
}

/// Launches the next `limit` audience members after customer `after` (in id
/// order): assignments, CampaignAssignment events, queued messages for the
/// contacted groups and suppressed ones (rule HOLDOUT / GLOBAL_CONTROL) for
/// the others. Returns how many were assigned and the last customer id.
pub async fn launch_chunk(
    tx: &mut PgConnection,
    id: Uuid,
    spec: &pb::Campaign,
    control_percent: i32,
    now: DateTime<Utc>,
    after: Uuid,
    limit: i64,
) -> Result<(i64, Option<Uuid>), ApiError> {
    let sql = format!(
        "INSERT INTO campaign_assignments (campaign_id, customer_id, grp, tier, assigned_at) \
         SELECT $1, a.customer_id, a.g, a.tier, $9 FROM {} ON CONFLICT DO NOTHING RETURNING customer_id",
        grouped_audience_from("AND c.customer_id > $10 ORDER BY c.customer_id LIMIT $11")
    );
    let assigned: Vec<(Uuid,)> = Audience::of(spec, control_percent)?
        .bind(id, sqlx::query_as(sqlx::AssertSqlSafe(sql)))
        .bind(now)
        .bind(after)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
    let Some(last) = assigned.iter().map(|a| a.0).max() else { return Ok((0, None)) };
    let assigned = assigned.len() as i64;
    let plan = Plan::of(spec);
    let expires = now + Duration::days(MESSAGE_LIFETIME_DAYS);
    let purpose = purpose(spec);
    // One statement per plan row: a tier's own plan, or the variant's default
    // (tier 0) for the tiers without one.
    for i in 0..plan.variants.len() {
        let own_plans: Vec<i16> = (0..plan.variants.len())
            .filter(|j| plan.variants[*j] == plan.variants[i] && plan.tiers[*j] != 0)
            .map(|j| plan.tiers[j])
            .collect();
        sqlx::query(
            "INSERT INTO messages (message_id, customer_id, channel, template_id, campaign_id, variant, purpose, state, due_at, expires_at, locale, \
                                   fallback_channels, fallback_templates) \
             SELECT gen_random_uuid(), a.customer_id, $6, $7, $1, a.grp, $2, $3, $4, $5, '', $13, $14 FROM campaign_assignments a \
             WHERE a.campaign_id = $1 AND a.customer_id > $11 AND a.customer_id <= $12 AND a.grp = $8 \
             AND CASE WHEN $9 = 0 THEN NOT (a.tier = ANY($10)) ELSE a.tier = $9 END",
        )
        .bind(id)
        .bind(purpose)
        .bind(state::QUEUED)
        .bind(now)
        .bind(expires)
        .bind(plan.channels[i])
        .bind(plan.templates[i])
        .bind(&plan.variants[i])
        .bind(plan.tiers[i])
        .bind(&own_plans)
        .bind(after)
        .bind(last)
        .bind(&plan.fallbacks[i].0)
        .bind(&plan.fallbacks[i].1)
        .execute(&mut *tx)
        .await?;
    }
    // Held-out customers are recorded but never contacted (OUT-3).
    let first_template = plan.templates.first().copied().unwrap_or_default();
    let first_channel = plan.channels.first().copied().unwrap_or_default();
    sqlx::query(
        "INSERT INTO messages (message_id, customer_id, channel, template_id, campaign_id, variant, purpose, state, due_at, expires_at, \
                               rule, detail, decided_at) \
         SELECT gen_random_uuid(), a.customer_id, $6, $7, $1, a.grp, $2, $3, $4, $4, upper(a.grp), \
                CASE a.grp WHEN 'holdout' THEN 'in the campaign holdout: recorded, not contacted' \
                           ELSE 'in the global control group: no marketing contact' END, $4 \
         FROM campaign_assignments a WHERE a.campaign_id = $1 AND a.customer_id > $8 AND a.customer_id <= $9 \
         AND a.grp IN ('holdout', 'global_control')",
    )
    .bind(id)
    .bind(purpose)
    .bind(state::SUPPRESSED)
    .bind(now)
    .bind(expires)
    .bind(first_channel)
    .bind(first_template)
    .bind(after)
    .bind(last)
    .execute(&mut *tx)
    .await?;
    // CampaignAssignment events (analytics computes lift from them).
    let rows: Vec<(Uuid, String, i16)> = sqlx::query_as(
        "SELECT customer_id, grp, tier FROM campaign_assignments WHERE campaign_id = $1 AND customer_id > $2 AND customer_id <= $3",
    )
    .bind(id)
    .bind(after)
    .bind(last)
    .fetch_all(&mut *tx)
    .await?;
    let events: Vec<(String, pb::CampaignAssignment)> = rows
        .into_iter()
        .map(|(c, grp, tier)| {
            let e = pb::CampaignAssignment {
                campaign_id: id.to_string(),
                customer_id: c.to_string(),
                group: grp,
                tier: tier as i32,
                assign_time: Some(crate::messages::ts(now)),
            };
            (c.to_string(), e)
        })
        .collect();
    outbox::enqueue_many(tx, SERVICE, "customer", "", &events).await?;
    Ok((assigned, Some(last)))
}
