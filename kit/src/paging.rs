//! AIP-158 pagination shared by every List RPC (SPEC 3): `page_size`
//! (default 50, max 1000) and an opaque `page_token` bound to the filter it
//! was issued for, so a token reused with another filter is refused.

use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use crate::error::ApiError;

/// Default page size.
pub const DEFAULT_PAGE_SIZE: usize = 50;
/// Largest page size.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Validates `page_size`: 0 means the default; negative is an error; above the maximum is capped.
pub fn page_size(requested: i32) -> Result<usize, ApiError> {
    match requested {
        n if n < 0 => Err(ApiError::invalid("page_size", "must not be negative")),
        0 => Ok(DEFAULT_PAGE_SIZE),
        n => Ok((n as usize).min(MAX_PAGE_SIZE)),
    }
}

/// A fingerprint of the filter a token belongs to (any serialisable value).
pub fn filter_hash<F: Serialize>(filter: &F) -> String {
    let bytes = serde_json::to_vec(filter).unwrap_or_default();
    hex(&Sha256::digest(bytes)[..8])
}

#[derive(Serialize, serde::Deserialize)]
struct Envelope<C> {
    f: String,
    c: C,
}

/// Encodes a cursor for the next page.
pub fn encode_token<C: Serialize>(cursor: &C, filter: &str) -> String {
    let json = serde_json::to_vec(&Envelope { f: filter.to_string(), c: cursor }).unwrap_or_default();
    hex(&json)
}

/// Decodes a token (empty: first page). A malformed token, or one issued for
/// another filter, is INVALID_ARGUMENT on `page_token`.
pub fn decode_token<C: DeserializeOwned>(token: &str, filter: &str) -> Result<Option<C>, ApiError> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad =
        || ApiError::invalid("page_token", "is not a token this list issued; start again with an empty page_token");
    if token.len() > 4096 {
        return Err(bad());
    }
    let bytes = unhex(token).ok_or_else(bad)?;
    let env: Envelope<C> = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    if env.f != filter {
        return Err(ApiError::invalid(
            "page_token",
            "was issued for a different filter; keep the filter unchanged while paging",
        ));
    }
    Ok(Some(env.c))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_default_and_cap() {
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(5000).unwrap(), 1000);
        assert!(page_size(-1).is_err());
    }

    #[test]
    fn tokens_round_trip_and_are_bound_to_their_filter() {
        let f = filter_hash(&("region", "CN-SH"));
        let t = encode_token(&(1700000000i64, "abc"), &f);
        assert_eq!(decode_token::<(i64, String)>(&t, &f).unwrap(), Some((1700000000, "abc".to_string())));
        let other = filter_hash(&("region", "CN-BJ"));
        assert!(decode_token::<(i64, String)>(&t, &other).is_err());
        assert!(decode_token::<(i64, String)>("zz-not-hex", &f).is_err());
        assert!(decode_token::<(i64, String)>("", &f).unwrap().is_none());
    }
}
