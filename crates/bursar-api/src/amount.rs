//! `amount` on the wire: accepted as a JSON number (`199.00`) or string (`"199.00"`), rendered as
//! a JSON number with exactly the currency's decimals. The literal is kept as text end to end
//! (serde_json's `RawValue`), so no binary floating point ever sees it.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;
use std::borrow::Cow;
use utoipa::openapi::RefOr;
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type};

/// A money amount exactly as written in JSON.
#[derive(Debug, Clone)]
pub struct Amount(Box<RawValue>);

impl Amount {
    /// Wraps decimal text (`199.00`) so that it serialises as a JSON number literal.
    /// Returns `None` if the text is not a valid JSON number.
    pub fn number(decimal_text: &str) -> Option<Amount> {
        serde_json::from_str::<serde_json::Number>(decimal_text).ok()?;
        RawValue::from_string(decimal_text.to_owned())
            .ok()
            .map(Amount)
    }

    /// The decimal text the client sent: a number's literal, or a string's content.
    /// `None` when the JSON value is neither a number nor a string.
    pub fn text(&self) -> Option<Cow<'_, str>> {
        let raw = self.0.get();
        match raw.as_bytes().first()? {
            b'"' => serde_json::from_str::<String>(raw).ok().map(Cow::Owned),
            b'-' | b'0'..=b'9' => Some(Cow::Borrowed(raw)),
            _ => None,
        }
    }

    /// The raw JSON text, as sent or as it will be rendered.
    pub fn raw_json(&self) -> &str {
        self.0.get()
    }
}

impl Serialize for Amount {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Amount {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Box::<RawValue>::deserialize(d).map(Amount)
    }
}

impl utoipa::PartialSchema for Amount {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::Type(Type::Number))
                    .description(Some("Decimal amount as a JSON number, e.g. 199.00")),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(SchemaType::Type(Type::String))
                    .pattern(Some(r"^[0-9]+(\.[0-9]+)?$"))
                    .description(Some("Decimal amount as a string, e.g. \"199.00\"")),
            )
            .description(Some(
                "Positive amount with no more decimals than the currency's minor unit \
                 (USD 2, JPY 0, KWD 3). No exponent notation. Responses always render a \
                 JSON number with exactly the currency's decimals; balances and ledger \
                 postings may be zero or negative.",
            ))
            .into()
    }
}

impl utoipa::ToSchema for Amount {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Serialize)]
    struct Wrap {
        amount: Amount,
    }

    #[test]
    fn keeps_literals_exactly() {
        let w: Wrap = serde_json::from_str(r#"{"amount": 199.00}"#).unwrap();
        assert_eq!(w.amount.text().unwrap(), "199.00");
        let w: Wrap = serde_json::from_str(r#"{"amount": "0.10"}"#).unwrap();
        assert_eq!(w.amount.text().unwrap(), "0.10");
        let w: Wrap =
            serde_json::from_str(r#"{"amount": 12345678901234567890.123456789}"#).unwrap();
        assert_eq!(w.amount.text().unwrap(), "12345678901234567890.123456789");
        let w: Wrap = serde_json::from_str(r#"{"amount": true}"#).unwrap();
        assert!(w.amount.text().is_none());
    }

    #[test]
    fn renders_a_number_literal() {
        let w = Wrap {
            amount: Amount::number("199.00").unwrap(),
        };
        assert_eq!(serde_json::to_string(&w).unwrap(), r#"{"amount":199.00}"#);
        assert!(Amount::number("1,5").is_none());
    }
}
