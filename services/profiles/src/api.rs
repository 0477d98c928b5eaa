//! The `crm.profiles.v1.ProfilesService` handlers: decode and validate,
//! apply the domain rules, store, encode (SPEC 4.1).

use std::collections::BTreeSet;

use chrono::Utc;
use crm_kit::idempotency::{self, Claim};
use crm_kit::{ApiError, Caller, FieldViolations, IntoGrpc, paging, telemetry};
use crm_proto::common::v1::{Channel, Purpose, TimeRange};
use crm_proto::profiles::v1 as pb;
use crm_proto::profiles::v1::profiles_service_server::ProfilesService;
use prost::Message;
use sqlx::PgPool;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::cache::{Lookup, ProfileCache};
use crate::domain::{customer as rules, masking, quality};
use crate::store::{self, Stored};
use crate::{SERVICE, events};

pub(crate) const SVC: &str = "/crm.profiles.v1.ProfilesService/";
const MAX_BATCH: usize = 1000;

/// The profiles API.
#[derive(Clone)]
pub struct ProfilesApi {
    pub(crate) pg: PgPool,
    pub(crate) cache: ProfileCache,
}

type Reply<T> = Result<Response<T>, Status>;

pub(crate) fn caller<T>(request: &Request<T>) -> Result<Caller, Status> {
    Caller::of(request).cloned().map_err(|e| e.into_status(SERVICE))
}

/// Parses a customer id field.
pub(crate) fn parse_id(field: &str, value: &str) -> Result<Uuid, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| ApiError::invalid(field, "must be a customer id (UUID)"))
}

fn range(
    field: &str,
    r: Option<&TimeRange>,
    v: &mut FieldViolations,
) -> (Option<chrono::DateTime<Utc>>, Option<chrono::DateTime<Utc>>) {
    let Some(r) = r else { return (None, None) };
    let mut bound = |name: &str, t: Option<&prost_types::Timestamp>| {
        t.and_then(|t| {
            let parsed = store::from_ts(t);
            if parsed.is_none() {
                v.add(format!("{field}.{name}"), "is not a valid time");
            }
            parsed
        })
    };
    (bound("start_time", r.start_time.as_ref()), bound("end_time", r.end_time.as_ref()))
}

impl ProfilesApi {
    /// An API over the pool and cache.
    pub fn new(pg: PgPool, cache: ProfileCache) -> Self {
        Self { pg, cache }
    }

    /// The caller's view of a stored record: masked without `pii:read` and a
    /// stated purpose; an unmasked view is audited first (SPEC 3, SEC-1).
    pub(crate) async fn view(
        &self,
        caller: &Caller,
        mut c: pb::Customer,
        purpose: &str,
        method: &str,
    ) -> Result<pb::Customer, ApiError> {
        c.completeness = quality::completeness(&c);
        if caller.can_read_pii() && !purpose.trim().is_empty() && !c.erased {
            let id = Uuid::parse_str(&c.customer_id).map_err(ApiError::internal)?;
            let mut conn = self.pg.acquire().await?;
            store::audit(
                &mut conn,
                &caller.subject,
                Some(id),
                &format!("{SVC}{method}"),
                purpose.trim(),
                &telemetry::current_trace_id(),
            )
            .await?;
        } else {
            masking::customer(&mut c);
        }
        Ok(c)
    }

    /// SEC-4: records a search or lookup of personal fields that found nobody.
    async fn audit_search(&self, caller: &Caller, purpose: &str, method: &str) -> Result<(), ApiError> {
        let mut conn = self.pg.acquire().await?;
        store::audit(
            &mut conn,
            &caller.subject,
            None,
            &format!("{SVC}{method}"),
            purpose.trim(),
            &telemetry::current_trace_id(),
        )
        .await?;
        Ok(())
    }

    /// Reads a live record through the cache (PRF-9); aliases resolve to the survivor.
    async fn read(&self, id: Uuid) -> Result<Option<pb::Customer>, ApiError> {
        if let Lookup::Hit(bytes) = self.cache.get(id).await
            && let Ok(c) = pb::Customer::decode(bytes.as_slice())
        {
            return Ok(Some(c));
        }
        let _flight = self.cache.single_flight(id).await;
        // Another task may have filled it while we waited.
        if let Lookup::Hit(bytes) = self.cache.get(id).await
            && let Ok(c) = pb::Customer::decode(bytes.as_slice())
        {
            return Ok(Some(c));
        }
        let mut conn = self.pg.acquire().await?;
        self.cache.count_load();
        let Some(stored) = store::load(&mut conn, id).await? else { return Ok(None) };
        if let Some(target) = stored.merged_into {
            let live = store::resolve(&mut conn, target).await?.unwrap_or(target);
            drop(conn);
            drop(_flight);
            return Box::pin(self.read(live)).await;
        }
        self.cache.fill(id, stored.version, &stored.customer.encode_to_vec()).await;
        Ok(Some(stored.customer))
    }

    async fn get(&self, caller: &Caller, req: pb::GetCustomerRequest) -> Result<pb::Customer, ApiError> {
        let id = parse_id("customer_id", &req.customer_id)?;
        check_purpose(&req.purpose)?;
        let c = self.read(id).await?.ok_or_else(|| ApiError::not_found("customer", &req.customer_id))?;
        self.view(caller, c, &req.purpose, "GetCustomer").await
    }

