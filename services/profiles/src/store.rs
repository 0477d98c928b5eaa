//! Profiles' SQL: customers, identities, transactions, interactions,
//! consent, timeline, audit and erasure. Nothing here decides business rules.

use chrono::{DateTime, Utc};
use crm_proto::common::v1::{Date, Money};
use crm_proto::profiles::v1::{
    AccessAuditEntry, Address, ConsentChange, ConsentGrant, Customer, ExternalId, Interaction, Organization,
    TimelineEntry, Transaction,
};
use prost::Message;
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// A customer row as stored.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The record, unmasked, with output fields filled (except `masked`).
    pub customer: Customer,
    /// Optimistic-concurrency version.
    pub version: i64,
    /// Set when this id was merged away.
    pub merged_into: Option<Uuid>,
}

const COLUMNS: &str = "customer_id, kind, name, phone, email, birth_year, birth_month, birth_day, gender, region, timezone, \
     preferred_channel, registered_at, address, tags, attributes, organization, tier, merged_into, erased_at, version, \
     created_at, updated_at";

pub fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// A protobuf timestamp as a time, `None` when it is not a valid one.
pub fn from_ts(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return None;
    }
    DateTime::from_timestamp(t.seconds, t.nanos as u32)
}

/// Attributes are stored as an encoded `Customer` holding only them.
fn encode_attributes(c: &Customer) -> Vec<u8> {
    Customer { attributes: c.attributes.clone(), ..Default::default() }.encode_to_vec()
}

fn row_to_stored(row: &PgRow) -> Result<Stored, sqlx::Error> {
    let id: Uuid = row.try_get("customer_id")?;
    let birth: (Option<i16>, Option<i16>, Option<i16>) =
        (row.try_get("birth_year")?, row.try_get("birth_month")?, row.try_get("birth_day")?);
    let address: Option<Vec<u8>> = row.try_get("address")?;
    let attributes: Vec<u8> = row.try_get("attributes")?;
    let organization: Option<Vec<u8>> = row.try_get("organization")?;
    let version: i64 = row.try_get("version")?;
    let erased_at: Option<DateTime<Utc>> = row.try_get("erased_at")?;
    let customer = Customer {
        customer_id: id.to_string(),
        kind: row.try_get::<i16, _>("kind")? as i32,
        name: row.try_get("name")?,
        phone: row.try_get::<Option<String>, _>("phone")?.unwrap_or_default(),
        email: row.try_get::<Option<String>, _>("email")?.unwrap_or_default(),
        birthday: match birth {
            (y, Some(m), Some(d)) => Some(Date { year: y.unwrap_or(0) as i32, month: m as i32, day: d as i32 }),
            _ => None,
        },
        gender: row.try_get::<i16, _>("gender")? as i32,
        region: row.try_get("region")?,
        timezone: row.try_get("timezone")?,
        preferred_channel: row.try_get::<i16, _>("preferred_channel")? as i32,
        registered_at: Some(ts(row.try_get("registered_at")?)),
        address: address.and_then(|b| Address::decode(b.as_slice()).ok()),
        external_ids: Vec::new(),
        tags: row.try_get("tags")?,
        attributes: Customer::decode(attributes.as_slice()).map(|c| c.attributes).unwrap_or_default(),
        organization: organization.and_then(|b| Organization::decode(b.as_slice()).ok()),
        tier: row.try_get::<i16, _>("tier")? as i32,
        completeness: 0,
        alias_ids: Vec::new(),
        masked: false,
        erased: erased_at.is_some(),
        create_time: Some(ts(row.try_get("created_at")?)),
        update_time: Some(ts(row.try_get("updated_at")?)),
        etag: etag(version),
    };
    Ok(Stored { customer, version, merged_into: row.try_get("merged_into")? })
}

/// The etag of a version.
pub fn etag(version: i64) -> String {
    format!("v{version}")
}

/// Loads one row by id (alias rows included), with external ids and aliases,
/// in one round trip.
pub async fn load(conn: &mut PgConnection, id: Uuid) -> Result<Option<Stored>, sqlx::Error> {
    let sql = format!(
        "SELECT {COLUMNS}, \
           ARRAY(SELECT source || chr(31) || external_id FROM external_ids x WHERE x.customer_id = c.customer_id ORDER BY 1) AS ext, \
           ARRAY(SELECT a.customer_id FROM customers a WHERE a.merged_into = c.customer_id ORDER BY 1) AS aliases \
         FROM customers c WHERE customer_id = $1"
    );
    let Some(row) = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(id).fetch_optional(&mut *conn).await? else {
        return Ok(None);
    };
    let mut stored = row_to_stored(&row)?;
    let ext: Vec<String> = row.try_get("ext")?;
    stored.customer.external_ids = ext
        .iter()
        .filter_map(|e| e.split_once('\u{1f}'))
        .map(|(source, id)| ExternalId { source: source.to_string(), id: id.to_string() })
        .collect();
    let aliases: Vec<Uuid> = row.try_get("aliases")?;
    stored.customer.alias_ids = aliases.into_iter().map(|a| a.to_string()).collect();
    Ok(Some(stored))
}

