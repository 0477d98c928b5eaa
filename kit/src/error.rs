//! Errors mapped to gRPC status codes with rich details (SPEC 3, REL-1).
//!
//! Every error a client sees carries a `google.rpc.ErrorInfo` (reason in
//! UPPER_SNAKE_CASE, domain "crm.<service>") and, for bad input, a
//! `google.rpc.BadRequest` listing every bad field. A client's mistake is
//! never INTERNAL; INTERNAL means a bug and is logged with the trace id.

use std::collections::HashMap;
use std::fmt;

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

/// One bad field of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldViolation {
    /// Path of the field, e.g. "customer.phone" or "transactions[3].amount".
    pub field: String,
    /// What is wrong with it, in words a client developer can act on.
    pub description: String,
}

/// At most this many violations are listed; the rest are only counted
/// (REL-5: a request's cost, and its answer's size, are bounded).
pub const MAX_LISTED_VIOLATIONS: usize = 100;

/// Collects every bad field of a request before failing, so a client learns
/// about all of them at once: the first [`MAX_LISTED_VIOLATIONS`] are listed,
/// and how many more there were.
#[derive(Debug, Default, Clone)]
pub struct FieldViolations {
    listed: Vec<FieldViolation>,
    unlisted: usize,
}

impl FieldViolations {
    /// An empty collection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a bad field (only counted past the first [`MAX_LISTED_VIOLATIONS`]).
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        if self.listed.len() < MAX_LISTED_VIOLATIONS {
            self.listed.push(FieldViolation { field: field.into(), description: description.into() });
        } else {
            self.unlisted += 1;
        }
    }

    /// Records the error of a parse, returning the value when it parsed.
    pub fn check<T, E: fmt::Display>(&mut self, field: &str, parsed: Result<T, E>) -> Option<T> {
        match parsed {
            Ok(v) => Some(v),
            Err(e) => {
                self.add(field, e.to_string());
                None
            }
        }
    }

    /// Records a missing required field.
    pub fn required(&mut self, field: &str) {
        self.add(field, "is required");
    }

    /// Takes over the field violations of another check (e.g.
    /// `idempotency::validate_request_id`), so they are reported together.
    pub fn absorb(&mut self, checked: Result<(), ApiError>) {
        if let Err(ApiError::InvalidArgument(more)) = checked {
            for v in more.listed {
                self.add(v.field, v.description);
            }
            self.unlisted += more.unlisted;
        }
    }

    /// Whether no field is bad.
    pub fn is_empty(&self) -> bool {
        self.listed.is_empty()
    }

    /// The listed violations (the first [`MAX_LISTED_VIOLATIONS`]).
    pub fn iter(&self) -> impl Iterator<Item = &FieldViolation> {
        self.listed.iter()
    }

    /// How many violations were counted but not listed.
    pub fn unlisted(&self) -> usize {
        self.unlisted
    }

    /// `Ok(())` when no field is bad, else INVALID_ARGUMENT naming all of them.
    pub fn into_result(self) -> Result<(), ApiError> {
        if self.listed.is_empty() { Ok(()) } else { Err(ApiError::InvalidArgument(self)) }
    }
}

/// An error a handler returns; converted to a `tonic::Status` at the edge.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Bad input: one or more fields (INVALID_ARGUMENT).
    #[error("invalid request: {}", summary(.0))]
    InvalidArgument(FieldViolations),
    /// The resource does not exist (NOT_FOUND).
    #[error("{resource} {id:?} not found")]
    NotFound {
        /// Kind of resource, e.g. "customer".
        resource: &'static str,
        /// The id asked for.
        id: String,
    },
    /// The resource exists already (ALREADY_EXISTS).
    #[error("{0}")]
    AlreadyExists(String),
    /// The system is not in the state the request needs (FAILED_PRECONDITION),
    /// e.g. an illegal state transition. `reason` is an UPPER_SNAKE_CASE code.
    #[error("{message}")]
    FailedPrecondition {
        /// Machine-readable reason.
        reason: &'static str,
        /// Human-readable message.
        message: String,
    },
    /// Concurrency conflict: stale etag, serialization failure (ABORTED).
    #[error("{0}")]
    Aborted(String),
    /// No (valid) credentials (UNAUTHENTICATED).
    #[error("{0}")]
    Unauthenticated(String),
    /// Credentials valid, permission missing (PERMISSION_DENIED).
    #[error("{0}")]
    PermissionDenied(String),
    /// Overload or quota (RESOURCE_EXHAUSTED); worth retrying later.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A request or message larger than the server accepts
    /// (RESOURCE_EXHAUSTED, REL-5); retrying it unchanged will not help.
    #[error("{0}")]
    TooLarge(String),
    /// A dependency is unreachable; retry with backoff (UNAVAILABLE).
    #[error("{0}")]
    Unavailable(String),
    /// The deadline passed (DEADLINE_EXCEEDED).
    #[error("{0}")]
    DeadlineExceeded(String),
    /// A bug. The detail is logged, not sent to the client (INTERNAL).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Bytes of the violations an error's message and its `BadRequest` detail
