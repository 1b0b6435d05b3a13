//! SSRF guard for outbound webhook deliveries.
//!
//! A webhook URL is chosen by a tenant, so every delivery is a request the tenant aims from inside
//! our network. Without a guard it can reach loopback admin ports, cloud metadata
//! (`169.254.169.254`) or private services. The guard works in three places:
//!
//! - [`check_url_resolving`] when an endpoint is created: a clear 422 for an obviously bad URL;
//! - [`check_url`] immediately before every send: IP-literal URLs never pass through a resolver,
//!   so they must be checked here;
//! - [`GuardedResolver`], installed by [`client`]: names are checked at connect time on the very
//!   addresses the connection uses, so a name that was public at creation and private at send
//!   (DNS rebinding) opens no connection. Redirects are disabled, because a redirect would be a
//!   second, unchecked URL.
//!
//! What counts as "not public" is [`classify`]; operators may open specific subnets with an
//! allow-list ([`Policy::new`]), e.g. a sandbox receiver on loopback.

use std::error::Error as StdError;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use reqwest::Url;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Longest accepted URL, in bytes of its serialized form. Bounds what we store and log per
/// endpoint; real webhook URLs are far shorter.
pub const MAX_URL_LEN: usize = 2048;

/// How long creation-time validation waits for DNS. A tenant's slow name server must not hold an
/// API request for the resolver's own (much longer) timeout.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an address is not public. The guard refuses every class unless an allow-list entry
/// contains the address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IpClass {
    /// `0.0.0.0/8`, `::` — "this host"; connecting to it reaches the local machine.
    Unspecified,
    /// `127.0.0.0/8`, `::1`.
    Loopback,
    /// `10/8`, `172.16/12`, `192.168/16` (RFC 1918).
    Private,
    /// `100.64/10`, carrier-grade NAT (RFC 6598); often internal in clouds.
    SharedAddressSpace,
    /// `169.254/16` (including the metadata service `169.254.169.254`), `fe80::/10`.
    LinkLocal,
    /// `192.0.0.0/24`, `2001::/23`: IETF protocol assignments (RFC 6890).
    IetfProtocol,
    /// `192.0.2/24`, `198.51.100/24`, `203.0.113/24`, `2001:db8::/32`, `3fff::/20`.
    Documentation,
    /// `198.18/15`, `2001:2::/48`.
    Benchmarking,
    /// `224/4`, `ff00::/8`.
    Multicast,
    /// `240/4`, the deprecated 6to4 relay anycast `192.88.99/24`, and all IPv6 outside the
    /// global unicast block `2000::/3` not listed elsewhere.
    Reserved,
    /// `255.255.255.255`.
    Broadcast,
    /// `fc00::/7` (RFC 4193), the IPv6 counterpart of private addresses.
    UniqueLocal,
    /// `fec0::/10`, deprecated but still routed internally by some networks.
    SiteLocal,
    /// `100::/64`, the IPv6 discard prefix.
    Discard,
}

impl IpClass {
    /// A stable snake_case name, for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::SharedAddressSpace => "shared",
            Self::LinkLocal => "link_local",
            Self::IetfProtocol => "ietf",
            Self::Documentation => "documentation",
            Self::Benchmarking => "benchmarking",
            Self::Multicast => "multicast",
            Self::Reserved => "reserved",
            Self::Broadcast => "broadcast",
            Self::UniqueLocal => "unique_local",
            Self::SiteLocal => "site_local",
            Self::Discard => "discard",
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Unspecified => "unspecified",
            Self::Loopback => "loopback",
            Self::Private => "private",
            Self::SharedAddressSpace => "carrier-grade NAT",
            Self::LinkLocal => "link-local",
            Self::IetfProtocol => "IETF-reserved",
            Self::Documentation => "documentation",
            Self::Benchmarking => "benchmarking",
            Self::Multicast => "multicast",
            Self::Reserved => "reserved",
            Self::Broadcast => "broadcast",
            Self::UniqueLocal => "unique-local",
            Self::SiteLocal => "site-local",
            Self::Discard => "discard-only",
        }
    }
}

impl std::fmt::Display for IpClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.describe())
    }
}

use IpClass as C;