/// Follows merges from `id` to the live record (PRF-3): an alias keeps resolving.
pub async fn resolve(conn: &mut PgConnection, id: Uuid) -> Result<Option<Uuid>, sqlx::Error> {
    crm_kit::db::live_customer(conn, id).await
}

/// The lock every identity change holds: shared by single creates and
/// updates, exclusive for a bulk import chunk (which would otherwise need
/// thousands of per-key locks from PostgreSQL's shared lock table).
const IDENTITY_LOCK: &str = "profiles:identity";

/// Serialises creates that share an identity (PRF-3): the identity lock
/// shared, then transaction-scoped advisory locks on each key, in a stable order.
pub async fn lock_identities(conn: &mut PgConnection, keys: &[String]) -> Result<(), sqlx::Error> {
    let mut keys = keys.to_vec();
    keys.sort();
    keys.dedup();
    sqlx::query("SELECT pg_advisory_xact_lock_shared(hashtextextended($1, 7))")
        .bind(IDENTITY_LOCK)
        .execute(&mut *conn)
        .await?;
    for k in keys {
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))")
            .bind(format!("profiles:identity:{k}"))
            .execute(&mut *conn)
            .await?;
    }
    Ok(())
}

/// The live customer holding one of these identities, with which matched.
/// A live holder comes first; else an alias (merged away) resolves to its
/// survivor (PRF-3).
pub async fn find_by_identity(
    conn: &mut PgConnection,
    phone: &str,
    email: &str,
    external_ids: &[ExternalId],
) -> Result<Option<(Uuid, &'static str)>, sqlx::Error> {
    for (sql, value, by) in [
        (
            "SELECT customer_id FROM customers WHERE phone = $1 ORDER BY (merged_into IS NULL) DESC LIMIT 1",
            phone,
            "phone",
        ),
        (
            "SELECT customer_id FROM customers WHERE email = $1 ORDER BY (merged_into IS NULL) DESC LIMIT 1",
            email,
            "email",
        ),
    ] {
        if value.is_empty() {
            continue;
        }
        if let Some(id) = sqlx::query_scalar::<_, Uuid>(sql).bind(value).fetch_optional(&mut *conn).await? {
            let live = resolve(conn, id).await?.unwrap_or(id);
            return Ok(Some((live, by)));
        }
    }
    for x in external_ids {
        if let Some(id) =
            sqlx::query_scalar::<_, Uuid>("SELECT customer_id FROM external_ids WHERE source = $1 AND external_id = $2")
                .bind(&x.source)
                .bind(&x.id)
                .fetch_optional(&mut *conn)
                .await?
        {
            let live = resolve(conn, id).await?.unwrap_or(id);
            return Ok(Some((live, "external_id")));
        }
    }
    Ok(None)
}

fn birth_parts(c: &Customer) -> (Option<i16>, Option<i16>, Option<i16>) {
    match &c.birthday {
        Some(d) => ((d.year != 0).then_some(d.year as i16), Some(d.month as i16), Some(d.day as i16)),
        None => (None, None, None),
    }
}

fn opt(s: &str) -> Option<&str> {
    (!s.is_empty()).then_some(s)
}

/// Inserts a new customer (already normalised) with its external ids.
pub async fn insert(conn: &mut PgConnection, id: Uuid, c: &Customer, now: DateTime<Utc>) -> Result<(), sqlx::Error> {
    let (by, bm, bd) = birth_parts(c);
    let registered = c.registered_at.as_ref().and_then(from_ts).unwrap_or(now);
    sqlx::query(
        "INSERT INTO customers (customer_id, kind, name, phone, email, birth_year, birth_month, birth_day, gender, region, \
         timezone, preferred_channel, registered_at, address, tags, attributes, organization, created_at, updated_at) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$17,$18,$18)",
    )
    .bind(id)
    .bind(c.kind as i16)
    .bind(&c.name)
    .bind(opt(&c.phone))
    .bind(opt(&c.email))
    .bind(by)
    .bind(bm)
    .bind(bd)
    .bind(c.gender as i16)
    .bind(&c.region)
    .bind(&c.timezone)
    .bind(c.preferred_channel as i16)
    .bind(registered)
    .bind(c.address.as_ref().map(|a| a.encode_to_vec()))
    .bind(&c.tags)
    .bind(encode_attributes(c))
    .bind(c.organization.as_ref().map(|o| o.encode_to_vec()))
    .bind(now)
    .execute(&mut *conn)
    .await?;
    add_external_ids(conn, id, &c.external_ids).await
}

