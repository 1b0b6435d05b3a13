//! Webhook secrets and signatures (spec `events-webhooks.md` §1 and §2.1).
//!
//! Every delivery carries two signatures over the same raw body, so receivers can pick the one
//! their tooling already understands:
//!
//! - **`X-Webhook-Signature`**: lowercase hex HMAC-SHA256 of the raw body, keyed with the UTF-8
//!   bytes of the whole secret string (`whsec_…`), as GitHub and Stripe receivers expect. It
//!   signs no timestamp, so it proves authenticity but not freshness.
//! - **Standard Webhooks** (`webhook-id`, `webhook-timestamp`, `webhook-signature`): HMAC-SHA256
//!   of `"{id}.{timestamp}.{body}"`, keyed with the base64-decoded part of the secret, sent as
//!   `v1,<base64>`. The signed timestamp lets receivers reject replays outside a tolerance.
//!
//! Everything here is a pure function: random bytes and timestamps come in as arguments, so the
//! sender, the SDK verifier and the tests all compute exactly the same bytes.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The prefix that marks a Bursar webhook secret, as in Standard Webhooks.
pub const SECRET_PREFIX: &str = "whsec_";
/// Fewest random bytes in a secret: Standard Webhooks requires 24 (192 bits).
pub const MIN_SECRET_BYTES: usize = 24;
/// Most random bytes in a secret: the Standard Webhooks upper bound.
pub const MAX_SECRET_BYTES: usize = 64;
/// How far `webhook-timestamp` may be from the receiver's clock, either way, before the
/// request is rejected. The Standard Webhooks reference libraries use the same 5 minutes.
pub const TOLERANCE_SECS: i64 = 5 * 60;

/// Header carrying the event id; stable across retries, so receivers de-duplicate on it.
pub const HEADER_ID: &str = "webhook-id";
/// Header carrying the Unix seconds of this attempt (not of the event).
pub const HEADER_TIMESTAMP: &str = "webhook-timestamp";
/// Header carrying the space-separated `v1,<base64>` signatures.
pub const HEADER_SIGNATURE: &str = "webhook-signature";
/// Header carrying the hex signature made with the current secret.
pub const HEADER_HEX_SIGNATURE: &str = "x-webhook-signature";
/// Header carrying the hex signature made with the previous secret during a rotation grace
/// window: one hex header can hold only one signature.
pub const HEADER_HEX_SIGNATURE_PREVIOUS: &str = "x-webhook-signature-previous";

type HmacSha256 = Hmac<Sha256>;

/// Why a secret was refused. The messages never contain the secret itself, so they are safe to
/// log or return in an error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SecretError {
    #[error("webhook secret must start with \"whsec_\"")]
    MissingPrefix,
    #[error("webhook secret is not valid standard base64 after \"whsec_\"")]
    InvalidBase64,
    #[error("webhook secret must hold 24 to 64 bytes, got {0}")]
    InvalidLength(usize),
}

/// A webhook endpoint's signing secret, in the form shown to its owner: `whsec_` + standard
/// base64 (with padding) of 24 to 64 random bytes.
///
/// Holding one means the text is well formed, so [`WebhookSecret::key_bytes`] cannot fail. The
/// type has no `Display` and its `Debug` is redacted, so a secret cannot reach a log line by
/// accident; use [`WebhookSecret::masked`] to show it and [`WebhookSecret::as_str`] to reveal it.
#[derive(Clone)]
pub struct WebhookSecret(String);

impl WebhookSecret {
    /// Builds a secret from random bytes the caller drew from a CSPRNG (this crate does no I/O
    /// and draws no randomness). 24 to 64 bytes; 24 is the usual choice.
    pub fn from_random_bytes(bytes: &[u8]) -> Result<WebhookSecret, SecretError> {
        check_len(bytes.len())?;
        Ok(WebhookSecret(format!(
            "{SECRET_PREFIX}{}",
            STANDARD.encode(bytes)
        )))
    }

    /// Accepts a secret as shown (`whsec_…`): the prefix, canonical standard base64 with
    /// padding, and 24 to 64 decoded bytes.
    pub fn parse(text: &str) -> Result<WebhookSecret, SecretError> {
        let encoded = text
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SecretError::MissingPrefix)?;
        let key = STANDARD
            .decode(encoded)
            .map_err(|_| SecretError::InvalidBase64)?;
        check_len(key.len())?;
        Ok(WebhookSecret(text.to_owned()))
    }

    /// The whole secret (`whsec_…`): what its owner copies, and the HMAC key of the hex
    /// `X-Webhook-Signature` scheme.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The base64-decoded part: the HMAC key of the Standard Webhooks scheme.
    pub fn key_bytes(&self) -> Vec<u8> {
        STANDARD
            .decode(&self.0[SECRET_PREFIX.len()..])
            .expect("checked when the secret was built")
    }

    /// `whsec_…` plus the last four characters: enough to tell two secrets apart on a
    /// dashboard or in a `GET` answer without revealing either.
    pub fn masked(&self) -> String {
        format!("{SECRET_PREFIX}…{}", &self.0[self.0.len() - 4..])
    }
}