    async fn create(
        &self,
        caller: &Caller,
        req: pb::CreateCustomerRequest,
    ) -> Result<pb::CreateCustomerResponse, ApiError> {
        let mut v = FieldViolations::new();
        let mut c = req.customer.clone().unwrap_or_default();
        if req.customer.is_none() {
            v.required("customer");
        } else {
            rules::normalise(&mut c, "customer.", &mut v);
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;

        let mut tx = self.pg.begin().await?;
        let claimed: Claim<pb::CreateCustomerResponse> =
            idempotency::claim(&mut tx, &format!("{SVC}CreateCustomer"), &req.request_id, &req).await?;
        let fresh = match claimed {
            Claim::Replay(mut r) => {
                // Stored unmasked; each caller sees it through their own permissions (SEC-1).
                drop(tx);
                r.customer = match r.customer {
                    Some(c) => Some(self.view(caller, c, "", "CreateCustomer").await?),
                    None => None,
                };
                return Ok(r);
            }
            Claim::Fresh(f) => f,
        };
        // PRF-3: serialise creates sharing an identity, then match before inserting.
        store::lock_identities(&mut tx, &rules::identity_keys(&c)).await?;
        let now = Utc::now();
        let (id, created, matched_by) =
            match store::find_by_identity(&mut tx, &c.phone, &c.email, &c.external_ids).await? {
                Some((id, by)) => {
                    self.enrich(&mut tx, id, &c, now, &req.request_id).await?;
                    // SEC-4: a create that matched tells its caller the identity exists.
                    store::audit(
                        &mut tx,
                        &caller.subject,
                        Some(id),
                        &format!("{SVC}CreateCustomer"),
                        &format!("identity matched by {by} on create (PRF-3)"),
                        &telemetry::current_trace_id(),
                    )
                    .await?;
                    (id, false, by)
                }
                None => {
                    let id = Uuid::now_v7();
                    store::insert(&mut tx, id, &c, now).await?;
                    let stored =
                        store::load(&mut tx, id).await?.ok_or_else(|| ApiError::internal("inserted row vanished"))?;
                    events::customer_created(&mut tx, &stored.customer, &req.request_id).await?;
                    (id, true, "")
                }
            };
        let stored = store::load(&mut tx, id).await?.ok_or_else(|| ApiError::internal("customer vanished"))?;
        let mut response = pb::CreateCustomerResponse {
            customer: Some(stored.customer.clone()),
            created,
            matched_by: matched_by.to_string(),
        };
        fresh.complete(&mut tx, &response).await?;
        tx.commit().await?;
        if !created {
            self.cache.invalidate(id, stored.version).await;
        }
        response.customer = Some(self.view(caller, stored.customer, "", "CreateCustomer").await?);
        Ok(response)
    }

    /// PRF-3: a create that matched an existing customer fills its empty
    /// fields and adds tags and external ids; it never overwrites.
    pub(crate) async fn enrich(
        &self,
        tx: &mut sqlx::PgConnection,
        id: Uuid,
        c: &pb::Customer,
        now: chrono::DateTime<Utc>,
        request_id: &str,
    ) -> Result<(), ApiError> {
        let Some(current) = store::load(tx, id).await? else {
            return Err(ApiError::internal("matched customer vanished"));
        };
        let mut merged = current.customer.clone();
        let mut changed = Vec::new();
        macro_rules! fill {
            ($field:ident, $empty:expr) => {
                if $empty(&merged.$field) && !$empty(&c.$field) {
                    merged.$field = c.$field.clone();
                    changed.push(stringify!($field));
                }
            };
        }
        fill!(phone, |s: &String| s.is_empty());
        fill!(email, |s: &String| s.is_empty());
        fill!(region, |s: &String| s.is_empty());
        fill!(timezone, |s: &String| s.is_empty());
        fill!(birthday, |s: &Option<_>| s.is_none());
        fill!(address, |s: &Option<_>| s.is_none());
        fill!(preferred_channel, |s: &i32| *s == 0);
        fill!(gender, |s: &i32| *s == 0);
        for t in &c.tags {
            if !merged.tags.contains(t) {
                merged.tags.push(t.clone());
                changed.push("tags");
            }
        }
        for x in &c.external_ids {
            if !merged.external_ids.contains(x) {
                merged.external_ids.push(x.clone());
                changed.push("external_ids");
            }
        }
        for (k, val) in &c.attributes {
            if !merged.attributes.contains_key(k) {
                merged.attributes.insert(k.clone(), val.clone());
                changed.push("attributes");
            }
        }
        if changed.is_empty() {
            return Ok(());
        }
        // Another live record may already hold the identity being filled in.
        if (changed.contains(&"phone") || changed.contains(&"email"))
            && let Some((other, _)) = store::find_by_identity(tx, &merged.phone, &merged.email, &[]).await?
            && other != id
        {
            merged.phone = current.customer.phone.clone();
            merged.email = current.customer.email.clone();
        }
        if store::update(tx, id, &merged, current.version, now).await?.is_none() {
            return Err(ApiError::Aborted("the matched customer changed concurrently; retry".into()));
        }
        let after = store::load(tx, id).await?.ok_or_else(|| ApiError::internal("customer vanished"))?;
        changed.dedup();
        events::customer_updated(
            tx,
            &after.customer,
            &changed.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            request_id,
        )
        .await?;
        Ok(())
    }

    async fn update(&self, caller: &Caller, req: pb::UpdateCustomerRequest) -> Result<pb::Customer, ApiError> {
        let mut v = FieldViolations::new();
        let patch = req.customer.clone().unwrap_or_default();
        let id = match req.customer.as_ref() {
            None => {
                v.required("customer");
                None
            }
            Some(c) => v.check(
                "customer.customer_id",
                parse_id("customer.customer_id", &c.customer_id).map_err(|e| summary(&e)),
            ),
        };
        let mask: Vec<String> = req.update_mask.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
        v.absorb(idempotency::validate_request_id(&req.request_id));
        let expected_etag = req.etag.trim().to_string();
        // Validate the mask before touching the database.
        rules::apply_mask(&mut pb::Customer::default(), &patch, &mask, &mut v);
        let id = match (id, v.is_empty()) {
            (Some(id), true) => id,
            _ => return Err(ApiError::InvalidArgument(v)),
        };

        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}UpdateCustomer"), &req.request_id, &req).await? {
            Claim::Replay(r) => return self.view(caller, r, "", "UpdateCustomer").await,
            Claim::Fresh(f) => f,
        };
        let live = store::resolve(&mut tx, id).await?.ok_or_else(|| ApiError::not_found("customer", id.to_string()))?;
        sqlx::query("SELECT 1 FROM customers WHERE customer_id = $1 FOR UPDATE").bind(live).execute(&mut *tx).await?;
        let current =
            store::load(&mut tx, live).await?.ok_or_else(|| ApiError::not_found("customer", id.to_string()))?;
        if current.customer.erased {
            return Err(ApiError::failed_precondition(
                "CUSTOMER_ERASED",
                "the customer was erased and cannot be updated",
            ));
        }
        if !expected_etag.is_empty() && expected_etag != store::etag(current.version) {
            return Err(ApiError::Aborted(format!(
                "etag {expected_etag:?} is stale; the customer is now at {:?}: re-read and retry",
                store::etag(current.version)
            )));
        }
        let mut next = current.customer.clone();
        let mut v = FieldViolations::new();
        rules::apply_mask(&mut next, &patch, &mask, &mut v);
        rules::normalise(&mut next, "customer.", &mut v);
        v.into_result()?;
        if !next.phone.is_empty() || !next.email.is_empty() {
            store::lock_identities(&mut tx, &rules::identity_keys(&next)).await?;
            if let Some((other, by)) = store::find_by_identity(&mut tx, &next.phone, &next.email, &[]).await?
                && other != live
            {
                // Only a caller who may read personal data learns whom (SEC-4).
                let whom = if caller.can_read_pii() { format!(" ({other})") } else { String::new() };
                return Err(ApiError::AlreadyExists(format!(
                    "another customer{whom} already has this {by}; merge the two records instead"
                )));
            }
        }
        let Some(version) = store::update(&mut tx, live, &next, current.version, Utc::now()).await? else {
            return Err(ApiError::Aborted("the customer changed concurrently; re-read and retry".into()));
        };
        let stored = store::load(&mut tx, live).await?.ok_or_else(|| ApiError::internal("customer vanished"))?;
        events::customer_updated(&mut tx, &stored.customer, &mask, &req.request_id).await?;
        fresh.complete(&mut tx, &stored.customer).await?;
        tx.commit().await?;
        self.cache.invalidate(live, version).await;
        self.view(caller, stored.customer, "", "UpdateCustomer").await
    }

    async fn list(
        &self,
        caller: &Caller,
        req: pb::ListCustomersRequest,
    ) -> Result<pb::ListCustomersResponse, ApiError> {
        let mut v = FieldViolations::new();
        let size = v.check("page_size", paging::page_size(req.page_size).map_err(|e| summary(&e))).unwrap_or(50);
        check_purpose(&req.purpose)?;
        if req.tags.len() > 50 {
            // A customer carries at most 50 tags; REL-5: no per-item work past that.
            return Err(ApiError::invalid("tags", "at most 50 tags"));
        }
        let filter = store::ListFilter {
            tags: req.tags.iter().map(|t| t.trim().to_lowercase()).collect(),
            region: (!req.region.is_empty()).then(|| req.region.clone()),
            tier: match crm_proto::common::v1::Tier::try_from(req.tier) {
                Ok(crm_proto::common::v1::Tier::Unspecified) => None,
                Ok(t) => Some(t as i16),
                Err(_) => {
                    v.add("tier", "is not a known Tier");
                    None
                }
            },
            kind: match pb::CustomerKind::try_from(req.kind) {
                Ok(pb::CustomerKind::Unspecified) => None,
                Ok(k) => Some(k as i16),
                Err(_) => {
                    v.add("kind", "is not a known CustomerKind");
                    None
                }
            },
            text_prefix: {
                let p = req.text_prefix.trim();
                if p.chars().count() > 100 {
                    v.add("text_prefix", "is longer than 100 characters");
                }
                (!p.is_empty()).then(|| p.to_string())
            },
            created: range("create_time", req.create_time.as_ref(), &mut v),
            updated: range("update_time", req.update_time.as_ref(), &mut v),
        };
        let fh = paging::filter_hash(&filter);
        let after: Option<(i64, u32, String)> = match paging::decode_token(&req.page_token, &fh) {
            Ok(a) => a,
            Err(e) => {
                v.add("page_token", summary(&e));
                None
            }
        };
        v.into_result()?;
        if filter.text_prefix.is_some() {
            require_search_rights(caller, &req.purpose, "text_prefix")?;
        }
        let after = match after {
            Some((secs, nanos, id)) => Some((
                chrono::DateTime::from_timestamp(secs, nanos)
                    .ok_or_else(|| ApiError::invalid("page_token", "is corrupt"))?,
                Uuid::parse_str(&id).map_err(|_| ApiError::invalid("page_token", "is corrupt"))?,
            )),
            None => None,
        };
        let mut conn = self.pg.acquire().await?;
        let mut rows = store::list(&mut conn, &filter, after, size + 1).await?;
        drop(conn);
        let more = rows.len() > size;
        rows.truncate(size);
        let next_page_token = match (more, rows.last()) {
            (true, Some(last)) => {
                let t = last.customer.create_time.unwrap_or_default();
                paging::encode_token(&(t.seconds, t.nanos as u32, last.customer.customer_id.clone()), &fh)
            }
            _ => String::new(),
        };
        if rows.is_empty() && filter.text_prefix.is_some() {
            // SEC-4: a search of personal fields that found nobody is audited too.
            self.audit_search(caller, &req.purpose, "ListCustomers").await?;
        }
        let mut customers = Vec::with_capacity(rows.len());
        for Stored { customer, .. } in rows {
            customers.push(self.view(caller, customer, &req.purpose, "ListCustomers").await?);
        }
        Ok(pb::ListCustomersResponse { customers, next_page_token })
    }

    async fn batch_get(
        &self,
        caller: &Caller,
        req: pb::BatchGetCustomersRequest,
    ) -> Result<pb::BatchGetCustomersResponse, ApiError> {
        let ids = crm_kit::fields::id_list("customer_ids", &req.customer_ids, MAX_BATCH)?;
        check_purpose(&req.purpose)?;
        let mut out = pb::BatchGetCustomersResponse::default();
        for (raw, id) in req.customer_ids.iter().zip(ids) {
            match self.read(id).await? {
                Some(c) => out.customers.push(self.view(caller, c, &req.purpose, "BatchGetCustomers").await?),
                None => out.missing_ids.push(raw.clone()),
            }
        }
        Ok(out)
    }

    async fn resolve_identity(
        &self,
        caller: &Caller,
        req: pb::ResolveCustomerRequest,
    ) -> Result<pb::Customer, ApiError> {
        use crate::domain::identity::{Email, Phone};
        use pb::resolve_customer_request::Identity;
        check_purpose(&req.purpose)?;
        let (phone, email, ext) = match &req.identity {
            None => return Err(ApiError::invalid("identity", "give one of phone, email or external_id")),
            Some(Identity::Phone(p)) => (
                Phone::parse(p).map_err(|e| ApiError::invalid("phone", e.0))?.as_str().to_string(),
                String::new(),
                vec![],
            ),
            Some(Identity::Email(e)) => (
                String::new(),
                Email::parse(e).map_err(|e| ApiError::invalid("email", e.0))?.as_str().to_string(),
                vec![],
            ),
            Some(Identity::ExternalId(x)) => {
                if x.source.is_empty() || x.id.is_empty() {
                    return Err(ApiError::invalid("external_id", "needs both source and id"));
                }
                (
                    String::new(),
                    String::new(),
                    vec![pb::ExternalId { source: x.source.trim().to_lowercase(), id: x.id.trim().to_string() }],
                )
            }
        };
        require_search_rights(caller, &req.purpose, "identity")?;
        let mut conn = self.pg.acquire().await?;
        let found = store::find_by_identity(&mut conn, &phone, &email, &ext).await?;
        drop(conn);
        let Some((id, _)) = found else {
            // SEC-4: a lookup that found nobody is audited too.
            self.audit_search(caller, &req.purpose, "ResolveCustomer").await?;
            return Err(ApiError::not_found("customer", "with that identity"));
        };
        let c = self.read(id).await?.ok_or_else(|| ApiError::not_found("customer", id.to_string()))?;
        self.view(caller, c, &req.purpose, "ResolveCustomer").await
    }

    /// Resolves the customer id of batch rows; unknown customers become rejections.
    async fn resolve_rows(&self, ids: &[String]) -> Result<Vec<Option<Uuid>>, ApiError> {
        let parsed: Vec<Option<Uuid>> = ids.iter().map(|s| Uuid::parse_str(s).ok()).collect();
        let distinct: Vec<Uuid> = parsed.iter().flatten().copied().collect::<BTreeSet<_>>().into_iter().collect();
        let mut conn = self.pg.acquire().await?;
        let mut map = std::collections::HashMap::new();
        for id in distinct {
            if let Some(live) = store::resolve(&mut conn, id).await? {
                map.insert(id, live);
            }
        }
        let live: BTreeSet<Uuid> =
            store::live_ids(&mut conn, &map.values().copied().collect::<Vec<_>>()).await?.into_iter().collect();
        Ok(parsed.into_iter().map(|p| p.and_then(|id| map.get(&id).copied()).filter(|l| live.contains(l))).collect())
    }

    async fn record_transactions(
        &self,
        req: pb::BatchRecordTransactionsRequest,
    ) -> Result<pb::BatchRecordTransactionsResponse, ApiError> {
        let mut v = FieldViolations::new();
        if req.transactions.is_empty() || req.transactions.len() > MAX_BATCH {
            v.add("transactions", format!("must hold 1..{MAX_BATCH} rows"));
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let owners =
            self.resolve_rows(&req.transactions.iter().map(|t| t.customer_id.clone()).collect::<Vec<_>>()).await?;
        let mut rejections = Vec::new();
        let mut rows = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, (t, owner)) in req.transactions.iter().zip(owners).enumerate() {
            match crate::domain::records::check_transaction(t) {
                Err((field, reason)) => rejections.push(pb::RowRejection { index: i as i64, field, reason }),
                Ok(()) => match owner {
                    None => rejections.push(pb::RowRejection {
                        index: i as i64,
                        field: "customer_id".into(),
                        reason: "no such customer".into(),
                    }),
                    Some(_) if !seen.insert(t.transaction_id.clone()) => rejections.push(pb::RowRejection {
                        index: i as i64,
                        field: "transaction_id".into(),
                        reason: "appears twice in this batch".into(),
                    }),
                    Some(id) => rows.push((id, pb::Transaction { customer_id: id.to_string(), ..t.clone() })),
                },
            }
        }
        let mut tx = self.pg.begin().await?;
        let fresh =
            match idempotency::claim(&mut tx, &format!("{SVC}BatchRecordTransactions"), &req.request_id, &req).await? {
                Claim::Replay(r) => return Ok(r),
                Claim::Fresh(f) => f,
            };
        let inserted: BTreeSet<String> = store::insert_transactions(&mut tx, &rows).await?.into_iter().collect();
        for (_, t) in rows.iter().filter(|(_, t)| inserted.contains(&t.transaction_id)) {
            events::transaction_recorded(&mut tx, t, &req.request_id).await?;
        }
        let response = pb::BatchRecordTransactionsResponse {
            accepted: inserted.len() as i64,
            duplicates: (rows.len() - inserted.len()) as i64,
            rejections,
        };
        fresh.complete(&mut tx, &response).await?;
        tx.commit().await?;
        Ok(response)
    }

    async fn record_interactions(
        &self,
        req: pb::BatchRecordInteractionsRequest,
    ) -> Result<pb::BatchRecordInteractionsResponse, ApiError> {
        let mut v = FieldViolations::new();
        if req.interactions.is_empty() || req.interactions.len() > MAX_BATCH {
            v.add("interactions", format!("must hold 1..{MAX_BATCH} rows"));
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let owners =
            self.resolve_rows(&req.interactions.iter().map(|t| t.customer_id.clone()).collect::<Vec<_>>()).await?;
        let mut rejections = Vec::new();
        let mut rows = Vec::new();
        for (i, (x, owner)) in req.interactions.iter().zip(owners).enumerate() {
            match (crate::domain::records::check_interaction(x), owner) {
                (Err((field, reason)), _) => rejections.push(pb::RowRejection { index: i as i64, field, reason }),
                (Ok(()), None) => rejections.push(pb::RowRejection {
                    index: i as i64,
                    field: "customer_id".into(),
                    reason: "no such customer".into(),
                }),
                (Ok(()), Some(id)) => {
                    let mut row = pb::Interaction { customer_id: id.to_string(), ..x.clone() };
                    if row.interaction_id.is_empty() {
                        // Without a source id the row cannot be deduplicated: derive one from the request.
                        row.interaction_id = format!("{}#{i}", req.request_id);
                    }
                    if row.direction == 0 {
                        row.direction = pb::Direction::Inbound as i32;
                    }
                    rows.push((id, row));
                }
            }
        }
        let mut tx = self.pg.begin().await?;
        let fresh =
            match idempotency::claim(&mut tx, &format!("{SVC}BatchRecordInteractions"), &req.request_id, &req).await? {
                Claim::Replay(r) => return Ok(r),
                Claim::Fresh(f) => f,
            };
        let inserted: BTreeSet<String> = store::insert_interactions(&mut tx, &rows).await?.into_iter().collect();
        for (_, x) in rows.iter().filter(|(_, x)| inserted.contains(&x.interaction_id)) {
            events::interaction_recorded(&mut tx, x, &req.request_id).await?;
        }
        let response = pb::BatchRecordInteractionsResponse {
            accepted: inserted.len() as i64,
            duplicates: (rows.len() - inserted.len()) as i64,
            rejections,
        };
        fresh.complete(&mut tx, &response).await?;
        tx.commit().await?;
        Ok(response)
    }

    async fn timeline(
        &self,
        caller: &Caller,
        req: pb::ListTimelineRequest,
    ) -> Result<pb::ListTimelineResponse, ApiError> {
        let mut v = FieldViolations::new();
        let id = v.check("customer_id", parse_id("customer_id", &req.customer_id).map_err(|e| summary(&e)));
        let size = v.check("page_size", paging::page_size(req.page_size).map_err(|e| summary(&e))).unwrap_or(50);
        for (i, k) in req.kinds.iter().enumerate() {
            if pb::TimelineEntryKind::try_from(*k).is_err() || *k == 0 {
                v.add(format!("kinds[{i}]"), "is not a known TimelineEntryKind");
            }
        }
        let r = range("time_range", req.time_range.as_ref(), &mut v);
        let fh = paging::filter_hash(&(&req.customer_id, &req.kinds, r));
        let after: Option<(i64, u32, i32, String)> = match paging::decode_token(&req.page_token, &fh) {
            Ok(a) => a,
            Err(e) => {
                v.add("page_token", summary(&e));
                None
            }
        };
        v.into_result()?;
        let id = id.ok_or_else(|| ApiError::invalid("customer_id", "is required"))?;
        let mut conn = self.pg.acquire().await?;
        let live =
            store::resolve(&mut conn, id).await?.ok_or_else(|| ApiError::not_found("customer", id.to_string()))?;
        let ids = store::identity_set(&mut conn, live).await?;
        let cursor = match after {
            Some((s, n, k, src)) => Some((
                chrono::DateTime::from_timestamp(s, n).ok_or_else(|| ApiError::invalid("page_token", "is corrupt"))?,
                k,
                src,
            )),
            None => None,
        };
        let mut entries = store::timeline(&mut conn, &ids, &req.kinds, r, cursor.as_ref(), size + 1).await?;
        if !caller.can_read_pii() {
            // SEC-4: an interaction's note may name the customer or give a number.
            let names: Vec<String> = store::names_of(&mut conn, &ids).await?.into_values().flatten().collect();
            let names: Vec<&str> = names.iter().map(String::as_str).collect();
            for e in &mut entries {
                e.summary = crm_kit::privacy::mask_text(&e.summary, &names);
            }
        }
        let more = entries.len() > size;
        entries.truncate(size);
        let next_page_token = match (more, entries.last()) {
            (true, Some(e)) => {
                let t = e.occurred_at.unwrap_or_default();
                paging::encode_token(&(t.seconds, t.nanos as u32, e.kind, e.source_id.clone()), &fh)
            }
            _ => String::new(),
        };
        Ok(pb::ListTimelineResponse { entries, next_page_token })
    }

    async fn live_customer(&self, conn: &mut sqlx::PgConnection, field: &str, raw: &str) -> Result<Uuid, ApiError> {
        let id = parse_id(field, raw)?;
        let live = store::resolve(conn, id).await?.ok_or_else(|| ApiError::not_found("customer", raw))?;
        Ok(live)
    }

    async fn get_consent(&self, req: pb::GetConsentRequest) -> Result<pb::ConsentState, ApiError> {
        parse_id("customer_id", &req.customer_id)?;
        let mut conn = self.pg.acquire().await?;
        let id = self.live_customer(&mut conn, "customer_id", &req.customer_id).await?;
        Ok(pb::ConsentState { customer_id: id.to_string(), grants: store::consents(&mut conn, id).await? })
    }

    async fn update_consent(
        &self,
        caller: &Caller,
        req: pb::UpdateConsentRequest,
    ) -> Result<pb::ConsentState, ApiError> {
        let mut v = FieldViolations::new();
        v.check("customer_id", parse_id("customer_id", &req.customer_id).map_err(|e| summary(&e)));
        if req.changes.is_empty() || req.changes.len() > 50 {
            // REL-5: no per-item work on a list over its limit.
            v.add("changes", "must hold 1..50 grants");
            v.absorb(idempotency::validate_request_id(&req.request_id));
            return Err(ApiError::InvalidArgument(v));
        }
        for (i, g) in req.changes.iter().enumerate() {
            if Channel::try_from(g.channel).is_err() || g.channel == 0 {
                v.add(format!("changes[{i}].channel"), "is required and must be a known Channel");
            }
            if Purpose::try_from(g.purpose).is_err() || g.purpose == 0 {
                v.add(format!("changes[{i}].purpose"), "is required and must be a known Purpose");
            }
            if g.source.chars().count() > 100 {
                v.add(format!("changes[{i}].source"), "is longer than 100 characters");
            }
            if g.expire_time.as_ref().is_some_and(|t| store::from_ts(t).is_none()) {
                v.add(format!("changes[{i}].expire_time"), "is not a valid time");
            }
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}UpdateConsent"), &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let id = self.live_customer(&mut tx, "customer_id", &req.customer_id).await?;
        let now = Utc::now();
        for g in &req.changes {
            store::set_consent(&mut tx, id, g, &caller.subject, now).await?;
        }
        let state = pb::ConsentState { customer_id: id.to_string(), grants: store::consents(&mut tx, id).await? };
        let changed: Vec<pb::ConsentGrant> = state
            .grants
            .iter()
            .filter(|g| req.changes.iter().any(|c| c.channel == g.channel && c.purpose == g.purpose))
            .cloned()
            .collect();
        events::consent_changed(&mut tx, id, changed, &req.request_id).await?;
        fresh.complete(&mut tx, &state).await?;
        tx.commit().await?;
        Ok(state)
    }

    async fn consent_history(
        &self,
        req: pb::ListConsentHistoryRequest,
    ) -> Result<pb::ListConsentHistoryResponse, ApiError> {
        let size = paging::page_size(req.page_size)?;
        let fh = paging::filter_hash(&req.customer_id);
        let before: Option<i64> = paging::decode_token(&req.page_token, &fh)?;
        let mut conn = self.pg.acquire().await?;
        let id = self.live_customer(&mut conn, "customer_id", &req.customer_id).await?;
        let mut rows = store::consent_history(&mut conn, id, before, size + 1).await?;
        let more = rows.len() > size;
        rows.truncate(size);
        let next_page_token = match (more, rows.last()) {
            (true, Some((hid, _))) => paging::encode_token(hid, &fh),
            _ => String::new(),
        };
        Ok(pb::ListConsentHistoryResponse { changes: rows.into_iter().map(|r| r.1).collect(), next_page_token })
    }

    async fn export(
        &self,
        caller: &Caller,
        req: pb::ExportCustomerDataRequest,
    ) -> Result<pb::ExportCustomerDataResponse, ApiError> {
        let mut v = FieldViolations::new();
        v.check("customer_id", parse_id("customer_id", &req.customer_id).map_err(|e| summary(&e)));
        if req.purpose.trim().is_empty() {
            v.add("purpose", "is required: state why the data is exported (audited)");
        }
        v.into_result()?;
        let mut conn = self.pg.acquire().await?;
        let id = self.live_customer(&mut conn, "customer_id", &req.customer_id).await?;
        let stored =
            store::load(&mut conn, id).await?.ok_or_else(|| ApiError::not_found("customer", &req.customer_id))?;
        let ids = store::identity_set(&mut conn, id).await?;
        store::audit(
            &mut conn,
            &caller.subject,
            Some(id),
            &format!("{SVC}ExportCustomerData"),
            req.purpose.trim(),
            &telemetry::current_trace_id(),
        )
        .await?;
        let transactions = sqlx::query_as::<_, (String, i16, i64, String, chrono::DateTime<Utc>, String, String, i16)>(
            "SELECT transaction_id, kind, amount_minor, currency, occurred_at, product_id, category, channel FROM transactions \
             WHERE customer_id = ANY($1) ORDER BY occurred_at",
        )
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(tid, kind, amount, currency, at, product, category, channel)| pb::Transaction {
            transaction_id: tid,
            customer_id: id.to_string(),
            kind: kind as i32,
            amount: Some(crm_proto::common::v1::Money { amount_minor: amount, currency }),
            occurred_at: Some(store::ts(at)),
            product_id: product,
            category,
            channel: channel as i32,
        })
        .collect();
        let interactions = sqlx::query_as::<_, (String, i16, i16, i16, chrono::DateTime<Utc>, String)>(
            "SELECT interaction_id, kind, channel, direction, occurred_at, note FROM interactions WHERE customer_id = ANY($1) ORDER BY occurred_at",
        )
        .bind(&ids)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .map(|(iid, kind, channel, direction, at, note)| pb::Interaction {
            interaction_id: iid,
            customer_id: id.to_string(),
            kind: kind as i32,
            channel: channel as i32,
            direction: direction as i32,
            occurred_at: Some(store::ts(at)),
            note,
        })
        .collect();
        let consent_history =
            store::consent_history(&mut conn, id, None, 10_000).await?.into_iter().map(|r| r.1).collect();
        let timeline = store::timeline(&mut conn, &ids, &[], (None, None), None, 10_000).await?;
        let mut customer = stored.customer;
        customer.completeness = quality::completeness(&customer);
        Ok(pb::ExportCustomerDataResponse {
            customer: Some(customer),
            transactions,
            interactions,
            consent_history,
            timeline,
        })
    }

    async fn erase(
        &self,
        caller: &Caller,
        req: pb::EraseCustomerRequest,
    ) -> Result<pb::EraseCustomerResponse, ApiError> {
        let mut v = FieldViolations::new();
        v.check("customer_id", parse_id("customer_id", &req.customer_id).map_err(|e| summary(&e)));
        if req.reason.trim().is_empty() || req.reason.chars().count() > 500 {
            v.add("reason", "is required, at most 500 characters (audited)");
        }
        v.absorb(idempotency::validate_request_id(&req.request_id));
        v.into_result()?;
        let mut tx = self.pg.begin().await?;
        let fresh = match idempotency::claim(&mut tx, &format!("{SVC}EraseCustomer"), &req.request_id, &req).await? {
            Claim::Replay(r) => return Ok(r),
            Claim::Fresh(f) => f,
        };
        let id = self.live_customer(&mut tx, "customer_id", &req.customer_id).await?;
        let ids = store::identity_set(&mut tx, id).await?;
        // Whatever the stated reason says about the person is taken out before it is kept.
        let names: Vec<String> = store::names_of(&mut tx, &ids).await?.into_values().flatten().collect();
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        let reason = crm_kit::privacy::scrub_text(req.reason.trim(), &names);
        // PRF-8: idempotent — a second erasure of the same customer changes nothing and emits nothing.
        let first = store::record_erasure(&mut tx, id, &caller.subject, &reason).await?;
        let now = Utc::now();
        if first {
            store::erase(&mut tx, &ids, &names, now).await?;
            // Stored first responses of idempotent mutations may hold the record: they go too.
            crm_kit::idempotency::forget_customers(&mut tx, &ids).await?;
            sqlx::query("INSERT INTO erasure_confirmations (customer_id, service) VALUES ($1, 'profiles') ON CONFLICT DO NOTHING")
                .bind(id)
                .execute(&mut *tx)
                .await?;
            events::customer_erased(&mut tx, id, &ids, &req.request_id).await?;
        }
        let status = erasure_status(&mut tx, id).await?;
        let response = pb::EraseCustomerResponse { status: Some(status) };
        fresh.complete(&mut tx, &response).await?;
        tx.commit().await?;
        for x in ids {
            let version: i64 = sqlx::query_scalar("SELECT version FROM customers WHERE customer_id = $1")
                .bind(x)
                .fetch_one(&self.pg)
                .await?;
            self.cache.invalidate(x, version).await;
        }
        Ok(response)
    }

    async fn audit_entries(&self, req: pb::ListAccessAuditRequest) -> Result<pb::ListAccessAuditResponse, ApiError> {
        let mut v = FieldViolations::new();
        let size = v.check("page_size", paging::page_size(req.page_size).map_err(|e| summary(&e))).unwrap_or(50);
        let customer = if req.customer_id.is_empty() {
            None
        } else {
            v.check("customer_id", Uuid::parse_str(&req.customer_id).map_err(|_| "must be a customer id (UUID)"))
        };
        let r = range("time_range", req.time_range.as_ref(), &mut v);
        let fh = paging::filter_hash(&(&req.customer_id, &req.subject, r));
        let before: Option<i64> = match paging::decode_token(&req.page_token, &fh) {
            Ok(b) => b,
            Err(e) => {
                v.add("page_token", summary(&e));
                None
            }
        };
        v.into_result()?;
        let subject = (!req.subject.is_empty()).then_some(req.subject.as_str());
        let mut conn = self.pg.acquire().await?;
        let mut rows = store::audit_entries(&mut conn, customer, subject, r, before, size + 1).await?;
        let more = rows.len() > size;
        rows.truncate(size);
        let next_page_token = match (more, rows.last()) {
            (true, Some((id, _))) => paging::encode_token(id, &fh),
            _ => String::new(),
        };
        Ok(pb::ListAccessAuditResponse { entries: rows.into_iter().map(|r| r.1).collect(), next_page_token })
    }
}

