//! `Idempotency-Key` on the wire (spec `idempotency.md` §1–2): parsing the header, the request
//! fingerprint, and turning stored outcomes into responses. The claim, the write and the stored
//! response share one transaction in storage (`OrderStore::create_order_idempotent`).

use std::collections::BTreeMap;

use axum::body::Body;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::Response;
use bursar_api::ErrorCode;
use bursar_domain::Timestamp;
use bursar_storage::{IdempotencyRecord, StoredResponse};
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

use super::context::Rendered;
use super::error::{ApiError, issue};

/// Response headers a replay carries (spec §2.3); everything else belongs to the exchange.
pub const REPLAYED_HEADERS: &[&str] = &[
    "location",
    "content-location",
    "etag",
    "last-modified",
    "link",
    "content-type",
];

fn invalid(why: &str) -> ApiError {
    ApiError::new(
        ErrorCode::IdempotencyKeyInvalid,
        format!("Idempotency-Key is invalid: {why}."),
    )
    .with_details(vec![issue("Idempotency-Key", "invalid", why)])
}

/// The key, accepted bare (`K1`) or as an RFC 8941 string (`"K1"`), both naming the same
/// record: 1–255 printable ASCII characters, one field only. `None` when absent.
pub fn parse_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let mut fields = headers.get_all("idempotency-key").iter();
    let Some(first) = fields.next() else {
        return Ok(None);
    };
    if fields.next().is_some() {
        return Err(invalid("send exactly one Idempotency-Key field"));
    }
    let raw = first.as_bytes();
    let key = match raw {
        [b'"', inner @ .., b'"'] => {
            unquote(inner).ok_or_else(|| invalid("broken quoted string"))?
        }
        [b'"', ..] => return Err(invalid("broken quoted string")),
        bare => bare.to_vec(),
    };
    if key.is_empty() || key.len() > 255 {
        return Err(invalid("it must be 1 to 255 characters"));
    }
    if !key.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(invalid("only printable ASCII characters are allowed"));
    }
    Ok(Some(
        String::from_utf8(key).expect("printable ASCII is UTF-8"),
    ))
}

/// The content of an sf-string: `\"` and `\\` are the only escapes, a bare `"` ends it.
fn unquote(inner: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter();
    while let Some(&b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(&e @ (b'"' | b'\\')) => out.push(e),
                _ => return None,
            },
            b'"' => return None,
            _ => out.push(b),
        }
    }
    Some(out)
}

/// SHA-256 (hex) of the method, the route template, the sorted query and the canonical JSON
/// body, so that key order and whitespace do not make a retry look like another request,
/// while any other difference (including a number written differently) does.
pub fn fingerprint(method: &str, route: &str, query: Option<&str>, body: &[u8]) -> String {
    let mut pairs: Vec<&str> = query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
        .collect();
    pairs.sort_unstable();
    let mut h = Sha256::new();
    for part in [method, route, &pairs.join("&")] {
        h.update(part.as_bytes());
        h.update(b"\n");
    }
    match canonical_json(body) {
        Some(text) => h.update(text.as_bytes()),
        // Not JSON: the handler refuses it anyway; hash the bytes as they are.
        None => h.update(body),
    }
    hex::encode(h.finalize())
}

/// JSON with object keys sorted and no insignificant whitespace (RFC 8785 in spirit). Numbers
/// keep their literal text, so no precision is lost on the way to the hash.
pub fn canonical_json(body: &[u8]) -> Option<String> {
    let raw: &RawValue = serde_json::from_slice(body).ok()?;
    let mut out = String::with_capacity(body.len());
    write_canonical(raw, &mut out).then_some(out)
}

fn write_canonical(raw: &RawValue, out: &mut String) -> bool {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'{') => {
            let Ok(map) = serde_json::from_str::<BTreeMap<String, &RawValue>>(text) else {
                return false;
            };
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::to_string(k).expect("a string serialises"));
                out.push(':');
                if !write_canonical(v, out) {
                    return false;
                }
            }
            out.push('}');
        }
        Some(b'[') => {
            let Ok(items) = serde_json::from_str::<Vec<&RawValue>>(text) else {
                return false;
            };
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                if !write_canonical(v, out) {
                    return false;
                }
            }
            out.push(']');
        }
        Some(b'"') => {
            let Ok(s) = serde_json::from_str::<String>(text) else {
                return false;
            };
            out.push_str(&serde_json::to_string(&s).expect("a string serialises"));
        }
        Some(_) => out.push_str(text),
        None => return false,
    }
    true
}