/// Non-public IPv4 blocks, most specific first where they overlap (broadcast inside 240/4).
const V4_BLOCKS: &[(Ipv4Addr, u8, IpClass)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 8, C::Unspecified),
    (Ipv4Addr::new(10, 0, 0, 0), 8, C::Private),
    (Ipv4Addr::new(100, 64, 0, 0), 10, C::SharedAddressSpace),
    (Ipv4Addr::new(127, 0, 0, 0), 8, C::Loopback),
    (Ipv4Addr::new(169, 254, 0, 0), 16, C::LinkLocal),
    (Ipv4Addr::new(172, 16, 0, 0), 12, C::Private),
    (Ipv4Addr::new(192, 0, 0, 0), 24, C::IetfProtocol),
    (Ipv4Addr::new(192, 0, 2, 0), 24, C::Documentation),
    (Ipv4Addr::new(192, 88, 99, 0), 24, C::Reserved),
    (Ipv4Addr::new(192, 168, 0, 0), 16, C::Private),
    (Ipv4Addr::new(198, 18, 0, 0), 15, C::Benchmarking),
    (Ipv4Addr::new(198, 51, 100, 0), 24, C::Documentation),
    (Ipv4Addr::new(203, 0, 113, 0), 24, C::Documentation),
    (Ipv4Addr::new(224, 0, 0, 0), 4, C::Multicast),
    (Ipv4Addr::BROADCAST, 32, C::Broadcast),
    (Ipv4Addr::new(240, 0, 0, 0), 4, C::Reserved),
];

/// Non-public IPv6 blocks checked after the special cases in [`classify`] (unspecified,
/// loopback, and the forms that embed an IPv4 address). Most specific first.
const V6_BLOCKS: &[(Ipv6Addr, u8, IpClass)] = &[
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64, C::Discard),
    (
        Ipv6Addr::new(0x2001, 0x2, 0, 0, 0, 0, 0, 0),
        48,
        C::Benchmarking,
    ),
    (
        Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0),
        23,
        C::IetfProtocol,
    ),
    (
        Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0),
        32,
        C::Documentation,
    ),
    (
        Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0),
        20,
        C::Documentation,
    ),
    (
        Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0),
        7,
        C::UniqueLocal,
    ),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, C::LinkLocal),
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10, C::SiteLocal),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, C::Multicast),
];

/// The only IPv6 block IANA has allocated for global unicast.
const V6_GLOBAL_UNICAST: (Ipv6Addr, u8) = (Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3);
/// NAT64 well-known prefix (RFC 6052): the low 32 bits are the IPv4 destination.
const V6_NAT64: (Ipv6Addr, u8) = (Ipv6Addr::new(0x64, 0xff9b, 0, 0, 0, 0, 0, 0), 96);
/// Deprecated IPv4-compatible addresses `::a.b.c.d` (RFC 4291).
const V6_V4_COMPATIBLE: (Ipv6Addr, u8) = (Ipv6Addr::UNSPECIFIED, 96);
/// 6to4 (RFC 3056): bits 16..48 are the IPv4 address of the site's relay.
const V6_6TO4: (Ipv6Addr, u8) = (Ipv6Addr::new(0x2002, 0, 0, 0, 0, 0, 0, 0), 16);