/// Services expected to confirm an erasure (PRF-8).
pub const ERASURE_PARTICIPANTS: &[&str] = &["profiles", "segmentation", "outreach", "feedback", "analytics"];

async fn erasure_status(conn: &mut sqlx::PgConnection, id: Uuid) -> Result<pb::ErasureStatus, ApiError> {
    let requested: Option<chrono::DateTime<Utc>> =
        sqlx::query_scalar("SELECT requested_at FROM erasures WHERE customer_id = $1")
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    let requested = requested.ok_or_else(|| ApiError::not_found("erasure", id.to_string()))?;
    let confirmed: Vec<(String, chrono::DateTime<Utc>)> =
        sqlx::query_as("SELECT service, confirmed_at FROM erasure_confirmations WHERE customer_id = $1")
            .bind(id)
            .fetch_all(&mut *conn)
            .await?;
    let pending =
        ERASURE_PARTICIPANTS.iter().filter(|s| !confirmed.iter().any(|c| c.0 == **s)).map(|s| s.to_string()).collect();
    Ok(pb::ErasureStatus {
        customer_id: id.to_string(),
        request_time: Some(store::ts(requested)),
        confirmed: confirmed.into_iter().map(|(s, t)| (s, store::ts(t))).collect(),
        pending,
    })
}

