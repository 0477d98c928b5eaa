//! PRF-3: MergeCustomers and UnmergeCustomer. A merge makes the loser an
//! alias that keeps resolving, moves its transactions, interactions,
//! identities, timeline entries and consent to the survivor, and records all
//! of it (who, why, which fields won, what moved) so UnmergeCustomer can put
//! everything back.

use chrono::Utc;
use crm_kit::idempotency::{self, Claim};
use crm_kit::outbox::{self, Aggregate};
use crm_kit::{ApiError, Caller, FieldViolations};
use crm_proto::profiles::v1 as pb;
use prost::Message;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::SERVICE;
use crate::api::{ProfilesApi, SVC, parse_id};
use crate::domain::{customer as rules, merge};
use crate::store;

const SEP: char = '\u{1f}';

async fn lock_pair(tx: &mut PgConnection, a: Uuid, b: Uuid) -> Result<(), sqlx::Error> {
    // A stable order avoids deadlocks between opposite merges.
    let (first, second) = if a < b { (a, b) } else { (b, a) };
    for id in [first, second] {
        sqlx::query("SELECT 1 FROM customers WHERE customer_id = $1 FOR UPDATE").bind(id).execute(&mut *tx).await?;
    }
    Ok(())
}

async fn bump_version(tx: &mut PgConnection, id: Uuid) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE customers SET version = version + 1, updated_at = now() WHERE customer_id = $1 RETURNING version",
    )
    .bind(id)
    .fetch_one(&mut *tx)
    .await
}

