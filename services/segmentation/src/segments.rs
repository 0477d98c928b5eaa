//! SEG-6 queries over compiled rules: preview (count and sample) of who a
//! rule selects now. Parameters are bound, never spliced (SEC-3).

use sqlx::PgConnection;
use uuid::Uuid;

use crate::domain::rules::{CompiledRule, Param};

/// Binds a compiled rule's parameters, in order, to any sqlx query.
macro_rules! bind_params {
    ($query:expr, $params:expr) => {{
        let mut q = $query;
        for p in $params {
            q = match p {
                Param::Int(v) => q.bind(*v),
                Param::Ints(v) => q.bind(v.clone()),
                Param::Text(v) => q.bind(v.clone()),
                Param::Texts(v) => q.bind(v.clone()),
                Param::Number(v) => q.bind(*v),
            };
        }
        q
    }};
}

/// How many live, not erased customers the rule selects now.
pub async fn count(conn: &mut PgConnection, rule: &CompiledRule) -> Result<i64, sqlx::Error> {
    // The predicate is compiled from a validated tree with a fixed column table.
    let sql = format!(
        "SELECT count(*) FROM customers c JOIN customer_scores s USING (customer_id) \
         WHERE c.merged_into IS NULL AND c.erased_at IS NULL AND {}",
        rule.predicate
    );
    bind_params!(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)), &rule.params).fetch_one(conn).await
}

/// Up to `limit` customers the rule selects, in id order.
pub async fn sample(conn: &mut PgConnection, rule: &CompiledRule, limit: i64) -> Result<Vec<Uuid>, sqlx::Error> {
    let sql = format!(
        "SELECT c.customer_id FROM customers c JOIN customer_scores s USING (customer_id) \
         WHERE c.merged_into IS NULL AND c.erased_at IS NULL AND {} ORDER BY c.customer_id LIMIT {}",
        rule.predicate,
        limit.clamp(0, 1000)
    );
    bind_params!(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)), &rule.params).fetch_all(conn).await
}

/// Why a segment could not be saved.
#[derive(Debug)]
pub enum SaveError {
    /// Bad fields (rule tree, name).
    Invalid(crm_kit::FieldViolations),
    /// Another live segment has this name.
    NameTaken,
    /// The database.
    Database(sqlx::Error),
}

impl From<sqlx::Error> for SaveError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => SaveError::NameTaken,
            _ => SaveError::Database(e),
        }
    }
}

/// Validates and saves a new segment (SEG-6); its membership is filled by [`refresh`].
pub async fn create(
    conn: &mut PgConnection,
    display_name: &str,
    description: &str,
    rule: &crm_proto::segmentation::v1::RuleNode,
) -> Result<Uuid, SaveError> {
    use prost::Message;
    let mut violations = crm_kit::FieldViolations::new();
    let name = display_name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        violations.add("segment.display_name", "is required, at most 100 characters");
    }
    if description.chars().count() > 2000 {
        violations.add("segment.description", "is longer than 2000 characters");
    }
    if let Err(more) = crate::domain::rules::compile(Some(rule), "segment.rule", 1) {
        for v in more.iter() {
            violations.add(v.field.clone(), v.description.clone());
        }
    }
    if !violations.is_empty() {
        return Err(SaveError::Invalid(violations));
    }
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO segments (segment_id, display_name, description, rule) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(name)
        .bind(description)
        .bind(rule.encode_to_vec())
        .execute(conn)
        .await?;
    Ok(id)
}

/// Joins and leaves of one refresh.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    /// Customers who joined.
    pub joined: Vec<Uuid>,
    /// Customers who left.
    pub left: Vec<Uuid>,
}

