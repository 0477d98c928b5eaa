//! Checks of request fields that every service's handlers share (SPEC 3,
//! REL-1): ids, update masks, etags, time ranges and bounded texts, each
//! failing with a field violation that names the field.

use chrono::{DateTime, Utc};
use crm_proto::common::v1::TimeRange;
use uuid::Uuid;

use crate::error::{ApiError, FieldViolations};

/// A required id (UUID).
pub fn parse_id(field: &str, value: &str) -> Result<Uuid, ApiError> {
    if value.is_empty() {
        return Err(ApiError::invalid(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| ApiError::invalid(field, "must be an id (UUID)"))
}

/// An optional id: empty is None.
pub fn optional_id(v: &mut FieldViolations, field: &str, value: &str) -> Option<Uuid> {
    if value.is_empty() {
        return None;
    }
    v.check(field, Uuid::parse_str(value).map_err(|_| "must be an id (UUID)"))
}

/// A required list of 1..=`max` ids (UUIDs), checked for its count before
/// any id is parsed (REL-5); every malformed one is named (`field[i]`).
pub fn id_list(field: &str, values: &[String], max: usize) -> Result<Vec<Uuid>, ApiError> {
    if values.is_empty() || values.len() > max {
        return Err(ApiError::invalid(field, format!("must hold 1..{max} ids")));
    }
    let mut v = FieldViolations::new();
    let ids: Vec<Uuid> = values
        .iter()
        .enumerate()
        .filter_map(|(i, s)| v.check(&format!("{field}[{i}]"), Uuid::parse_str(s).map_err(|_| "must be an id (UUID)")))
        .collect();
    v.into_result()?;
    Ok(ids)
}

/// The paths of a required `update_mask`, each one of `allowed` (AIP-134).
pub fn update_mask(mask: &Option<prost_types::FieldMask>, allowed: &[&str]) -> Result<Vec<String>, ApiError> {
    let paths = mask.as_ref().map(|m| m.paths.clone()).unwrap_or_default();
    if paths.is_empty() {
        return Err(ApiError::invalid("update_mask", format!("is required; fields: {}", allowed.join(", "))));
    }
    for p in &paths {
        if !allowed.contains(&p.as_str()) {
            return Err(ApiError::invalid(
                "update_mask",
                format!("unknown field {p:?}; fields: {}", allowed.join(", ")),
            ));
        }
    }
    Ok(paths)
}

/// The etag of a version: `v<version>`.
pub fn etag(version: i64) -> String {
    format!("v{version}")
}

/// Optimistic concurrency: a given etag must be the current one (ABORTED otherwise).
pub fn check_etag(given: &str, version: i64) -> Result<(), ApiError> {
    if !given.is_empty() && given != etag(version) {
        return Err(ApiError::Aborted(format!("etag {given:?} is stale; the current one is {:?}", etag(version))));
    }
    Ok(())
}

/// A wire timestamp as UTC, None if out of range.
pub fn timestamp(t: &prost_types::Timestamp) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).ok()?)
}

/// A UTC time on the wire.
pub fn to_timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// The bounds of an optional time range; bad bounds are recorded in `v`.
pub fn time_range(
    v: &mut FieldViolations,
    field: &str,
    r: Option<&TimeRange>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let Some(r) = r else { return (None, None) };
    let mut bound = |name: &str, t: Option<&prost_types::Timestamp>| {
        let t = t?;
        let parsed = timestamp(t);
        if parsed.is_none() {
            v.add(format!("{field}.{name}"), "is not a valid time");
        }
        parsed
    };
    let (start, end) = (bound("start_time", r.start_time.as_ref()), bound("end_time", r.end_time.as_ref()));
    if let (Some(s), Some(e)) = (start, end)
        && e < s
    {
        v.add(format!("{field}.end_time"), "is before start_time");
    }
    (start, end)
}

/// A text of at most `max` characters, trimmed; empty is "missing" when `required`.
pub fn text(v: &mut FieldViolations, field: &str, value: &str, max: usize, required: bool) -> String {
    let trimmed = value.trim();
    if required && trimmed.is_empty() {
        v.required(field);
    } else if trimmed.chars().count() > max {
        v.add(field, format!("is longer than {max} characters"));
    } else if trimmed.chars().any(|c| c.is_control() && c != '\n' && c != '\t' && c != '\r') {
        v.add(field, "contains control characters");
    }
    trimmed.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_masks_and_etags() {
        assert!(parse_id("x", "").is_err());
        assert!(parse_id("x", "nope").is_err());
        assert!(parse_id("x", "0190b6a0-0000-7000-8000-000000000000").is_ok());
        let mask = Some(prost_types::FieldMask { paths: vec!["title".into()] });
        assert_eq!(update_mask(&mask, &["title", "status"]).unwrap(), ["title"]);
        assert!(update_mask(&None, &["title"]).is_err());
        let bad = Some(prost_types::FieldMask { paths: vec!["owner".into()] });
        assert!(update_mask(&bad, &["title"]).is_err());
        assert!(check_etag("", 3).is_ok());
        assert!(check_etag("v3", 3).is_ok());
        assert_eq!(check_etag("v2", 3).unwrap_err().code(), tonic::Code::Aborted);
    }

    #[test]
    fn id_lists_are_counted_before_they_are_parsed() {
        let good = "0190b6a0-0000-7000-8000-000000000000".to_string();
        assert_eq!(id_list("ids", std::slice::from_ref(&good), 2).unwrap().len(), 1);
        let too_many = id_list("ids", &vec!["x".to_string(); 3], 2).unwrap_err();
        assert!(matches!(&too_many, ApiError::InvalidArgument(v) if v.iter().map(|f| f.field.as_str()).eq(["ids"])));
        let bad = id_list("ids", &[good, "x".into()], 2).unwrap_err();
        assert!(matches!(&bad, ApiError::InvalidArgument(v) if v.iter().map(|f| f.field.as_str()).eq(["ids[1]"])));
        assert!(id_list("ids", &[], 2).is_err());
    }

    #[test]
    fn texts_and_ranges() {
        let mut v = FieldViolations::new();
        assert_eq!(text(&mut v, "a", "  hi  ", 10, true), "hi");
        text(&mut v, "b", "   ", 10, true);
        text(&mut v, "c", &"x".repeat(11), 10, false);
        text(&mut v, "d", "bell\u{7}", 10, false);
        let r = TimeRange {
            start_time: Some(prost_types::Timestamp { seconds: 100, nanos: 0 }),
            end_time: Some(prost_types::Timestamp { seconds: 50, nanos: 0 }),
        };
        time_range(&mut v, "time_range", Some(&r));
        let fields: Vec<&str> = v.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["b", "c", "d", "time_range.end_time"]);
    }
}