/// Links external ids to a customer (ids already linked elsewhere stay there).
pub async fn add_external_ids(conn: &mut PgConnection, id: Uuid, ids: &[ExternalId]) -> Result<(), sqlx::Error> {
    for x in ids {
        sqlx::query(
            "INSERT INTO external_ids (source, external_id, customer_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
        )
        .bind(&x.source)
        .bind(&x.id)
        .bind(id)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Writes every field of `c` over the row if its version is still `expected`;
/// returns the new version, or `None` when the row changed meanwhile.
pub async fn update(
    conn: &mut PgConnection,
    id: Uuid,
    c: &Customer,
    expected: i64,
    now: DateTime<Utc>,
) -> Result<Option<i64>, sqlx::Error> {
    let (by, bm, bd) = birth_parts(c);
    let registered = c.registered_at.as_ref().and_then(from_ts);
    let version: Option<i64> = sqlx::query_scalar(
        "UPDATE customers SET kind=$3, name=$4, phone=$5, email=$6, birth_year=$7, birth_month=$8, birth_day=$9, gender=$10, \
         region=$11, timezone=$12, preferred_channel=$13, registered_at=COALESCE($14, registered_at), address=$15, tags=$16, \
         attributes=$17, organization=$18, version=version+1, updated_at=$19 \
         WHERE customer_id=$1 AND version=$2 AND merged_into IS NULL RETURNING version",
    )
    .bind(id)
    .bind(expected)
    .bind(c.kind as i16)
    .bind(&c.name)
    .bind(opt(&c.phone))
    .bind(opt(&c.email))
    .bind(by)
    .bind(bm)
    .bind(bd)
    .bind(c.gender as i16)
    .bind(&c.region)
    .bind(&c.timezone)
    .bind(c.preferred_channel as i16)
    .bind(registered)
    .bind(c.address.as_ref().map(|a| a.encode_to_vec()))
    .bind(&c.tags)
    .bind(encode_attributes(c))
    .bind(c.organization.as_ref().map(|o| o.encode_to_vec()))
    .bind(now)
    .fetch_optional(&mut *conn)
    .await?;
    if version.is_some() {
        sqlx::query("DELETE FROM external_ids WHERE customer_id = $1").bind(id).execute(&mut *conn).await?;
        add_external_ids(conn, id, &c.external_ids).await?;
    }
    Ok(version)
}

/// Filters of ListCustomers (PRF-6).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ListFilter {
    pub tags: Vec<String>,
    pub region: Option<String>,
    pub tier: Option<i16>,
    pub kind: Option<i16>,
    pub text_prefix: Option<String>,
    pub created: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    pub updated: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
}

/// A page of live customers ordered by (created_at, customer_id) after `after`.
pub async fn list(
    conn: &mut PgConnection,
    f: &ListFilter,
    after: Option<(DateTime<Utc>, Uuid)>,
    limit: usize,
) -> Result<Vec<Stored>, sqlx::Error> {
    // Every value is a bind parameter; the text prefix is escaped for LIKE.
    let prefix = f
        .text_prefix
        .as_ref()
        .map(|p| format!("{}%", p.to_lowercase().replace('\\', "\\\\").replace('%', "\\%").replace('_', "\\_")));
    let phone_prefix = f.text_prefix.as_ref().and_then(|p| {
        let digits: String = p.chars().filter(|c| c.is_ascii_digit()).collect();
        (!digits.is_empty()).then(|| format!("+%{digits}%"))
    });
    let sql = format!(
        "SELECT {COLUMNS} FROM customers WHERE merged_into IS NULL \
         AND ($1::text[] = '{{}}' OR tags @> $1) \
         AND ($2::text IS NULL OR region = $2) \
         AND ($3::smallint IS NULL OR tier = $3) \
         AND ($4::smallint IS NULL OR kind = $4) \
         AND ($5::text IS NULL OR lower(name) LIKE $5 OR email LIKE $5 OR ($6::text IS NOT NULL AND phone LIKE $6)) \
         AND ($7::timestamptz IS NULL OR created_at >= $7) AND ($8::timestamptz IS NULL OR created_at < $8) \
         AND ($9::timestamptz IS NULL OR updated_at >= $9) AND ($10::timestamptz IS NULL OR updated_at < $10) \
         AND ($11::timestamptz IS NULL OR (created_at, customer_id) > ($11, $12)) \
         ORDER BY created_at, customer_id LIMIT $13"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&f.tags)
        .bind(&f.region)
        .bind(f.tier)
        .bind(f.kind)
        .bind(&prefix)
        .bind(&phone_prefix)
        .bind(f.created.0)
        .bind(f.created.1)
        .bind(f.updated.0)
        .bind(f.updated.1)
        .bind(after.map(|a| a.0))
        .bind(after.map(|a| a.1))
        .bind(limit as i64)
        .fetch_all(&mut *conn)
        .await?;
    rows.iter().map(row_to_stored).collect()
}

/// Records transactions, skipping ids already present; returns the rows inserted.
pub async fn insert_transactions(
    conn: &mut PgConnection,
    rows: &[(Uuid, Transaction)],
) -> Result<Vec<String>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let mut ids = Vec::with_capacity(rows.len());
    let mut customers = Vec::with_capacity(rows.len());
    let mut kinds = Vec::with_capacity(rows.len());
    let mut amounts = Vec::with_capacity(rows.len());
    let mut currencies = Vec::with_capacity(rows.len());
    let mut times = Vec::with_capacity(rows.len());
    let mut products = Vec::with_capacity(rows.len());
    let mut categories = Vec::with_capacity(rows.len());
    let mut channels = Vec::with_capacity(rows.len());
    for (customer, t) in rows {
        let amount = t.amount.clone().unwrap_or_default();
        ids.push(t.transaction_id.clone());
        customers.push(*customer);
        kinds.push(t.kind as i16);
        amounts.push(amount.amount_minor);
        currencies.push(amount.currency);
        times.push(t.occurred_at.as_ref().and_then(from_ts).unwrap_or_else(Utc::now));
        products.push(t.product_id.clone());
        categories.push(t.category.clone());
        channels.push(t.channel as i16);
    }
    sqlx::query_scalar(
        "INSERT INTO transactions (transaction_id, customer_id, kind, amount_minor, currency, occurred_at, product_id, category, channel) \
         SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::smallint[], $4::bigint[], $5::text[], $6::timestamptz[], $7::text[], $8::text[], $9::smallint[]) \
         ON CONFLICT (transaction_id) DO NOTHING RETURNING transaction_id",
    )
    .bind(&ids)
    .bind(&customers)
    .bind(&kinds)
    .bind(&amounts)
    .bind(&currencies)
    .bind(&times)
    .bind(&products)
    .bind(&categories)
    .bind(&channels)
    .fetch_all(&mut *conn)
    .await
}

