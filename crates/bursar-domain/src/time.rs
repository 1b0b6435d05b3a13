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
}

/// Source of the current time. The server wires a system clock; tests wire a manual one.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}
