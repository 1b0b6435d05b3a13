//! API key format: `bsr_(live|test)_` + 30 base62 random characters + a 6-character base62
//! CRC32 checksum (spec `api-product.md` §2.1). The checksum lets a typo or a scanner's false
//! positive be rejected before any I/O; the key itself is only ever stored as its SHA-256.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The base62 alphabet, most significant digit first: `0-9A-Za-z`.
pub const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
pub const RANDOM_CHARS: usize = 30;
const CHECKSUM_CHARS: usize = 6;
const PREFIX_LEN: usize = 9; // "bsr_test_" / "bsr_live_"

/// Test keys touch test-mode data only; live keys move real money.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KeyMode {
    Test,
    Live,
}

impl KeyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyMode::Test => "test",
            KeyMode::Live => "live",
        }
    }

    pub fn parse(s: &str) -> Option<KeyMode> {
        match s {
            "test" => Some(KeyMode::Test),
            "live" => Some(KeyMode::Live),
            _ => None,
        }
    }
}

/// A syntactically valid key whose checksum matched. Holding one says nothing about whether
/// the key exists: that is the store's answer to [`ParsedKey::hash`].
#[derive(Clone, PartialEq, Eq)]
pub struct ParsedKey {
    secret: String,
    mode: KeyMode,
}

impl std::fmt::Debug for ParsedKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a secret, even in a debug dump.
        write!(f, "ParsedKey({}…)", self.start())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed API key")]
pub struct MalformedKey;

impl ParsedKey {
    /// Builds a new key from 30 random base62 characters the caller drew from a CSPRNG.
    pub fn assemble(mode: KeyMode, random: &str) -> Result<ParsedKey, MalformedKey> {
        if random.len() != RANDOM_CHARS || !random.bytes().all(|b| BASE62.contains(&b)) {
            return Err(MalformedKey);
        }
        let body = format!("bsr_{}_{random}", mode.as_str());
        let secret = format!("{body}{}", checksum(body.as_bytes()));
        Ok(ParsedKey { secret, mode })
    }

    /// Checks shape and checksum, with no I/O. The checksum comparison is constant-time.
    pub fn parse(text: &str) -> Result<ParsedKey, MalformedKey> {
        let bytes = text.as_bytes();
        if bytes.len() != PREFIX_LEN + RANDOM_CHARS + CHECKSUM_CHARS {
            return Err(MalformedKey);
        }
        let mode = match &text[..PREFIX_LEN] {
            "bsr_test_" => KeyMode::Test,
            "bsr_live_" => KeyMode::Live,
            _ => return Err(MalformedKey),
        };
        if !bytes[PREFIX_LEN..].iter().all(|b| BASE62.contains(b)) {
            return Err(MalformedKey);
        }
        let (body, sum) = bytes.split_at(PREFIX_LEN + RANDOM_CHARS);
        let expected = checksum(body);
        if !bool::from(expected.as_bytes().ct_eq(sum)) {
            return Err(MalformedKey);
        }
        Ok(ParsedKey {
            secret: text.to_owned(),
            mode,
        })
    }

    pub fn mode(&self) -> KeyMode {
        self.mode
    }

    /// The full secret, to be shown to its owner exactly once.
    pub fn reveal(&self) -> &str {
        &self.secret
    }

    /// Lowercase hex SHA-256 of the whole key: the only form that is stored and looked up.
    pub fn hash(&self) -> String {
        hex::encode(Sha256::digest(self.secret.as_bytes()))
    }

    /// Prefix plus the first four random characters, safe to display.
    pub fn start(&self) -> String {
        self.secret[..PREFIX_LEN + 4].to_owned()
    }

    /// The last four characters, safe to display.
    pub fn last4(&self) -> String {
        self.secret[self.secret.len() - 4..].to_owned()
    }
}

/// What a restricted key may touch. A key without scopes has full access; a key with scopes
/// may only do what they list (spec `api-product.md` §2.1: restriction by scopes, not by
/// prefixes). `write` implies `read` on the same resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Scope {
    pub resource: Resource,
    pub access: Access,
}

/// The resources scopes name; each API route belongs to one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Customers,
    Orders,
    Payments,
    Refunds,
    Balances,
    Fx,
    Events,
    WebhookEndpoints,
    Keys,
    Usage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Access {
    Read,
    Write,
}

impl Resource {
    pub const ALL: [Resource; 10] = [
        Resource::Customers,
        Resource::Orders,
        Resource::Payments,
        Resource::Refunds,
        Resource::Balances,
        Resource::Fx,
        Resource::Events,
        Resource::WebhookEndpoints,
        Resource::Keys,
        Resource::Usage,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Customers => "customers",
            Resource::Orders => "orders",
            Resource::Payments => "payments",
            Resource::Refunds => "refunds",
            Resource::Balances => "balances",
            Resource::Fx => "fx",
            Resource::Events => "events",
            Resource::WebhookEndpoints => "webhook_endpoints",
            Resource::Keys => "keys",
            Resource::Usage => "usage",
        }
    }
}

