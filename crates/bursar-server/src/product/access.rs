//! What a request needs: the scope its route demands, its usage class, and its client IP.

use std::net::{IpAddr, SocketAddr};

use axum::http::{HeaderMap, Method};
use bursar_domain::apikey::{Access, Resource, Scope};
use ipnet::IpNet;

/// The scope a route needs: its resource by path prefix, `read` for GET/HEAD, else `write`.
/// `None` for a route outside the resource list (none today; such a route needs full access).
pub fn needed_scope(method: &Method, route: &str) -> Option<Scope> {
    let rest = route.strip_prefix("/api/")?;
    let first = rest.split('/').next().unwrap_or_default();
    let resource = match first {
        "customers" => Resource::Customers,
        "orders" => Resource::Orders,
        "payments" => Resource::Payments,
        "refunds" => Resource::Refunds,
        "balances" | "ledger_entries" => Resource::Balances,
        "rates" | "quotes" | "conversions" => Resource::Fx,
        "events" => Resource::Events,
        "webhook_endpoints" => Resource::WebhookEndpoints,
        "keys" => Resource::Keys,
        "usage" | "invoices" => Resource::Usage,
        _ => return None,
    };
    let access = if method == Method::GET || method == Method::HEAD {
        Access::Read
    } else {
        Access::Write
    };
    Some(Scope { resource, access })
}

/// The usage class a request is metered under.
pub fn route_class(method: &Method) -> &'static str {
    if method == Method::GET || method == Method::HEAD {
        "read"
    } else {
        "write"
    }
}

/// The client's address: the TCP peer, unless the peer is a trusted proxy, in which case the
/// right-most `X-Forwarded-For` address that is not itself a trusted proxy (so a client cannot
/// choose its own key by prepending addresses).
pub fn client_ip(
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
    trusted: &[IpNet],
) -> Option<IpAddr> {
    let peer = peer?.ip();
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return Some(peer);
    }
    let forwarded: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|a| a.trim().parse().ok())
        .collect();
    Some(
        forwarded
            .into_iter()
            .rev()
            .find(|ip| !is_trusted(ip))
            .unwrap_or(peer),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_map_to_scopes() {
        let s = |m: Method, r: &str| needed_scope(&m, r).map(Scope::render);
        assert_eq!(
            s(Method::GET, "/api/orders/{id}").as_deref(),
            Some("orders:read")
        );
        assert_eq!(
            s(Method::POST, "/api/orders").as_deref(),
            Some("orders:write")
        );
        assert_eq!(
            s(Method::GET, "/api/ledger_entries").as_deref(),
            Some("balances:read")
        );
        assert_eq!(s(Method::POST, "/api/quotes").as_deref(), Some("fx:write"));
        assert_eq!(
            s(Method::GET, "/api/invoices/upcoming").as_deref(),
            Some("usage:read")
        );
        assert_eq!(
            s(Method::POST, "/api/keys/{id}/roll").as_deref(),
            Some("keys:write")
        );
        assert_eq!(s(Method::GET, "/healthz"), None);
    }

    #[test]
    fn forwarded_for_counts_only_behind_a_trusted_proxy() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "1.2.3.4, 203.0.113.9, 10.1.1.1".parse().unwrap(),
        );
        let proxy = Some("10.0.0.2:5000".parse().unwrap());
        let direct = Some("198.51.100.7:5000".parse().unwrap());
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            Some("203.0.113.9".parse().unwrap())
        );
        assert_eq!(
            client_ip(direct, &h, &trusted),
            Some("198.51.100.7".parse().unwrap())
        );
        assert_eq!(
            client_ip(proxy, &HeaderMap::new(), &trusted),
            Some("10.0.0.2".parse().unwrap())
        );
        assert_eq!(client_ip(None, &h, &trusted), None);
    }
}
