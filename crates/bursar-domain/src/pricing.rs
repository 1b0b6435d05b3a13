//! Plans' usage pricing and billing periods (spec `api-product.md` §2.4–2.5): tiered prices
//! over a period's billable units, exact decimal arithmetic, each line rounded once.
//!
//! A tier's `up_to` is inclusive: tiers `up_to 1000 @ 0.10`, `up_to 10000 @ 0.05`,
//! `up_to None @ 0.01` price units 1–1,000, 1,001–10,000 and 10,001 on. **Graduated**: each unit
//! is priced by the tier it falls in (15,000 units → 100 + 450 + 50 = 600.00). **Volume**: every
//! unit is priced by the tier the total falls in (15,000 units → 15,000 × 0.01 = 150.00).
//! Included units are free and come off the top before tiers apply.

use chrono::{DateTime, Datelike, TimeZone, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use crate::{Currency, Timestamp};

/// Unit prices may carry up to this many decimals (sub-cent prices per request are common).
pub const MAX_UNIT_DECIMALS: u32 = 12;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TierMode {
    Graduated,
    Volume,
}

impl TierMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TierMode::Graduated => "graduated",
            TierMode::Volume => "volume",
        }
    }
}

/// One price tier. `flat_amount` is charged once when any unit falls in the tier (graduated)
/// or when the total falls in it (volume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    /// Last unit of the tier (inclusive); `None` on the last tier: no upper bound.
    pub up_to: Option<u64>,
    pub unit_amount: Decimal,
    #[serde(default)]
    pub flat_amount: Decimal,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    #[error("a price needs at least one tier")]
    NoTiers,
    #[error("tier bounds must increase strictly, and only the last tier is unbounded")]
    Bounds,
    #[error("prices must not be negative")]
    Negative,
    #[error("unit prices have at most {MAX_UNIT_DECIMALS} decimals")]
    TooManyDecimals,
    #[error("flat amounts have at most the currency's decimals")]
    FlatDecimals,
    #[error("the amount is too large")]
    Overflow,
}

/// How a plan prices the units above its included ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsagePrice {
    pub mode: TierMode,
    pub tiers: Vec<Tier>,
    #[serde(default)]
    pub included_units: u64,
}

/// One priced tier of an invoice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PricedLine {
    /// First and last unit of the tier's range (the last is `None` when unbounded).
    pub from: u64,
    pub up_to: Option<u64>,
    /// Units charged at this tier's price.
    pub units: u64,
    pub unit_amount: Decimal,
    pub flat_amount: Decimal,
    /// `units × unit_amount + flat_amount`, rounded half-even to the currency's minor unit.
    pub amount_minor: i64,
}

/// The priced usage of one period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Priced {
    pub units: u64,
    /// Units over the included ones, the ones the tiers price.
    pub billable_units: u64,
    pub lines: Vec<PricedLine>,
    pub total_minor: i64,
}

impl UsagePrice {
    /// Checks the tier table once, when the configuration is loaded.
    pub fn validate(&self, currency: Currency) -> Result<(), PricingError> {
        let Some(last) = self.tiers.last() else {
            return Err(PricingError::NoTiers);
        };
        if last.up_to.is_some() {
            return Err(PricingError::Bounds);
        }
        let mut below = 0u64;
        for (i, t) in self.tiers.iter().enumerate() {
            match t.up_to {
                Some(up) if up > below || (i == 0 && up > 0) => below = up,
                None if i + 1 == self.tiers.len() => {}
                _ => return Err(PricingError::Bounds),
            }
            if t.unit_amount.is_sign_negative() || t.flat_amount.is_sign_negative() {
                return Err(PricingError::Negative);
            }
            if t.unit_amount.normalize().scale() > MAX_UNIT_DECIMALS {
                return Err(PricingError::TooManyDecimals);
            }
            if t.flat_amount.normalize().scale() > u32::from(currency.minor_units()) {
                return Err(PricingError::FlatDecimals);
            }
        }
        Ok(())
    }

