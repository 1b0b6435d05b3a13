//! Verifying Bursar webhook deliveries on the receiving side.
//!
//! Bursar signs every delivery twice (see `docs/webhooks/receivers.md`):
//!
//! - [`Verifier::verify`] checks the **Standard Webhooks** headers (`webhook-id`,
//!   `webhook-timestamp`, `webhook-signature`). The timestamp is signed, so a captured request
//!   cannot be replayed outside the tolerance. Prefer this one.
//! - [`Verifier::verify_hex`] checks `X-Webhook-Signature` (and `X-Webhook-Signature-Previous`
//!   during a secret rotation), the GitHub-style hex HMAC of the body. It proves who sent the
//!   body but not when, so pair it with de-duplication by `webhook-id`.
//!
//! Both take the **raw** request body: re-serialising parsed JSON changes the bytes and breaks
//! the signature. Both compare decoded MAC bytes in constant time. The expected MACs come from
//! [`bursar_domain::webhook`], the same code the server signs with.
//!
//! Because retries carry the same `webhook-id`, a verified delivery may still be one already
//! processed: remember processed ids for at least the retry horizon (about three days).

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bursar_domain::webhook::{
    self, HEADER_HEX_SIGNATURE, HEADER_HEX_SIGNATURE_PREVIOUS, HEADER_ID, HEADER_SIGNATURE,
    HEADER_TIMESTAMP, TOLERANCE_SECS, WebhookSecret,
};
use reqwest::header::HeaderMap;
use subtle::ConstantTimeEq;

pub use bursar_domain::webhook::SecretError;

/// Why a delivery was rejected. Every variant means "answer 4xx and do not process"; the
/// variants exist so the receiver can log *why*, and none of them carries a secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A required header is absent (its lowercase name).
    #[error("missing header {0}")]
    MissingHeader(&'static str),
    /// A header is present but malformed: not ASCII, repeated, a `webhook-id` containing `.`,
    /// or a `webhook-timestamp` that is not decimal Unix seconds.
    #[error("invalid header {0}")]
    InvalidHeader(&'static str),
    /// `webhook-timestamp` is further in the past than the tolerance: a replay, or a delivery
    /// held up somewhere for too long.
    #[error("webhook timestamp is too old")]
    TimestampTooOld,
    /// `webhook-timestamp` is further in the future than the tolerance: usually a clock skewed
    /// on one side.
    #[error("webhook timestamp is too far in the future")]
    TimestampTooNew,
    /// No signature in the headers matches any secret this verifier holds.
    #[error("no matching webhook signature")]
    NoMatchingSignature,
}

/// Why a [`Verifier`] could not be built.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum VerifierError {
    /// A verifier without secrets would reject everything; that is a configuration mistake.
    #[error("no webhook secrets given")]
    NoSecrets,
    /// The secret at `index` (0-based, in the order given) is not a `whsec_…` secret.
    #[error("webhook secret #{index} is invalid: {source}")]
    InvalidSecret { index: usize, source: SecretError },
}

/// Checks that a delivery comes from Bursar, for one endpoint's secret(s).
///
/// Hold every secret that may currently be signing: during a rotation that is the new and the
/// old one. A delivery passes if any of its signatures matches any held secret, so the sender
/// and the receiver can switch secrets independently without dropping deliveries.
#[derive(Debug, Clone)]
pub struct Verifier {
    secrets: Vec<WebhookSecret>,
    tolerance_secs: i64,
}

