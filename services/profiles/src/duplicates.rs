//! PRF-10: ListSuspectedDuplicates — pairs that look like one customer but
//! were not merged, scored and explained, highest score first.

use crm_kit::{ApiError, FieldViolations, paging};
use crm_proto::profiles::v1 as pb;

use crate::api::ProfilesApi;
use crate::domain::quality;
use crate::store;

/// Candidate pairs examined per request at most.
const MAX_CANDIDATES: i64 = 100_000;

impl ProfilesApi {
    pub(crate) async fn suspected_duplicates(
        &self,
        req: pb::ListSuspectedDuplicatesRequest,
    ) -> Result<pb::ListSuspectedDuplicatesResponse, ApiError> {
        let mut v = FieldViolations::new();
        let size = v.check("page_size", paging::page_size(req.page_size).map_err(|e| e.to_string())).unwrap_or(50);
        let min_score = match req.min_score {
            0 => 60,
            s if (1..=100).contains(&s) => s,
            _ => {
                v.add("min_score", "must be 0 (default 60) or 1..100");
                60
            }
        };
        let fh = paging::filter_hash(&min_score);
        let offset: usize = match paging::decode_token::<usize>(&req.page_token, &fh) {
            Ok(o) => o.unwrap_or(0),
            Err(_) => {
                v.add("page_token", "is not a token this list issued; start again with an empty page_token");
                0
            }
        };
        v.into_result()?;
        let mut conn = self.pg.acquire().await?;
        let candidates = store::duplicate_candidates(&mut conn, MAX_CANDIDATES).await?;
        let mut scored: Vec<pb::SuspectedDuplicate> = candidates
            .into_iter()
            .map(|c| {
                let (score, reasons) = quality::duplicate_score(c.likeness);
                pb::SuspectedDuplicate {
                    customer_id: c.a.to_string(),
                    other_customer_id: c.b.to_string(),
                    reasons: reasons.into_iter().map(String::from).collect(),
                    score,
                }
            })
            .filter(|d| d.score >= min_score)
            .collect();
        // Stable order: score, then ids, so pages do not overlap.
        scored.sort_by(|x, y| {
            y.score
                .cmp(&x.score)
                .then_with(|| x.customer_id.cmp(&y.customer_id))
                .then_with(|| x.other_customer_id.cmp(&y.other_customer_id))
        });
        let page: Vec<_> = scored.iter().skip(offset).take(size).cloned().collect();
        let next_page_token = if offset + page.len() < scored.len() {
            paging::encode_token(&(offset + page.len()), &fh)
        } else {
            String::new()
        };
        Ok(pb::ListSuspectedDuplicatesResponse { duplicates: page, next_page_token })
    }
}
