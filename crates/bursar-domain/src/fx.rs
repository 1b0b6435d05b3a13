//! Currency conversion: exchange rates and the rounding of converted amounts.
//!
//! Everything here is exact decimal arithmetic; binary floating point never appears, because a
//! rate of `0.1` or an amount of `0.30` has no exact `f64` value and the error would end up in
//! someone's balance. Rates are kept as [`Decimal`], but the products and quotients are formed
//! on their integer mantissas in `i128` and rounded exactly once, half-even, at the end.
//! [`Decimal`] arithmetic alone would not do: a product or quotient that needs more than its 28
//! significant digits is silently rounded, and rounding that rounded value again to the minor
//! unit can turn a value just below a midpoint into a midpoint (double rounding). A 15-digit
//! amount times a 15-digit rate already needs 30 digits.

use std::cmp::Ordering;
use std::fmt;

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use crate::money::MAX_AMOUNT_MINOR;
use crate::{Currency, Money};

/// Most decimals a [`Rate`] may carry. Twelve is finer than any market quote (those stop at 5 or
/// 6) while leaving room for computed rates such as an inverse or a spread-adjusted rate.
const MAX_RATE_DECIMALS: u32 = 12;

/// Most integer digits a [`Rate`] may carry: keeps `rate × amount` inside exact `i128` range.
const MAX_RATE_INTEGER_DIGITS: u32 = 12;

/// One basis point is 1/10 000; a spread is a whole number of them.
const BPS_PER_UNIT: u32 = 10_000;

/// Why a rate or a conversion was refused. Each variant has a stable code (see [`FxError::code`])
/// so that clients can react to the kind of failure without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FxError {
    /// The rate text is not a plain positive decimal within the accepted precision, or a computed
    /// rate (inverse, spread-adjusted) fell outside that range.
    #[error(
        "exchange rate must be a positive decimal such as 0.9213, with at most 12 integer digits and 12 decimals"
    )]
    InvalidRate,
    /// Converting a currency into itself is a caller bug: a rate other than 1 would create or
    /// destroy money.
    #[error("source and target currency must differ")]
    SameCurrency,
    /// The converted amount rounds to zero minor units of the target currency, and a payment of
    /// zero is not a payment.
    #[error("converted amount rounds to zero in the target currency")]
    ConversionTooSmall,
    /// The converted amount exceeds the maximum of 999999999999999 minor units that every
    /// amount in Bursar respects.
    #[error("converted amount exceeds the maximum of 999999999999999 minor units")]
    TooLarge,
    /// A spread of 10 000 basis points or more would leave a zero or negative rate.
    #[error("spread must be below 10000 basis points")]
    InvalidSpread,
}

impl FxError {
    /// Stable machine-readable code, used in error `details[].code`; unlike the message it never
    /// changes wording.
    pub fn code(self) -> &'static str {
        match self {
            FxError::InvalidRate => "invalid_rate",
            FxError::SameCurrency => "same_currency",
            FxError::ConversionTooSmall => "conversion_too_small",
            FxError::TooLarge => "too_large",
            FxError::InvalidSpread => "invalid_spread",
        }
    }
}

/// A market exchange rate: units of the quote currency for one unit (major) of the base currency.
///
/// Always positive, below 10^12 and with at most 12 decimals, whichever way it was built, so
/// that its text form parses back to the same rate. It travels as a decimal *string* (never a
/// JSON number, which many clients would read into a float).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Rate(Decimal);