/// Records interactions, skipping ids already present; returns the rows inserted.
pub async fn insert_interactions(
    conn: &mut PgConnection,
    rows: &[(Uuid, Interaction)],
) -> Result<Vec<String>, sqlx::Error> {
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<String> = rows.iter().map(|r| r.1.interaction_id.clone()).collect();
    let customers: Vec<Uuid> = rows.iter().map(|r| r.0).collect();
    let kinds: Vec<i16> = rows.iter().map(|r| r.1.kind as i16).collect();
    let channels: Vec<i16> = rows.iter().map(|r| r.1.channel as i16).collect();
    let directions: Vec<i16> = rows.iter().map(|r| r.1.direction as i16).collect();
    let times: Vec<DateTime<Utc>> =
        rows.iter().map(|r| r.1.occurred_at.as_ref().and_then(from_ts).unwrap_or_else(Utc::now)).collect();
    let notes: Vec<String> = rows.iter().map(|r| r.1.note.clone()).collect();
    sqlx::query_scalar(
        "INSERT INTO interactions (interaction_id, customer_id, kind, channel, direction, occurred_at, note) \
         SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::smallint[], $4::smallint[], $5::smallint[], $6::timestamptz[], $7::text[]) \
         ON CONFLICT (interaction_id) DO NOTHING RETURNING interaction_id",
    )
    .bind(&ids)
    .bind(&customers)
    .bind(&kinds)
    .bind(&channels)
    .bind(&directions)
    .bind(&times)
    .bind(&notes)
    .fetch_all(&mut *conn)
    .await
}

