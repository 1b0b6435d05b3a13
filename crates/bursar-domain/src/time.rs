//! Time as a value: services ask an injected [`Clock`] instead of calling `now()` themselves,
//! so tests can freeze or move time (key expiry, retention windows, quote locks).

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, UTC. Stored as a 64-bit integer in both backends so that
/// ordering, range filters and arithmetic behave identically on SQLite and PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Timestamp(pub i64);

impl Timestamp {
    pub fn millis(self) -> i64 {
        self.0
    }

    /// RFC 3339 in UTC with milliseconds, `2026-03-25T09:14:07.123Z`: how every API response
    /// and event renders a time.
    pub fn rfc3339(self) -> String {
        chrono::DateTime::from_timestamp_millis(self.0)
            .map(|d| d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
            .unwrap_or_default()
    }
}

/// Source of the current time. The server wires a system clock; tests wire a manual one.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}