impl Scope {
    /// `orders:read`, `payments:write`.
    pub fn parse(text: &str) -> Option<Scope> {
        let (resource, access) = text.split_once(':')?;
        let resource = Resource::ALL.into_iter().find(|r| r.as_str() == resource)?;
        let access = match access {
            "read" => Access::Read,
            "write" => Access::Write,
            _ => return None,
        };
        Some(Scope { resource, access })
    }

    pub fn render(self) -> String {
        let access = match self.access {
            Access::Read => "read",
            Access::Write => "write",
        };
        format!("{}:{access}", self.resource.as_str())
    }

    /// Whether a key holding `scopes` (`None`: full access) may do `needed`.
    pub fn allows(scopes: Option<&[Scope]>, needed: Scope) -> bool {
        scopes.is_none_or(|held| {
            held.iter().any(|s| {
                s.resource == needed.resource
                    && (s.access == needed.access || s.access == Access::Write)
            })
        })
    }
}

/// CRC32 (IEEE) of `body`, written in base62 and left-padded with `0` to six characters.
fn checksum(body: &[u8]) -> String {
    let mut n = crc32fast::hash(body);
    let mut out = [b'0'; CHECKSUM_CHARS];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(n % 62) as usize];
        n /= 62;
    }
    String::from_utf8(out.to_vec()).expect("base62 is ASCII")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_write_implies_read() {
        let read = Scope::parse("orders:read").unwrap();
        let write = Scope::parse("orders:write").unwrap();
        assert_eq!(read.render(), "orders:read");
        assert!(Scope::parse("orders:admin").is_none());
        assert!(Scope::parse("ordres:read").is_none());
        assert!(Scope::parse("orders").is_none());
        assert!(Scope::allows(None, write));
        assert!(Scope::allows(Some(&[write]), read));
        assert!(!Scope::allows(Some(&[read]), write));
        let pay = Scope::parse("payments:read").unwrap();
        assert!(!Scope::allows(Some(&[write]), pay));
        for r in Resource::ALL {
            let s = Scope {
                resource: r,
                access: Access::Write,
            };
            assert_eq!(Scope::parse(&s.render()), Some(s));
        }
    }

    #[test]
    fn matches_the_spec_vector() {
        let k = ParsedKey::assemble(KeyMode::Test, "0123456789ABCDEFGHIJabcdefghij").unwrap();
        assert_eq!(k.reveal(), "bsr_test_0123456789ABCDEFGHIJabcdefghij0KXORN");
        assert_eq!(
            crc32fast::hash(b"bsr_test_0123456789ABCDEFGHIJabcdefghij"),
            0x1216_d239
        );
        assert_eq!(ParsedKey::parse(k.reveal()), Ok(k.clone()));
        assert_eq!(k.start(), "bsr_test_0123");
        assert_eq!(k.last4(), "XORN");
        assert_eq!(k.hash().len(), 64);
    }

    #[test]
    fn any_flipped_character_is_rejected() {
        let good = "bsr_live_0123456789ABCDEFGHIJabcdefghij";
        let k = ParsedKey::assemble(KeyMode::Live, &good[9..]).unwrap();
        let s = k.reveal().to_owned();
        for i in 9..s.len() {
            let mut b = s.clone().into_bytes();
            b[i] = if b[i] == b'a' { b'b' } else { b'a' };
            let flipped = String::from_utf8(b).unwrap();
            assert_eq!(
                ParsedKey::parse(&flipped),
                Err(MalformedKey),
                "position {i}"
            );
        }
    }

    #[test]
    fn shape_errors() {
        for bad in [
            "",
            "bsr_test_",
            "sk_test_0123456789ABCDEFGHIJabcdefghij0KXORN",
            "bsr_prod_0123456789ABCDEFGHIJabcdefghij0KXORN",
            "bsr_test_0123456789ABCDEFGHIJabcdefghij0KXOR",
            "bsr_test_0123456789ABCDEFGHIJabcdefgh-j0KXORN",
            "bsr_test_0123456789ABCDEFGHIJabcdefghij0KXORNN",
        ] {
            assert!(ParsedKey::parse(bad).is_err(), "{bad}");
        }
        assert!(ParsedKey::assemble(KeyMode::Test, "short").is_err());
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let k = ParsedKey::assemble(KeyMode::Test, "0123456789ABCDEFGHIJabcdefghij").unwrap();
        assert!(!format!("{k:?}").contains("0KXORN"));
    }
}
