//! Double-entry bookkeeping for every money movement (issue 4, item 3).
//!
//! Each movement is one [`Entry`] of signed postings, one per ledger account touched; the
//! postings of an entry sum to zero in every currency, so money is never created or lost,
//! only moved. Entries are built here, by the rule of the movement, and only here: storage
//! writes what it is given (and the balances beside it), so both backends book exactly the
//! same way. Postings are immutable once written; a correction is a new entry.
//!
//! Sign convention: positive is a debit. For the merchant, `available` and `pending` are
//! assets (money held, money authorized), `processor_clearing` is what the processor owes
//! or holds back, and `fx_clearing` is the counterparty of conversions.
//!
//! | movement | postings |
//! |---|---|
//! | authorization of A | pending +A, processor_clearing −A |
//! | capture of C of A | pending −C, available +C; and for the rest R = A−C: pending −R, processor_clearing +R |
//! | void of A | pending −A, processor_clearing +A |
//! | refund of F | available −F, processor_clearing +F |
//! | conversion of a X into b Y | available −a X, fx_clearing +a X; fx_clearing −b Y, available +b Y |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{Currency, Money};

/// The ledger accounts every Bursar account has, per currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerAccount {
    /// Captured funds the merchant can convert or refund from.
    Available,
    /// Authorized, not yet captured.
    Pending,
    /// The processor's side of every card movement.
    ProcessorClearing,
    /// The other side of every conversion, per currency.
    FxClearing,
}

impl LedgerAccount {
    pub const ALL: [LedgerAccount; 4] = [
        LedgerAccount::Available,
        LedgerAccount::Pending,
        LedgerAccount::ProcessorClearing,
        LedgerAccount::FxClearing,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LedgerAccount::Available => "available",
            LedgerAccount::Pending => "pending",
            LedgerAccount::ProcessorClearing => "processor_clearing",
            LedgerAccount::FxClearing => "fx_clearing",
        }
    }

    pub fn parse(s: &str) -> Option<LedgerAccount> {
        LedgerAccount::ALL.into_iter().find(|a| a.as_str() == s)
    }
}

/// What kind of movement an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Authorization,
    Capture,
    Void,
    Refund,
    Conversion,
}

impl EntryKind {
    pub const ALL: [EntryKind; 5] = [
        EntryKind::Authorization,
        EntryKind::Capture,
        EntryKind::Void,
        EntryKind::Refund,
        EntryKind::Conversion,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::Authorization => "authorization",
            EntryKind::Capture => "capture",
            EntryKind::Void => "void",
            EntryKind::Refund => "refund",
            EntryKind::Conversion => "conversion",
        }
    }

    pub fn parse(s: &str) -> Option<EntryKind> {
        EntryKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// One signed line of an entry, in minor units of its currency (debit positive).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posting {
    pub ledger_account: LedgerAccount,
    pub currency: Currency,
    pub minor: i64,
}

/// A balanced set of postings. The constructors are the booking rules; there is no way to
/// build an unbalanced entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    kind: EntryKind,
    postings: Vec<Posting>,
}

fn post(ledger_account: LedgerAccount, currency: Currency, minor: i64) -> Posting {
    Posting {
        ledger_account,
        currency,
        minor,
    }
}

impl Entry {
    fn new(kind: EntryKind, postings: Vec<Posting>) -> Entry {
        let postings: Vec<Posting> = postings.into_iter().filter(|p| p.minor != 0).collect();
        debug_assert!(is_balanced(&postings), "{kind:?} entry must balance");
        Entry { kind, postings }
    }

    /// The processor authorized `amount`: it is pending until captured or voided.
    pub fn authorization(amount: Money) -> Entry {
        let c = amount.currency;
        Entry::new(
            EntryKind::Authorization,
            vec![
                post(LedgerAccount::Pending, c, amount.minor),
                post(LedgerAccount::ProcessorClearing, c, -amount.minor),
            ],
        )
    }