impl Rate {
    /// Parses decimal text like "0.9213" or "151.37": positive, no exponent, no sign, at most
    /// 12 decimals, at most 12 integer digits (leading zeros do not count).
    ///
    /// The grammar is strict (`"1."`, `".5"`, `"+1"`, `" 1"` are refused) because a rate comes
    /// from configuration or a rate feed, where a malformed value is a mistake to surface rather
    /// than a format to guess at. More than 12 decimals is refused even when they are zeros, like
    /// excess decimals in [`Money::parse`].
    pub fn parse(text: &str) -> Result<Rate, FxError> {
        let (int_part, frac_part) = match text.split_once('.') {
            Some((int_part, frac_part)) => (int_part, Some(frac_part)),
            None => (text, None),
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(int_part) || frac_part.is_some_and(|f| !digits(f)) {
            return Err(FxError::InvalidRate);
        }
        let int_significant = int_part.trim_start_matches('0');
        let frac_part = frac_part.unwrap_or("");
        let scale = u32::try_from(frac_part.len()).map_err(|_| FxError::InvalidRate)?;
        if int_significant.len() > MAX_RATE_INTEGER_DIGITS as usize || scale > MAX_RATE_DECIMALS {
            return Err(FxError::InvalidRate);
        }
        // At most 24 digits: far inside i128.
        let mantissa = int_significant
            .bytes()
            .chain(frac_part.bytes())
            .fold(0_i128, |acc, b| acc * 10 + i128::from(b - b'0'));
        Rate::from_parts(mantissa, scale)
    }

    /// The rate as a [`Decimal`], for callers that store or display it; conversions should go
    /// through [`convert`] so that the rounding rule is applied in one place.
    pub fn value(self) -> Decimal {
        self.0
    }

    /// 1 / rate, rounded half-even to 12 decimal places, used when only the opposite pair is
    /// configured (a EUR→USD rate derived from a USD→EUR quote).
    ///
    /// The inverse is computed exactly before that single rounding. Err([`FxError::InvalidRate`])
    /// if the result rounds to zero or is not itself a valid rate (the inverse of
    /// 0.000000000001 is 10^12, one integer digit too many).
    pub fn inverse(self) -> Result<Rate, FxError> {
        let (mantissa, scale) = self.parts();
        // 1 / (m / 10^s) = 10^s / m; at 12 decimals that is 10^(s + 12) / m, with s + 12 <= 24.
        let numerator = pow10(scale + MAX_RATE_DECIMALS).ok_or(FxError::InvalidRate)?;
        let quotient = div_round_half_even(numerator, mantissa).ok_or(FxError::InvalidRate)?;
        Rate::from_parts(quotient, MAX_RATE_DECIMALS)
    }

    /// The rate the customer gets: rate × (10 000 − spread_bps) / 10 000, rounded half-even to
    /// 12 decimals. The spread is how Bursar prices the conversion, so it only ever lowers the
    /// rate: a customer never receives more than the market rate gives.
    ///
    /// Err([`FxError::InvalidSpread`]) if `spread_bps >= 10_000`, and Err([`FxError::InvalidRate`])
    /// if the adjusted rate rounds to zero (a tiny rate with a spread close to 100%).
    pub fn with_spread(self, spread_bps: u32) -> Result<Rate, FxError> {
        if spread_bps >= BPS_PER_UNIT {
            return Err(FxError::InvalidSpread);
        }
        let (mantissa, scale) = self.parts();
        // m < 10^24 and the factor is at most 10^4: the product stays below 10^28.
        let product = mantissa
            .checked_mul(i128::from(BPS_PER_UNIT - spread_bps))
            .ok_or(FxError::InvalidRate)?;
        // product / 10^(s + 4), brought to at most 12 decimals.
        let exact_scale = scale + 4;
        if exact_scale <= MAX_RATE_DECIMALS {
            return Rate::from_parts(product, exact_scale);
        }
        let divisor = pow10(exact_scale - MAX_RATE_DECIMALS).ok_or(FxError::InvalidRate)?;
        let rounded = div_round_half_even(product, divisor).ok_or(FxError::InvalidRate)?;
        Rate::from_parts(rounded, MAX_RATE_DECIMALS)
    }

    /// Canonical decimal text, without trailing zeros ("0.92", "151", "0.000000000001"), so that
    /// equal rates always render identically in responses, logs and audit records.
    pub fn to_text(self) -> String {
        self.0.to_string()
    }

    /// Validates and builds `mantissa / 10^scale`, normalized: the single gate every rate
    /// passes through, which is what makes the bounds an invariant of the type.
    fn from_parts(mantissa: i128, scale: u32) -> Result<Rate, FxError> {
        if mantissa <= 0 || scale > MAX_RATE_DECIMALS {
            return Err(FxError::InvalidRate);
        }
        let limit = pow10(MAX_RATE_INTEGER_DIGITS + scale).ok_or(FxError::InvalidRate)?;
        if mantissa >= limit {
            return Err(FxError::InvalidRate);
        }
        let value =
            Decimal::try_from_i128_with_scale(mantissa, scale).map_err(|_| FxError::InvalidRate)?;
        Ok(Rate(value.normalize()))
    }

    /// `(m, s)` with rate = m / 10^s, where 0 < m < 10^24 and s <= 12.
    fn parts(self) -> (i128, u32) {
        (self.0.mantissa(), self.0.scale())
    }
}

impl fmt::Display for Rate {
    /// Same as [`Rate::to_text`], so that formatting a rate never exposes a non-canonical form.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// Serialization goes through the canonical text, so a stored rate reads back identically.
impl From<Rate> for String {
    fn from(rate: Rate) -> String {
        rate.to_text()
    }
}

/// Deserialization applies [`Rate::parse`], so a rate read from JSON obeys the same bounds as
/// one read from configuration.
impl TryFrom<String> for Rate {
    type Error = FxError;