impl std::fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print any of the secret, even in a debug dump.
        f.write_str("WebhookSecret(whsec_<redacted>)")
    }
}

/// Constant-time, so comparing a presented secret with a stored one leaks nothing by timing.
impl PartialEq for WebhookSecret {
    fn eq(&self, other: &WebhookSecret) -> bool {
        self.0.as_bytes().ct_eq(other.0.as_bytes()).into()
    }
}

impl Eq for WebhookSecret {}

fn check_len(len: usize) -> Result<(), SecretError> {
    if (MIN_SECRET_BYTES..=MAX_SECRET_BYTES).contains(&len) {
        Ok(())
    } else {
        Err(SecretError::InvalidLength(len))
    }
}

fn hmac_sha256(key: &[u8]) -> HmacSha256 {
    <HmacSha256 as KeyInit>::new_from_slice(key).expect("HMAC accepts keys of any length")
}

/// The raw 32-byte MAC behind [`sign_hex`]: verifiers decode the header and compare bytes in
/// constant time against this rather than comparing strings.
pub fn hex_mac(secret: &str, body: &[u8]) -> [u8; 32] {
    let mut mac = hmac_sha256(secret.as_bytes());
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// The `X-Webhook-Signature` value: lowercase hex HMAC-SHA256 of the raw `body`, keyed with the
/// UTF-8 bytes of the whole secret string as shown (`whsec_…`, prefix included), so that
/// receivers can paste the secret into GitHub- or Stripe-style verification code unchanged.
pub fn sign_hex(secret: &str, body: &[u8]) -> String {
    hex::encode(hex_mac(secret, body))
}

/// The raw 32-byte MAC behind [`sign_standard`], for constant-time comparison by verifiers.
///
/// `msg_id` must not contain `.`, or the signed message would be ambiguous.
pub fn standard_mac(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut mac = hmac_sha256(key);
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// One Standard Webhooks signature, `v1,<base64>`: HMAC-SHA256 of
/// `"{msg_id}.{timestamp}.{body}"` keyed with `key` (the decoded secret, see
/// [`WebhookSecret::key_bytes`]). The timestamp is inside the MAC, so a captured request cannot
/// be replayed outside the receiver's tolerance.
///
/// `msg_id` must not contain `.`, or the signed message would be ambiguous.
pub fn sign_standard(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "v1,{}",
        STANDARD.encode(standard_mac(key, msg_id, timestamp, body))
    )
}

/// The `webhook-signature` header value: one `v1,` entry per key, space-separated, current key
/// first. During a rotation grace window the sender passes `[new, old]`, so a receiver still
/// holding only the old secret keeps verifying (any matching entry passes). Empty when `keys`
/// is empty.
pub fn signature_header(
    keys: &[&WebhookSecret],
    msg_id: &str,
    timestamp: i64,
    body: &[u8],
) -> String {
    keys.iter()
        .map(|k| sign_standard(&k.key_bytes(), msg_id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const MSG_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TIMESTAMP: i64 = 1_649_367_553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;

    /// `^whsec_[A-Za-z0-9+/]{32,}={0,2}$`, written out because the crate has no regex engine.
    fn matches_secret_shape(s: &str) -> bool {
        let Some(rest) = s.strip_prefix("whsec_") else {
            return false;
        };
        let body = rest.trim_end_matches('=');
        rest.len() - body.len() <= 2
            && body.len() >= 32
            && body
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'+' || b == b'/')
    }

    #[test]
    fn standard_webhooks_vector() {
        let secret = WebhookSecret::parse(SECRET).unwrap();
        assert_eq!(secret.key_bytes().len(), 24);
        assert_eq!(
            sign_standard(&secret.key_bytes(), MSG_ID, TIMESTAMP, BODY),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
        assert_eq!(
            signature_header(&[&secret], MSG_ID, TIMESTAMP, BODY),
            "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw="
        );
    }

    #[test]
    fn hex_vector_keys_with_the_whole_secret_string() {
        assert_eq!(
            sign_hex(SECRET, BODY),
            "e0fc16c6d4a28f39a6e0935569f05d86e87367db24a4b6d9271215c603e49f6a"
        );
        assert_eq!(hex::encode(hex_mac(SECRET, BODY)), sign_hex(SECRET, BODY));
    }

    #[test]
    fn hex_matches_the_github_cross_check() {
        assert_eq!(
            sign_hex("It's a Secret to Everybody", b"Hello, World!"),
            "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"
        );
    }

    #[test]
    fn rotation_header_lists_every_key_current_first() {
        let new = WebhookSecret::from_random_bytes(&[7; 32]).unwrap();
        let old = WebhookSecret::parse(SECRET).unwrap();
        let header = signature_header(&[&new, &old], MSG_ID, TIMESTAMP, BODY);
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(
            entries,
            [
                sign_standard(&new.key_bytes(), MSG_ID, TIMESTAMP, BODY),
                sign_standard(&old.key_bytes(), MSG_ID, TIMESTAMP, BODY),
            ]
        );
        assert_eq!(signature_header(&[], MSG_ID, TIMESTAMP, BODY), "");
    }

    #[test]
    fn generated_secrets_round_trip_and_have_the_documented_shape() {
        for len in MIN_SECRET_BYTES..=MAX_SECRET_BYTES {
            let bytes: Vec<u8> = (0..len).map(|i| (i * 37 + len).to_le_bytes()[0]).collect();
            let s = WebhookSecret::from_random_bytes(&bytes).unwrap();
            assert!(matches_secret_shape(s.as_str()), "{len}: {}", s.as_str());
            assert_eq!(s.key_bytes(), bytes);
            assert_eq!(WebhookSecret::parse(s.as_str()), Ok(s.clone()));
        }
        assert!(matches_secret_shape(SECRET));
    }

    #[test]
    fn out_of_range_lengths_are_refused() {
        assert_eq!(
            WebhookSecret::from_random_bytes(&[1; 23]),
            Err(SecretError::InvalidLength(23))
        );
        assert_eq!(
            WebhookSecret::from_random_bytes(&[1; 65]),
            Err(SecretError::InvalidLength(65))
        );
        assert_eq!(
            WebhookSecret::from_random_bytes(&[]),
            Err(SecretError::InvalidLength(0))
        );
    }

    #[test]
    fn parse_rejects_malformed_secrets() {
        let short = format!("whsec_{}", STANDARD.encode([1u8; 23]));
        let long = format!("whsec_{}", STANDARD.encode([1u8; 65]));
        for (bad, why) in [
            (
                "C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
                SecretError::MissingPrefix,
            ),
            (
                "WHSEC_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
                SecretError::MissingPrefix,
            ),
            (
                "whsec_C2FVsBQIhrscChlQIMV-b5sSYspob7oD",
                SecretError::InvalidBase64,
            ),
            (
                "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7o",
                SecretError::InvalidBase64,
            ),
            (
                " whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD",
                SecretError::MissingPrefix,
            ),
            (
                "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD ",
                SecretError::InvalidBase64,
            ),
            ("whsec_", SecretError::InvalidLength(0)),
            (short.as_str(), SecretError::InvalidLength(23)),
            (long.as_str(), SecretError::InvalidLength(65)),
        ] {
            assert_eq!(WebhookSecret::parse(bad), Err(why), "{bad}");
        }
        // Padding is required: 25 bytes encode to 36 characters ending in "==".
        let padded = format!("whsec_{}", STANDARD.encode([9u8; 25]));
        assert!(padded.ends_with("=="));
        assert!(WebhookSecret::parse(&padded).is_ok());
        assert_eq!(
            WebhookSecret::parse(padded.trim_end_matches('=')),
            Err(SecretError::InvalidBase64)
        );
    }

    #[test]
    fn debug_and_errors_never_show_the_secret() {
        let s = WebhookSecret::parse(SECRET).unwrap();
        let dbg = format!("{s:?}");
        assert!(!dbg.contains("C2FV"), "{dbg}");
        assert!(!dbg.contains("7oD"), "{dbg}");
        assert!(!format!("{:?}", [&s]).contains("b5sS"));
        let err = WebhookSecret::parse("whsec_C2FVsBQIhrscChlQIMV-b5sSYspob7oD").unwrap_err();
        assert!(!err.to_string().contains("C2FV"));
    }

    #[test]
    fn masked_shows_only_the_last_four_characters() {
        let s = WebhookSecret::parse(SECRET).unwrap();
        assert_eq!(s.masked(), "whsec_…b7oD");
    }

    #[test]
    fn equality_compares_the_whole_secret() {
        let a = WebhookSecret::parse(SECRET).unwrap();
        let b = WebhookSecret::from_random_bytes(&[0; 24]).unwrap();
        assert_ne!(a, b);
        assert_eq!(a, a.clone());
    }

    proptest::proptest! {
        #[test]
        fn any_random_bytes_make_a_parseable_secret(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, MIN_SECRET_BYTES..=MAX_SECRET_BYTES)
        ) {
            let s = WebhookSecret::from_random_bytes(&bytes).unwrap();
            proptest::prop_assert!(matches_secret_shape(s.as_str()));
            proptest::prop_assert_eq!(s.key_bytes(), bytes);
            proptest::prop_assert_eq!(WebhookSecret::parse(s.as_str()), Ok(s.clone()));
        }
    }
}
