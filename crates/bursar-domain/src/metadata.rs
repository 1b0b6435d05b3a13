//! `metadata`: a small string map clients attach to resources. Bounded so that one client
//! cannot turn rows (and every event and webhook carrying them) into blobs.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const MAX_KEYS: usize = 50;
pub const MAX_KEY_CHARS: usize = 40;
pub const MAX_VALUE_CHARS: usize = 500;

/// A validated metadata map; keys are kept sorted so stored and rendered forms are stable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Metadata(BTreeMap<String, String>);

/// Why a metadata map was refused (stable codes for error details).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetadataError {
    #[error("metadata may hold at most 50 keys")]
    TooManyKeys,
    #[error("metadata keys must be 1 to 40 characters")]
    BadKey(String),
    #[error("metadata values may be at most 500 characters")]
    ValueTooLong(String),
    #[error("metadata values must not contain NUL characters")]
    BadValue(String),
}

impl MetadataError {
    /// The offending key, if the problem is with one entry.
    pub fn key(&self) -> Option<&str> {
        match self {
            MetadataError::TooManyKeys => None,
            MetadataError::BadKey(k)
            | MetadataError::ValueTooLong(k)
            | MetadataError::BadValue(k) => Some(k),
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            MetadataError::TooManyKeys => "too_many_keys",
            MetadataError::BadKey(_) => "invalid_key",
            MetadataError::ValueTooLong(_) => "value_too_long",
            MetadataError::BadValue(_) => "invalid_characters",
        }
    }
}

impl Metadata {
    pub fn new(map: BTreeMap<String, String>) -> Result<Metadata, MetadataError> {
        if map.len() > MAX_KEYS {
            return Err(MetadataError::TooManyKeys);
        }
        for (k, v) in &map {
            let n = k.chars().count();
            if n == 0 || n > MAX_KEY_CHARS || k.chars().any(char::is_control) {
                return Err(MetadataError::BadKey(k.clone()));
            }
            if v.chars().count() > MAX_VALUE_CHARS {
                return Err(MetadataError::ValueTooLong(k.clone()));
            }
            // NUL cannot be stored in PostgreSQL text or jsonb, nor safely shown anywhere.
            if v.contains('\0') {
                return Err(MetadataError::BadValue(k.clone()));
            }
        }
        Ok(Metadata(map))
    }

    pub fn as_map(&self) -> &BTreeMap<String, String> {
        &self.0
    }

    pub fn into_map(self) -> BTreeMap<String, String> {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_enforced() {
        let ok: BTreeMap<_, _> = (0..50)
            .map(|i| (format!("k{i}"), "v".repeat(500)))
            .collect();
        assert!(Metadata::new(ok).is_ok());
        let many: BTreeMap<_, _> = (0..51).map(|i| (format!("k{i}"), String::new())).collect();
        assert_eq!(Metadata::new(many), Err(MetadataError::TooManyKeys));
        let long_key = BTreeMap::from([("k".repeat(41), String::new())]);
        assert_eq!(Metadata::new(long_key).unwrap_err().code(), "invalid_key");
        let empty_key = BTreeMap::from([(String::new(), "x".into())]);
        assert_eq!(Metadata::new(empty_key).unwrap_err().code(), "invalid_key");
        let long_val = BTreeMap::from([("k".into(), "é".repeat(501))]);
        assert_eq!(
            Metadata::new(long_val).unwrap_err().code(),
            "value_too_long"
        );
    }
}