fn in_v4(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

fn in_v6(ip: Ipv6Addr, (net, len): (Ipv6Addr, u8)) -> bool {
    let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// The IPv4 address an IPv6 address stands for, when the packet would in effect go to that IPv4
/// host (mapped, IPv4-compatible, NAT64, 6to4). Classifying by it stops `::ffff:127.0.0.1` or
/// `64:ff9b::a9fe:a9fe` from slipping past a check written for IPv4.
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    let o = ip.octets();
    if in_v6(ip, V6_NAT64) || in_v6(ip, V6_V4_COMPATIBLE) {
        return Some(Ipv4Addr::new(o[12], o[13], o[14], o[15]));
    }
    if in_v6(ip, V6_6TO4) {
        return Some(Ipv4Addr::new(o[2], o[3], o[4], o[5]));
    }
    None
}

/// Classifies `ip`: `None` means public (fine to connect to), `Some(class)` says why not.
///
/// IPv6 forms that embed an IPv4 address are classified by that address, so
/// `::ffff:127.0.0.1` is loopback and `::ffff:8.8.8.8` is public.
pub fn classify(ip: IpAddr) -> Option<IpClass> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> Option<IpClass> {
    V4_BLOCKS
        .iter()
        .find(|(net, len, _)| in_v4(ip, *net, *len))
        .map(|(_, _, class)| *class)
}

fn classify_v6(ip: Ipv6Addr) -> Option<IpClass> {
    if ip.is_unspecified() {
        return Some(C::Unspecified);
    }
    if ip.is_loopback() {
        return Some(C::Loopback);
    }
    if let Some(v4) = embedded_v4(ip) {
        return classify_v4(v4);
    }
    if let Some((_, _, class)) = V6_BLOCKS
        .iter()
        .find(|(net, len, _)| in_v6(ip, (*net, *len)))
    {
        return Some(*class);
    }
    if !in_v6(ip, V6_GLOBAL_UNICAST) {
        return Some(C::Reserved);
    }
    None
}

/// An address the outbound policy refuses, with the reason. It is the value callers look for
/// (see [`is_blocked`]) to record a delivery failure as `blocked_ip` rather than a network error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("address {addr} is {class}")]
pub struct Blocked {
    addr: IpAddr,
    class: IpClass,
}

impl Blocked {
    /// The refused address, exactly as it was checked.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Why it is refused.
    pub fn class(&self) -> IpClass {
        self.class
    }
}

/// An allow-list entry that is not a CIDR. Startup fails on it rather than silently ignoring an
/// entry the operator meant to open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid CIDR {cidr:?} in the outbound allow-list: {reason}")]
pub struct PolicyError {
    cidr: String,
    reason: String,
}

impl PolicyError {
    /// The offending entry, as given.
    pub fn cidr(&self) -> &str {
        &self.cidr
    }
}

/// What outbound webhook requests may reach.
///
/// Public addresses are always allowed; non-public ones ([`classify`]) only when an allow-list
/// entry contains them. The allow-list exists for deliberate exceptions such as a local test
/// receiver, never as the main control.
#[derive(Debug, Clone)]
pub struct Policy {
    allow: Vec<IpNet>,
    /// Refuse `http://` URLs. Off by default so that development can target a plain-HTTP local
    /// receiver (with an allow-list entry); production configurations should turn it on.
    pub require_https: bool,
}

impl Policy {
    /// Builds a policy from allow-list entries such as `"127.0.0.0/8"` or `"::1/128"`. A bare
    /// address means that single host. An entry with host bits set (`"10.0.0.1/8"`) is refused,
    /// because it usually means the operator meant a different network than the one it
    /// denotes. `require_https` starts off; set the field from configuration.
    pub fn new(allow: &[String]) -> Result<Policy, PolicyError> {
        let allow = allow
            .iter()
            .map(|entry| parse_cidr(entry))
            .collect::<Result<_, _>>()?;
        Ok(Policy {
            allow,
            require_https: false,
        })
    }

    /// The allow-list, normalised.
    pub fn allowed(&self) -> &[IpNet] {
        &self.allow
    }

    /// Refuses `ip` if it is not public and no allow-list entry contains it. For IPv4-mapped
    /// addresses the allow-list also applies to the embedded IPv4 address, so allowing
    /// `127.0.0.0/8` also allows `::ffff:127.0.0.1` (the same socket, either way).
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Blocked> {
        let Some(class) = classify(ip) else {
            return Ok(());
        };
        if self.allows(ip) {
            return Ok(());
        }
        Err(Blocked { addr: ip, class })
    }

    fn allows(&self, ip: IpAddr) -> bool {
        let mapped = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4),
            IpAddr::V4(_) => None,
        };
        self.allow
            .iter()
            .any(|net| net.contains(&ip) || mapped.is_some_and(|v4| net.contains(&v4)))
    }
}

fn parse_cidr(entry: &str) -> Result<IpNet, PolicyError> {
    let error = |reason: String| PolicyError {
        cidr: entry.to_owned(),
        reason,
    };
    let text = entry.trim();
    if !text.contains('/') {
        return text
            .parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| error("not an IP address or CIDR".to_owned()));
    }
    let net: IpNet = text
        .parse()
        .map_err(|_| error("expected ADDRESS/PREFIX_LENGTH".to_owned()))?;
    if net.trunc() != net {
        return Err(error(format!(
            "host bits are set (did you mean {}?)",
            net.trunc()
        )));
    }
    Ok(net)
}

/// A [`reqwest::dns::Resolve`] that drops every address the [`Policy`] refuses.
///
/// The check runs on the addresses the connection will actually use, at connect time, so a
/// name that passed validation at creation and now points inside (DNS rebinding) opens no
/// connection. When nothing is left the error's source chain holds a [`Blocked`]
/// (see [`is_blocked`]).
#[derive(Debug, Clone)]
pub struct GuardedResolver {
    policy: Arc<Policy>,
}

impl GuardedResolver {
    /// A resolver enforcing `policy`.
    pub fn new(policy: Arc<Policy>) -> Self {
        Self { policy }
    }
}

