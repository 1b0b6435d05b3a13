//! Bursar's pure domain: the rules that must hold no matter which transport or database is used.
//!
//! Nothing here does I/O, reads the clock or draws randomness: time comes in as [`Timestamp`]
//! values and random bytes as arguments, so every rule is testable without a runtime.

pub mod apikey;
pub mod currency;
pub mod fx;
pub mod ledger;
pub mod metadata;
pub mod money;
pub mod order;
pub mod pricing;
pub mod time;
pub mod webhook;

pub use currency::Currency;
pub use fx::{FxError, Rate};
pub use metadata::Metadata;
pub use money::{AmountError, Money};
pub use order::{OrderAction, OrderStatus};
pub use time::{Clock, Timestamp};

/// Identifier of an account (tenant). Every query is scoped by one.
pub type AccountId = i64;