/// list: both travel in HTTP/2 headers, which clients cap (16 KB is common),
/// so a request with many bad fields is still answered readably.
const MESSAGE_BYTES: usize = 1024;
const DETAIL_BYTES: usize = 6144;

/// The first violations whose text fits in `budget` bytes, and how many were left out.
fn within(v: &FieldViolations, budget: usize) -> (Vec<&FieldViolation>, usize) {
    let mut used = 0;
    let mut shown = Vec::new();
    for f in v.iter() {
        let size = f.field.len() + f.description.len() + 4;
        if used + size > budget && !shown.is_empty() {
            break;
        }
        used += size;
        shown.push(f);
    }
    let left = v.iter().count() - shown.len() + v.unlisted;
    (shown, left)
}

fn summary(v: &FieldViolations) -> String {
    let (shown, left) = within(v, MESSAGE_BYTES);
    let mut text =
        shown.iter().map(|f| format!("{}: {}", f.field, clip(&f.description))).collect::<Vec<_>>().join("; ");
    if left > 0 {
        text.push_str(&format!("; and {left} more not listed"));
    }
    text
}

/// A message shortened to what a header can carry.
fn clip_message(text: &str) -> String {
    if text.len() <= 2 * MESSAGE_BYTES {
        return text.to_string();
    }
    let mut end = 2 * MESSAGE_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

/// A description shortened to what a header can carry.
fn clip(text: &str) -> String {
    if text.len() <= 300 {
        return text.to_string();
    }
    let mut end = 300;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl ApiError {
    /// INVALID_ARGUMENT for a single field.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut v = FieldViolations::new();
        v.add(field, description);
        Self::InvalidArgument(v)
    }

    /// NOT_FOUND.
    pub fn not_found(resource: &'static str, id: impl Into<String>) -> Self {
        Self::NotFound { resource, id: id.into() }
    }

    /// FAILED_PRECONDITION with a reason code.
    pub fn failed_precondition(reason: &'static str, message: impl Into<String>) -> Self {
        Self::FailedPrecondition { reason, message: message.into() }
    }

    /// INTERNAL, for bugs; the message is logged only.
    pub fn internal(message: impl fmt::Display) -> Self {
        Self::Internal(message.to_string())
    }

    /// The same error with `context` put before its message, for a caller
    /// that knows where the error happened (e.g. which row of an import).
    /// Field violations and NOT_FOUND keep theirs; for INTERNAL the context
    /// goes to the logged detail, as the detail does.
    pub fn context(self, context: impl fmt::Display) -> Self {
        let with = |m: String| format!("{context}: {m}");
        match self {
            Self::InvalidArgument(_) | Self::NotFound { .. } => self,
            Self::AlreadyExists(m) => Self::AlreadyExists(with(m)),
            Self::FailedPrecondition { reason, message } => Self::FailedPrecondition { reason, message: with(message) },
            Self::Aborted(m) => Self::Aborted(with(m)),
            Self::Unauthenticated(m) => Self::Unauthenticated(with(m)),
            Self::PermissionDenied(m) => Self::PermissionDenied(with(m)),
            Self::ResourceExhausted(m) => Self::ResourceExhausted(with(m)),
            Self::TooLarge(m) => Self::TooLarge(with(m)),
            Self::Unavailable(m) => Self::Unavailable(with(m)),
            Self::DeadlineExceeded(m) => Self::DeadlineExceeded(with(m)),
            Self::Internal(m) => Self::Internal(with(m)),
        }
    }

    /// Why a client stream could not be read: a message over the size limit
    /// stays RESOURCE_EXHAUSTED (REL-5); anything else is a broken stream.
    pub fn from_stream(status: &Status) -> Self {
        match status.code() {
            Code::ResourceExhausted => Self::TooLarge(status.message().to_string()),
            _ => Self::invalid("stream", format!("could not read the stream: {}", status.message())),
        }
    }

    /// The gRPC code.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound { .. } => Code::NotFound,
            Self::AlreadyExists(_) => Code::AlreadyExists,
            Self::FailedPrecondition { .. } => Code::FailedPrecondition,
            Self::Aborted(_) => Code::Aborted,
            Self::Unauthenticated(_) => Code::Unauthenticated,
            Self::PermissionDenied(_) => Code::PermissionDenied,
            Self::ResourceExhausted(_) | Self::TooLarge(_) => Code::ResourceExhausted,
            Self::Unavailable(_) => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::Internal(_) => Code::Internal,
        }
    }

    /// The `ErrorInfo.reason` code.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_) => "INVALID_ARGUMENT",
            Self::NotFound { .. } => "NOT_FOUND",
            Self::AlreadyExists(_) => "ALREADY_EXISTS",
            Self::FailedPrecondition { reason, .. } => reason,
            Self::Aborted(_) => "CONFLICT",
            Self::Unauthenticated(_) => "UNAUTHENTICATED",
            Self::PermissionDenied(_) => "PERMISSION_DENIED",
            Self::ResourceExhausted(_) => "OVERLOADED",
            Self::TooLarge(_) => "MESSAGE_TOO_LARGE",
            Self::Unavailable(_) => "DEPENDENCY_UNAVAILABLE",
            Self::DeadlineExceeded(_) => "DEADLINE_EXCEEDED",
            Self::Internal(_) => "INTERNAL",
        }
    }

    /// Converts to a status with details, in the error domain `crm.<service>`.
    pub fn into_status(self, service: &str) -> Status {
        let code = self.code();
        let trace_id = crate::telemetry::current_trace_id();
        let message = match &self {
            Self::Internal(detail) => {
                tracing::error!(error = %detail, trace_id = %trace_id, "internal error");
                format!("internal error; quote trace id {trace_id} when reporting it")
            }
            other => clip_message(&other.to_string()),
        };
        let mut metadata = HashMap::new();
        if !trace_id.is_empty() {
            metadata.insert("trace_id".to_string(), trace_id);
        }
        if let Self::NotFound { resource, id } = &self {
            metadata.insert("resource".to_string(), resource.to_string());
            metadata.insert("id".to_string(), id.clone());
        }
        let mut details = ErrorDetails::new();
        details.set_error_info(self.reason(), format!("crm.{service}"), metadata);
        if let Self::InvalidArgument(violations) = &self {
            let (shown, left) = within(violations, DETAIL_BYTES);
            for v in shown {
                details.add_bad_request_violation(clip(&v.field), clip(&v.description));
            }
            if left > 0 {
                note_unlisted(&mut details, left);
            }
        }
        if matches!(self, Self::ResourceExhausted(_) | Self::Unavailable(_)) {
            details.set_retry_info(Some(std::time::Duration::from_millis(200)));
        }
        Status::with_error_details(code, message, details)
    }
}