/// For each of `ids` that is a customer: the live record it stands for
/// (following merges, at most 32 deep) and whether that one was erased.
pub async fn live_of(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, (Uuid, bool)>, sqlx::Error> {
    let rows: Vec<(Uuid, Uuid, bool)> = sqlx::query_as(
        "WITH RECURSIVE chain(asked, id, next, erased, depth) AS ( \
             SELECT customer_id, customer_id, merged_into, erased_at IS NOT NULL, 0 FROM customers WHERE customer_id = ANY($1) \
             UNION ALL SELECT chain.asked, c.customer_id, c.merged_into, c.erased_at IS NOT NULL, chain.depth + 1 \
             FROM customers c JOIN chain ON c.customer_id = chain.next WHERE chain.depth < 32) \
         SELECT asked, id, erased FROM chain WHERE next IS NULL",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows.into_iter().map(|(asked, id, erased)| (asked, (id, erased))).collect())
}

/// Current consent of several customers, as `(customer, grant)` pairs.
pub async fn consents_of(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<(Uuid, ConsentGrant)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT customer_id, channel, purpose, granted, source, updated_at, expires_at FROM consents \
         WHERE customer_id = ANY($1) ORDER BY customer_id, channel, purpose",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(|r| Ok((r.try_get("customer_id")?, grant_from_row(r)?))).collect()
}

/// SEC-4: the names a free text about each of `ids` may mention: the
/// record's own and, for an alias, its survivor's. Erased records have none.
pub async fn names_of(
    conn: &mut PgConnection,
    ids: &[Uuid],
) -> Result<std::collections::HashMap<Uuid, Vec<String>>, sqlx::Error> {
    let rows: Vec<(Uuid, String)> = sqlx::query_as(
        "SELECT c.customer_id, c.name FROM customers c WHERE c.customer_id = ANY($1) AND c.erased_at IS NULL \
         UNION ALL SELECT c.customer_id, s.name FROM customers c JOIN customers s ON s.customer_id = c.merged_into \
         WHERE c.customer_id = ANY($1) AND s.erased_at IS NULL",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut out: std::collections::HashMap<Uuid, Vec<String>> = std::collections::HashMap::new();
    for (id, name) in rows {
        out.entry(id).or_default().push(name);
    }
    Ok(out)
}

/// Which of these ids are live (not merged away, not erased) customers.
pub async fn live_ids(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT customer_id FROM customers WHERE customer_id = ANY($1) AND merged_into IS NULL AND erased_at IS NULL",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await
}

fn grant_from_row(row: &PgRow) -> Result<ConsentGrant, sqlx::Error> {
    let expires: Option<DateTime<Utc>> = row.try_get("expires_at")?;
    let granted: bool = row.try_get("granted")?;
    Ok(ConsentGrant {
        channel: row.try_get::<i16, _>("channel")? as i32,
        purpose: row.try_get::<i16, _>("purpose")? as i32,
        // PRF-7: an expired grant counts as no consent.
        granted: granted && expires.is_none_or(|e| e > Utc::now()),
        source: row.try_get("source")?,
        update_time: Some(ts(row.try_get("updated_at")?)),
        expire_time: expires.map(ts),
    })
}

/// Current consent of a customer.
pub async fn consents(conn: &mut PgConnection, id: Uuid) -> Result<Vec<ConsentGrant>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT channel, purpose, granted, source, updated_at, expires_at FROM consents WHERE customer_id = $1 ORDER BY channel, purpose",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter().map(grant_from_row).collect()
}

/// Sets one grant and appends it to the history. The grant's time never goes
/// back for a channel and purpose, whatever the replicas' clocks say: the
/// read models of other services order the changes by it (REL-6).
pub async fn set_consent(
    conn: &mut PgConnection,
    id: Uuid,
    g: &ConsentGrant,
    by: &str,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let expires = g.expire_time.as_ref().and_then(from_ts);
    let now: DateTime<Utc> = sqlx::query_scalar(
        "INSERT INTO consents (customer_id, channel, purpose, granted, source, updated_at, expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7) \
         ON CONFLICT (customer_id, channel, purpose) DO UPDATE SET granted=$4, source=$5, \
           updated_at=GREATEST($6, consents.updated_at + interval '1 microsecond'), expires_at=$7 \
         RETURNING updated_at",
    )
    .bind(id)
    .bind(g.channel as i16)
    .bind(g.purpose as i16)
    .bind(g.granted)
    .bind(&g.source)
    .bind(now)
    .bind(expires)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(
        "INSERT INTO consent_history (customer_id, channel, purpose, granted, source, changed_at, expires_at, changed_by) \
         VALUES ($1,$2,$3,$4,$5,$6,$7,$8)",
    )
    .bind(id)
    .bind(g.channel as i16)
    .bind(g.purpose as i16)
    .bind(g.granted)
    .bind(&g.source)
    .bind(now)
    .bind(expires)
    .bind(by)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Consent history, newest first, after history id `before` (exclusive).
pub async fn consent_history(
    conn: &mut PgConnection,
    id: Uuid,
    before: Option<i64>,
    limit: usize,
) -> Result<Vec<(i64, ConsentChange)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, channel, purpose, granted, source, changed_at AS updated_at, expires_at, changed_by FROM consent_history \
         WHERE customer_id = $1 AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
    )
    .bind(id)
    .bind(before)
    .bind(limit as i64)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let mut grant = grant_from_row(r)?;
            grant.granted = r.try_get("granted")?;
            Ok((r.try_get("id")?, ConsentChange { grant: Some(grant), changed_by: r.try_get("changed_by")? }))
        })
        .collect()
}

/// A timeline cursor: (occurred_at, kind, source id) of the last entry shown.
pub type TimelineCursor = (DateTime<Utc>, i32, String);

/// Timeline entries of `ids` (a customer and its aliases), newest first (PRF-5).
pub async fn timeline(
    conn: &mut PgConnection,
    ids: &[Uuid],
    kinds: &[i32],
    range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    after: Option<&TimelineCursor>,
    limit: usize,
) -> Result<Vec<TimelineEntry>, sqlx::Error> {
    let kinds16: Vec<i16> = kinds.iter().map(|k| *k as i16).collect();
    let rows = sqlx::query(
        "SELECT * FROM ( \
           SELECT 1::smallint AS kind, occurred_at, channel, \
                  CASE WHEN kind = 2 THEN 'Refund ' ELSE 'Purchase ' END || to_char(amount_minor / 100.0, 'FM999999999990.00') || ' ' || currency \
                  || CASE WHEN category <> '' THEN ' ' || category ELSE '' END AS summary, \
                  transaction_id AS source_id, 'profiles' AS source_service, amount_minor, currency::text AS currency \
             FROM transactions WHERE customer_id = ANY($1) \
           UNION ALL \
           SELECT 2::smallint, occurred_at, channel, 'Interaction ' || kind::text || CASE WHEN note <> '' THEN ': ' || left(note, 80) ELSE '' END, \
                  interaction_id, 'profiles', NULL::bigint, NULL::text FROM interactions WHERE customer_id = ANY($1) \
           UNION ALL \
           SELECT 5::smallint, changed_at, channel, CASE WHEN granted THEN 'Consent granted' ELSE 'Consent withdrawn' END \
                  || ' (purpose ' || purpose::text || ')', 'consent-' || id::text, 'profiles', NULL::bigint, NULL::text \
             FROM consent_history WHERE customer_id = ANY($1) \
           UNION ALL \
           SELECT kind, occurred_at, channel, summary, source_id, source_service, amount_minor, currency::text \
             FROM timeline_external WHERE customer_id = ANY($1) \
         ) t \
         WHERE (cardinality($2::smallint[]) = 0 OR kind = ANY($2)) \
           AND ($3::timestamptz IS NULL OR occurred_at >= $3) AND ($4::timestamptz IS NULL OR occurred_at < $4) \
           AND ($5::timestamptz IS NULL OR (occurred_at, kind, source_id) < ($5, $6::smallint, $7)) \
         ORDER BY occurred_at DESC, kind DESC, source_id DESC LIMIT $8",
    )
    .bind(ids)
    .bind(&kinds16)
    .bind(range.0)
    .bind(range.1)
    .bind(after.map(|a| a.0))
    .bind(after.map(|a| a.1 as i16))
    .bind(after.map(|a| a.2.clone()))
    .bind(limit as i64)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            let amount: Option<i64> = r.try_get("amount_minor")?;
            let currency: Option<String> = r.try_get("currency")?;
            Ok(TimelineEntry {
                kind: r.try_get::<i16, _>("kind")? as i32,
                occurred_at: Some(ts(r.try_get("occurred_at")?)),
                channel: r.try_get::<i16, _>("channel")? as i32,
                summary: r.try_get("summary")?,
                source_id: r.try_get("source_id")?,
                source_service: r.try_get("source_service")?,
                amount: amount.map(|a| Money { amount_minor: a, currency: currency.unwrap_or_default() }),
            })
        })
        .collect()
}

