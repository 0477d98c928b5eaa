//! The `crm.segmentation.v1.SegmentationService` handlers (SPEC 4.2). Every
//! answer about scores or membership carries its freshness (SEG-7).

use std::pin::Pin;

use chrono::{DateTime, Utc};
use crm_kit::idempotency::{self, Claim};
use crm_kit::{ApiError, FieldViolations, IntoGrpc, paging};
use crm_proto::common::v1::Freshness;
use crm_proto::segmentation::v1 as pb;
use crm_proto::segmentation::v1::segmentation_service_server::SegmentationService;
use prost::Message;
use sqlx::{PgPool, Row};
use tokio_stream::Stream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::domain::rules;
use crate::{SERVICE, segments};

const SVC: &str = "/crm.segmentation.v1.SegmentationService/";

/// The segmentation API.
#[derive(Clone)]
pub struct SegmentationApi {
    pg: PgPool,
}

type Reply<T> = Result<Response<T>, Status>;

/// display_name, description, rule, version, created_at, updated_at, refreshed_at.
type SegmentRow = (String, String, Vec<u8>, i64, DateTime<Utc>, DateTime<Utc>, Option<DateTime<Utc>>);

/// scope, state, progress, step, error, created_at, ended_at.
type OperationRow = (i16, i16, i16, String, String, DateTime<Utc>, Option<DateTime<Utc>>);

fn ts(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

fn parse_id(field: &str, value: &str) -> Result<Uuid, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| ApiError::invalid(field, "must be an id (UUID)"))
}

impl SegmentationApi {
    /// An API over the pool.
    pub fn new(pg: PgPool) -> Self {
        Self { pg }
    }

    async fn freshness(&self, computed: Option<DateTime<Utc>>) -> Result<Freshness, ApiError> {
        let as_of: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT max(newest_event_at) FROM freshness").fetch_one(&self.pg).await?;
        Ok(Freshness { as_of: as_of.map(ts), computed_at: computed.map(ts) })
    }

    /// A customer's freshness (SEG-7): the newest event their scores reflect.
    /// A row left alone by a full recompute because nothing changed still
    /// reflects that recompute's events; a customer waiting for the
    /// incremental recompute reflects nothing newer than the wait.
    async fn customer_freshness(
        &self,
        id: Uuid,
        row_as_of: Option<DateTime<Utc>>,
        computed: DateTime<Utc>,
    ) -> Result<Freshness, ApiError> {
        type Times = (Option<DateTime<Utc>>, Option<DateTime<Utc>>, Option<DateTime<Utc>>);
        let (as_of, computed, waiting): Times = sqlx::query_as(
            "SELECT GREATEST($2::timestamptz, c.as_of), GREATEST($3::timestamptz, c.rfm_at), d.since \
                 FROM (SELECT 1) one LEFT JOIN calibration c ON true LEFT JOIN dirty_customers d ON d.customer_id = $1",
        )
        .bind(id)
        .bind(row_as_of)
        .bind(computed)
        .fetch_one(&self.pg)
        .await?;
        let as_of = match (as_of, waiting) {
            (Some(a), Some(w)) => Some(a.min(w)),
            (a, _) => a,
        };
        Ok(Freshness { as_of: as_of.map(ts), computed_at: computed.map(ts) })
    }

    async fn live(&self, field: &str, raw: &str) -> Result<Uuid, ApiError> {
        let id = parse_id(field, raw)?;
        let mut conn = self.pg.acquire().await?;
        crm_kit::db::live_customer(&mut conn, id).await?.ok_or_else(|| ApiError::not_found("customer", raw))
    }