/// Names how many violations were left out of the `BadRequest` list.
fn note_unlisted(details: &mut ErrorDetails, unlisted: usize) {
    details.add_bad_request_violation("*", format!("{unlisted} more bad fields are not listed"));
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match &e {
            E::PoolTimedOut | E::PoolClosed | E::Io(_) | E::Tls(_) => {
                ApiError::Unavailable(format!("database unavailable: {e}"))
            }
            E::Database(db) => match db.code().as_deref() {
                // serialization_failure, deadlock_detected: the client may retry.
                Some("40001") | Some("40P01") => ApiError::Aborted("concurrent update conflict; retry".into()),
                // query_canceled (statement_timeout).
                Some("57014") => ApiError::DeadlineExceeded("database statement timed out".into()),
                // admin_shutdown, crash_shutdown, cannot_connect_now, too_many_connections.
                Some("57P01") | Some("57P02") | Some("57P03") | Some("53300") => {
                    ApiError::Unavailable(format!("database unavailable: {e}"))
                }
                _ => ApiError::Internal(format!("database error: {e}")),
            },
            _ => ApiError::Internal(format!("database error: {e}")),
        }
    }
}

impl From<redis::RedisError> for ApiError {
    fn from(e: redis::RedisError) -> Self {
        ApiError::Unavailable(format!("redis unavailable: {e}"))
    }
}

