//! Request identifiers and W3C Trace Context, parsed strictly (spec `idempotency.md` §3.9–3.10).

use rand::RngExt;

/// Keeps a client's `X-Request-Id` only if it is 20–200 characters of `[A-Za-z0-9+/=_-]`
/// (Heroku's rule plus `_`, so Bursar's own `req_…` ids survive a forwarding hop).
pub fn accept_request_id(inbound: Option<&str>) -> Option<String> {
    let v = inbound?;
    let ok = (20..=200).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'_' | b'-'));
    ok.then(|| v.to_owned())
}

/// A fresh request id: `req_<UUIDv7>`, time-ordered so ids sort roughly by arrival.
pub fn new_request_id() -> String {
    format!("req_{}", uuid::Uuid::now_v7())
}

/// The trace this request belongs to and Bursar's own span in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// 32 lowercase hex characters.
    pub trace_id: String,
    /// The caller's span (16 hex), when the trace was continued.
    pub parent_id: Option<String>,
    /// Bursar's span for this request (16 hex); outbound calls use it as their parent.
    pub span_id: String,
    /// Trace flags (2 hex), kept from the caller.
    pub flags: String,
    /// Vendor state, kept only alongside a valid `traceparent`.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// Continues a valid inbound `traceparent`, or starts a new trace (dropping `tracestate`).
    pub fn from_headers(traceparent: Option<&str>, tracestate: Option<&str>) -> TraceContext {
        let mut rng = rand::rng();
        let span_id = random_hex(&mut rng, 8);
        match traceparent.and_then(parse_traceparent) {
            Some((trace_id, parent_id, flags)) => TraceContext {
                trace_id,
                parent_id: Some(parent_id),
                span_id,
                flags,
                tracestate: tracestate.map(str::to_owned),
            },
            None => TraceContext {
                trace_id: random_hex(&mut rng, 16),
                parent_id: None,
                span_id,
                flags: "01".into(),
                tracestate: None,
            },
        }
    }

    /// `traceparent` for Bursar's span: what an outbound call or a response hint carries.
    pub fn traceparent(&self) -> String {
        format!("00-{}-{}-{}", self.trace_id, self.span_id, self.flags)
    }
}

/// The `traceparent` of a new span of trace `trace_id` (an outbound call made for it): the
/// same trace and flags, a fresh parent-id.
pub fn child_traceparent(trace_id: &str, flags: &str) -> String {
    format!("00-{trace_id}-{}-{flags}", random_hex(&mut rand::rng(), 8))
}

fn random_hex(rng: &mut impl rand::Rng, bytes: usize) -> String {
    loop {
        let buf: Vec<u8> = (0..bytes).map(|_| rng.random()).collect();
        if buf.iter().any(|b| *b != 0) {
            return hex_lower(&buf);
        }
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Returns (trace-id, parent-id, flags) of a valid header, following the W3C rules: lowercase
/// hex, version `ff` invalid, all-zero ids invalid; a higher version is parsed by its first
/// four fields, version 00 must be exactly 55 characters.
fn parse_traceparent(h: &str) -> Option<(String, String, String)> {
    let h = h.trim();
    if h.len() < 55 {
        return None;
    }
    let (version, rest) = h.split_at(2);
    if !is_lower_hex(version) || version == "ff" {
        return None;
    }
    if version == "00" && h.len() != 55 {
        return None;
    }
    if version != "00" && h.len() > 55 && h.as_bytes()[55] != b'-' {
        return None;
    }
    let fields = &rest[..53];
    let mut parts = fields.split('-');
    let (Some(""), Some(trace), Some(parent), Some(flags), None) = (
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
        parts.next(),
    ) else {
        return None;
    };
    let valid = trace.len() == 32
        && parent.len() == 16
        && flags.len() == 2
        && is_lower_hex(trace)
        && is_lower_hex(parent)
        && is_lower_hex(flags)
        && trace.bytes().any(|b| b != b'0')
        && parent.bytes().any(|b| b != b'0');
    valid.then(|| (trace.to_owned(), parent.to_owned(), flags.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn continues_a_valid_traceparent() {
        let t = TraceContext::from_headers(Some(GOOD), Some("congo=t61rcWkgMzE"));
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.parent_id.as_deref(), Some("00f067aa0ba902b7"));
        assert_eq!(t.flags, "01");
        assert_ne!(t.span_id, "00f067aa0ba902b7");
        assert_eq!(t.tracestate.as_deref(), Some("congo=t61rcWkgMzE"));
        assert!(
            t.traceparent()
                .starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-")
        );
    }

    #[test]
    fn restarts_on_any_invalid_traceparent_and_drops_tracestate() {
        for bad in [
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
            "garbage",
        ] {
            let t = TraceContext::from_headers(Some(bad), Some("congo=x"));
            assert_eq!(t.parent_id, None, "{bad}");
            assert_eq!(t.tracestate, None, "{bad}");
            assert_eq!(t.trace_id.len(), 32);
            assert_ne!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
        }
        assert_eq!(
            TraceContext::from_headers(None, Some("a=b")).tracestate,
            None
        );
    }

    #[test]
    fn future_versions_are_read_by_their_known_fields() {
        let h = "cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-the-future-holds";
        let t = TraceContext::from_headers(Some(h), None);
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn request_ids() {
        assert_eq!(
            accept_request_id(Some("abcdefghij0123456789")),
            Some("abcdefghij0123456789".into())
        );
        assert_eq!(accept_request_id(Some("short")), None);
        assert_eq!(accept_request_id(Some(&"a".repeat(201))), None);
        assert_eq!(accept_request_id(Some("abcdefghij 0123456789")), None);
        let id = new_request_id();
        assert!(id.starts_with("req_") && accept_request_id(Some(&id)).is_some());
    }
}