    /// Prices `units` in `currency`. The table must have passed [`UsagePrice::validate`].
    pub fn price(&self, units: u64, currency: Currency) -> Result<Priced, PricingError> {
        let billable = units.saturating_sub(self.included_units);
        let mut lines = Vec::new();
        let mut from = 1u64;
        for t in &self.tiers {
            let last = t.up_to.unwrap_or(u64::MAX);
            let charged = match self.mode {
                TierMode::Graduated if billable >= from => Some(billable.min(last) - from + 1),
                TierMode::Volume if billable >= from && billable <= last => Some(billable),
                _ => None,
            };
            if let Some(n) = charged {
                lines.push(PricedLine {
                    from,
                    up_to: t.up_to,
                    units: n,
                    unit_amount: t.unit_amount,
                    flat_amount: t.flat_amount,
                    amount_minor: line_amount(n, t, currency)?,
                });
            }
            if last == u64::MAX {
                break;
            }
            from = last + 1;
        }
        let total_minor = lines
            .iter()
            .try_fold(0i64, |sum, l| sum.checked_add(l.amount_minor))
            .ok_or(PricingError::Overflow)?;
        Ok(Priced {
            units,
            billable_units: billable,
            lines,
            total_minor,
        })
    }
}

/// `n × unit + flat` in minor units, rounded once, half-even. The product is exact: units
/// are integers and unit prices have at most 12 decimals, well inside Decimal's 28 digits.
fn line_amount(n: u64, t: &Tier, currency: Currency) -> Result<i64, PricingError> {
    let exact = Decimal::from(n)
        .checked_mul(t.unit_amount)
        .and_then(|v| v.checked_add(t.flat_amount))
        .ok_or(PricingError::Overflow)?;
    let scale = Decimal::from(10_i64.pow(u32::from(currency.minor_units())));
    let minor = exact
        .checked_mul(scale)
        .ok_or(PricingError::Overflow)?
        .round_dp_with_strategy(0, RoundingStrategy::MidpointNearestEven);
    i64::try_from(minor).map_err(|_| PricingError::Overflow)
}

/// A calendar-month billing period in UTC: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub start: Timestamp,
    pub end: Timestamp,
}

impl Period {
    /// The calendar month (UTC) that contains `at`.
    pub fn month_of(at: Timestamp) -> Period {
        let t = DateTime::<Utc>::from_timestamp_millis(at.0).unwrap_or_default();
        let start = Utc
            .with_ymd_and_hms(t.year(), t.month(), 1, 0, 0, 0)
            .single()
            .expect("the first of a month at midnight UTC exists");
        let (y, m) = if t.month() == 12 {
            (t.year() + 1, 1)
        } else {
            (t.year(), t.month() + 1)
        };
        let end = Utc
            .with_ymd_and_hms(y, m, 1, 0, 0, 0)
            .single()
            .expect("the first of a month at midnight UTC exists");
        Period {
            start: Timestamp(start.timestamp_millis()),
            end: Timestamp(end.timestamp_millis()),
        }
    }
}