/// Turns a handler's `Result<T, ApiError>` into tonic's `Result<Response<T>, Status>`.
pub trait IntoGrpc<T> {
    /// Converts, using `service` as the error domain.
    fn into_grpc(self, service: &str) -> Result<tonic::Response<T>, Status>;
}

impl<T> IntoGrpc<T> for Result<T, ApiError> {
    fn into_grpc(self, service: &str) -> Result<tonic::Response<T>, Status> {
        self.map(tonic::Response::new).map_err(|e| e.into_status(service))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_argument_lists_every_bad_field() {
        let mut v = FieldViolations::new();
        v.add("customer.phone", "not a valid phone number");
        v.required("request_id");
        let status = v.into_result().unwrap_err().into_status("profiles");
        assert_eq!(status.code(), Code::InvalidArgument);
        let details = status.get_error_details();
        let fields: Vec<_> =
            details.bad_request().expect("BadRequest").field_violations.iter().map(|f| f.field.clone()).collect();
        assert_eq!(fields, ["customer.phone", "request_id"]);
        let info = details.error_info().expect("ErrorInfo");
        assert_eq!(info.domain, "crm.profiles");
        assert_eq!(info.reason, "INVALID_ARGUMENT");
    }

    #[test]
    fn rel5_field_violations_list_the_first_hundred_and_count_the_rest() {
        let mut v = FieldViolations::new();
        for i in 0..100_000 {
            v.add(format!("tags[{i}]"), "is bad");
        }
        assert_eq!(v.iter().count(), MAX_LISTED_VIOLATIONS);
        assert_eq!(v.unlisted(), 100_000 - MAX_LISTED_VIOLATIONS);
        let status = v.into_result().unwrap_err().into_status("profiles");
        let listed = status.get_error_details().bad_request().expect("BadRequest").field_violations.clone();
        let shown = listed.len() - 1;
        assert!(shown > 50 && shown <= MAX_LISTED_VIOLATIONS, "as many as fit in a header: {shown}");
        let note = &listed[shown];
        assert_eq!(note.field, "*");
        assert_eq!(note.description, format!("{} more bad fields are not listed", 100_000 - shown));
        assert!(status.message().contains(" more not listed"), "{}", status.message());
        assert!(status.message().len() < 2 * MESSAGE_BYTES, "the message stays small");
        assert!(status.details().len() < 2 * DETAIL_BYTES, "so does the detail: {}", status.details().len());
    }

    #[test]
    fn rel5_long_descriptions_and_messages_are_clipped_to_fit_in_headers() {
        let long = "z".repeat(50_000);
        let status = ApiError::invalid(long.clone(), long.clone()).into_status("profiles");
        assert!(status.message().len() < 2 * MESSAGE_BYTES + 10, "{}", status.message().len());
        assert!(status.details().len() < 2 * DETAIL_BYTES);
        let status = ApiError::AlreadyExists(long).into_status("profiles");
        assert!(status.message().len() <= 2 * MESSAGE_BYTES + 4);
    }

    #[test]
    fn internal_errors_do_not_leak_their_detail() {
        let status = ApiError::internal("secret table xyz broke").into_status("profiles");
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("xyz"));
    }

    #[test]
    fn context_goes_before_the_message_and_keeps_the_code() {
        let e = ApiError::Unavailable("database unavailable".into()).context("import stopped at row 5");
        let status = e.into_status("profiles");
        assert_eq!(status.code(), Code::Unavailable);
        assert_eq!(status.message(), "import stopped at row 5: database unavailable");
        let internal = ApiError::internal("boom").context("row 5");
        assert!(matches!(&internal, ApiError::Internal(d) if d == "row 5: boom"));
        assert!(!internal.into_status("profiles").message().contains("row 5"), "INTERNAL keeps its detail to the log");
        let invalid = ApiError::invalid("customer.phone", "bad").context("row 5");
        assert_eq!(invalid.to_string(), "invalid request: customer.phone: bad");
    }

    #[test]
    fn failed_precondition_carries_its_reason() {
        let status = ApiError::failed_precondition("ILLEGAL_TRANSITION", "DRAFT -> COMPLETED is not allowed")
            .into_status("outreach");
        assert_eq!(status.code(), Code::FailedPrecondition);
        assert_eq!(status.get_error_details().error_info().unwrap().reason, "ILLEGAL_TRANSITION");
    }

    #[test]
    fn pool_timeouts_are_unavailable_not_internal() {
        assert_eq!(ApiError::from(sqlx::Error::PoolTimedOut).code(), Code::Unavailable);
    }
}