    fn try_from(text: String) -> Result<Rate, FxError> {
        Rate::parse(&text)
    }
}

/// Converts `from` at `rate` (already including any spread) into `to`: the exact decimal
/// product from.minor / 10^e_from × rate, rounded half-even (banker's rounding) to the target
/// currency's minor unit, where e_from is the source currency's number of decimals.
///
/// Half-even rounding is used because it is unbiased: over many conversions, amounts that fall
/// exactly on a midpoint go up as often as down, so neither Bursar nor its customers
/// systematically gain. The product is never rounded before that single rounding step.
///
/// Errors: [`FxError::SameCurrency`]; [`FxError::ConversionTooSmall`] when the result rounds to
/// zero minor units (a non-positive `from`, which no `Money` constructor produces, is refused the
/// same way); [`FxError::TooLarge`] when the result exceeds [`MAX_AMOUNT_MINOR`]. It never panics.
pub fn convert(from: Money, to: Currency, rate: Rate) -> Result<Money, FxError> {
    if from.currency == to {
        return Err(FxError::SameCurrency);
    }
    if from.minor <= 0 {
        return Err(FxError::ConversionTooSmall);
    }
    let (rate_mantissa, rate_scale) = rate.parts();
    let from_decimals = u32::from(from.currency.minor_units());
    let to_decimals = u32::from(to.minor_units());
    // Result in target minor units = product / 10^k, with k = e_from + s_rate − e_to.
    // Overflow here means product > 1.7 × 10^38; since minor units are at most 4 and a rate has
    // at most 12 decimals, k <= 16, so the result would exceed 10^22 minor units: too large.
    let product = i128::from(from.minor)
        .checked_mul(rate_mantissa)
        .ok_or(FxError::TooLarge)?;
    let result = match (from_decimals + rate_scale).checked_sub(to_decimals) {
        // The target has at least as many decimals as the product: exact, nothing to round.
        None => {
            let factor =
                pow10(to_decimals - from_decimals - rate_scale).ok_or(FxError::TooLarge)?;
            product.checked_mul(factor).ok_or(FxError::TooLarge)?
        }
        Some(k) => match pow10(k) {
            Some(divisor) => div_round_half_even(product, divisor).ok_or(FxError::TooLarge)?,
            // 10^k > i128::MAX > 2 × product: the quotient is below one half.
            None => 0,
        },
    };
    if result <= 0 {
        return Err(FxError::ConversionTooSmall);
    }
    if result > i128::from(MAX_AMOUNT_MINOR) {
        return Err(FxError::TooLarge);
    }
    let minor = i64::try_from(result).map_err(|_| FxError::TooLarge)?;
    Ok(Money {
        minor,
        currency: to,
    })
}

/// 10^exp, or `None` past `i128`'s range (exp > 38).
fn pow10(exp: u32) -> Option<i128> {
    10_i128.checked_pow(exp)
}

/// `numerator / divisor` rounded to the nearest integer, a tie going to the even neighbour.
/// Only defined for `numerator >= 0` and `divisor > 0` (`None` otherwise), which is all the
/// callers need since amounts and rates are positive.
fn div_round_half_even(numerator: i128, divisor: i128) -> Option<i128> {
    if numerator < 0 || divisor <= 0 {
        return None;
    }
    let quotient = numerator / divisor;
    let remainder = numerator % divisor;
    // Compare remainder with divisor / 2 without computing 2 × remainder (which could overflow).
    let round_up = match remainder.cmp(&(divisor - remainder)) {
        Ordering::Less => false,
        Ordering::Greater => true,
        Ordering::Equal => quotient % 2 == 1,
    };
    if round_up {
        quotient.checked_add(1)
    } else {
        Some(quotient)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rust_decimal::RoundingStrategy;

    fn cur(code: &str) -> Currency {
        Currency::from_code(code).unwrap()
    }

    fn money(minor: i64, code: &str) -> Money {
        Money::from_minor(minor, cur(code)).unwrap()
    }

    fn rate(text: &str) -> Rate {
        Rate::parse(text).unwrap()
    }

    /// Converts and returns the target minor units, panicking with context on error.
    fn conv(minor: i64, from: &str, to: &str, rate_text: &str) -> i64 {
        let result = convert(money(minor, from), cur(to), rate(rate_text))
            .unwrap_or_else(|e| panic!("{minor} {from}->{to} at {rate_text}: {e:?}"));
        assert_eq!(result.currency, cur(to));
        result.minor
    }

    #[test]
    fn usd_to_eur_two_to_two_decimals() {
        // 100.00 × 0.9213 = 92.13 exactly.
        assert_eq!(conv(10_000, "USD", "EUR", "0.9213"), 9_213);
        // 19.99 × 0.9213 = 18.416787 → 18.42.
        assert_eq!(conv(1_999, "USD", "EUR", "0.9213"), 1_842);
        // 0.25 × 0.5 = 0.125: a tie, goes to the even 0.12.
        assert_eq!(conv(25, "USD", "EUR", "0.5"), 12);
        // 0.27 × 0.5 = 0.135: a tie, goes to the even 0.14.
        assert_eq!(conv(27, "USD", "EUR", "0.5"), 14);
        // 0.25 × 0.50000001 = 0.1250000025: above the midpoint, up to 0.13.
        assert_eq!(conv(25, "USD", "EUR", "0.50000001"), 13);
        // 0.27 × 0.49999999 = 0.1349999973: below the midpoint, down to 0.13.
        assert_eq!(conv(27, "USD", "EUR", "0.49999999"), 13);
    }

    #[test]
    fn usd_to_jpy_two_to_zero_decimals() {
        // 19.99 × 151.37 = 3025.8863 → 3026.
        assert_eq!(conv(1_999, "USD", "JPY", "151.37"), 3_026);
        // 1.00 × 150.5 = 150.5: a tie, goes to the even 150.
        assert_eq!(conv(100, "USD", "JPY", "150.5"), 150);
        // 1.00 × 151.5 = 151.5: a tie, goes to the even 152.
        assert_eq!(conv(100, "USD", "JPY", "151.5"), 152);
        // 0.01 × 151.37 = 1.5137 → 2.
        assert_eq!(conv(1, "USD", "JPY", "151.37"), 2);
    }

    #[test]
    fn jpy_to_usd_zero_to_two_decimals() {
        // 500 × 0.006606 = 3.303 → 3.30.
        assert_eq!(conv(500, "JPY", "USD", "0.006606"), 330);
        // 1000 × 0.0066 = 6.6 exactly → 6.60.
        assert_eq!(conv(1_000, "JPY", "USD", "0.0066"), 660);
        // 125 × 0.001 = 0.125: a tie, goes to the even 0.12.
        assert_eq!(conv(125, "JPY", "USD", "0.001"), 12);
        // 135 × 0.001 = 0.135: a tie, goes to the even 0.14.
        assert_eq!(conv(135, "JPY", "USD", "0.001"), 14);
    }

    #[test]
    fn usd_to_kwd_two_to_three_decimals() {
        // 100.00 × 0.3075 = 30.75 exactly → 30.750.
        assert_eq!(conv(10_000, "USD", "KWD", "0.3075"), 30_750);
        // 1.00 × 0.3075 = 0.3075: a tie, goes to the even 0.308.
        assert_eq!(conv(100, "USD", "KWD", "0.3075"), 308);
        // 1.00 × 0.3065 = 0.3065: a tie, goes to the even 0.306.
        assert_eq!(conv(100, "USD", "KWD", "0.3065"), 306);
        // 0.01 × 0.30712 = 0.0030712 → 0.003.
        assert_eq!(conv(1, "USD", "KWD", "0.30712"), 3);
    }

    #[test]
    fn kwd_to_usd_three_to_two_decimals() {
        // 1.000 × 3.25 = 3.25 exactly.
        assert_eq!(conv(1_000, "KWD", "USD", "3.25"), 325);
        // 0.100 × 3.25 = 0.325: a tie, goes to the even 0.32.
        assert_eq!(conv(100, "KWD", "USD", "3.25"), 32);
        // 0.300 × 3.25 = 0.975: a tie, goes to the even 0.98.
        assert_eq!(conv(300, "KWD", "USD", "3.25"), 98);
        // 1.234 × 3.2525 = 4.013585 → 4.01.
        assert_eq!(conv(1_234, "KWD", "USD", "3.2525"), 401);
    }

    #[test]
    fn kwd_to_jpy_three_to_zero_decimals() {
        // 1.000 × 490.5 = 490.5: a tie, goes to the even 490.
        assert_eq!(conv(1_000, "KWD", "JPY", "490.5"), 490);
        // 1.000 × 491.5 = 491.5: a tie, goes to the even 492.
        assert_eq!(conv(1_000, "KWD", "JPY", "491.5"), 492);
        // 0.003 × 500 = 1.5: a tie, goes to the even 2.
        assert_eq!(conv(3, "KWD", "JPY", "500"), 2);
        // 12.345 × 491.23 = 6064.23435 → 6064.
        assert_eq!(conv(12_345, "KWD", "JPY", "491.23"), 6_064);
    }

    #[test]
    fn products_beyond_28_digits_are_rounded_once() {
        // 946222374953.268 KWD × 123.456789012347 = 116817576103367.499999999999996 JPY exactly
        // (30 significant digits). A 28-digit decimal product would be
        // 116817576103367.50000000000000, which half-even then rounds up to ...368: the
        // double-rounding trap. Exact: ...367.
        assert_eq!(
            conv(946_222_374_953_268, "KWD", "JPY", "123.456789012347"),
            116_817_576_103_367
        );
    }

    #[test]
    fn too_small_and_too_large() {
        use FxError::*;
        // 1 JPY × 0.0001 = 0.0001 USD = 0.01 cents → 0.
        assert_eq!(
            convert(money(1, "JPY"), cur("USD"), rate("0.0001")),
            Err(ConversionTooSmall)
        );
        // 0.001 KWD × 500 = 0.5 JPY: a tie, goes to the even 0.
        assert_eq!(
            convert(money(1, "KWD"), cur("JPY"), rate("500")),
            Err(ConversionTooSmall)
        );
        // 0.01 USD × 0.5 = 0.005 KWD exactly: not too small.
        assert_eq!(conv(1, "USD", "KWD", "0.5"), 5);
        // 9999999999999.99 USD × 1 = the maximum exactly; × 1.000000000001 exceeds it.
        assert_eq!(conv(MAX_AMOUNT_MINOR, "USD", "EUR", "1"), MAX_AMOUNT_MINOR);
        assert_eq!(
            convert(
                money(MAX_AMOUNT_MINOR, "USD"),
                cur("EUR"),
                rate("1.000000000001")
            ),
            Err(TooLarge)
        );
        // 999999999999999 JPY × 999999999999.999999999999 overflows even i128: still TooLarge.
        assert_eq!(
            convert(
                money(MAX_AMOUNT_MINOR, "JPY"),
                cur("KWD"),
                rate("999999999999.999999999999")
            ),
            Err(TooLarge)
        );
        assert_eq!(
            convert(money(100, "USD"), cur("USD"), rate("1")),
            Err(SameCurrency)
        );
        // Money's fields are public; a non-positive amount is refused, not converted.
        let negative = Money {
            minor: -100,
            currency: cur("USD"),
        };
        assert_eq!(
            convert(negative, cur("EUR"), rate("0.9")),
            Err(ConversionTooSmall)
        );
    }

    #[test]
    fn overflow_reasoning_holds_for_every_currency() {
        // convert() maps an i128 overflow of amount × rate mantissa to TooLarge. That is sound
        // because the result divides the product by at most 10^(4 + 12): anything above
        // i128::MAX / 10^16 ≈ 1.7 × 10^22 is far beyond MAX_AMOUNT_MINOR. Pin the "4".
        assert!(Currency::all().all(|c| c.minor_units() <= 4));
    }

    #[test]
    fn spread_examples() {
        // 1.10 × 9950 / 10000 = 1.0945.
        assert_eq!(rate("1.10").with_spread(50), Ok(rate("1.0945")));
        assert_eq!(rate("1.10").with_spread(0), Ok(rate("1.1")));
        // 151.37 × 9975 / 10000 = 150.991575.
        assert_eq!(rate("151.37").with_spread(25), Ok(rate("150.991575")));
        // 0.123456789012 × 9999 / 10000 = 0.1234444433330988 → 0.123444443333.
        assert_eq!(
            rate("0.123456789012").with_spread(1),
            Ok(rate("0.123444443333"))
        );
        // 1.000000000001 × 0.5 = 0.5000000000005: a tie, goes to the even 0.500000000000.
        assert_eq!(rate("1.000000000001").with_spread(5_000), Ok(rate("0.5")));
        // 1.000000000003 × 0.5 = 0.5000000000015: a tie, goes to the even 0.500000000002.
        assert_eq!(
            rate("1.000000000003").with_spread(5_000),
            Ok(rate("0.500000000002"))
        );
        // 0.000000000001 × 0.0001 = 10^-16 rounds to zero: not a rate.
        assert_eq!(
            rate("0.000000000001").with_spread(9_999),
            Err(FxError::InvalidRate)
        );
        assert_eq!(rate("1.1").with_spread(9_999), Ok(rate("0.00011")));
        assert_eq!(rate("1.1").with_spread(10_000), Err(FxError::InvalidSpread));
        assert_eq!(
            rate("1.1").with_spread(u32::MAX),
            Err(FxError::InvalidSpread)
        );
    }

    #[test]
    fn inverse_examples() {
        assert_eq!(rate("2").inverse(), Ok(rate("0.5")));
        assert_eq!(rate("8").inverse(), Ok(rate("0.125")));
        // 1 / 3 = 0.333333333333|33… → 0.333333333333.
        assert_eq!(rate("3").inverse(), Ok(rate("0.333333333333")));
        // 1 / 1.1 = 0.909090909090|909… → 0.909090909091.
        assert_eq!(rate("1.1").inverse(), Ok(rate("0.909090909091")));
        // 1 / 0.9213 = 1.085422772169|76… → 1.085422772170.
        assert_eq!(rate("0.9213").inverse(), Ok(rate("1.08542277217")));
        // 1 / 151.37 = 0.006606328863|05… → 0.006606328863.
        assert_eq!(rate("151.37").inverse(), Ok(rate("0.006606328863")));
        // 1 / 8192 = 0.0001220703125 exactly: a tie, goes to the even 0.000122070312.
        assert_eq!(rate("8192").inverse(), Ok(rate("0.000122070312")));
        // 1 / 999999999999 = 1.000000000001e-12 → 0.000000000001.
        assert_eq!(rate("999999999999").inverse(), Ok(rate("0.000000000001")));
        // 1 / 0.000000000001 = 10^12: thirteen integer digits, not a valid rate.
        assert_eq!(rate("0.000000000001").inverse(), Err(FxError::InvalidRate));
        assert_eq!(rate("0.000000000002").inverse(), Ok(rate("500000000000")));
    }

    #[test]
    fn parse_accepts_and_canonicalizes() {
        assert_eq!(rate("0.9213").to_text(), "0.9213");
        assert_eq!(rate("0.920").to_text(), "0.92");
        assert_eq!(rate("151.37").to_string(), "151.37");
        assert_eq!(rate("100").to_text(), "100");
        assert_eq!(rate("100.000").to_text(), "100");
        assert_eq!(rate("007.5").to_text(), "7.5");
        assert_eq!(rate("0.000000000001").to_text(), "0.000000000001");
        assert_eq!(
            rate("999999999999.999999999999").to_text(),
            "999999999999.999999999999"
        );
        assert_eq!(rate("0000000000000001").to_text(), "1");
        assert_eq!(rate("0.92"), rate("0.9200"));
        assert_eq!(rate("0.9213").value(), Decimal::new(9_213, 4));
    }

    #[test]
    fn parse_rejects_what_a_rate_cannot_be() {
        for text in [
            "0",
            "0.0",
            "0.000000000000",
            "-1",
            "+1",
            "1e3",
            "1E3",
            "abc",
            "",
            ".",
            "1.",
            ".5",
            " 1",
            "1 ",
            "1.5.3",
            "1,5",
            "NaN",
            "inf",
            "1.1234567890123",
            "1.0000000000000",
            "0.0000000000001",
            "1000000000000",
            "1000000000000.5",
            "١",
        ] {
            assert_eq!(Rate::parse(text), Err(FxError::InvalidRate), "{text:?}");
        }
    }

    #[test]
    fn serde_uses_the_canonical_text_and_validates() {
        use serde::de::IntoDeserializer;
        use serde::de::value::{Error as DeError, StringDeserializer};

        let de = |text: &str| {
            let d: StringDeserializer<DeError> = text.to_owned().into_deserializer();
            Rate::deserialize(d)
        };
        assert_eq!(de("0.9200").unwrap(), rate("0.92"));
        assert!(de("0").is_err());
        assert!(de("1e3").is_err());
        assert_eq!(String::from(rate("1.50")), "1.5");
    }

    #[test]
    fn error_codes_are_stable() {
        assert_eq!(FxError::InvalidRate.code(), "invalid_rate");
        assert_eq!(FxError::SameCurrency.code(), "same_currency");
        assert_eq!(FxError::ConversionTooSmall.code(), "conversion_too_small");
        assert_eq!(FxError::TooLarge.code(), "too_large");
        assert_eq!(FxError::InvalidSpread.code(), "invalid_spread");
    }

    // ---- property tests ----

    const PROPERTY_CURRENCIES: [&str; 5] = ["USD", "EUR", "JPY", "KWD", "BHD"];

    fn any_currency() -> impl Strategy<Value = Currency> {
        proptest::sample::select(PROPERTY_CURRENCIES.to_vec()).prop_map(cur)
    }

    /// Two different currencies.
    fn currency_pair() -> impl Strategy<Value = (Currency, Currency)> {
        (0..PROPERTY_CURRENCIES.len(), 1..PROPERTY_CURRENCIES.len()).prop_map(|(a, offset)| {
            let b = (a + offset) % PROPERTY_CURRENCIES.len();
            (cur(PROPERTY_CURRENCIES[a]), cur(PROPERTY_CURRENCIES[b]))
        })
    }

    /// Amounts spread over every magnitude (a uniform draw would almost always have 15 digits).
    fn minor_amount() -> impl Strategy<Value = i64> {
        (1_u32..=15).prop_flat_map(|digits| {
            let low = 10_i64.pow(digits - 1);
            let high = (10_i64.pow(digits) - 1).min(MAX_AMOUNT_MINOR);
            low..=high
        })
    }

    /// A rate with at most `max_digits` significant digits, anywhere between 10^-12 and 10^12,
    /// built through its text so that parsing is exercised too.
    fn rate_with_digits(max_digits: u32) -> impl Strategy<Value = Rate> {
        (0_u32..=12, 1_u32..=max_digits)
            .prop_filter("at most 12 integer digits", |(scale, digits)| {
                *digits <= 12 + scale
            })
            .prop_flat_map(|(scale, digits)| {
                let low = 10_i128.pow(digits - 1);
                let high = 10_i128.pow(digits) - 1;
                (low..=high, Just(scale))
            })
            .prop_map(|(mantissa, scale)| {
                let text = Decimal::from_i128_with_scale(mantissa, scale).to_string();
                let rate = Rate::parse(&text).unwrap();
                assert_eq!(Rate::parse(&rate.to_text()), Ok(rate));
                rate
            })
    }

    fn any_rate() -> impl Strategy<Value = Rate> {
        rate_with_digits(24)
    }

    /// Orders outcomes on one axis: too small < any amount < too large.
    fn outcome_rank(result: Result<Money, FxError>) -> i128 {
        match result {
            Ok(m) => i128::from(m.minor),
            Err(FxError::ConversionTooSmall) => 0,
            Err(FxError::TooLarge) => i128::MAX,
            Err(e) => panic!("unexpected {e:?}"),
        }
    }

    proptest! {
        #[test]
        fn result_is_the_exact_product_rounded_half_even(
            minor in minor_amount(),
            (from, to) in currency_pair(),
            // 15-digit amounts × 13-digit rates stay below 10^28, where Decimal is exact: that
            // makes Decimal an independent reference here.
            rate in rate_with_digits(13),
        ) {
            let e_from = u32::from(from.minor_units());
            let exact = Decimal::from_i128_with_scale(i128::from(minor), e_from)
                .checked_mul(rate.value())
                .unwrap();
            prop_assert_eq!(
                exact.scale(),
                e_from + rate.value().scale(),
                "reference product was rounded"
            );
            // exact × 10^e_to, by moving the decimal point (no arithmetic, so no rounding).
            let e_to = u32::from(to.minor_units());
            let result = convert(Money::from_minor(minor, from).unwrap(), to, rate);
            let exact_in_target_minor = if exact.scale() >= e_to {
                Decimal::from_i128_with_scale(exact.mantissa(), exact.scale() - e_to)
            } else {
                let shift = 10_i128.pow(e_to - exact.scale());
                match Decimal::try_from_i128_with_scale(exact.mantissa() * shift, 0) {
                    Ok(shifted) => shifted,
                    // Beyond Decimal's range (~7.9 × 10^28): far above the maximum amount.
                    Err(_) => {
                        prop_assert_eq!(result, Err(FxError::TooLarge));
                        return Ok(());
                    }
                }
            };
            let half = Decimal::new(5, 1);
            match result {
                Ok(result) => {
                    prop_assert_eq!(result.currency, to);
                    let distance = (Decimal::from(result.minor) - exact_in_target_minor).abs();
                    prop_assert!(
                        distance <= half,
                        "{} is {} away from {}",
                        result.minor,
                        distance,
                        exact_in_target_minor
                    );
                    if distance == half {
                        prop_assert_eq!(result.minor % 2, 0);
                    }
                    // And it agrees with Decimal's own half-even rounding of the exact product.
                    let reference =
                        exact.round_dp_with_strategy(e_to, RoundingStrategy::MidpointNearestEven);
                    let ours = Decimal::from_i128_with_scale(i128::from(result.minor), e_to);
                    prop_assert_eq!(ours, reference);
                }
                Err(FxError::ConversionTooSmall) => {
                    prop_assert!(exact_in_target_minor <= half);
                }
                Err(FxError::TooLarge) => {
                    prop_assert!(exact_in_target_minor > Decimal::from(MAX_AMOUNT_MINOR) + half);
                }
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
        }

        #[test]
        fn a_larger_amount_never_converts_to_less(
            a in minor_amount(),
            b in minor_amount(),
            (from, to) in currency_pair(),
            rate in any_rate(),
        ) {
            let (small, large) = (a.min(b), a.max(b));
            let small_result = convert(Money::from_minor(small, from).unwrap(), to, rate);
            let large_result = convert(Money::from_minor(large, from).unwrap(), to, rate);
            prop_assert!(outcome_rank(small_result) <= outcome_rank(large_result));
        }

        #[test]
        fn a_spread_never_gives_more(
            minor in minor_amount(),
            (from, to) in currency_pair(),
            rate in any_rate(),
            spread_bps in 0_u32..10_000,
        ) {
            let amount = Money::from_minor(minor, from).unwrap();
            match rate.with_spread(spread_bps) {
                Ok(customer_rate) => {
                    prop_assert!(customer_rate.value() <= rate.value());
                    prop_assert!(
                        outcome_rank(convert(amount, to, customer_rate))
                            <= outcome_rank(convert(amount, to, rate))
                    );
                }
                // Only a rate that rounds to zero may be refused.
                Err(e) => prop_assert_eq!(e, FxError::InvalidRate),
            }
        }

        #[test]
        fn never_panics_and_results_are_bounded(
            minor in prop_oneof![minor_amount(), 1..=MAX_AMOUNT_MINOR, any::<i64>()],
            from in any_currency(),
            to in any_currency(),
            rate in any_rate(),
            spread_bps in any::<u32>(),
        ) {
            let amount = Money { minor, currency: from };
            match convert(amount, to, rate) {
                Ok(result) => {
                    prop_assert!((1..=MAX_AMOUNT_MINOR).contains(&result.minor));
                    prop_assert_eq!(result.currency, to);
                    prop_assert_ne!(from, to);
                    // Within half a minor unit, checked by multiplying back in integers:
                    // |result × 10^k − amount × m| <= 10^k / 2 with k = e_from + s − e_to.
                    let (m, s) = rate.parts();
                    let product = i128::from(minor) * m;
                    let e_from = u32::from(from.minor_units());
                    let e_to = u32::from(to.minor_units());
                    let (lhs, rhs, unit) = match (e_from + s).checked_sub(e_to) {
                        Some(k) => {
                            let unit = 10_i128.pow(k);
                            (i128::from(result.minor) * unit, product, unit)
                        }
                        None => {
                            let shift = 10_i128.pow(e_to - e_from - s);
                            (i128::from(result.minor), product * shift, 1)
                        }
                    };
                    prop_assert!(2 * (lhs - rhs).abs() <= unit);
                }
                Err(FxError::SameCurrency) => prop_assert_eq!(from, to),
                Err(FxError::ConversionTooSmall | FxError::TooLarge) => {}
                Err(e) => prop_assert!(false, "unexpected {:?}", e),
            }
            // The rate operations are total too.
            let _ = rate.inverse();
            let _ = rate.with_spread(spread_bps);
        }
    }
}
