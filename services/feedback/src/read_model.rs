//! What feedback takes from profiles' events (SPEC 2, PRF-3, PRF-8):
//! merges move a customer's feedback, tickets and survey answers to the
//! survivor (an unmerge moves back what was submitted for the restored id);
//! an erasure removes the free text (feedback, survey comments, ticket notes)
//! and confirms it. Categories, scores and times stay: aggregates without
//! identity may remain.

use crm_kit::consumer::{Event, EventHandler, HandlerError, confirm_erasure, erased_ids, payload_id};
use crm_proto::profiles::v1 as profiles;
use sqlx::PgConnection;

use crate::SERVICE;

/// Applies profiles' events.
#[derive(Debug, Clone, Default)]
pub struct ProfilesEvents;

impl EventHandler for ProfilesEvents {
    async fn handle(&self, tx: &mut PgConnection, event: &Event) -> Result<(), HandlerError> {
        if let Some(e) = event.payload::<profiles::CustomerMerged>()? {
            let (survivor, loser) = (payload_id(&e.survivor_id)?, payload_id(&e.loser_id)?);
            for table in ["feedback", "tickets", "survey_responses"] {
                // Table names are literals of this list.
                sqlx::query(sqlx::AssertSqlSafe(format!("UPDATE {table} SET customer_id = $1 WHERE customer_id = $2")))
                    .bind(survivor)
                    .bind(loser)
                    .execute(&mut *tx)
                    .await?;
            }
        } else if let Some(e) = event.payload::<profiles::CustomerUnmerged>()? {
            let (survivor, restored) = (payload_id(&e.survivor_id)?, payload_id(&e.restored_id)?);
            sqlx::query("UPDATE feedback SET customer_id = $2 WHERE customer_id = $1 AND submitted_customer_id = $2")
                .bind(survivor)
                .bind(restored)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE tickets t SET customer_id = $2 FROM feedback f \
                 WHERE t.feedback_id = f.feedback_id AND t.customer_id = $1 AND f.submitted_customer_id = $2",
            )
            .bind(survivor)
            .bind(restored)
            .execute(&mut *tx)
            .await?;
            sqlx::query(
                "UPDATE survey_responses SET customer_id = $2 WHERE customer_id = $1 AND submitted_customer_id = $2",
            )
            .bind(survivor)
            .bind(restored)
            .execute(&mut *tx)
            .await?;
        } else if let Some(e) = event.payload::<profiles::CustomerErased>()? {
            let ids = erased_ids(&e)?;
            sqlx::query(
                "UPDATE feedback SET text = '', evidence = '[]'::jsonb, erased_at = now() \
                 WHERE (customer_id = ANY($1) OR submitted_customer_id = ANY($1)) AND erased_at IS NULL",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
            sqlx::query("UPDATE survey_responses SET comment = '' WHERE customer_id = ANY($1) OR submitted_customer_id = ANY($1)")
                .bind(&ids)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "UPDATE ticket_history h SET note = '' FROM tickets t WHERE h.ticket_id = t.ticket_id AND t.customer_id = ANY($1)",
            )
            .bind(&ids)
            .execute(&mut *tx)
            .await?;
            // SEC-5: stored first responses (feedback texts, comments, notes) go too.
            crm_kit::idempotency::forget_customers(tx, &ids).await?;
            confirm_erasure(tx, SERVICE, &e.customer_id, &event.envelope.request_id).await?;
        }
        Ok(())
    }
}