impl ProfilesApi {
    pub(crate) async fn merge(
        &self,
        caller: &Caller,
        req: pb::MergeCustomersRequest,
    ) -> Result<pb::MergeCustomersResponse, ApiError> {
        let mut v = FieldViolations::new();
        let survivor = v.check(
            "survivor_id",
            parse_id("survivor_id", &req.survivor_id).map_err(|_| "must be a customer id (UUID)"),
        );
        let loser =
            v.check("loser_id", parse_id("loser_id", &req.loser_id).map_err(|_| "must be a customer id (UUID)"));
        if survivor.is_some() && survivor == loser {
            v.add("loser_id", "must differ from survivor_id");
        }
        if req.reason.trim().is_empty() || req.reason.chars().count() > 500 {
            v.add("reason", "is required, at most 500 characters (audited)");
        }
        let mut take: Vec<String> = req.take_from_loser.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
        if take.len() > merge::MERGEABLE.len() {
            // REL-5: no per-item work on a list longer than what it can name.
            v.add("take_from_loser", format!("names more than the {} mergeable fields", merge::MERGEABLE.len()));
            take.clear();
        }
        for p in &take {
            if !merge::MERGEABLE.contains(&p.as_str()) {
                v.add(
                    "take_from_loser",
                    format!("{p:?} cannot be taken from the loser; allowed: {}", merge::MERGEABLE.join(", ")),
                );
            }
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let (survivor, loser) = (survivor.unwrap_or_default(), loser.unwrap_or_default());

        let mut tx = self.pg.begin().await?;
        let claimed: Claim<pb::MergeCustomersResponse> =
            idempotency::claim(&mut tx, &format!("{SVC}MergeCustomers"), &req.request_id, &req).await?;
        let fresh = match claimed {
            Claim::Replay(mut r) => {
                drop(tx);
                if let Some(c) = r.survivor.take() {
                    r.survivor = Some(self.view(caller, c, "", "MergeCustomers").await?);
                }
                return Ok(r);
            }
            Claim::Fresh(f) => f,
        };
        lock_pair(&mut tx, survivor, loser).await?;
        let s = store::load(&mut tx, survivor)
            .await?
            .ok_or_else(|| ApiError::not_found("customer", survivor.to_string()))?;
        let l = store::load(&mut tx, loser).await?.ok_or_else(|| ApiError::not_found("customer", loser.to_string()))?;
        for (who, c) in [("survivor", &s), ("loser", &l)] {
            if c.merged_into.is_some() {
                return Err(ApiError::failed_precondition(
                    "ALREADY_MERGED",
                    format!("the {who} was merged away already; use the id it resolves to"),
                ));
            }
            if c.customer.erased {
                return Err(ApiError::failed_precondition("CUSTOMER_ERASED", format!("the {who} was erased")));
            }
        }
        let (mut next, from_loser) = merge::merged(&s.customer, &l.customer, &take);
        next.external_ids = s.customer.external_ids.iter().chain(&l.customer.external_ids).cloned().collect();
        let mut violations = FieldViolations::new();
        rules::normalise(&mut next, "merged.", &mut violations);
        violations.into_result()?;
        let consent_before =
            pb::ConsentState { customer_id: survivor.to_string(), grants: store::consents(&mut tx, survivor).await? };

        // The loser becomes an alias first, so its identities no longer count as live.
        sqlx::query("UPDATE customers SET merged_into = $2 WHERE customer_id = $1")
            .bind(loser)
            .bind(survivor)
            .execute(&mut *tx)
            .await?;
        let loser_version = bump_version(&mut tx, loser).await?;
        let moved_transactions: Vec<String> = sqlx::query_scalar(
            "UPDATE transactions SET customer_id = $2 WHERE customer_id = $1 RETURNING transaction_id",
        )
        .bind(loser)
        .bind(survivor)
        .fetch_all(&mut *tx)
        .await?;
        let moved_interactions: Vec<String> = sqlx::query_scalar(
            "UPDATE interactions SET customer_id = $2 WHERE customer_id = $1 RETURNING interaction_id",
        )
        .bind(loser)
        .bind(survivor)
        .fetch_all(&mut *tx)
        .await?;
        let moved_external_ids: Vec<String> = sqlx::query_scalar(
            "UPDATE external_ids SET customer_id = $2 WHERE customer_id = $1 RETURNING source || chr(31) || external_id",
        )
        .bind(loser)
        .bind(survivor)
        .fetch_all(&mut *tx)
        .await?;
        let moved_timeline: Vec<String> = sqlx::query_scalar(
            "UPDATE timeline_external SET customer_id = $2 WHERE customer_id = $1 RETURNING source_service || chr(31) || source_id",
        )
        .bind(loser)
        .bind(survivor)
        .fetch_all(&mut *tx)
        .await?;
        // Consent: the loser's grant wins where it is newer than the survivor's (or the survivor has none).
        sqlx::query(
            "INSERT INTO consents (customer_id, channel, purpose, granted, source, updated_at, expires_at) \
             SELECT $2, channel, purpose, granted, source, updated_at, expires_at FROM consents WHERE customer_id = $1 \
             ON CONFLICT (customer_id, channel, purpose) DO UPDATE SET granted = EXCLUDED.granted, source = EXCLUDED.source, \
               updated_at = EXCLUDED.updated_at, expires_at = EXCLUDED.expires_at WHERE consents.updated_at < EXCLUDED.updated_at",
        )
        .bind(loser)
        .bind(survivor)
        .execute(&mut *tx)
        .await?;

        let now = Utc::now();
        let Some(version) = store::update(&mut tx, survivor, &next, s.version, now).await? else {
            return Err(ApiError::Aborted("the survivor changed concurrently; retry".into()));
        };
        let after = store::load(&mut tx, survivor).await?.ok_or_else(|| ApiError::internal("survivor vanished"))?;
        let merge_id = Uuid::now_v7();
        sqlx::query(
            "INSERT INTO merges (merge_id, survivor_id, loser_id, reason, merged_by, merged_at, fields_from_loser, survivor_before, \
             survivor_after, moved_transactions, moved_interactions, moved_external_ids, moved_timeline, consent_before) \
             VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14)",
        )
        .bind(merge_id)
        .bind(survivor)
        .bind(loser)
        .bind(req.reason.trim())
        .bind(&caller.subject)
        .bind(now)
        .bind(&from_loser)
        .bind(s.customer.encode_to_vec())
        .bind(after.customer.encode_to_vec())
        .bind(&moved_transactions)
        .bind(&moved_interactions)
        .bind(&moved_external_ids)
        .bind(&moved_timeline)
        .bind(consent_before.encode_to_vec())
        .execute(&mut *tx)
        .await?;
        let event = pb::CustomerMerged {
            survivor_id: survivor.to_string(),
            loser_id: loser.to_string(),
            merge_id: merge_id.to_string(),
        };
        outbox::enqueue(
            &mut tx,
            SERVICE,
            Aggregate { kind: "customer", id: &survivor.to_string() },
            &req.request_id,
            &event,
        )
        .await?;
        let response =
            pb::MergeCustomersResponse { survivor: Some(after.customer.clone()), merge_id: merge_id.to_string() };
        fresh.complete(&mut tx, &response).await?;
        tx.commit().await?;
        self.cache.invalidate(survivor, version).await;
        self.cache.invalidate(loser, loser_version).await;
        tracing::info!(%survivor, %loser, %merge_id, fields_from_loser = ?from_loser, "customers merged");
        Ok(pb::MergeCustomersResponse {
            survivor: Some(self.view(caller, after.customer, "", "MergeCustomers").await?),
            merge_id: merge_id.to_string(),
        })
    }

    pub(crate) async fn unmerge(
        &self,
        caller: &Caller,
        req: pb::UnmergeCustomerRequest,
    ) -> Result<pb::UnmergeCustomerResponse, ApiError> {
        let mut v = FieldViolations::new();
        let merge_id = v.check("merge_id", Uuid::parse_str(&req.merge_id).map_err(|_| "must be a merge id (UUID)"));
        if req.reason.trim().is_empty() || req.reason.chars().count() > 500 {
            v.add("reason", "is required, at most 500 characters (audited)");
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let merge_id = merge_id.unwrap_or_default();

        let mut tx = self.pg.begin().await?;
        let claimed: Claim<pb::UnmergeCustomerResponse> =
            idempotency::claim(&mut tx, &format!("{SVC}UnmergeCustomer"), &req.request_id, &req).await?;
        let fresh = match claimed {
            Claim::Replay(mut r) => {
                drop(tx);
                if let Some(c) = r.survivor.take() {
                    r.survivor = Some(self.view(caller, c, "", "UnmergeCustomer").await?);
                }
                if let Some(c) = r.restored.take() {
                    r.restored = Some(self.view(caller, c, "", "UnmergeCustomer").await?);
                }
                return Ok(r);
            }
            Claim::Fresh(f) => f,
        };
        type MergeRow = (
            Uuid,
            Uuid,
            Vec<String>,
            Vec<u8>,
            Vec<u8>,
            Vec<String>,
            Vec<String>,
            Vec<String>,
            Vec<String>,
            Vec<u8>,
            Option<chrono::DateTime<Utc>>,
        );
        let row: Option<MergeRow> = sqlx::query_as(
            "SELECT survivor_id, loser_id, fields_from_loser, survivor_before, survivor_after, moved_transactions, moved_interactions, \
             moved_external_ids, moved_timeline, consent_before, undone_at FROM merges WHERE merge_id = $1 FOR UPDATE",
        )
        .bind(merge_id)
        .fetch_optional(&mut *tx)
        .await?;
        let (survivor, loser, from_loser, before, after_merge, txs, ints, exts, timeline, consent_before, undone) =
            row.ok_or_else(|| ApiError::not_found("merge", req.merge_id.clone()))?;
        if undone.is_some() {
            return Err(ApiError::failed_precondition("ALREADY_UNDONE", "this merge was undone already"));
        }
        lock_pair(&mut tx, survivor, loser).await?;
        let s = store::load(&mut tx, survivor).await?.ok_or_else(|| ApiError::internal("survivor vanished"))?;
        let l = store::load(&mut tx, loser).await?.ok_or_else(|| ApiError::internal("loser vanished"))?;
        if s.merged_into.is_some() {
            return Err(ApiError::failed_precondition(
                "SURVIVOR_MERGED_AGAIN",
                "the survivor was merged into another customer since; undo that merge first",
            ));
        }
        if l.merged_into != Some(survivor) {
            return Err(ApiError::failed_precondition("NOT_MERGED", "the loser is no longer an alias of the survivor"));
        }
        if s.customer.erased {
            return Err(ApiError::failed_precondition(
                "CUSTOMER_ERASED",
                "the survivor was erased; nothing to restore",
            ));
        }
        let decode = |b: &[u8]| pb::Customer::decode(b).map_err(|e| ApiError::internal(format!("merge snapshot: {e}")));
        let mut restored = merge::unmerged(&s.customer, &decode(&before)?, &decode(&after_merge)?, &from_loser);
        let moved: Vec<(String, String)> =
            exts.iter().filter_map(|x| x.split_once(SEP)).map(|(a, b)| (a.to_string(), b.to_string())).collect();
        restored.external_ids.retain(|x| !moved.iter().any(|(src, id)| *src == x.source && *id == x.id));
        // The loser's identities must be free again among live customers.
        for (what, value) in [("phone", &l.customer.phone), ("email", &l.customer.email)] {
            let survivor_keeps =
                (what == "phone" && restored.phone == *value) || (what == "email" && restored.email == *value);
            if !value.is_empty() && survivor_keeps {
                return Err(ApiError::failed_precondition(
                    "IDENTITY_TAKEN",
                    format!("the survivor now holds the loser's {what} (edited since the merge); change it first"),
                ));
            }
        }
        let now = Utc::now();
        let Some(version) = store::update(&mut tx, survivor, &restored, s.version, now).await? else {
            return Err(ApiError::Aborted("the survivor changed concurrently; retry".into()));
        };
        sqlx::query("UPDATE customers SET merged_into = NULL WHERE customer_id = $1")
            .bind(loser)
            .execute(&mut *tx)
            .await?;
        let loser_version = bump_version(&mut tx, loser).await?;
        sqlx::query("UPDATE transactions SET customer_id = $2 WHERE customer_id = $1 AND transaction_id = ANY($3)")
            .bind(survivor)
            .bind(loser)
            .bind(&txs)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE interactions SET customer_id = $2 WHERE customer_id = $1 AND interaction_id = ANY($3)")
            .bind(survivor)
            .bind(loser)
            .bind(&ints)
            .execute(&mut *tx)
            .await?;
        for (src, id) in &moved {
            sqlx::query("INSERT INTO external_ids (source, external_id, customer_id) VALUES ($1, $2, $3) ON CONFLICT (source, external_id) DO UPDATE SET customer_id = $3")
                .bind(src)
                .bind(id)
                .bind(loser)
                .execute(&mut *tx)
                .await?;
        }
        sqlx::query("UPDATE timeline_external SET customer_id = $2 WHERE customer_id = $1 AND source_service || chr(31) || source_id = ANY($3)")
            .bind(survivor)
            .bind(loser)
            .bind(&timeline)
            .execute(&mut *tx)
            .await?;
        // Consent of the survivor goes back to what it was, except grants changed after the merge.
        let before_consent = pb::ConsentState::decode(consent_before.as_slice())
            .map_err(|e| ApiError::internal(format!("consent snapshot: {e}")))?;
        let merged_at: chrono::DateTime<Utc> = sqlx::query_scalar("SELECT merged_at FROM merges WHERE merge_id = $1")
            .bind(merge_id)
            .fetch_one(&mut *tx)
            .await?;
        sqlx::query("DELETE FROM consents WHERE customer_id = $1 AND updated_at <= $2")
            .bind(survivor)
            .bind(merged_at)
            .execute(&mut *tx)
            .await?;
        for g in &before_consent.grants {
            let kept: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM consents WHERE customer_id = $1 AND channel = $2 AND purpose = $3)",
            )
            .bind(survivor)
            .bind(g.channel as i16)
            .bind(g.purpose as i16)
            .fetch_one(&mut *tx)
            .await?;
            if !kept {
                sqlx::query("INSERT INTO consents (customer_id, channel, purpose, granted, source, updated_at, expires_at) VALUES ($1,$2,$3,$4,$5,$6,$7)")
                    .bind(survivor)
                    .bind(g.channel as i16)
                    .bind(g.purpose as i16)
                    .bind(sqlx::query_scalar::<_, bool>("SELECT granted FROM consent_history WHERE customer_id = $1 AND channel = $2 AND purpose = $3 AND changed_at <= $4 ORDER BY id DESC LIMIT 1")
                        .bind(survivor)
                        .bind(g.channel as i16)
                        .bind(g.purpose as i16)
                        .bind(merged_at)
                        .fetch_optional(&mut *tx)
                        .await?
                        .unwrap_or(g.granted))
                    .bind(&g.source)
                    .bind(g.update_time.as_ref().and_then(store::from_ts).unwrap_or(merged_at))
                    .bind(g.expire_time.as_ref().and_then(store::from_ts))
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query("UPDATE merges SET undone_at = $2, undone_by = $3, undo_reason = $4 WHERE merge_id = $1")
            .bind(merge_id)
            .bind(now)
            .bind(&caller.subject)
            .bind(req.reason.trim())
            .execute(&mut *tx)
            .await?;
        let event = pb::CustomerUnmerged {
            survivor_id: survivor.to_string(),
            restored_id: loser.to_string(),
            merge_id: merge_id.to_string(),
            moved_transaction_ids: txs.clone(),
            moved_interaction_ids: ints.clone(),
        };
        outbox::enqueue(
            &mut tx,
            SERVICE,
            Aggregate { kind: "customer", id: &survivor.to_string() },
            &req.request_id,
            &event,
        )
        .await?;
        let s_after = store::load(&mut tx, survivor).await?.ok_or_else(|| ApiError::internal("survivor vanished"))?;
        let l_after = store::load(&mut tx, loser).await?.ok_or_else(|| ApiError::internal("loser vanished"))?;
        let response = pb::UnmergeCustomerResponse {
            survivor: Some(s_after.customer.clone()),
            restored: Some(l_after.customer.clone()),
        };
        fresh.complete(&mut tx, &response).await?;
        tx.commit().await?;
        self.cache.invalidate(survivor, version).await;
        self.cache.invalidate(loser, loser_version).await;
        Ok(pb::UnmergeCustomerResponse {
            survivor: Some(self.view(caller, s_after.customer, "", "UnmergeCustomer").await?),
            restored: Some(self.view(caller, l_after.customer, "", "UnmergeCustomer").await?),
        })
    }
}