/// All ids whose rows belong to `id` (itself and its aliases).
pub async fn identity_set(conn: &mut PgConnection, id: Uuid) -> Result<Vec<Uuid>, sqlx::Error> {
    sqlx::query_scalar(
        "WITH RECURSIVE tree(id) AS (SELECT $1::uuid UNION SELECT c.customer_id FROM customers c JOIN tree ON c.merged_into = tree.id) \
         SELECT id FROM tree",
    )
    .bind(id)
    .fetch_all(&mut *conn)
    .await
}

/// Appends an unmasked read, or a search of personal fields, to the audit
/// (SEC-1, SEC-4); `customer` is `None` for a search that found nobody.
pub async fn audit(
    conn: &mut PgConnection,
    subject: &str,
    customer: Option<Uuid>,
    method: &str,
    purpose: &str,
    trace_id: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO access_audit (subject, customer_id, method, purpose, trace_id) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(subject)
    .bind(customer)
    .bind(method)
    // The audit is append-only and outlives an erasure: a phone or e-mail
    // written into a purpose is masked before it is kept (SEC-5).
    .bind(crm_kit::privacy::mask_text(purpose, &[]))
    .bind(trace_id)
    .execute(conn)
    .await?;
    Ok(())
}

/// Audit entries matching the filters, newest first, before id `before`.
pub async fn audit_entries(
    conn: &mut PgConnection,
    customer: Option<Uuid>,
    subject: Option<&str>,
    range: (Option<DateTime<Utc>>, Option<DateTime<Utc>>),
    before: Option<i64>,
    limit: usize,
) -> Result<Vec<(i64, AccessAuditEntry)>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, subject, access_time, customer_id, method, purpose, trace_id FROM access_audit \
         WHERE ($1::uuid IS NULL OR customer_id = $1) AND ($2::text IS NULL OR subject = $2) \
           AND ($3::timestamptz IS NULL OR access_time >= $3) AND ($4::timestamptz IS NULL OR access_time < $4) \
           AND ($5::bigint IS NULL OR id < $5) ORDER BY id DESC LIMIT $6",
    )
    .bind(customer)
    .bind(subject)
    .bind(range.0)
    .bind(range.1)
    .bind(before)
    .bind(limit as i64)
    .fetch_all(&mut *conn)
    .await?;
    rows.iter()
        .map(|r| {
            Ok((
                r.try_get("id")?,
                AccessAuditEntry {
                    subject: r.try_get("subject")?,
                    access_time: Some(ts(r.try_get("access_time")?)),
                    customer_id: r
                        .try_get::<Option<Uuid>, _>("customer_id")?
                        .map(|id| id.to_string())
                        .unwrap_or_default(),
                    method: r.try_get("method")?,
                    purpose: r.try_get("purpose")?,
                    trace_id: r.try_get("trace_id")?,
                },
            ))
        })
        .collect()
}

/// PRF-8: records the erasure request; false if the customer was erased already.
pub async fn record_erasure(conn: &mut PgConnection, id: Uuid, by: &str, reason: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "WITH ins AS (INSERT INTO erasures (customer_id, requested_by, reason) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING RETURNING 1) \
         SELECT count(*) = 1 FROM ins",
    )
    .bind(id)
    .bind(by)
    .bind(reason)
    .fetch_one(&mut *conn)
    .await
}

