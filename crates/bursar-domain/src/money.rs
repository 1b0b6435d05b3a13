//! Exact money: amounts are parsed from decimal text (never through `f64`) and kept as integer
//! minor units, which is also what the databases store.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::str::FromStr;

use crate::Currency;

/// Largest accepted amount in minor units (15 digits: 9 999 999 999 999.99 USD,
/// 999 999 999 999 999 JPY). Far above any real charge, far below `i64::MAX`, so sums of many
/// amounts (balances, refunds) cannot overflow.
pub const MAX_AMOUNT_MINOR: i64 = 999_999_999_999_999;

/// Why an amount was refused. Each variant has a stable code reported in the error `details`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("amount must be a decimal number such as 199.00")]
    Invalid,
    #[error("amount must be written without exponent notation")]
    ExponentNotAllowed,
    #[error("amount must be greater than zero")]
    NotPositive,
    #[error("amount has more decimals than the currency allows")]
    TooManyDecimals,
    #[error("amount exceeds the maximum of 999999999999999 minor units")]
    TooLarge,
}

impl AmountError {
    /// Stable machine-readable code, used in error `details[].code`.
    pub fn code(self) -> &'static str {
        match self {
            AmountError::Invalid => "invalid_amount",
            AmountError::ExponentNotAllowed => "exponent_not_allowed",
            AmountError::NotPositive => "not_positive",
            AmountError::TooManyDecimals => "too_many_decimals",
            AmountError::TooLarge => "too_large",
        }
    }
}

/// A positive amount of one currency, in that currency's minor units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    /// Parses the decimal text of an amount as the client wrote it (the literal of a JSON number
    /// or the content of a JSON string). Decimals beyond the currency's minor unit are refused
    /// even when they are zeros: `199.000` USD says the client believes in a third decimal,
    /// which is a bug worth surfacing rather than rounding away.
    pub fn parse(text: &str, currency: Currency) -> Result<Money, AmountError> {
        if text.contains(['e', 'E']) {
            return Err(AmountError::ExponentNotAllowed);
        }
        let unsigned = text.strip_prefix('-').unwrap_or(text);
        let (int_part, frac_part) = match unsigned.split_once('.') {
            Some((i, f)) => (i, Some(f)),
            None => (unsigned, None),
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(int_part) || frac_part.is_some_and(|f| !digits(f)) {
            return Err(AmountError::Invalid);
        }
        // Leading zeros are harmless ("0.50"), but a 40-digit integer part is not a price.
        if int_part.trim_start_matches('0').len() > 18 {
            return Err(AmountError::TooLarge);
        }
        let decimals = frac_part.map_or(0, str::len);
        if decimals > 28 {
            return Err(AmountError::TooManyDecimals);
        }
        let value = Decimal::from_str(text).map_err(|_| AmountError::Invalid)?;
        if value <= Decimal::ZERO {
            return Err(AmountError::NotPositive);
        }
        if decimals > usize::from(currency.minor_units()) {
            return Err(AmountError::TooManyDecimals);
        }
        let scaled = value * Decimal::from(10_i64.pow(u32::from(currency.minor_units())));
        let minor = i64::try_from(scaled.trunc()).map_err(|_| AmountError::TooLarge)?;
        Money::from_minor(minor, currency)
    }

    /// Builds an amount from stored minor units, enforcing the same bounds as parsing.
    pub fn from_minor(minor: i64, currency: Currency) -> Result<Money, AmountError> {
        if minor <= 0 {
            return Err(AmountError::NotPositive);
        }
        if minor > MAX_AMOUNT_MINOR {
            return Err(AmountError::TooLarge);
        }
        Ok(Money { minor, currency })
    }

    /// The amount as decimal text with exactly the currency's decimals: `199.00`, `500`, `1.500`.
    pub fn to_decimal_string(self) -> String {
        decimal_string(self.minor, self.currency)
    }
}