/// The answer for a key that already holds a record: 422 when the record belongs to another
/// request (checked first, so a mismatch is never reported as retryable); 409 with
/// `Retry-After` while its work is in flight; otherwise the stored response, replayed.
pub fn answer_existing(
    record: &IdempotencyRecord,
    fingerprint: &str,
    now: Timestamp,
) -> Result<Response, ApiError> {
    if record.fingerprint != fingerprint {
        return Err(ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "This Idempotency-Key was already used for a different request; use a new key.",
        )
        .with_extra("original_method", record.method.as_str())
        .with_extra("original_path", record.route.as_str()));
    }
    if let Some(until) = record.in_flight {
        return Err(in_progress(until, now));
    }
    Ok(from_stored(&record.response, true))
}

/// 409 for a request whose first attempt still holds the lease until `until`; `Retry-After`
/// is the time left, at least a second.
pub fn in_progress(until: Timestamp, now: Timestamp) -> ApiError {
    let left = u64::try_from(until.0.saturating_sub(now.0)).unwrap_or(0);
    let secs = u32::try_from(left.div_ceil(1000))
        .unwrap_or(u32::MAX)
        .max(1);
    let mut e = ApiError::new(
        ErrorCode::IdempotencyRequestInProgress,
        "A request with this Idempotency-Key is still being processed; retry after the \
         indicated delay with the same key.",
    );
    e.retry_after = Some(secs);
    e
}

/// A stored outcome as a response; `replayed` adds `Idempotent-Replayed: true`.
pub fn from_stored(stored: &StoredResponse, replayed: bool) -> Response {
    let mut resp = Response::new(Body::from(stored.body.clone()));
    *resp.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    for (name, value) in &stored.headers {
        if let (Ok(n), Ok(v)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::from_str(value),
        ) {
            resp.headers_mut().insert(n, v);
        }
    }
    if replayed {
        resp.headers_mut()
            .insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    resp.extensions_mut().insert(Rendered);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(values: &[&[u8]]) -> Result<Option<String>, ApiError> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append("idempotency-key", HeaderValue::from_bytes(v).unwrap());
        }
        parse_key(&h)
    }

    #[test]
    fn bare_and_quoted_keys_name_the_same_record() {
        let bare = key(&[b"order-20260325-00091"]).unwrap();
        let quoted = key(&[b"\"order-20260325-00091\""]).unwrap();
        assert_eq!(bare.as_deref(), Some("order-20260325-00091"));
        assert_eq!(bare, quoted);
        assert_eq!(
            key(&[br#""a\"b\\c""#]).unwrap().as_deref(),
            Some(r#"a"b\c"#)
        );
        assert_eq!(key(&[]).unwrap(), None);
    }

    #[test]
    fn malformed_keys_are_refused() {
        let long = vec![b'k'; 256];
        let max = vec![b'k'; 255];
        assert!(key(&[&max]).unwrap().is_some());
        for bad in [
            &b""[..],
            b"\"\"",
            &long,
            b"caf\xc3\xa9",
            b"tab\there",
            b"\"unterminated",
            b"\"bad\\escape\"",
            b"\"in\"side\"",
        ] {
            let e = key(&[bad]).unwrap_err();
            assert_eq!(e.code, ErrorCode::IdempotencyKeyInvalid, "{bad:?}");
        }
        assert!(key(&[b"one", b"two"]).is_err(), "two fields");
    }

    #[test]
    fn fingerprints_ignore_layout_but_not_content() {
        let a = br#"{"customer_id": 44, "amount": 199.00, "currency": "USD"}"#;
        let b = br#"{"currency":"USD","amount":199.00,
                     "customer_id":44}"#;
        let fp = |body: &[u8]| fingerprint("POST", "/api/orders", None, body);
        assert_eq!(fp(a), fp(b));
        assert_ne!(
            fp(a),
            fp(br#"{"customer_id": 44, "amount": 199.01, "currency": "USD"}"#)
        );
        assert_ne!(
            fp(a),
            fp(br#"{"customer_id": 44, "amount": 199.0, "currency": "USD"}"#)
        );
        assert_ne!(fp(a), fingerprint("POST", "/api/payments", None, a));
        assert_ne!(fp(a), fingerprint("PATCH", "/api/orders", None, a));
        assert_ne!(
            fp(a),
            fingerprint("POST", "/api/orders", Some("dry_run=true"), a)
        );
        assert_eq!(
            fingerprint("POST", "/r", Some("b=2&a=1"), a),
            fingerprint("POST", "/r", Some("a=1&b=2"), a)
        );
        assert_eq!(
            canonical_json(br#" { "z": [1, {"b": "\u00e9", "a": null}], "a": true } "#).unwrap(),
            r#"{"a":true,"z":[1,{"a":null,"b":"é"}]}"#
        );
    }
}