impl Verifier {
    /// A verifier for the given `whsec_…` secrets, with the default 5-minute tolerance.
    pub fn new<I>(secrets: I) -> Result<Verifier, VerifierError>
    where
        I: IntoIterator,
        I::Item: AsRef<str>,
    {
        let secrets = secrets
            .into_iter()
            .enumerate()
            .map(|(index, s)| {
                WebhookSecret::parse(s.as_ref())
                    .map_err(|source| VerifierError::InvalidSecret { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if secrets.is_empty() {
            return Err(VerifierError::NoSecrets);
        }
        Ok(Verifier {
            secrets,
            tolerance_secs: TOLERANCE_SECS,
        })
    }

    /// How far `webhook-timestamp` may be from `now`, each way (default 5 minutes).
    /// Timestamps are whole seconds, so sub-second parts are ignored. Widening it widens the
    /// replay window; narrowing it below your clock skew rejects genuine deliveries.
    pub fn with_tolerance(mut self, tolerance: Duration) -> Verifier {
        self.tolerance_secs = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
        self
    }

    /// Verifies the Standard Webhooks headers over the raw `body`.
    ///
    /// `now_unix_secs` is the receiver's current Unix time in seconds; it is a parameter so
    /// that tests (and receivers with their own clock abstraction) control it. The rules:
    /// all three `webhook-*` headers are required; `webhook-id` must not contain `.`; the
    /// timestamp must be within the tolerance of `now`; and at least one `v1,` entry of the
    /// space-separated `webhook-signature` list must match one held secret. Other schemes
    /// (such as `v1a,`) are skipped, so a list with no `v1,` entry fails.
    pub fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now_unix_secs: i64,
    ) -> Result<(), VerifyError> {
        let msg_id = single(headers, HEADER_ID)?;
        if msg_id.is_empty() || msg_id.contains('.') {
            return Err(VerifyError::InvalidHeader(HEADER_ID));
        }
        let timestamp = parse_timestamp(single(headers, HEADER_TIMESTAMP)?)?;
        let mut values = headers.get_all(HEADER_SIGNATURE).iter().peekable();
        if values.peek().is_none() {
            return Err(VerifyError::MissingHeader(HEADER_SIGNATURE));
        }
        if now_unix_secs.saturating_sub(timestamp) > self.tolerance_secs {
            return Err(VerifyError::TimestampTooOld);
        }
        if timestamp.saturating_sub(now_unix_secs) > self.tolerance_secs {
            return Err(VerifyError::TimestampTooNew);
        }

        let expected: Vec<[u8; 32]> = self
            .secrets
            .iter()
            .map(|s| webhook::standard_mac(&s.key_bytes(), msg_id, timestamp, body))
            .collect();
        for value in values {
            let value = value
                .to_str()
                .map_err(|_| VerifyError::InvalidHeader(HEADER_SIGNATURE))?;
            for entry in value.split(' ') {
                let Some(("v1", encoded)) = entry.split_once(',') else {
                    continue; // another scheme (v1a, a future v2) or stray spacing
                };
                let Ok(presented) = STANDARD.decode(encoded) else {
                    continue;
                };
                if matches_any(&presented, &expected) {
                    return Ok(());
                }
            }
        }
        Err(VerifyError::NoMatchingSignature)
    }

    /// Verifies `X-Webhook-Signature` (or, during a rotation grace window,
    /// `X-Webhook-Signature-Previous`) over the raw `body`: lowercase hex HMAC-SHA256 keyed with
    /// the whole secret string.
    ///
    /// No timestamp is signed, so this proves authenticity and integrity but not freshness: a
    /// captured request can be replayed. Receivers relying on it alone must de-duplicate by
    /// `webhook-id`. `X-Webhook-Signature` is required; values that are not hex simply do not
    /// match.
    pub fn verify_hex(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), VerifyError> {
        if !headers.contains_key(HEADER_HEX_SIGNATURE) {
            return Err(VerifyError::MissingHeader(HEADER_HEX_SIGNATURE));
        }
        let expected: Vec<[u8; 32]> = self
            .secrets
            .iter()
            .map(|s| webhook::hex_mac(s.as_str(), body))
            .collect();
        for name in [HEADER_HEX_SIGNATURE, HEADER_HEX_SIGNATURE_PREVIOUS] {
            for value in headers.get_all(name) {
                let Ok(presented) = hex::decode(value.as_bytes()) else {
                    continue;
                };
                if matches_any(&presented, &expected) {
                    return Ok(());
                }
            }
        }
        Err(VerifyError::NoMatchingSignature)
    }
}

/// Constant-time per comparison; a length mismatch (a truncated signature) never matches.
fn matches_any(presented: &[u8], expected: &[[u8; 32]]) -> bool {
    expected
        .iter()
        .any(|e| bool::from(e.as_slice().ct_eq(presented)))
}

/// The one value of a header that must appear exactly once: two `webhook-id`s would make it
/// ambiguous which one was signed.
fn single<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, VerifyError> {
    let mut values = headers.get_all(name).iter();
    let value = values.next().ok_or(VerifyError::MissingHeader(name))?;
    if values.next().is_some() {
        return Err(VerifyError::InvalidHeader(name));
    }
    value
        .to_str()
        .map(str::trim)
        .map_err(|_| VerifyError::InvalidHeader(name))
}

/// Decimal Unix seconds, digits only: `+5`, `-5` or `1e9` were not produced by Bursar.
fn parse_timestamp(text: &str) -> Result<i64, VerifyError> {
    let invalid = VerifyError::InvalidHeader(HEADER_TIMESTAMP);
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid);
    }
    text.parse().map_err(|_| invalid)
}

/// Compiles the Rust example in the receiver guide as a doctest, so the guide cannot drift
/// from the SDK.
#[cfg(doctest)]
#[doc = include_str!("../../../docs/webhooks/receivers.md")]
pub struct ReceiverGuide;

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    const SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const MSG_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const TS: i64 = 1_649_367_553;
    const BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";
    const HEX: &str = "e0fc16c6d4a28f39a6e0935569f05d86e87367db24a4b6d9271215c603e49f6a";

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_str(value).unwrap());
        }
        h
    }

    fn standard(sig: &str) -> HeaderMap {
        headers(&[
            ("webhook-id", MSG_ID),
            ("webhook-timestamp", &TS.to_string()),
            ("webhook-signature", sig),
        ])
    }

    fn verifier() -> Verifier {
        Verifier::new([SECRET]).unwrap()
    }

    fn secret(fill: u8) -> WebhookSecret {
        WebhookSecret::from_random_bytes(&[fill; 24]).unwrap()
    }

    #[test]
    fn spec_vector_verifies() {
        assert_eq!(verifier().verify(&standard(SIG), BODY, TS), Ok(()));
        assert_eq!(
            verifier().verify_hex(&headers(&[("X-Webhook-Signature", HEX)]), BODY),
            Ok(())
        );
    }

    #[test]
    fn header_names_are_case_insensitive() {
        let h = headers(&[
            ("Webhook-Id", MSG_ID),
            ("WEBHOOK-TIMESTAMP", "1649367553"),
            ("Webhook-Signature", SIG),
        ]);
        assert_eq!(verifier().verify(&h, BODY, TS), Ok(()));
    }

    #[test]
    fn one_flipped_body_byte_is_rejected() {
        for i in 0..BODY.len() {
            let mut body = BODY.to_vec();
            body[i] ^= 0x01;
            assert_eq!(
                verifier().verify(&standard(SIG), &body, TS),
                Err(VerifyError::NoMatchingSignature),
                "byte {i}"
            );
        }
    }

    #[test]
    fn wrong_secret_is_rejected() {
        let other = Verifier::new([secret(1).as_str()]).unwrap();
        assert_eq!(
            other.verify(&standard(SIG), BODY, TS),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn truncated_signature_is_rejected() {
        // Shorter valid base64 (31 bytes) and a cut that breaks the base64 both fail.
        let short = format!(
            "v1,{}",
            STANDARD.encode(&STANDARD.decode(&SIG[3..]).unwrap()[..31])
        );
        for sig in [short.as_str(), &SIG[..SIG.len() - 1], &SIG[..10], "v1,"] {
            assert_eq!(
                verifier().verify(&standard(sig), BODY, TS),
                Err(VerifyError::NoMatchingSignature),
                "{sig}"
            );
        }
    }

    #[test]
    fn each_missing_header_is_rejected() {
        for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
            let mut h = standard(SIG);
            h.remove(name);
            assert_eq!(
                verifier().verify(&h, BODY, TS),
                Err(VerifyError::MissingHeader(name))
            );
        }
    }

    #[test]
    fn only_non_v1_schemes_are_rejected() {
        let b64 = &SIG[3..];
        for sig in [
            format!("v1a,{b64}"),
            format!("v2,{b64}"),
            format!("v1a,{b64} v2,{b64}"),
            b64.to_owned(),
        ] {
            assert_eq!(
                verifier().verify(&standard(&sig), BODY, TS),
                Err(VerifyError::NoMatchingSignature),
                "{sig}"
            );
        }
    }

    #[test]
    fn timestamp_tolerance_is_five_minutes_each_way() {
        let v = verifier();
        let h = standard(SIG);
        assert_eq!(
            v.verify(&h, BODY, TS + 301),
            Err(VerifyError::TimestampTooOld)
        );
        assert_eq!(
            v.verify(&h, BODY, TS - 301),
            Err(VerifyError::TimestampTooNew)
        );
        assert_eq!(v.verify(&h, BODY, TS + 299), Ok(()));
        assert_eq!(v.verify(&h, BODY, TS + 300), Ok(()));
        assert_eq!(v.verify(&h, BODY, TS - 300), Ok(()));
    }

    #[test]
    fn tolerance_is_configurable() {
        let v = verifier().with_tolerance(Duration::from_secs(10));
        let h = standard(SIG);
        assert_eq!(v.verify(&h, BODY, TS + 10), Ok(()));
        assert_eq!(
            v.verify(&h, BODY, TS + 11),
            Err(VerifyError::TimestampTooOld)
        );
        let wide = verifier().with_tolerance(Duration::MAX);
        assert_eq!(wide.verify(&h, BODY, i64::MAX), Ok(()));
        assert_eq!(wide.verify(&h, BODY, i64::MIN), Ok(()));
    }

    #[test]
    fn malformed_id_and_timestamp_are_rejected() {
        let mut h = standard(SIG);
        h.insert("webhook-id", HeaderValue::from_static("msg.1"));
        assert_eq!(
            verifier().verify(&h, BODY, TS),
            Err(VerifyError::InvalidHeader("webhook-id"))
        );
        for ts in [
            "",
            "abc",
            "+1649367553",
            "-1",
            "1649367553.0",
            "99999999999999999999",
        ] {
            let mut h = standard(SIG);
            h.insert("webhook-timestamp", HeaderValue::from_str(ts).unwrap());
            assert_eq!(
                verifier().verify(&h, BODY, TS),
                Err(VerifyError::InvalidHeader("webhook-timestamp")),
                "{ts:?}"
            );
        }
        let mut h = standard(SIG);
        h.append("webhook-id", HeaderValue::from_static("msg_other"));
        assert_eq!(
            verifier().verify(&h, BODY, TS),
            Err(VerifyError::InvalidHeader("webhook-id"))
        );
    }

    #[test]
    fn a_later_matching_entry_passes() {
        let wrong = webhook::sign_standard(&secret(2).key_bytes(), MSG_ID, TS, BODY);
        let sig = format!("v1a,AAAA {wrong}  {SIG}");
        assert_eq!(verifier().verify(&standard(&sig), BODY, TS), Ok(()));
    }

    #[test]
    fn rotation_receiver_with_either_secret_verifies() {
        let old = WebhookSecret::parse(SECRET).unwrap();
        let new = secret(3);
        let sig = webhook::signature_header(&[&new, &old], MSG_ID, TS, BODY);
        let h = standard(&sig);
        assert_eq!(
            Verifier::new([old.as_str()]).unwrap().verify(&h, BODY, TS),
            Ok(())
        );
        assert_eq!(
            Verifier::new([new.as_str()]).unwrap().verify(&h, BODY, TS),
            Ok(())
        );
        // A receiver holding both, newest first, verifies a header signed with the old only.
        let both = Verifier::new([new.as_str(), old.as_str()]).unwrap();
        assert_eq!(both.verify(&standard(SIG), BODY, TS), Ok(()));
        // After the grace window only the new signature is sent: old-only receivers fail.
        let after = webhook::signature_header(&[&new], MSG_ID, TS, BODY);
        assert_eq!(
            Verifier::new([old.as_str()])
                .unwrap()
                .verify(&standard(&after), BODY, TS),
            Err(VerifyError::NoMatchingSignature)
        );
    }

    #[test]
    fn hex_scheme() {
        let v = verifier();
        let h = headers(&[("x-webhook-signature", HEX)]);
        assert_eq!(v.verify_hex(&h, BODY), Ok(()));
        let upper = headers(&[("X-WEBHOOK-SIGNATURE", &HEX.to_uppercase())]);
        assert_eq!(v.verify_hex(&upper, BODY), Ok(()));

        let mut tampered = BODY.to_vec();
        tampered[5] ^= 0x20;
        assert_eq!(
            v.verify_hex(&h, &tampered),
            Err(VerifyError::NoMatchingSignature)
        );
        let other = Verifier::new([secret(4).as_str()]).unwrap();
        assert_eq!(
            other.verify_hex(&h, BODY),
            Err(VerifyError::NoMatchingSignature)
        );
        for bad in [&HEX[..63], &HEX[..62], "sha256=e0fc", ""] {
            assert_eq!(
                v.verify_hex(&headers(&[("x-webhook-signature", bad)]), BODY),
                Err(VerifyError::NoMatchingSignature),
                "{bad}"
            );
        }
        assert_eq!(
            v.verify_hex(&HeaderMap::new(), BODY),
            Err(VerifyError::MissingHeader("x-webhook-signature"))
        );
    }

    #[test]
    fn hex_previous_header_is_accepted_during_rotation() {
        let old = WebhookSecret::parse(SECRET).unwrap();
        let new = secret(5);
        let h = headers(&[
            (
                "X-Webhook-Signature",
                &webhook::sign_hex(new.as_str(), BODY),
            ),
            (
                "X-Webhook-Signature-Previous",
                &webhook::sign_hex(old.as_str(), BODY),
            ),
        ]);
        assert_eq!(verifier().verify_hex(&h, BODY), Ok(()));
        assert_eq!(
            Verifier::new([new.as_str()]).unwrap().verify_hex(&h, BODY),
            Ok(())
        );
        // The previous header alone is not a delivery Bursar would send.
        let only_prev = headers(&[("X-Webhook-Signature-Previous", HEX)]);
        assert_eq!(
            verifier().verify_hex(&only_prev, BODY),
            Err(VerifyError::MissingHeader("x-webhook-signature"))
        );
    }

    #[test]
    fn construction_errors() {
        assert_eq!(
            Verifier::new(Vec::<String>::new()).unwrap_err(),
            VerifierError::NoSecrets
        );
        assert_eq!(
            Verifier::new([SECRET, "not-a-secret"]).unwrap_err(),
            VerifierError::InvalidSecret {
                index: 1,
                source: SecretError::MissingPrefix
            }
        );
        let owned = vec![SECRET.to_owned()];
        assert!(Verifier::new(&owned).is_ok());
    }

    #[test]
    fn debug_does_not_show_secrets() {
        let dbg = format!("{:?}", verifier());
        assert!(!dbg.contains("C2FV"), "{dbg}");
    }
}