/// Every address of a host was refused; the source is the first refusal.
#[derive(Debug, thiserror::Error)]
#[error("every address of {host} is refused by the outbound policy")]
struct HostRefused {
    host: String,
    #[source]
    first: Blocked,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = Arc::clone(&self.policy);
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let mut first_refused = None;
            let mut kept = Vec::new();
            for addr in tokio::net::lookup_host((host.as_str(), 0)).await? {
                match policy.check_ip(addr.ip()) {
                    Ok(()) => kept.push(addr),
                    Err(blocked) => {
                        tracing::warn!(
                            host = %host,
                            addr = %blocked.addr(),
                            class = blocked.class().as_str(),
                            "outbound request: dropped a refused address"
                        );
                        first_refused.get_or_insert(blocked);
                    }
                }
            }
            if kept.is_empty() {
                return Err(match first_refused {
                    Some(first) => Box::new(HostRefused { host, first }) as _,
                    None => Box::new(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("{host} has no addresses"),
                    )) as _,
                });
            }
            let addrs: Addrs = Box::new(kept.into_iter());
            Ok(addrs)
        })
    }
}

/// Whether `err`, or any error in its `source()` chain, is a [`Blocked`] refusal. Works on the
/// `reqwest::Error` of a request refused by [`GuardedResolver`] and on a [`UrlProblem`], so a
/// delivery failure can be recorded as `blocked_ip` instead of a generic network error.
pub fn is_blocked(err: &(dyn StdError + 'static)) -> bool {
    let mut current = Some(err);
    while let Some(e) = current {
        if e.is::<Blocked>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// The HTTP client for webhook deliveries: the [`GuardedResolver`], no redirects (a `Location`
/// would be a second URL nobody checked; the 3xx is returned as the result), no proxy (a proxy
/// would resolve names itself, out of the guard's sight), HTTP/1.1, `https_only` when the policy
/// requires it, and `timeout` for the whole request.
///
/// IP-literal URLs never reach the resolver, so callers must also run [`check_url`] before every
/// send. As with every client in this process, a rustls crypto provider must be installed first.
pub fn client(
    policy: Arc<Policy>,
    timeout: Duration,
    user_agent: &str,
) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .https_only(policy.require_https)
        .dns_resolver(GuardedResolver::new(policy))
        .timeout(timeout)
        .user_agent(user_agent)
        .http1_only()
        .build()
}

/// Why a webhook URL is refused. The `Display` text is meant for a 422 error detail: it says
/// what to fix and reveals nothing about our network; [`UrlProblem::kind`] is a stable code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum UrlProblem {
    /// Not `http`/`https`, or `http` while the policy requires `https`.
    #[error("{}", if *https_only { "the URL must use https" } else { "the URL must use http or https" })]
    Scheme {
        /// Whether only `https` would have been accepted.
        https_only: bool,
    },
    /// The URL carries `user:password@`; credentials belong in headers or the signing secret,
    /// not in a URL that ends up in logs.
    #[error("the URL must not contain a user name or password")]
    Userinfo,
    /// Longer than [`MAX_URL_LEN`].
    #[error("the URL must be at most 2048 characters long")]
    TooLong,
    /// No host to connect to.
    #[error("the URL must have a host")]
    NoHost,
    /// The host is, or resolves to, an address the policy refuses.
    #[error("the URL's host is not a public address ({} address)", .0.class())]
    BlockedIp(#[source] Blocked),
    /// The host name does not resolve (now).
    #[error("the URL's host name does not resolve")]
    Unresolvable(#[source] Option<io::Error>),
}

impl UrlProblem {
    /// A stable short code: `scheme`, `userinfo`, `too_long`, `no_host`, `blocked_ip`,
    /// `unresolvable`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Scheme { .. } => "scheme",
            Self::Userinfo => "userinfo",
            Self::TooLong => "too_long",
            Self::NoHost => "no_host",
            Self::BlockedIp(_) => "blocked_ip",
            Self::Unresolvable(_) => "unresolvable",
        }
    }
}

/// Checks a webhook URL without DNS: scheme, credentials, length, host, and, when the host is
/// an IP literal (`http://10.1.2.3`, `http://[::ffff:127.0.0.1]`), the address itself.
///
/// Run it when an endpoint is created and immediately before every send: reqwest connects to
/// IP literals directly, without consulting [`GuardedResolver`], so this is the only check such
/// URLs get. (The URL parser has already normalised forms like `http://2130706433/` or
/// `http://0x7f.1/` to dotted IPv4, so they are caught here too.)
pub fn check_url(policy: &Policy, url: &Url) -> Result<(), UrlProblem> {
    if url.as_str().len() > MAX_URL_LEN {
        return Err(UrlProblem::TooLong);
    }
    match url.scheme() {
        "https" => {}
        "http" if !policy.require_https => {}
        _ => {
            return Err(UrlProblem::Scheme {
                https_only: policy.require_https,
            });
        }
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlProblem::Userinfo);
    }
    match host(url)? {
        Host::Name(_) => Ok(()),
        Host::Ip(ip) => policy.check_ip(ip).map_err(UrlProblem::BlockedIp),
    }
}