    async fn customer_segments(&self, id: Uuid) -> Result<Vec<pb::SegmentRef>, ApiError> {
        let rows: Vec<(Uuid, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT m.segment_id, s.display_name, m.joined_at FROM segment_members m JOIN segments s USING (segment_id) \
             WHERE m.customer_id = $1 AND s.deleted_at IS NULL ORDER BY s.display_name",
        )
        .bind(id)
        .fetch_all(&self.pg)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(s, name, at)| pb::SegmentRef {
                segment_id: s.to_string(),
                display_name: name,
                join_time: Some(ts(at)),
            })
            .collect())
    }

    async fn view(&self, req: pb::GetCustomerSegmentationRequest) -> Result<pb::CustomerSegmentation, ApiError> {
        let id = self.live("customer_id", &req.customer_id).await?;
        let row = sqlx::query("SELECT * FROM customer_scores WHERE customer_id = $1")
            .bind(id)
            .fetch_optional(&self.pg)
            .await?;
        let Some(row) = row else {
            return Err(ApiError::failed_precondition(
                "NOT_COMPUTED_YET",
                "the customer is known but not scored yet; the next recompute will score them",
            ));
        };
        let risk =
            pb::ChurnRisk::decode(row.try_get::<Vec<u8>, _>("churn_risk")?.as_slice()).map_err(ApiError::internal)?;
        let recency: i32 = row.try_get("recency_days")?;
        let small = |name: &str| -> Result<i32, ApiError> { Ok(row.try_get::<i16, _>(name)? as i32) };
        let rfm = pb::Rfm {
            recency_days: recency,
            frequency: row.try_get("frequency")?,
            monetary: Some(crm_proto::common::v1::Money {
                amount_minor: row.try_get("monetary_minor")?,
                currency: "CNY".into(),
            }),
            recency_score: small("r_score")?,
            frequency_score: small("f_score")?,
            monetary_score: small("m_score")?,
            recency_percentile: small("r_percentile")?,
            frequency_percentile: small("f_percentile")?,
            monetary_percentile: small("m_percentile")?,
            segment: small("rfm_segment")?,
        };
        let history = self.tier_moves(id, None, 12).await?.into_iter().map(|(_, m)| m).collect();
        let computed: DateTime<Utc> = row.try_get("computed_at")?;
        let freshness = self.customer_freshness(id, row.try_get("as_of")?, computed).await?;
        Ok(pb::CustomerSegmentation {
            customer_id: id.to_string(),
            tier: small("tier")?,
            tier_since: Some(ts(row.try_get("tier_since")?)),
            tier_history: history,
            rfm: Some(rfm),
            grid_cell: small("grid_cell")?,
            lifecycle_stage: small("lifecycle_stage")?,
            lifecycle_since: Some(ts(row.try_get("lifecycle_since")?)),
            churn_risk: Some(risk),
            segments: self.customer_segments(id).await?,
            freshness: Some(freshness),
        })
    }

    async fn tier_moves(
        &self,
        id: Uuid,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<(i64, pb::TierMove)>, ApiError> {
        let rows: Vec<(i64, i16, i16, String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT id, from_tier, to_tier, reason, moved_at FROM tier_moves WHERE customer_id = $1 AND ($2::bigint IS NULL OR id < $2) \
             ORDER BY id DESC LIMIT $3",
        )
        .bind(id)
        .bind(before)
        .bind(limit as i64)
        .fetch_all(&self.pg)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(i, f, t, r, at)| {
                (i, pb::TierMove { from_tier: f as i32, to_tier: t as i32, reason: r, move_time: Some(ts(at)) })
            })
            .collect())
    }

    async fn segment_row(&self, id: Uuid) -> Result<pb::Segment, ApiError> {
        let mut conn = self.pg.acquire().await?;
        self.segment_row_in(&mut conn, id).await
    }

    /// The segment as seen by `conn` (inside a transaction: including its own writes).
    async fn segment_row_in(&self, conn: &mut sqlx::PgConnection, id: Uuid) -> Result<pb::Segment, ApiError> {
        let row: Option<SegmentRow> = sqlx::query_as(
            "SELECT display_name, description, rule, version, created_at, updated_at, refreshed_at FROM segments \
             WHERE segment_id = $1 AND deleted_at IS NULL",
        )
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        let (name, description, rule, version, created, updated, refreshed) =
            row.ok_or_else(|| ApiError::not_found("segment", id.to_string()))?;
        let members: i64 = sqlx::query_scalar("SELECT count(*) FROM segment_members WHERE segment_id = $1")
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
        Ok(pb::Segment {
            segment_id: id.to_string(),
            display_name: name,
            description,
            rule: Some(pb::RuleNode::decode(rule.as_slice()).map_err(ApiError::internal)?),
            member_count: members,
            freshness: Some(self.freshness(refreshed).await?),
            create_time: Some(ts(created)),
            update_time: Some(ts(updated)),
            etag: format!("v{version}"),
        })
    }

    async fn create_segment(&self, req: pb::CreateSegmentRequest) -> Result<pb::Segment, ApiError> {
        let mut v = FieldViolations::new();
        if req.segment.is_none() {
            v.required("segment");
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let s = req.segment.clone().unwrap_or_default();
        let mut tx = self.pg.begin().await?;
        let claimed: Claim<pb::Segment> =
            idempotency::claim(&mut tx, &format!("{SVC}CreateSegment"), &req.request_id, &req).await?;
        let fresh = match claimed {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let rule = s.rule.clone().unwrap_or_default();
        let id = match segments::create(&mut tx, &s.display_name, &s.description, &rule).await {
            Ok(id) => id,
            Err(segments::SaveError::Invalid(v)) => return Err(ApiError::InvalidArgument(v)),
            Err(segments::SaveError::NameTaken) => {
                return Err(ApiError::AlreadyExists(format!("a segment named {:?} exists", s.display_name.trim())));
            }
            Err(segments::SaveError::Database(e)) => return Err(e.into()),
        };
        // The first response is stored in the same transaction as the change.
        let saved = self.segment_row_in(&mut tx, id).await?;
        fresh.complete(&mut tx, &saved).await?;
        tx.commit().await?;
        Ok(saved)
    }

    async fn update_segment(&self, req: pb::UpdateSegmentRequest) -> Result<pb::Segment, ApiError> {
        let mut v = FieldViolations::new();
        let patch = req.segment.clone().unwrap_or_default();
        let id = v.check(
            "segment.segment_id",
            parse_id("segment.segment_id", &patch.segment_id).map_err(|_| "must be a segment id (UUID)"),
        );
        let mut paths = req.update_mask.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
        if paths.is_empty() {
            v.add("update_mask", "is required: display_name, description, rule");
        } else if paths.len() > 3 {
            v.add("update_mask", "names more than the 3 updatable fields: display_name, description, rule");
            paths.clear();
        }
        for p in &paths {
            if !["display_name", "description", "rule"].contains(&p.as_str()) {
                v.add("update_mask", format!("unknown or read-only field {p:?}"));
            }
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let id = id.unwrap_or_default();
        let current = self.segment_row(id).await?;
        if !req.etag.is_empty() && req.etag != current.etag {
            return Err(ApiError::Aborted(format!(
                "etag {:?} is stale; the segment is at {:?}",
                req.etag, current.etag
            )));
        }
        let mut next = current.clone();
        for p in &paths {
            match p.as_str() {
                "display_name" => next.display_name = patch.display_name.clone(),
                "description" => next.description = patch.description.clone(),
                _ => next.rule = patch.rule.clone(),
            }
        }
        let mut v = FieldViolations::new();
        if next.display_name.trim().is_empty() || next.display_name.chars().count() > 100 {
            v.add("segment.display_name", "is required, at most 100 characters");
        }
        if let Err(more) = rules::compile(next.rule.as_ref(), "segment.rule", 1) {
            more.iter().for_each(|x| v.add(x.field.clone(), x.description.clone()));
        }
        v.into_result()?;
        let mut tx = self.pg.begin().await?;
        let claimed: Claim<pb::Segment> =
            idempotency::claim(&mut tx, &format!("{SVC}UpdateSegment"), &req.request_id, &req).await?;
        let fresh = match claimed {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let version: i64 = current.etag.trim_start_matches('v').parse().unwrap_or(0);
        let updated = sqlx::query(
            "UPDATE segments SET display_name = $3, description = $4, rule = $5, version = version + 1, updated_at = now() \
             WHERE segment_id = $1 AND version = $2 AND deleted_at IS NULL",
        )
        .bind(id)
        .bind(version)
        .bind(next.display_name.trim())
        .bind(&next.description)
        .bind(next.rule.clone().unwrap_or_default().encode_to_vec())
        .execute(&mut *tx)
        .await
        .map_err(|e| match &e {
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => ApiError::AlreadyExists("another segment has this name".into()),
            _ => e.into(),
        })?;
        if updated.rows_affected() == 0 {
            return Err(ApiError::Aborted("the segment changed concurrently; re-read and retry".into()));
        }
        let saved = self.segment_row_in(&mut tx, id).await?;
        fresh.complete(&mut tx, &saved).await?;
        tx.commit().await?;
        Ok(saved)
    }

    async fn preview(&self, req: pb::PreviewSegmentRequest) -> Result<pb::PreviewSegmentResponse, ApiError> {
        let mut v = FieldViolations::new();
        let compiled = match rules::compile(req.rule.as_ref(), "rule", 1) {
            Ok(c) => Some(c),
            Err(more) => {
                more.iter().for_each(|x| v.add(x.field.clone(), x.description.clone()));
                None
            }
        };
        let size = match req.sample_size {
            0 => 20,
            n if (1..=100).contains(&n) => n as i64,
            _ => {
                v.add("sample_size", "must be 0 (default 20) or 1..100");
                20
            }
        };
        v.into_result()?;
        let compiled = compiled.ok_or_else(|| ApiError::invalid("rule", "is required"))?;
        let mut conn = self.pg.acquire().await?;
        let count = segments::count(&mut conn, &compiled).await?;
        let sample = segments::sample(&mut conn, &compiled, size).await?;
        let computed: Option<DateTime<Utc>> =
            sqlx::query_scalar("SELECT max(computed_at) FROM customer_scores").fetch_one(&mut *conn).await?;
        Ok(pb::PreviewSegmentResponse {
            count,
            sample_customer_ids: sample.into_iter().map(|c| c.to_string()).collect(),
            freshness: Some(self.freshness(computed).await?),
        })
    }

    async fn members(&self, req: pb::ListSegmentMembersRequest) -> Result<pb::ListSegmentMembersResponse, ApiError> {
        let mut v = FieldViolations::new();
        let id =
            v.check("segment_id", parse_id("segment_id", &req.segment_id).map_err(|_| "must be a segment id (UUID)"));
        let size = v.check("page_size", paging::page_size(req.page_size).map_err(|e| e.to_string())).unwrap_or(50);
        let fh = paging::filter_hash(&req.segment_id);
        let after: Option<String> = match paging::decode_token(&req.page_token, &fh) {
            Ok(a) => a,
            Err(_) => {
                v.add("page_token", "is not a token this list issued");
                None
            }
        };
        v.into_result()?;
        let id = id.unwrap_or_default();
        let segment = self.segment_row(id).await?;
        let after = after
            .map(|a| Uuid::parse_str(&a))
            .transpose()
            .map_err(|_| ApiError::invalid("page_token", "is corrupt"))?;
        let rows: Vec<(Uuid, DateTime<Utc>)> = sqlx::query_as(
            "SELECT customer_id, joined_at FROM segment_members WHERE segment_id = $1 AND ($2::uuid IS NULL OR customer_id > $2) \
             ORDER BY customer_id LIMIT $3",
        )
        .bind(id)
        .bind(after)
        .bind(size as i64 + 1)
        .fetch_all(&self.pg)
        .await?;
        let more = rows.len() > size;
        let members: Vec<pb::SegmentMember> = rows
            .into_iter()
            .take(size)
            .map(|(c, at)| pb::SegmentMember { customer_id: c.to_string(), join_time: Some(ts(at)) })
            .collect();
        let next_page_token = match (more, members.last()) {
            (true, Some(last)) => paging::encode_token(&last.customer_id, &fh),
            _ => String::new(),
        };
        Ok(pb::ListSegmentMembersResponse { members, next_page_token, freshness: segment.freshness })
    }
}

#[tonic::async_trait]
impl SegmentationService for SegmentationApi {
    async fn get_customer_segmentation(
        &self,
        request: Request<pb::GetCustomerSegmentationRequest>,
    ) -> Reply<pb::CustomerSegmentation> {
        self.view(request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn list_tier_history(
        &self,
        request: Request<pb::ListTierHistoryRequest>,
    ) -> Reply<pb::ListTierHistoryResponse> {
        let req = request.into_inner();
        async {
            let size = paging::page_size(req.page_size)?;
            let fh = paging::filter_hash(&req.customer_id);
            let before: Option<i64> = paging::decode_token(&req.page_token, &fh)?;
            let id = self.live("customer_id", &req.customer_id).await?;
            let mut rows = self.tier_moves(id, before, size + 1).await?;
            let more = rows.len() > size;
            rows.truncate(size);
            let next_page_token = match (more, rows.last()) {
                (true, Some((i, _))) => paging::encode_token(i, &fh),
                _ => String::new(),
            };
            Ok(pb::ListTierHistoryResponse { moves: rows.into_iter().map(|r| r.1).collect(), next_page_token })
        }
        .await
        .into_grpc(SERVICE)
    }

    async fn create_segment(&self, request: Request<pb::CreateSegmentRequest>) -> Reply<pb::Segment> {
        SegmentationApi::create_segment(self, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn get_segment(&self, request: Request<pb::GetSegmentRequest>) -> Reply<pb::Segment> {
        let req = request.into_inner();
        async { self.segment_row(parse_id("segment_id", &req.segment_id)?).await }.await.into_grpc(SERVICE)
    }

    async fn list_segments(&self, request: Request<pb::ListSegmentsRequest>) -> Reply<pb::ListSegmentsResponse> {
        let req = request.into_inner();
        async {
            let size = paging::page_size(req.page_size)?;
            let fh = paging::filter_hash(&"segments");
            let after: Option<(String, String)> = paging::decode_token(&req.page_token, &fh)?;
            let (name, id) = after.unwrap_or_default();
            let ids: Vec<(Uuid, String)> = sqlx::query_as(
                "SELECT segment_id, lower(display_name) FROM segments WHERE deleted_at IS NULL \
                 AND ($1 = '' OR (lower(display_name), segment_id::text) > ($1, $2)) ORDER BY lower(display_name), segment_id LIMIT $3",
            )
            .bind(&name)
            .bind(&id)
            .bind(size as i64 + 1)
            .fetch_all(&self.pg)
            .await?;
            let more = ids.len() > size;
            let mut out = Vec::new();
            for (sid, _) in ids.iter().take(size) {
                out.push(self.segment_row(*sid).await?);
            }
            let next_page_token = match (more, ids.get(size.saturating_sub(1))) {
                (true, Some((sid, n))) => paging::encode_token(&(n.clone(), sid.to_string()), &fh),
                _ => String::new(),
            };
            Ok(pb::ListSegmentsResponse { segments: out, next_page_token })
        }
        .await
        .into_grpc(SERVICE)
    }

    async fn update_segment(&self, request: Request<pb::UpdateSegmentRequest>) -> Reply<pb::Segment> {
        SegmentationApi::update_segment(self, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn delete_segment(&self, request: Request<pb::DeleteSegmentRequest>) -> Reply<pb::DeleteSegmentResponse> {
        let req = request.into_inner();
        async {
            let mut v = FieldViolations::new();
            let id = v.check(
                "segment_id",
                parse_id("segment_id", &req.segment_id).map_err(|_| "must be a segment id (UUID)"),
            );
            v.absorb(idempotency::validate_request_id(&req.request_id));
            v.into_result()?;
            let id = id.unwrap_or_default();
            // Deleting twice is fine; the membership history is kept (SEG-6).
            let found: Option<bool> =
                sqlx::query_scalar("SELECT deleted_at IS NULL FROM segments WHERE segment_id = $1")
                    .bind(id)
                    .fetch_optional(&self.pg)
                    .await?;
            if found.is_none() {
                return Err(ApiError::not_found("segment", req.segment_id.clone()));
            }
            let mut tx = self.pg.begin().await?;
            sqlx::query("UPDATE segments SET deleted_at = COALESCE(deleted_at, now()) WHERE segment_id = $1")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            sqlx::query("DELETE FROM segment_members WHERE segment_id = $1").bind(id).execute(&mut *tx).await?;
            tx.commit().await?;
            Ok(pb::DeleteSegmentResponse {})
        }
        .await
        .into_grpc(SERVICE)
    }

    async fn preview_segment(&self, request: Request<pb::PreviewSegmentRequest>) -> Reply<pb::PreviewSegmentResponse> {
        self.preview(request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn list_segment_members(
        &self,
        request: Request<pb::ListSegmentMembersRequest>,
    ) -> Reply<pb::ListSegmentMembersResponse> {
        self.members(request.into_inner()).await.into_grpc(SERVICE)
    }

    type StreamSegmentMembersStream = Pin<Box<dyn Stream<Item = Result<pb::SegmentMember, Status>> + Send>>;

    async fn stream_segment_members(
        &self,
        request: Request<pb::StreamSegmentMembersRequest>,
    ) -> Reply<Self::StreamSegmentMembersStream> {
        let req = request.into_inner();
        let id = parse_id("segment_id", &req.segment_id).map_err(|e| e.into_status(SERVICE))?;
        self.segment_row(id).await.map_err(|e| e.into_status(SERVICE))?;
        let pg = self.pg.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1000);
        tokio::spawn(async move {
            let mut after: Option<Uuid> = None;
            loop {
                let rows: Result<Vec<(Uuid, DateTime<Utc>)>, _> = sqlx::query_as(
                    "SELECT customer_id, joined_at FROM segment_members WHERE segment_id = $1 AND ($2::uuid IS NULL OR customer_id > $2) \
                     ORDER BY customer_id LIMIT 1000",
                )
                .bind(id)
                .bind(after)
                .fetch_all(&pg)
                .await;
                let rows = match rows {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(ApiError::from(e).into_status(SERVICE))).await;
                        return;
                    }
                };
                if rows.is_empty() {
                    return;
                }
                after = rows.last().map(|r| r.0);
                for (c, at) in rows {
                    if tx
                        .send(Ok(pb::SegmentMember { customer_id: c.to_string(), join_time: Some(ts(at)) }))
                        .await
                        .is_err()
                    {
                        return; // The client went away.
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn list_customer_segments(
        &self,
        request: Request<pb::ListCustomerSegmentsRequest>,
    ) -> Reply<pb::ListCustomerSegmentsResponse> {
        let req = request.into_inner();
        async {
            let id = self.live("customer_id", &req.customer_id).await?;
            let refreshed: Option<DateTime<Utc>> =
                sqlx::query_scalar("SELECT max(refreshed_at) FROM segments").fetch_one(&self.pg).await?;
            Ok(pb::ListCustomerSegmentsResponse {
                segments: self.customer_segments(id).await?,
                freshness: Some(self.freshness(refreshed).await?),
            })
        }
        .await
        .into_grpc(SERVICE)
    }

    async fn start_recompute(&self, request: Request<pb::StartRecomputeRequest>) -> Reply<pb::RecomputeOperation> {
        let req = request.into_inner();
        async {
            idempotency::validate_request_id(&req.request_id)?;
            let scope = match pb::RecomputeScope::try_from(req.scope) {
                Ok(pb::RecomputeScope::Unspecified) => pb::RecomputeScope::Full,
                Ok(s) => s,
                Err(_) => return Err(ApiError::invalid("scope", "is not a known RecomputeScope")),
            };
            let mut tx = self.pg.begin().await?;
            let claimed: Claim<pb::RecomputeOperation> =
                idempotency::claim(&mut tx, &format!("{SVC}StartRecompute"), &req.request_id, &req).await?;
            let fresh = match claimed {
                Claim::Replay(r) => return Ok(r),
                Claim::Fresh(f) => f,
            };
            let id = Uuid::now_v7();
            sqlx::query("INSERT INTO recompute_operations (operation_id, scope, state) VALUES ($1, $2, 1)")
                .bind(id)
                .bind(scope as i16)
                .execute(&mut *tx)
                .await?;
            let op = pb::RecomputeOperation {
                operation_id: id.to_string(),
                scope: scope as i32,
                state: pb::OperationState::Pending as i32,
                create_time: Some(ts(Utc::now())),
                ..Default::default()
            };
            fresh.complete(&mut tx, &op).await?;
            tx.commit().await?;
            Ok(op)
        }
        .await
        .into_grpc(SERVICE)
    }

    async fn get_recompute(&self, request: Request<pb::GetRecomputeRequest>) -> Reply<pb::RecomputeOperation> {
        let req = request.into_inner();
        async {
            let id = parse_id("operation_id", &req.operation_id)?;
            let row: Option<OperationRow> = sqlx::query_as(
                "SELECT scope, state, progress, step, error, created_at, ended_at FROM recompute_operations WHERE operation_id = $1",
            )
            .bind(id)
            .fetch_optional(&self.pg)
            .await?;
            let (scope, state, progress, step, error, created, ended) = row.ok_or_else(|| ApiError::not_found("operation", req.operation_id.clone()))?;
            Ok(pb::RecomputeOperation {
                operation_id: id.to_string(),
                scope: scope as i32,
                state: state as i32,
                progress_percent: progress as i32,
                step,
                error,
                create_time: Some(ts(created)),
                end_time: ended.map(ts),
            })
        }
        .await
        .into_grpc(SERVICE)
    }
}
