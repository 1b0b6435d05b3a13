//! Rendering decisions for clients: the IETF `RateLimit-Policy` / `RateLimit` fields (draft-10,
//! RFC 8941 structured-field lists), `Retry-After`, and the subject used to key per-client limits.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use crate::{Outcome, PolicyState};

/// RFC 8941 §3.3.1: an sf-integer has at most 15 decimal digits.
const SF_INTEGER_MAX: u64 = 999_999_999_999_999;

/// The subject that identifies a client for per-IP limits.
///
/// IPv4 addresses are used as they are. IPv6 addresses are keyed by their /64 prefix, because a
/// single subscriber is routinely handed a whole /64 and could otherwise rotate through 2^64
/// addresses to escape the limit (and blow up the key count). IPv4-mapped IPv6 (`::ffff:a.b.c.d`,
/// what a dual-stack socket reports for IPv4 peers) is the IPv4 client it wraps, so both
/// spellings share one bucket.
pub fn client_subject(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4.to_string(),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                format!("{}/64", Ipv6Addr::from(prefix))
            }
        },
    }
}

/// The `RateLimit-Policy` field value, e.g. `"key";q=10;w=1, "account";q=100;w=10`.
///
/// One list member per state, in check order, so a client can match each `RateLimit` member to
/// its policy by name. `w` is whole seconds (at least 1) because the draft defines it as an
/// sf-integer; sub-second windows are rounded up.
pub fn policy_header(states: &[PolicyState]) -> String {
    list(states, |out, state| {
        let w = ceil_secs(state.window).clamp(1, SF_INTEGER_MAX);
        let _ = write!(out, ";q={};w={w}", state.limit);
    })
}

/// An RFC 8941 list with one item per policy: its quoted name, then `params`.
fn list(states: &[PolicyState], params: impl Fn(&mut String, &PolicyState)) -> String {
    let mut out = String::new();
    for (i, state) in states.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        push_sf_string(&mut out, &state.name);
        params(&mut out, state);
    }
    out
}

/// The `RateLimit` field value, e.g. `"key";r=3;t=1, "account";r=97;t=1`.
///
/// `r` is the remaining requests of cost 1 and `t` the whole seconds, rounded up, until the
/// policy's burst is full again. For a policy that denied the request, `t` is instead the time
/// until that request would fit (its `retry_after`): that is when the client can usefully come
/// back, and it keeps `Retry-After` from ever being earlier than `t` (spec §2.3).
pub fn ratelimit_header(states: &[PolicyState]) -> String {
    list(states, |out, state| {
        let r = state.remaining.min(SF_INTEGER_MAX);
        let _ = write!(out, ";r={r};t={}", reset_secs(state));
    })
}

/// The `Retry-After` value (integer seconds) for a denied outcome.
///
/// The largest wait among the denying policies, rounded up, and at least 1: `Retry-After: 0`
/// invites an immediate retry storm, and every denying policy must have room again before a retry
/// can succeed. It equals the largest `t` among denying items in [`ratelimit_header`], so it is
/// never earlier than any of them. An outcome with no denying item gives 1.
pub fn retry_after_secs(outcome: &Outcome) -> u64 {
    outcome
        .states
        .iter()
        .filter(|state| state.retry_after.is_some())
        .map(reset_secs)
        .max()
        .unwrap_or(1)
        .max(1)
}

/// The `t` of one state (see [`ratelimit_header`]).
fn reset_secs(state: &PolicyState) -> u64 {
    ceil_secs(state.retry_after.unwrap_or(state.reset_after)).min(SF_INTEGER_MAX)
}

/// Whole seconds, rounded up.
fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