/// Re-materialises the membership of every live segment from the current
/// scores, set-based (one statement per segment), for every customer or
/// `only` these (the incremental recompute); records joins and leaves in the
/// history and emits SegmentMembershipChanged for each.
pub async fn refresh(
    conn: &mut PgConnection,
    now: chrono::DateTime<chrono::Utc>,
    only: Option<&[Uuid]>,
) -> Result<Vec<(Uuid, Changes)>, crm_kit::ApiError> {
    use prost::Message;
    let segments: Vec<(Uuid, Vec<u8>)> =
        sqlx::query_as("SELECT segment_id, rule FROM segments WHERE deleted_at IS NULL ORDER BY segment_id")
            .fetch_all(&mut *conn)
            .await?;
    let mut out = Vec::new();
    for (segment, bytes) in segments {
        let rule = crm_proto::segmentation::v1::RuleNode::decode(bytes.as_slice())
            .map_err(|e| crm_kit::ApiError::internal(format!("stored rule of {segment}: {e}")))?;
        // Stored rules were validated on save; $1 and $2 are the segment and the time.
        let compiled = crate::domain::rules::compile(Some(&rule), "rule", 3)
            .map_err(|_| crm_kit::ApiError::internal(format!("stored rule of {segment} no longer compiles")))?;
        // With `only`, its ids are the parameter after the rule's.
        let (scope_c, scope_m) = match only {
            Some(_) => {
                let n = 3 + compiled.params.len();
                (format!("AND c.customer_id = ANY (${n})"), format!("AND m.customer_id = ANY (${n})"))
            }
            None => (String::new(), String::new()),
        };
        let sql = format!(
            "WITH cur AS (SELECT c.customer_id FROM customers c JOIN customer_scores s USING (customer_id) \
                          WHERE c.merged_into IS NULL AND c.erased_at IS NULL AND {} {scope_c}), \
             joined AS (INSERT INTO segment_members (segment_id, customer_id, joined_at) \
                        SELECT $1, customer_id, $2 FROM cur ON CONFLICT DO NOTHING RETURNING customer_id), \
             left_ AS (DELETE FROM segment_members m WHERE m.segment_id = $1 {scope_m} \
                       AND NOT EXISTS (SELECT 1 FROM cur WHERE cur.customer_id = m.customer_id) RETURNING customer_id) \
             SELECT true, customer_id FROM joined UNION ALL SELECT false, customer_id FROM left_",
            compiled.predicate
        );
        let q = sqlx::query_as::<_, (bool, Uuid)>(sqlx::AssertSqlSafe(sql)).bind(segment).bind(now);
        let mut q = bind_params!(q, &compiled.params);
        if let Some(ids) = only {
            q = q.bind(ids);
        }
        let rows = q.fetch_all(&mut *conn).await?;
        let mut changes = Changes::default();
        for (joined, customer) in rows {
            if joined { changes.joined.push(customer) } else { changes.left.push(customer) }
        }
        // A partial refresh (the incremental recompute) does not make the whole segment fresh.
        if only.is_none() {
            sqlx::query("UPDATE segments SET refreshed_at = $2 WHERE segment_id = $1")
                .bind(segment)
                .bind(now)
                .execute(&mut *conn)
                .await?;
        }
        if changes.joined.is_empty() && changes.left.is_empty() {
            continue;
        }
        let (who, flags): (Vec<Uuid>, Vec<bool>) =
            changes.joined.iter().map(|c| (*c, true)).chain(changes.left.iter().map(|c| (*c, false))).unzip();
        sqlx::query(
            "INSERT INTO segment_history (segment_id, customer_id, joined, changed_at) \
             SELECT $1, c, j, $4 FROM UNNEST($2::uuid[], $3::bool[]) AS x(c, j)",
        )
        .bind(segment)
        .bind(&who)
        .bind(&flags)
        .bind(now)
        .execute(&mut *conn)
        .await?;
        let events: Vec<(String, crm_proto::segmentation::v1::SegmentMembershipChanged)> = who
            .iter()
            .zip(&flags)
            .map(|(c, j)| {
                (
                    c.to_string(),
                    crm_proto::segmentation::v1::SegmentMembershipChanged {
                        segment_id: segment.to_string(),
                        customer_id: c.to_string(),
                        joined: *j,
                        change_time: Some(prost_types::Timestamp { seconds: now.timestamp(), nanos: 0 }),
                    },
                )
            })
            .collect();
        crm_kit::outbox::enqueue_many(&mut *conn, crate::SERVICE, "customer", "", &events).await?;
        out.push((segment, changes));
    }
    Ok(out)
}