enum Host<'a> {
    Name(&'a str),
    Ip(IpAddr),
}

/// The URL's host, told apart as a name or an IP literal. The URL parser has already
/// canonicalised IPv4 (for http and https a host that looks numeric is IPv4 or an error) and
/// bracketed IPv6, so parsing its output is exact.
fn host(url: &Url) -> Result<Host<'_>, UrlProblem> {
    let host = url
        .host_str()
        .filter(|h| !h.is_empty())
        .ok_or(UrlProblem::NoHost)?;
    if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        // Cannot fail for a parsed URL; refusing is the safe answer if it ever does.
        let v6: Ipv6Addr = v6.parse().map_err(|_| UrlProblem::NoHost)?;
        return Ok(Host::Ip(IpAddr::V6(v6)));
    }
    Ok(match host.parse::<Ipv4Addr>() {
        Ok(v4) => Host::Ip(IpAddr::V4(v4)),
        Err(_) => Host::Name(host),
    })
}

/// [`check_url`], plus, for a host name, resolving it now and refusing it if any address is
/// refused. This is creation-time validation, giving the tenant a 422 instead of an endpoint
/// that can never deliver; it is not the security boundary (the name can change later, which
/// [`GuardedResolver`] handles). A name that does not resolve within a few seconds is
/// `unresolvable`.
pub async fn check_url_resolving(policy: &Policy, url: &Url) -> Result<(), UrlProblem> {
    check_url(policy, url)?;
    let Host::Name(name) = host(url)? else {
        return Ok(());
    };
    let resolved = tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((name, 0)))
        .await
        .map_err(|_| {
            UrlProblem::Unresolvable(Some(io::Error::new(
                io::ErrorKind::TimedOut,
                "name resolution timed out",
            )))
        })?
        .map_err(|e| UrlProblem::Unresolvable(Some(e)))?;
    let addrs: Vec<SocketAddr> = resolved.collect();
    if addrs.is_empty() {
        return Err(UrlProblem::Unresolvable(None));
    }
    for addr in addrs {
        policy.check_ip(addr.ip()).map_err(UrlProblem::BlockedIp)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn assert_class(addr: &str, class: IpClass) {
        assert_eq!(classify(ip(addr)), Some(class), "{addr}");
        let blocked = Policy::new(&[]).unwrap().check_ip(ip(addr)).unwrap_err();
        assert_eq!(blocked.class(), class, "{addr}");
        assert_eq!(blocked.addr(), ip(addr));
    }

    fn assert_public(addr: &str) {
        assert_eq!(classify(ip(addr)), None, "{addr}");
        assert_eq!(
            Policy::new(&[]).unwrap().check_ip(ip(addr)),
            Ok(()),
            "{addr}"
        );
    }

    fn policy(allow: &[&str]) -> Policy {
        let allow: Vec<String> = allow.iter().map(|s| (*s).to_owned()).collect();
        Policy::new(&allow).unwrap()
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn v4_unspecified() {
        for a in ["0.0.0.0", "0.1.2.3", "0.255.255.255"] {
            assert_class(a, C::Unspecified);
        }
    }

    #[test]
    fn v4_loopback() {
        for a in ["127.0.0.1", "127.0.0.0", "127.255.255.254", "127.1.2.3"] {
            assert_class(a, C::Loopback);
        }
    }

    #[test]
    fn v4_private() {
        for a in [
            "10.0.0.0",
            "10.1.2.3",
            "10.255.255.255",
            "172.16.0.0",
            "172.20.1.1",
            "172.31.255.255",
            "192.168.0.1",
            "192.168.255.255",
        ] {
            assert_class(a, C::Private);
        }
    }

    #[test]
    fn v4_cgnat() {
        for a in ["100.64.0.0", "100.64.0.1", "100.127.255.255"] {
            assert_class(a, C::SharedAddressSpace);
        }
    }

    #[test]
    fn v4_link_local_and_metadata() {
        for a in ["169.254.0.1", "169.254.169.254", "169.254.255.255"] {
            assert_class(a, C::LinkLocal);
        }
    }

    #[test]
    fn v4_ietf_protocol_assignments() {
        for a in ["192.0.0.0", "192.0.0.8", "192.0.0.170", "192.0.0.255"] {
            assert_class(a, C::IetfProtocol);
        }
    }

    #[test]
    fn v4_documentation() {
        for a in ["192.0.2.1", "198.51.100.7", "203.0.113.255"] {
            assert_class(a, C::Documentation);
        }
    }

    #[test]
    fn v4_benchmarking() {
        for a in ["198.18.0.0", "198.19.255.255"] {
            assert_class(a, C::Benchmarking);
        }
    }

    #[test]
    fn v4_multicast() {
        for a in ["224.0.0.1", "239.255.255.250", "233.1.1.1"] {
            assert_class(a, C::Multicast);
        }
    }

    #[test]
    fn v4_reserved_and_broadcast() {
        for a in ["240.0.0.0", "250.1.2.3", "255.255.255.254", "192.88.99.1"] {
            assert_class(a, C::Reserved);
        }
        assert_class("255.255.255.255", C::Broadcast);
    }

    #[test]
    fn v4_public_including_block_edges() {
        for a in [
            "8.8.8.8",
            "1.1.1.1",
            "93.184.216.34",
            "1.0.0.0",
            "9.255.255.255",
            "11.0.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "126.255.255.255",
            "128.0.0.0",
            "169.253.255.255",
            "169.255.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.0",
            "192.0.3.0",
            "192.167.255.255",
            "192.169.0.0",
            "198.17.255.255",
            "198.20.0.0",
            "198.51.99.255",
            "203.0.112.255",
            "223.255.255.255",
        ] {
            assert_public(a);
        }
    }

    #[test]
    fn v6_unspecified_and_loopback() {
        assert_class("::", C::Unspecified);
        assert_class("::1", C::Loopback);
    }

    #[test]
    fn v6_mapped_is_classified_by_embedded_v4() {
        assert_class("::ffff:127.0.0.1", C::Loopback);
        assert_class("::ffff:10.1.2.3", C::Private);
        assert_class("::ffff:169.254.169.254", C::LinkLocal);
        assert_class("::ffff:100.64.0.1", C::SharedAddressSpace);
        assert_class("::ffff:0.0.0.0", C::Unspecified);
        assert_public("::ffff:8.8.8.8");
    }

    #[test]
    fn v6_compatible_and_nat64_are_classified_by_embedded_v4() {
        assert_class("::127.0.0.1", C::Loopback);
        assert_class("::10.0.0.1", C::Private);
        assert_class("64:ff9b::127.0.0.1", C::Loopback);
        assert_class("64:ff9b::a9fe:a9fe", C::LinkLocal);
        assert_class("64:ff9b::192.168.1.1", C::Private);
        assert_public("64:ff9b::8.8.8.8");
    }

    #[test]
    fn v6_6to4_is_classified_by_embedded_v4() {
        assert_class("2002:7f00:1::", C::Loopback);
        assert_class("2002:a00:1::1", C::Private);
        assert_class("2002:a9fe:a9fe::1", C::LinkLocal);
        assert_public("2002:808:808::1");
    }

    #[test]
    fn v6_unique_local() {
        for a in ["fc00::1", "fd12:3456:789a::1", "fdff:ffff::1"] {
            assert_class(a, C::UniqueLocal);
        }
    }

    #[test]
    fn v6_link_local() {
        for a in ["fe80::1", "febf:ffff::1"] {
            assert_class(a, C::LinkLocal);
        }
    }

    #[test]
    fn v6_site_local() {
        for a in ["fec0::1", "feff::1"] {
            assert_class(a, C::SiteLocal);
        }
    }

    #[test]
    fn v6_multicast() {
        for a in ["ff02::1", "ff05::1:3", "ff0e::101"] {
            assert_class(a, C::Multicast);
        }
    }

    #[test]
    fn v6_documentation() {
        for a in ["2001:db8::1", "2001:db8:ffff::1", "3fff::1"] {
            assert_class(a, C::Documentation);
        }
    }

    #[test]
    fn v6_discard() {
        assert_class("100::", C::Discard);
        assert_class("100::ffff:ffff:ffff:ffff", C::Discard);
        // Outside the /64 but still outside global unicast.
        assert_class("100:0:0:1::", C::Reserved);
    }

    #[test]
    fn v6_ietf_benchmarking_and_unallocated() {
        assert_class("2001::1", C::IetfProtocol); // Teredo
        assert_class("2001:2::1", C::Benchmarking);
        assert_class("4000::1", C::Reserved);
        assert_class("::1:0:0:1", C::Reserved);
    }

    #[test]
    fn v6_public() {
        for a in [
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "2a00:1450:4001:82b::200e",
            "2001:200::1",
        ] {
            assert_public(a);
        }
    }

    #[test]
    fn blocked_displays_address_and_class() {
        let err = Policy::new(&[])
            .unwrap()
            .check_ip(ip("10.1.2.3"))
            .unwrap_err();
        assert_eq!(err.to_string(), "address 10.1.2.3 is private");
        let err = Policy::new(&[])
            .unwrap()
            .check_ip(ip("::ffff:127.0.0.1"))
            .unwrap_err();
        assert_eq!(err.to_string(), "address ::ffff:127.0.0.1 is loopback");
    }

    #[test]
    fn allow_list_opens_exactly_its_subnet() {
        let p = policy(&["127.0.0.0/8"]);
        assert_eq!(p.check_ip(ip("127.0.0.1")), Ok(()));
        assert_eq!(p.check_ip(ip("127.9.9.9")), Ok(()));
        assert_eq!(p.check_ip(ip("::ffff:127.0.0.1")), Ok(()));
        assert_eq!(p.check_ip(ip("10.0.0.1")).unwrap_err().class(), C::Private);
        assert_eq!(p.check_ip(ip("::1")).unwrap_err().class(), C::Loopback);
        // Only mapped addresses share the IPv4 allow-list; NAT64 needs its own entry.
        assert!(p.check_ip(ip("64:ff9b::127.0.0.1")).is_err());

        let p = policy(&["::1/128", "10.1.0.0/16"]);
        assert_eq!(p.check_ip(ip("::1")), Ok(()));
        assert_eq!(p.check_ip(ip("10.1.200.3")), Ok(()));
        assert!(p.check_ip(ip("10.2.0.1")).is_err());
        assert!(p.check_ip(ip("127.0.0.1")).is_err());
    }

    #[test]
    fn allow_list_accepts_bare_addresses_as_single_hosts() {
        let p = policy(&[" 192.168.1.10 ", "fd00::5"]);
        assert_eq!(p.check_ip(ip("192.168.1.10")), Ok(()));
        assert!(p.check_ip(ip("192.168.1.11")).is_err());
        assert_eq!(p.check_ip(ip("fd00::5")), Ok(()));
        assert_eq!(p.allowed().len(), 2);
    }

    #[test]
    fn malformed_cidrs_are_errors_naming_the_entry() {
        for bad in [
            "10.0.0.0/33",
            "::1/129",
            "10.0.0/8",
            "localhost",
            "",
            "10.0.0.0/",
            "10.0.0.0/8/8",
            "10.0.0.1/8",
        ] {
            let err = Policy::new(&["127.0.0.0/8".to_owned(), bad.to_owned()]).unwrap_err();
            assert_eq!(err.cidr(), bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
        let err = Policy::new(&["10.0.0.1/8".to_owned()]).unwrap_err();
        assert!(err.to_string().contains("did you mean 10.0.0.0/8"), "{err}");
    }

    #[test]
    fn check_url_refuses_the_checklist_addresses() {
        let p = Policy::new(&[]).unwrap();
        for u in [
            "http://127.0.0.1",
            "http://169.254.169.254/latest/meta-data",
            "http://[::1]",
            "http://[::ffff:127.0.0.1]",
            "http://10.1.2.3",
            "http://100.64.0.1",
            "https://[fd00::1]:8443/hook",
            "http://0.0.0.0:8080",
            // Alternative IPv4 spellings the URL parser normalises to 127.0.0.1.
            "http://2130706433/",
            "http://0x7f.1/",
            "http://127.1/",
        ] {
            let err = check_url(&p, &url(u)).unwrap_err();
            assert_eq!(err.kind(), "blocked_ip", "{u}");
            assert!(is_blocked(&err), "{u}");
        }
    }

    #[test]
    fn check_url_accepts_public_hosts() {
        let p = Policy::new(&[]).unwrap();
        for u in [
            "https://example.com/webhooks",
            "http://example.com:8080/x?y=1",
            "https://8.8.8.8/",
            "https://[2606:4700:4700::1111]/",
            "https://[::ffff:8.8.8.8]/",
        ] {
            assert!(check_url(&p, &url(u)).is_ok(), "{u}");
        }
    }

    #[test]
    fn check_url_applies_the_allow_list_to_literals() {
        let p = policy(&["127.0.0.0/8"]);
        assert!(check_url(&p, &url("http://127.0.0.1:3000/hook")).is_ok());
        assert!(check_url(&p, &url("http://[::ffff:127.0.0.1]:3000/hook")).is_ok());
        assert!(check_url(&p, &url("http://10.0.0.1/")).is_err());
    }

    #[test]
    fn check_url_refuses_userinfo() {
        let p = Policy::new(&[]).unwrap();
        for u in [
            "https://user:pw@example.com",
            "https://user@example.com",
            "https://:pw@example.com",
        ] {
            assert_eq!(
                check_url(&p, &url(u)).unwrap_err().kind(),
                "userinfo",
                "{u}"
            );
        }
    }

    #[test]
    fn check_url_scheme_rules() {
        let mut p = Policy::new(&[]).unwrap();
        for u in [
            "ftp://example.com/",
            "file:///etc/passwd",
            "gopher://example.com/",
        ] {
            let err = check_url(&p, &url(u)).unwrap_err();
            assert_eq!(err.kind(), "scheme", "{u}");
            assert_eq!(err.to_string(), "the URL must use http or https");
        }
        p.require_https = true;
        let err = check_url(&p, &url("http://example.com/")).unwrap_err();
        assert_eq!(err.kind(), "scheme");
        assert_eq!(err.to_string(), "the URL must use https");
        assert!(check_url(&p, &url("https://example.com/")).is_ok());
    }

    #[test]
    fn check_url_length_limit() {
        let p = Policy::new(&[]).unwrap();
        let long = format!("https://example.com/{}", "a".repeat(3000));
        assert_eq!(check_url(&p, &url(&long)).unwrap_err().kind(), "too_long");
        let base = "https://example.com/";
        let exact = format!("{base}{}", "a".repeat(MAX_URL_LEN - base.len()));
        assert!(check_url(&p, &url(&exact)).is_ok());
        let over = format!("{exact}a");
        assert_eq!(check_url(&p, &url(&over)).unwrap_err().kind(), "too_long");
    }

    #[test]
    fn url_problem_messages_reveal_no_internals() {
        let p = Policy::new(&[]).unwrap();
        let err = check_url(&p, &url("http://169.254.169.254/latest/meta-data")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the URL's host is not a public address (link-local address)"
        );
        assert_eq!(UrlProblem::Unresolvable(None).kind(), "unresolvable");
        assert_eq!(UrlProblem::NoHost.kind(), "no_host");
        assert_eq!(UrlProblem::TooLong.kind(), "too_long");
    }

    #[tokio::test]
    async fn check_url_resolving_refuses_names_resolving_inside() {
        let p = Policy::new(&[]).unwrap();
        let err = check_url_resolving(&p, &url("http://localhost:8080/hook"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "blocked_ip");
        assert!(is_blocked(&err));
        // Literals are still checked without DNS.
        let err = check_url_resolving(&p, &url("http://10.1.2.3/"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "blocked_ip");
    }

    #[tokio::test]
    async fn check_url_resolving_honours_the_allow_list() {
        let p = policy(&["127.0.0.0/8", "::1/128"]);
        check_url_resolving(&p, &url("http://localhost:8080/hook"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn check_url_resolving_reports_unresolvable_names() {
        let p = Policy::new(&[]).unwrap();
        // `.invalid` is reserved never to resolve (RFC 6761).
        let err = check_url_resolving(&p, &url("https://no-such-host.invalid/"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), "unresolvable");
        assert!(!is_blocked(&err));
    }

    #[tokio::test]
    async fn guarded_resolver_drops_refused_addresses() {
        let refusing = GuardedResolver::new(Arc::new(Policy::new(&[]).unwrap()));
        let err = match refusing.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => panic!("resolved to {:?}", addrs.collect::<Vec<_>>()),
            Err(e) => e,
        };
        assert!(is_blocked(&*err), "{err}");

        let allowing = GuardedResolver::new(Arc::new(policy(&["127.0.0.0/8"])));
        let addrs: Vec<SocketAddr> = match allowing.resolve("localhost".parse().unwrap()).await {
            Ok(addrs) => addrs.collect(),
            Err(e) => panic!("{e}"),
        };
        assert!(!addrs.is_empty());
        // `::1` (if the resolver returned it) is not in the allow-list and was dropped.
        assert!(
            addrs
                .iter()
                .all(|a| a.ip().is_ipv4() && a.ip().is_loopback())
        );
    }
}