    /// `captured` of an authorization of `authorized` became available; the rest of the
    /// authorization is released. `captured` must not exceed `authorized` (storage checks).
    pub fn capture(authorized: Money, captured: i64) -> Entry {
        let c = authorized.currency;
        let released = authorized.minor - captured;
        Entry::new(
            EntryKind::Capture,
            vec![
                post(LedgerAccount::Pending, c, -captured),
                post(LedgerAccount::Available, c, captured),
                post(LedgerAccount::Pending, c, -released),
                post(LedgerAccount::ProcessorClearing, c, released),
            ],
        )
    }

    /// An authorization was voided: nothing of it will be captured.
    pub fn void(authorized: Money) -> Entry {
        let c = authorized.currency;
        Entry::new(
            EntryKind::Void,
            vec![
                post(LedgerAccount::Pending, c, -authorized.minor),
                post(LedgerAccount::ProcessorClearing, c, authorized.minor),
            ],
        )
    }

    /// `amount` went back to the card holder out of available funds.
    pub fn refund(amount: Money) -> Entry {
        let c = amount.currency;
        Entry::new(
            EntryKind::Refund,
            vec![
                post(LedgerAccount::Available, c, -amount.minor),
                post(LedgerAccount::ProcessorClearing, c, amount.minor),
            ],
        )
    }

    /// `from` left the available balance of its currency and `to` arrived in the other's.
    pub fn conversion(from: Money, to: Money) -> Entry {
        Entry::new(
            EntryKind::Conversion,
            vec![
                post(LedgerAccount::Available, from.currency, -from.minor),
                post(LedgerAccount::FxClearing, from.currency, from.minor),
                post(LedgerAccount::FxClearing, to.currency, -to.minor),
                post(LedgerAccount::Available, to.currency, to.minor),
            ],
        )
    }

    pub fn kind(&self) -> EntryKind {
        self.kind
    }

    /// Non-zero postings only.
    pub fn postings(&self) -> &[Posting] {
        &self.postings
    }
}

/// Whether postings sum to zero in every currency (checked in `i128`, so no sum overflows).
pub fn is_balanced(postings: &[Posting]) -> bool {
    let mut sums: BTreeMap<&str, i128> = BTreeMap::new();
    for p in postings {
        *sums.entry(p.currency.code()).or_default() += i128::from(p.minor);
    }
    sums.values().all(|s| *s == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(minor: i64, code: &str) -> Money {
        Money::from_minor(minor, Currency::from_code(code).unwrap()).unwrap()
    }

    #[test]
    fn every_rule_balances_per_currency() {
        let entries = [
            Entry::authorization(m(1999, "USD")),
            Entry::capture(m(1999, "USD"), 1999),
            Entry::capture(m(1999, "USD"), 1000),
            Entry::void(m(500, "JPY")),
            Entry::refund(m(1, "KWD")),
            Entry::conversion(m(10_000, "USD"), m(9_213, "EUR")),
            Entry::conversion(m(1_000, "KWD"), m(497_000, "JPY")),
        ];
        for e in &entries {
            assert!(is_balanced(e.postings()), "{e:?}");
            assert!(e.postings().iter().all(|p| p.minor != 0));
        }
    }

    #[test]
    fn a_full_capture_releases_nothing() {
        let e = Entry::capture(m(1999, "USD"), 1999);
        assert_eq!(e.postings().len(), 2);
        let partial = Entry::capture(m(1999, "USD"), 999);
        let pending: i64 = partial
            .postings()
            .iter()
            .filter(|p| p.ledger_account == LedgerAccount::Pending)
            .map(|p| p.minor)
            .sum();
        assert_eq!(pending, -1999, "the whole authorization leaves pending");
    }

    #[test]
    fn a_conversion_balances_each_currency_not_the_total() {
        let e = Entry::conversion(m(100, "USD"), m(15_000, "JPY"));
        assert!(is_balanced(e.postings()));
        let lopsided = [
            post(LedgerAccount::Available, m(1, "USD").currency, -100),
            post(LedgerAccount::Available, m(1, "JPY").currency, 100),
        ];
        assert!(!is_balanced(&lopsided));
    }

    #[test]
    fn names_round_trip() {
        for a in LedgerAccount::ALL {
            assert_eq!(LedgerAccount::parse(a.as_str()), Some(a));
        }
        for k in EntryKind::ALL {
            assert_eq!(EntryKind::parse(k.as_str()), Some(k));
        }
    }
}