/// Appends an RFC 8941 sf-string. Policy names are configuration, but a quote, backslash or a
/// non-printable character must still never produce an invalid field, so the first two are
/// escaped and the rest replaced by `?`.
fn push_sf_string(out: &mut String, value: &str) {
    out.push('"');
    for c in value.chars() {
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn state(
        name: &str,
        limit: u32,
        window_s: u64,
        r: u64,
        reset_ms: u64,
        retry_ms: Option<u64>,
    ) -> PolicyState {
        PolicyState {
            name: name.to_owned(),
            limit,
            window: Duration::from_secs(window_s),
            remaining: r,
            reset_after: Duration::from_millis(reset_ms),
            retry_after: retry_ms.map(Duration::from_millis),
        }
    }

    /// Checklist 14: exact field values, names quoted, parameters integers.
    #[test]
    fn renders_exact_structured_field_lists() {
        let states = [
            state("key", 10, 1, 3, 700, None),
            state("account", 100, 10, 97, 300, None),
        ];
        assert_eq!(
            policy_header(&states),
            r#""key";q=10;w=1, "account";q=100;w=10"#
        );
        assert_eq!(
            ratelimit_header(&states),
            r#""key";r=3;t=1, "account";r=97;t=1"#
        );
        assert_eq!(policy_header(&[]), "");
    }

    #[test]
    fn rounds_windows_and_resets_up_to_whole_seconds() {
        let mut s = state("ip", 5, 0, 0, 0, None);
        s.window = Duration::from_millis(1_500);
        s.reset_after = Duration::from_micros(1_000_001);
        assert_eq!(policy_header(std::slice::from_ref(&s)), r#""ip";q=5;w=2"#);
        assert_eq!(
            ratelimit_header(std::slice::from_ref(&s)),
            r#""ip";r=0;t=2"#
        );
        s.window = Duration::from_millis(200);
        s.reset_after = Duration::ZERO;
        assert_eq!(policy_header(std::slice::from_ref(&s)), r#""ip";q=5;w=1"#);
        assert_eq!(
            ratelimit_header(std::slice::from_ref(&s)),
            r#""ip";r=0;t=0"#
        );
    }

    #[test]
    fn names_are_always_valid_sf_strings() {
        let s = state("we\"ird\\na\u{e9}me\n", 1, 1, 0, 0, None);
        assert_eq!(policy_header(&[s]), r#""we\"ird\\na?me?";q=1;w=1"#);
    }

    /// Checklist 15: Retry-After is an integer ≥ 1, ceil(retry_after), never earlier than `t`.
    #[test]
    fn retry_after_is_at_least_one_and_never_before_t() {
        let outcome = Outcome {
            allowed: false,
            states: vec![
                state("key", 10, 1, 0, 1_000, Some(100)),
                state("account", 100, 10, 0, 9_000, Some(2_100)),
                state("ip", 100, 10, 50, 4_000, None),
            ],
            degraded: false,
        };
        assert_eq!(retry_after_secs(&outcome), 3);
        assert_eq!(
            ratelimit_header(&outcome.states),
            r#""key";r=0;t=1, "account";r=0;t=3, "ip";r=50;t=4"#
        );
        for s in outcome.states.iter().filter(|s| s.retry_after.is_some()) {
            assert!(retry_after_secs(&outcome) >= reset_secs(s));
        }
        let tiny = Outcome {
            allowed: false,
            states: vec![state("key", 10, 1, 0, 1, Some(0))],
            degraded: false,
        };
        assert_eq!(retry_after_secs(&tiny), 1);
    }

    /// Checklist 22 (keying): IPv6 by /64, IPv4-mapped as IPv4.
    #[test]
    fn client_subjects() {
        let v4 = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 7));
        assert_eq!(client_subject(v4), "203.0.113.7");
        let mapped: IpAddr = "::ffff:203.0.113.7".parse().unwrap();
        assert_eq!(client_subject(mapped), "203.0.113.7");
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff:ffff:ffff:ffff".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(client_subject(a), "2001:db8:1:2::/64");
        assert_eq!(client_subject(a), client_subject(b));
        assert_ne!(client_subject(a), client_subject(c));
    }
}
