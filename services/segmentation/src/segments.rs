//! SEG-6 queries over compiled rules: preview (count and sample) of who a
//! rule selects now. Parameters are bound, never spliced (SEC-3).

use sqlx::PgConnection;
use sqlx::postgres::PgArguments;
use sqlx::query::QueryScalar;
use uuid::Uuid;

use crate::domain::rules::{CompiledRule, Param};

fn bind_all<'q, O>(
    mut q: QueryScalar<'q, sqlx::Postgres, O, PgArguments>,
    params: &'q [Param],
) -> QueryScalar<'q, sqlx::Postgres, O, PgArguments> {
    for p in params {
        q = match p {
            Param::Int(v) => q.bind(*v),
            Param::Ints(v) => q.bind(v),
            Param::Text(v) => q.bind(v),
            Param::Texts(v) => q.bind(v),
            Param::Number(v) => q.bind(*v),
        };
    }
    q
}

/// How many live, not erased customers the rule selects now.
pub async fn count(conn: &mut PgConnection, rule: &CompiledRule) -> Result<i64, sqlx::Error> {
    // The predicate is compiled from a validated tree with a fixed column table.
    let sql = format!(
        "SELECT count(*) FROM customers c JOIN customer_scores s USING (customer_id) \
         WHERE c.merged_into IS NULL AND c.erased_at IS NULL AND {}",
        rule.predicate
    );
    bind_all(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)), &rule.params).fetch_one(conn).await
}

/// Up to `limit` customers the rule selects, in id order.
pub async fn sample(conn: &mut PgConnection, rule: &CompiledRule, limit: i64) -> Result<Vec<Uuid>, sqlx::Error> {
    let sql = format!(
        "SELECT c.customer_id FROM customers c JOIN customer_scores s USING (customer_id) \
         WHERE c.merged_into IS NULL AND c.erased_at IS NULL AND {} ORDER BY c.customer_id LIMIT {}",
        rule.predicate,
        limit.clamp(0, 1000)
    );
    bind_all(sqlx::query_scalar(sqlx::AssertSqlSafe(sql)), &rule.params).fetch_all(conn).await
}