/// Midnight UTC of the day that contains `at`: the unit usage is counted in.
pub fn day_of(at: Timestamp) -> Timestamp {
    const DAY_MS: i64 = 86_400_000;
    Timestamp(at.0.div_euclid(DAY_MS) * DAY_MS)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    fn issue_tiers(mode: TierMode) -> UsagePrice {
        UsagePrice {
            mode,
            tiers: vec![
                Tier {
                    up_to: Some(1_000),
                    unit_amount: d("0.10"),
                    flat_amount: Decimal::ZERO,
                },
                Tier {
                    up_to: Some(10_000),
                    unit_amount: d("0.05"),
                    flat_amount: Decimal::ZERO,
                },
                Tier {
                    up_to: None,
                    unit_amount: d("0.01"),
                    flat_amount: Decimal::ZERO,
                },
            ],
            included_units: 0,
        }
    }

    fn usd() -> Currency {
        Currency::from_code("USD").unwrap()
    }

    #[test]
    fn fifteen_thousand_units_cost_600_graduated_and_150_volume() {
        let g = issue_tiers(TierMode::Graduated)
            .price(15_000, usd())
            .unwrap();
        assert_eq!(g.total_minor, 60_000);
        let units: Vec<u64> = g.lines.iter().map(|l| l.units).collect();
        assert_eq!(units, [1_000, 9_000, 5_000]);
        let v = issue_tiers(TierMode::Volume).price(15_000, usd()).unwrap();
        assert_eq!(v.total_minor, 15_000);
        assert_eq!(v.lines.len(), 1);
    }

    #[test]
    fn tier_edges() {
        let g = issue_tiers(TierMode::Graduated);
        let v = issue_tiers(TierMode::Volume);
        let total = |p: &UsagePrice, n| p.price(n, usd()).unwrap().total_minor;
        assert_eq!(total(&g, 0), 0);
        assert_eq!(total(&g, 1), 10);
        assert_eq!(total(&g, 1_000), 10_000);
        assert_eq!(total(&g, 1_001), 10_005);
        assert_eq!(total(&g, 10_000), 55_000);
        assert_eq!(total(&g, 10_001), 55_001);
        assert_eq!(total(&v, 1_000), 10_000);
        assert_eq!(total(&v, 1_001), 5_005);
        assert_eq!(total(&v, 10_000), 50_000);
        assert_eq!(total(&v, 10_001), 10_001);
        assert!(v.price(0, usd()).unwrap().lines.is_empty());
    }

    #[test]
    fn included_units_are_free_and_lines_round_half_even_once() {
        let mut p = issue_tiers(TierMode::Graduated);
        p.included_units = 500;
        assert_eq!(p.price(500, usd()).unwrap().total_minor, 0);
        assert_eq!(p.price(1_500, usd()).unwrap().total_minor, 10_000);
        // 5 units at 0.001 = 0.005 → 0.00 (half-even); 15 units = 0.015 → 0.02.
        let tiny = UsagePrice {
            mode: TierMode::Volume,
            tiers: vec![Tier {
                up_to: None,
                unit_amount: d("0.001"),
                flat_amount: Decimal::ZERO,
            }],
            included_units: 0,
        };
        assert_eq!(tiny.price(5, usd()).unwrap().total_minor, 0);
        assert_eq!(tiny.price(15, usd()).unwrap().total_minor, 2);
        let jpy = Currency::from_code("JPY").unwrap();
        assert_eq!(tiny.price(2_500, jpy).unwrap().total_minor, 2);
    }

    #[test]
    fn bad_tables_are_refused() {
        let usd = usd();
        let mut p = issue_tiers(TierMode::Graduated);
        assert_eq!(p.validate(usd), Ok(()));
        p.tiers[1].up_to = Some(1_000);
        assert_eq!(p.validate(usd), Err(PricingError::Bounds));
        let mut p = issue_tiers(TierMode::Graduated);
        p.tiers[2].up_to = Some(20_000);
        assert_eq!(p.validate(usd), Err(PricingError::Bounds));
        let mut p = issue_tiers(TierMode::Graduated);
        p.tiers[0].unit_amount = d("-0.1");
        assert_eq!(p.validate(usd), Err(PricingError::Negative));
        p.tiers[0].unit_amount = d("0.0000000000001");
        assert_eq!(p.validate(usd), Err(PricingError::TooManyDecimals));
        let mut p = issue_tiers(TierMode::Graduated);
        p.tiers[0].flat_amount = d("0.001");
        assert_eq!(p.validate(usd), Err(PricingError::FlatDecimals));
        p.tiers.clear();
        assert_eq!(p.validate(usd), Err(PricingError::NoTiers));
    }

    #[test]
    fn months_are_calendar_months_in_utc() {
        // 2026-12-31T23:59:59.999Z and the next millisecond.
        let last = Timestamp(1_798_761_599_999);
        let p = Period::month_of(last);
        assert_eq!(p.start, Timestamp(1_796_083_200_000)); // 2026-12-01
        assert_eq!(p.end, Timestamp(1_798_761_600_000)); // 2027-01-01
        assert_eq!(Period::month_of(p.end).start, p.end);
        assert_eq!(day_of(last), Timestamp(1_798_675_200_000));
    }

    proptest! {
        /// Graduated lines cover the billable units exactly once, and each line's amount is
        /// its exact product rounded once.
        #[test]
        fn graduated_lines_partition_the_units(units in 0u64..50_000_000) {
            let p = issue_tiers(TierMode::Graduated).price(units, usd()).unwrap();
            prop_assert_eq!(p.lines.iter().map(|l| l.units).sum::<u64>(), units);
            let sum: i64 = p.lines.iter().map(|l| l.amount_minor).sum();
            prop_assert_eq!(sum, p.total_minor);
            // Prices in whole cents: the total is exact.
            let exact = units.min(1_000) * 10
                + units.clamp(1_000, 10_000).saturating_sub(1_000) * 5
                + units.saturating_sub(10_000);
            prop_assert_eq!(p.total_minor, i64::try_from(exact).unwrap());
        }

        /// Volume pricing charges every unit at one tier's price.
        #[test]
        fn volume_prices_every_unit_at_one_tier(units in 1u64..50_000_000) {
            let p = issue_tiers(TierMode::Volume).price(units, usd()).unwrap();
            prop_assert_eq!(p.lines.len(), 1);
            prop_assert_eq!(p.lines[0].units, units);
        }
    }
}
