//! Idempotent mutations by client `request_id` (SPEC 3).
//!
//! Inside the mutation's own transaction, [`claim`] inserts the
//! `(method, request_id)` key. The first request proceeds and stores its
//! response with [`Fresh::complete`] before committing; a retry (even one
//! racing the first: it waits on the key's row lock) gets [`Claim::Replay`]
//! with the first response and changes nothing. The same `request_id` with a
//! different request is INVALID_ARGUMENT. A failed mutation rolls back its
//! key, so the client may retry it. Keys are kept `IDEMPOTENCY_RETENTION_HOURS`
//! ([`crate::retention`]).
//!
//! ```ignore
//! let mut tx = pool.begin().await?;
//! let fresh = match idempotency::claim(&mut tx, METHOD, &req.request_id, &req).await? {
//!     Claim::Replay(response) => return Ok(response),
//!     Claim::Fresh(fresh) => fresh,
//! };
//! let response = /* change rows, enqueue events */;
//! fresh.complete(&mut tx, &response).await?;
//! tx.commit().await?;
//! ```

use std::marker::PhantomData;

use sha2::{Digest, Sha256};
use sqlx::PgConnection;

use crate::error::ApiError;

/// Outcome of claiming a request id.
pub enum Claim<R> {
    /// First time: do the work, then [`Fresh::complete`].
    Fresh(Fresh<R>),
    /// Seen before: the first response.
    Replay(R),
}

/// A claimed key awaiting its response.
#[must_use = "complete() stores the response; without it the claim is rolled back with the transaction"]
pub struct Fresh<R> {
    scope: String,
    request_id: String,
    fingerprint: Vec<u8>,
    _response: PhantomData<fn() -> R>,
}

/// Checks a request id: 1..128 printable ASCII characters.
pub fn validate_request_id(request_id: &str) -> Result<(), ApiError> {
    if request_id.is_empty() {
        return Err(ApiError::invalid("request_id", "is required (a client-chosen idempotency key, e.g. a UUID)"));
    }
    if request_id.len() > 128 || !request_id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ApiError::invalid("request_id", "must be 1..128 printable ASCII characters"));
    }
    Ok(())
}

/// Claims `(scope, request_id)` for `request` in the caller's transaction.
pub async fn claim<Q: prost::Message, R: prost::Message + Default>(
    conn: &mut PgConnection,
    scope: &str,
    request_id: &str,
    request: &Q,
) -> Result<Claim<R>, ApiError> {
    validate_request_id(request_id)?;
    let fingerprint = Sha256::digest(request.encode_to_vec()).to_vec();
    // Placeholder response until complete(); never visible outside this
    // transaction because both happen before commit.
    let inserted = sqlx::query(
        "INSERT INTO kit_idempotency (scope, request_id, fingerprint, response) VALUES ($1, $2, $3, '') \
         ON CONFLICT (scope, request_id) DO NOTHING",
    )
    .bind(scope)
    .bind(request_id)
    .bind(&fingerprint)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(Claim::Fresh(Fresh {
            scope: scope.to_string(),
            request_id: request_id.to_string(),
            fingerprint,
            _response: PhantomData,
        }));
    }
    let (stored_fp, response): (Vec<u8>, Vec<u8>) =
        sqlx::query_as("SELECT fingerprint, response FROM kit_idempotency WHERE scope = $1 AND request_id = $2")
            .bind(scope)
            .bind(request_id)
            .fetch_one(&mut *conn)
            .await?;
    if stored_fp != fingerprint {
        return Err(ApiError::invalid(
            "request_id",
            "was already used for a different request; use a new request_id for a new mutation",
        ));
    }
    R::decode(response.as_slice())
        .map(Claim::Replay)
        .map_err(|e| ApiError::internal(format!("stored idempotent response is undecodable: {e}")))
}

impl<R: prost::Message> Fresh<R> {
    /// Stores the response of the first execution, in the same transaction.
    pub async fn complete(self, conn: &mut PgConnection, response: &R) -> Result<(), ApiError> {
        sqlx::query(
            "UPDATE kit_idempotency SET response = $3 WHERE scope = $1 AND request_id = $2 AND fingerprint = $4",
        )
        .bind(&self.scope)
        .bind(&self.request_id)
        .bind(response.encode_to_vec())
        .bind(&self.fingerprint)
        .execute(&mut *conn)
        .await?;
        Ok(())
    }
}

/// PRF-8, SEC-5: deletes the stored first responses that mention any of
/// these customers (an encoded response holds the id verbatim): they may
/// hold the person's data (a record, a feedback text, a note). Called from
/// each service's handler of CustomerErased, in its transaction; the table
/// is bounded by retention, so the scan is too. A retry of such a request
/// after the erasure runs as a new one.
pub async fn forget_customers(conn: &mut PgConnection, ids: &[uuid::Uuid]) -> Result<u64, sqlx::Error> {
    let needles: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    Ok(sqlx::query(
        "DELETE FROM kit_idempotency k WHERE EXISTS \
         (SELECT 1 FROM UNNEST($1::text[]) AS n WHERE position(convert_to(n, 'UTF8') IN k.response) > 0)",
    )
    .bind(&needles)
    .execute(conn)
    .await?
    .rows_affected())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_checked() {
        assert!(validate_request_id("3f1c2a7e-1").is_ok());
        assert!(validate_request_id("").is_err());
        assert!(validate_request_id("has space").is_err());
        assert!(validate_request_id(&"x".repeat(129)).is_err());
    }
}