/// PRF-8, SEC-5: removes personal data of `ids` irreversibly; keeps the rows
/// (and aggregates without identity: transactions) so history stays
/// consistent. The merges they took part in keep who and when; their
/// snapshots of the records go (such a merge cannot be undone any more) and
/// their stated reasons lose the customers' `names`, phones and e-mails.
pub async fn erase(
    conn: &mut PgConnection,
    ids: &[Uuid],
    names: &[&str],
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let reasons: Vec<(Uuid, String, Option<String>)> = sqlx::query_as(
        "SELECT merge_id, reason, undo_reason FROM merges WHERE survivor_id = ANY($1) OR loser_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    for (merge, reason, undo) in reasons {
        sqlx::query(
            "UPDATE merges SET survivor_before = '', survivor_after = '', consent_before = '', reason = $2, undo_reason = $3 \
             WHERE merge_id = $1",
        )
        .bind(merge)
        .bind(crm_kit::privacy::scrub_text(&reason, names))
        .bind(undo.map(|u| crm_kit::privacy::scrub_text(&u, names)))
        .execute(&mut *conn)
        .await?;
    }
    sqlx::query(
        "UPDATE customers SET name = 'erased', phone = NULL, email = NULL, birth_year = NULL, birth_month = NULL, birth_day = NULL, \
         gender = 0, address = NULL, tags = '{}', attributes = '', organization = NULL, erased_at = COALESCE(erased_at, $2), \
         version = version + 1, updated_at = $2 WHERE customer_id = ANY($1)",
    )
    .bind(ids)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    sqlx::query("DELETE FROM external_ids WHERE customer_id = ANY($1)").bind(ids).execute(&mut *conn).await?;
    sqlx::query("UPDATE interactions SET note = '' WHERE customer_id = ANY($1)").bind(ids).execute(&mut *conn).await?;
    sqlx::query("UPDATE consent_history SET source = '' WHERE customer_id = ANY($1)")
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    sqlx::query("UPDATE timeline_external SET summary = 'erased' WHERE customer_id = ANY($1)")
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Inserts many new customers (already normalised) in one statement (bulk import).
pub async fn insert_customers(
    conn: &mut PgConnection,
    rows: &[(Uuid, Customer)],
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut kinds = Vec::with_capacity(n);
    let mut names = Vec::with_capacity(n);
    let mut phones: Vec<Option<&str>> = Vec::with_capacity(n);
    let mut emails: Vec<Option<&str>> = Vec::with_capacity(n);
    let (mut by, mut bm, mut bd) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
    let mut genders = Vec::with_capacity(n);
    let mut regions = Vec::with_capacity(n);
    let mut zones = Vec::with_capacity(n);
    let mut channels = Vec::with_capacity(n);
    let mut registered = Vec::with_capacity(n);
    let mut addresses: Vec<Option<Vec<u8>>> = Vec::with_capacity(n);
    let mut tags = Vec::with_capacity(n);
    let mut attributes = Vec::with_capacity(n);
    let mut organizations: Vec<Option<Vec<u8>>> = Vec::with_capacity(n);
    for (id, c) in rows {
        let (y, m, d) = birth_parts(c);
        ids.push(*id);
        kinds.push(c.kind as i16);
        names.push(c.name.as_str());
        phones.push(opt(&c.phone));
        emails.push(opt(&c.email));
        by.push(y);
        bm.push(m);
        bd.push(d);
        genders.push(c.gender as i16);
        regions.push(c.region.as_str());
        zones.push(c.timezone.as_str());
        channels.push(c.preferred_channel as i16);
        registered.push(c.registered_at.as_ref().and_then(from_ts).unwrap_or(now));
        addresses.push(c.address.as_ref().map(|a| a.encode_to_vec()));
        // Tags cannot contain U+001F (validated), so it separates them.
        tags.push(c.tags.join("\u{1f}"));
        attributes.push(encode_attributes(c));
        organizations.push(c.organization.as_ref().map(|o| o.encode_to_vec()));
    }
    sqlx::query(
        "INSERT INTO customers (customer_id, kind, name, phone, email, birth_year, birth_month, birth_day, gender, region, \
         timezone, preferred_channel, registered_at, address, tags, attributes, organization, created_at, updated_at) \
         SELECT id, kind, name, phone, email, by, bm, bd, gender, region, tz, ch, reg, addr, \
                CASE WHEN tags = '' THEN '{}'::text[] ELSE string_to_array(tags, chr(31)) END, attrs, org, $18, $18 \
         FROM UNNEST($1::uuid[], $2::int2[], $3::text[], $4::text[], $5::text[], $6::int2[], $7::int2[], $8::int2[], $9::int2[], \
                     $10::text[], $11::text[], $12::int2[], $13::timestamptz[], $14::bytea[], $15::text[], $16::bytea[], $17::bytea[]) \
              AS t(id, kind, name, phone, email, by, bm, bd, gender, region, tz, ch, reg, addr, tags, attrs, org)",
    )
    .bind(&ids)
    .bind(&kinds)
    .bind(&names)
    .bind(&phones)
    .bind(&emails)
    .bind(&by)
    .bind(&bm)
    .bind(&bd)
    .bind(&genders)
    .bind(&regions)
    .bind(&zones)
    .bind(&channels)
    .bind(&registered)
    .bind(&addresses)
    .bind(&tags)
    .bind(&attributes)
    .bind(&organizations)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    let mut sources = Vec::new();
    let mut external = Vec::new();
    let mut owners = Vec::new();
    for (id, c) in rows {
        for x in &c.external_ids {
            sources.push(x.source.as_str());
            external.push(x.id.as_str());
            owners.push(*id);
        }
    }
    if !sources.is_empty() {
        sqlx::query(
            "INSERT INTO external_ids (source, external_id, customer_id) SELECT * FROM UNNEST($1::text[], $2::text[], $3::uuid[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&sources)
        .bind(&external)
        .bind(&owners)
        .execute(&mut *conn)
        .await?;
    }
    Ok(())
}

/// Takes the identity lock exclusively (bulk import): no single create or
/// update of an identity runs meanwhile, and one lock slot suffices.
pub async fn lock_identities_bulk(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))")
        .bind(IDENTITY_LOCK)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Existing holders of phones, e-mails and external ids: `(key, customer id)`
/// with keys `phone:<e164>`, `email:<address>`, `ext:<source>:<id>`, resolved to live records.
pub async fn holders(
    conn: &mut PgConnection,
    phones: &[String],
    emails: &[String],
    ext: &[(String, String)],
) -> Result<Vec<(String, Uuid)>, sqlx::Error> {
    let mut found: Vec<(String, Uuid, Option<Uuid>)> = sqlx::query_as(
        "SELECT 'phone:' || phone, customer_id, merged_into FROM customers WHERE phone = ANY($1) \
         UNION ALL SELECT 'email:' || email, customer_id, merged_into FROM customers WHERE email = ANY($2)",
    )
    .bind(phones)
    .bind(emails)
    .fetch_all(&mut *conn)
    .await?;
    if !ext.is_empty() {
        let sources: Vec<&str> = ext.iter().map(|e| e.0.as_str()).collect();
        let ids: Vec<&str> = ext.iter().map(|e| e.1.as_str()).collect();
        let rows: Vec<(String, Uuid, Option<Uuid>)> = sqlx::query_as(
            "SELECT 'ext:' || x.source || ':' || x.external_id, x.customer_id, c.merged_into FROM external_ids x \
             JOIN customers c ON c.customer_id = x.customer_id \
             JOIN UNNEST($1::text[], $2::text[]) AS t(s, i) ON x.source = t.s AND x.external_id = t.i",
        )
        .bind(&sources)
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?;
        found.extend(rows);
    }
    // Prefer live holders; resolve aliases (rare) one by one.
    found.sort_by_key(|(_, _, merged)| merged.is_some());
    let mut out: Vec<(String, Uuid)> = Vec::with_capacity(found.len());
    let mut seen = std::collections::HashSet::with_capacity(found.len());
    for (key, id, merged) in found {
        if !seen.insert(key.clone()) {
            continue;
        }
        let live = match merged {
            None => id,
            Some(_) => resolve(conn, id).await?.unwrap_or(id),
        };
        out.push((key, live));
    }
    Ok(out)
}

/// A candidate duplicate pair with what the two records share (PRF-10).
#[derive(Debug, Clone)]
pub struct Candidate {
    pub a: Uuid,
    pub b: Uuid,
    pub likeness: crate::domain::quality::Likeness,
}

/// Pairs of live, not erased customers that share a name or a phone tail,
/// excluding pairs a merge of which was undone (a human said: not the same).
pub async fn duplicate_candidates(conn: &mut PgConnection, limit: i64) -> Result<Vec<Candidate>, sqlx::Error> {
    let rows: Vec<(Uuid, Uuid, bool, bool, bool, bool, bool)> = sqlx::query_as(
        "WITH live AS ( \
           SELECT customer_id, lower(name) AS n, phone, email, birth_year, birth_month, birth_day, region \
           FROM customers WHERE merged_into IS NULL AND erased_at IS NULL), \
         pairs AS ( \
           SELECT a.customer_id AS a, b.customer_id AS b FROM live a JOIN live b ON a.n = b.n AND a.customer_id < b.customer_id \
           UNION \
           SELECT a.customer_id, b.customer_id FROM live a JOIN live b \
             ON right(a.phone, 7) = right(b.phone, 7) AND a.phone <> b.phone AND a.customer_id < b.customer_id) \
         SELECT p.a, p.b, \
           COALESCE(x.n = y.n, false), \
           COALESCE(x.birth_month = y.birth_month AND x.birth_day = y.birth_day \
             AND (x.birth_year IS NULL OR y.birth_year IS NULL OR x.birth_year = y.birth_year), false), \
           COALESCE(right(x.phone, 7) = right(y.phone, 7) AND x.phone <> y.phone, false), \
           COALESCE(split_part(x.email, '@', 1) = split_part(y.email, '@', 1) AND x.email <> y.email, false), \
           COALESCE(x.region = y.region AND x.region <> '', false) \
         FROM pairs p JOIN live x ON x.customer_id = p.a JOIN live y ON y.customer_id = p.b \
         WHERE NOT EXISTS (SELECT 1 FROM merges m WHERE m.undone_at IS NOT NULL \
                           AND ((m.survivor_id = p.a AND m.loser_id = p.b) OR (m.survivor_id = p.b AND m.loser_id = p.a))) \
         LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(a, b, same_name, same_birthday, similar_phone, same_email_user, same_region)| Candidate {
            a,
            b,
            likeness: crate::domain::quality::Likeness {
                same_name,
                same_birthday,
                similar_phone,
                same_email_user,
                same_region,
            },
        })
        .collect())
}