/// Minor units as decimal text with exactly the currency's decimals (`-12.50`, `0.00`,
/// `500`): also for what, unlike a charge, can be zero or negative (balances, postings).
pub fn decimal_string(minor: i64, currency: Currency) -> String {
    let mut d = Decimal::from(minor);
    d.set_scale(u32::from(currency.minor_units()))
        .expect("minor units are at most 4, far below Decimal's limit of 28");
    d.to_string()
}

#[cfg(test)]
mod tests {
    #[test]
    fn signed_amounts_render_with_the_currency_decimals() {
        let usd = Currency::from_code("USD").unwrap();
        assert_eq!(decimal_string(-1250, usd), "-12.50");
        assert_eq!(decimal_string(0, usd), "0.00");
        let jpy = Currency::from_code("JPY").unwrap();
        assert_eq!(decimal_string(500, jpy), "500");
    }

    use super::*;

    fn cur(c: &str) -> Currency {
        Currency::from_code(c).unwrap()
    }

    #[test]
    fn parses_exactly_per_currency() {
        let m = Money::parse("199.00", cur("USD")).unwrap();
        assert_eq!(m.minor, 19900);
        assert_eq!(m.to_decimal_string(), "199.00");
        assert_eq!(
            Money::parse("199", cur("USD")).unwrap().to_decimal_string(),
            "199.00"
        );
        assert_eq!(Money::parse("0.1", cur("USD")).unwrap().minor, 10);
        assert_eq!(
            Money::parse("500", cur("JPY")).unwrap().to_decimal_string(),
            "500"
        );
        assert_eq!(
            Money::parse("1.5", cur("KWD")).unwrap().to_decimal_string(),
            "1.500"
        );
        assert_eq!(Money::parse("0.001", cur("KWD")).unwrap().minor, 1);
        // 0.1 + 0.2 style binary-float traps do not exist here.
        assert_eq!(Money::parse("0.30", cur("EUR")).unwrap().minor, 30);
    }

    #[test]
    fn refuses_what_money_cannot_be() {
        use AmountError::*;
        let usd = cur("USD");
        assert_eq!(Money::parse("1.001", usd), Err(TooManyDecimals));
        assert_eq!(Money::parse("1.000", usd), Err(TooManyDecimals));
        assert_eq!(Money::parse("1.5", cur("JPY")), Err(TooManyDecimals));
        assert_eq!(Money::parse("0", usd), Err(NotPositive));
        assert_eq!(Money::parse("0.00", usd), Err(NotPositive));
        assert_eq!(Money::parse("-5.00", usd), Err(NotPositive));
        assert_eq!(Money::parse("1e3", usd), Err(ExponentNotAllowed));
        assert_eq!(Money::parse("1.0E2", usd), Err(ExponentNotAllowed));
        assert_eq!(Money::parse("", usd), Err(Invalid));
        assert_eq!(Money::parse("1.", usd), Err(Invalid));
        assert_eq!(Money::parse(".5", usd), Err(Invalid));
        assert_eq!(Money::parse("+5", usd), Err(Invalid));
        assert_eq!(Money::parse(" 5", usd), Err(Invalid));
        assert_eq!(Money::parse("5 USD", usd), Err(Invalid));
        assert_eq!(Money::parse("10000000000000.00", usd), Err(TooLarge));
        assert_eq!(
            Money::parse("99999999999999999999999999999", usd),
            Err(TooLarge)
        );
        assert!(Money::parse("9999999999999.99", usd).is_ok());
        assert_eq!(
            Money::parse("999999999999999", cur("JPY")).unwrap().minor,
            MAX_AMOUNT_MINOR
        );
        assert_eq!(Money::parse("1000000000000000", cur("JPY")), Err(TooLarge));
    }

    #[test]
    fn round_trips_every_minor_value_shape() {
        for c in Currency::all() {
            for minor in [1_i64, 9, 10, 99, 100, 12345, MAX_AMOUNT_MINOR] {
                let m = Money::from_minor(minor, c).unwrap();
                assert_eq!(
                    Money::parse(&m.to_decimal_string(), c),
                    Ok(m),
                    "{c} {minor}"
                );
            }
        }
    }
}
