//! Two reads other services make so that they need no copy of personal
//! data: the current consent at hand-off (PRF-7, REL-6) and free text
//! masked for readers without `pii:read` (SEC-4).

use std::collections::HashMap;

use crm_kit::privacy::mask_text;
use crm_kit::{ApiError, FieldViolations};
use crm_proto::profiles::v1 as pb;
use uuid::Uuid;

use crate::api::ProfilesApi;
use crate::store;

/// Ids per BatchGetConsent and texts per MaskFreeText.
const MAX_BATCH: usize = 1000;
/// Characters of one text, and of all texts of one request.
const MAX_TEXT_CHARS: usize = 20_000;
const MAX_TOTAL_CHARS: usize = 1_000_000;

impl ProfilesApi {
    /// PRF-7, REL-6: consent as recorded now, for each asked id (aliases
    /// answer with their survivor's; an erased customer has none).
    pub(crate) async fn batch_consent(
        &self,
        req: pb::BatchGetConsentRequest,
    ) -> Result<pb::BatchGetConsentResponse, ApiError> {
        let ids = crm_kit::fields::id_list("customer_ids", &req.customer_ids, MAX_BATCH)?;
        let mut conn = self.pg.acquire().await?;
        let live = store::live_of(&mut conn, &ids).await?;
        let live_ids: Vec<Uuid> = live.values().filter(|(_, erased)| !erased).map(|(id, _)| *id).collect();
        let mut grants: HashMap<Uuid, Vec<pb::ConsentGrant>> = HashMap::new();
        for (id, grant) in store::consents_of(&mut conn, &live_ids).await? {
            grants.entry(id).or_default().push(grant);
        }
        let mut out = pb::BatchGetConsentResponse::default();
        for (raw, id) in req.customer_ids.iter().zip(&ids) {
            match live.get(id) {
                None => out.missing_ids.push(raw.clone()),
                Some((_, true)) => out.states.push(pb::ConsentState { customer_id: raw.clone(), grants: Vec::new() }),
                Some((live, false)) => out.states.push(pb::ConsentState {
                    customer_id: raw.clone(),
                    grants: grants.get(live).cloned().unwrap_or_default(),
                }),
            }
        }
        Ok(out)
    }

    /// SEC-4: free texts with phone numbers, e-mails and their customer's
    /// names masked.
    pub(crate) async fn mask_free_text(
        &self,
        req: pb::MaskFreeTextRequest,
    ) -> Result<pb::MaskFreeTextResponse, ApiError> {
        if req.texts.is_empty() || req.texts.len() > MAX_BATCH {
            return Err(ApiError::invalid("texts", format!("must hold 1..{MAX_BATCH} texts")));
        }
        // Sizes before any per-character work (REL-5): bytes bound characters from above.
        let mut v = FieldViolations::new();
        let mut total = 0usize;
        for (i, t) in req.texts.iter().enumerate() {
            let chars = if t.text.len() > MAX_TEXT_CHARS { t.text.chars().count() } else { t.text.len() };
            if chars > MAX_TEXT_CHARS {
                v.add(format!("texts[{i}].text"), format!("is longer than {MAX_TEXT_CHARS} characters"));
            }
            total += chars;
        }
        if total > MAX_TOTAL_CHARS {
            v.add("texts", format!("hold more than {MAX_TOTAL_CHARS} characters in all"));
        }
        let ids: Vec<Option<Uuid>> = req
            .texts
            .iter()
            .enumerate()
            .map(|(i, t)| match t.customer_id.as_str() {
                "" => None,
                s => v.check(
                    &format!("texts[{i}].customer_id"),
                    Uuid::parse_str(s).map_err(|_| "must be a customer id (UUID)"),
                ),
            })
            .collect();
        v.into_result()?;
        let known: Vec<Uuid> = ids.iter().flatten().copied().collect();
        let names = if known.is_empty() {
            HashMap::new()
        } else {
            let mut conn = self.pg.acquire().await?;
            store::names_of(&mut conn, &known).await?
        };
        let texts = req
            .texts
            .iter()
            .zip(ids)
            .map(|(t, id)| {
                let of: Vec<&str> = id
                    .and_then(|id| names.get(&id))
                    .map(|n| n.iter().map(String::as_str).collect())
                    .unwrap_or_default();
                mask_text(&t.text, &of)
            })
            .collect();
        Ok(pb::MaskFreeTextResponse { texts })
    }
}