/// SEC-4: searching or matching on personal fields needs `pii:read` and a
/// stated purpose; a caller who may not read a field cannot probe it.
fn require_search_rights(caller: &Caller, purpose: &str, field: &str) -> Result<(), ApiError> {
    if !caller.can_read_pii() {
        return Err(ApiError::PermissionDenied(format!(
            "{field} searches personal data (name, phone, e-mail, external ids) and needs the pii:read permission (SEC-4)"
        )));
    }
    if purpose.trim().is_empty() {
        return Err(ApiError::invalid("purpose", format!("is required when {field} searches personal data (audited)")));
    }
    Ok(())
}

fn check_purpose(purpose: &str) -> Result<(), ApiError> {
    if purpose.chars().count() > 200 {
        return Err(ApiError::invalid("purpose", "is longer than 200 characters"));
    }
    Ok(())
}

/// The description of a single-field error, for re-filing under another collector.
fn summary(e: &ApiError) -> String {
    match e {
        ApiError::InvalidArgument(v) => v.iter().map(|x| x.description.clone()).collect::<Vec<_>>().join("; "),
        other => other.to_string(),
    }
}

#[tonic::async_trait]
impl ProfilesService for ProfilesApi {
    async fn create_customer(&self, request: Request<pb::CreateCustomerRequest>) -> Reply<pb::CreateCustomerResponse> {
        let caller = caller(&request)?;
        self.create(&caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn get_customer(&self, request: Request<pb::GetCustomerRequest>) -> Reply<pb::Customer> {
        let caller = caller(&request)?;
        self.get(&caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn batch_get_customers(
        &self,
        request: Request<pb::BatchGetCustomersRequest>,
    ) -> Reply<pb::BatchGetCustomersResponse> {
        let caller = caller(&request)?;
        self.batch_get(&caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn update_customer(&self, request: Request<pb::UpdateCustomerRequest>) -> Reply<pb::Customer> {
        let caller = caller(&request)?;
        self.update(&caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn list_customers(&self, request: Request<pb::ListCustomersRequest>) -> Reply<pb::ListCustomersResponse> {
        let caller = caller(&request)?;
        self.list(&caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn resolve_customer(&self, request: Request<pb::ResolveCustomerRequest>) -> Reply<pb::Customer> {
        let caller = caller(&request)?;
        self.resolve_identity(&caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn merge_customers(&self, request: Request<pb::MergeCustomersRequest>) -> Reply<pb::MergeCustomersResponse> {
        let caller = caller(&request)?;
        self.merge(&caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn unmerge_customer(
        &self,
        request: Request<pb::UnmergeCustomerRequest>,
    ) -> Reply<pb::UnmergeCustomerResponse> {
        let caller = caller(&request)?;
        self.unmerge(&caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn batch_record_transactions(
        &self,
        request: Request<pb::BatchRecordTransactionsRequest>,
    ) -> Reply<pb::BatchRecordTransactionsResponse> {
        self.record_transactions(request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn batch_record_interactions(
        &self,
        request: Request<pb::BatchRecordInteractionsRequest>,
    ) -> Reply<pb::BatchRecordInteractionsResponse> {
        self.record_interactions(request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn import_records(
        &self,
        request: Request<Streaming<pb::ImportRecordsRequest>>,
    ) -> Reply<pb::ImportRecordsResponse> {
        self.import(request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn list_timeline(&self, request: Request<pb::ListTimelineRequest>) -> Reply<pb::ListTimelineResponse> {
        let caller = caller(&request)?;
        self.timeline(&caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn get_consent(&self, request: Request<pb::GetConsentRequest>) -> Reply<pb::ConsentState> {
        ProfilesApi::get_consent(self, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn update_consent(&self, request: Request<pb::UpdateConsentRequest>) -> Reply<pb::ConsentState> {
        let caller = caller(&request)?;
        ProfilesApi::update_consent(self, &caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn list_consent_history(
        &self,
        request: Request<pb::ListConsentHistoryRequest>,
    ) -> Reply<pb::ListConsentHistoryResponse> {
        self.consent_history(request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn export_customer_data(
        &self,
        request: Request<pb::ExportCustomerDataRequest>,
    ) -> Reply<pb::ExportCustomerDataResponse> {
        let caller = caller(&request)?;
        self.export(&caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn erase_customer(&self, request: Request<pb::EraseCustomerRequest>) -> Reply<pb::EraseCustomerResponse> {
        let caller = caller(&request)?;
        self.erase(&caller, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn get_erasure_status(&self, request: Request<pb::GetErasureStatusRequest>) -> Reply<pb::ErasureStatus> {
        let req = request.into_inner();
        async {
            let id = parse_id("customer_id", &req.customer_id)?;
            let mut conn = self.pg.acquire().await?;
            erasure_status(&mut conn, id).await
        }
        .await
        .into_grpc(SERVICE)
    }

    async fn list_access_audit(
        &self,
        request: Request<pb::ListAccessAuditRequest>,
    ) -> Reply<pb::ListAccessAuditResponse> {
        self.audit_entries(request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn batch_get_consent(
        &self,
        request: Request<pb::BatchGetConsentRequest>,
    ) -> Reply<pb::BatchGetConsentResponse> {
        self.batch_consent(request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn mask_free_text(&self, request: Request<pb::MaskFreeTextRequest>) -> Reply<pb::MaskFreeTextResponse> {
        ProfilesApi::mask_free_text(self, request.into_inner()).await.into_grpc(SERVICE)
    }

    async fn list_suspected_duplicates(
        &self,
        request: Request<pb::ListSuspectedDuplicatesRequest>,
    ) -> Reply<pb::ListSuspectedDuplicatesResponse> {
        self.suspected_duplicates(request.into_inner()).await.into_grpc(SERVICE)
    }
}
