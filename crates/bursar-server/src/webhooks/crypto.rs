//! Endpoint secrets at rest: sealed with ChaCha20-Poly1305 (ring) under a key the database
//! never holds, so a copy of the database alone does not let anyone sign webhooks.

use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};

/// Prefix of a sealed value: the scheme, so the format can change later.
const SCHEME: &str = "v1:";

pub struct SecretBox {
    key: LessSafeKey,
    rng: SystemRandom,
}

#[derive(Debug, thiserror::Error)]
pub enum BoxError {
    #[error("the webhook encryption key must be 32 bytes of base64")]
    BadKey,
    #[error("a stored webhook secret could not be decrypted (wrong webhooks.encryption_key?)")]
    Open,
    #[error("no randomness available")]
    Random,
    #[error("webhook key file {0}: {1}")]
    File(String, std::io::Error),
}

impl std::fmt::Debug for SecretBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretBox(<key>)")
    }
}

impl SecretBox {
    pub fn from_base64(key: &str) -> Result<SecretBox, BoxError> {
        let bytes = STANDARD.decode(key.trim()).map_err(|_| BoxError::BadKey)?;
        let key = UnboundKey::new(&CHACHA20_POLY1305, &bytes).map_err(|_| BoxError::BadKey)?;
        Ok(SecretBox {
            key: LessSafeKey::new(key),
            rng: SystemRandom::new(),
        })
    }

    /// The configured key, or the key file in `data_dir` (created, readable by the owner
    /// only, on first use).
    pub fn load(configured: Option<&str>, data_dir: &Path) -> Result<SecretBox, BoxError> {
        if let Some(key) = configured {
            return SecretBox::from_base64(key);
        }
        let path = data_dir.join("webhook-secrets.key");
        let shown = path.display().to_string();
        match std::fs::read_to_string(&path) {
            Ok(key) => SecretBox::from_base64(&key),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = [0u8; 32];
                SystemRandom::new()
                    .fill(&mut key)
                    .map_err(|_| BoxError::Random)?;
                let text = STANDARD.encode(key);
                std::fs::create_dir_all(data_dir).map_err(|e| BoxError::File(shown.clone(), e))?;
                write_private(&path, &text).map_err(|e| BoxError::File(shown, e))?;
                SecretBox::from_base64(&text)
            }
            Err(e) => Err(BoxError::File(shown, e)),
        }
    }

    pub fn random_bytes(&self, out: &mut [u8]) -> Result<(), BoxError> {
        self.rng.fill(out).map_err(|_| BoxError::Random)
    }

    /// `v1:` + base64(nonce ‖ ciphertext ‖ tag), a fresh random nonce each time.
    pub fn seal(&self, plain: &str) -> Result<String, BoxError> {
        let mut nonce = [0u8; NONCE_LEN];
        self.random_bytes(&mut nonce)?;
        let mut data = plain.as_bytes().to_vec();
        self.key
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut data)
            .map_err(|_| BoxError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&data);
        Ok(format!("{SCHEME}{}", STANDARD.encode(out)))
    }

    pub fn open(&self, sealed: &str) -> Result<String, BoxError> {
        let raw = sealed
            .strip_prefix(SCHEME)
            .and_then(|b| STANDARD.decode(b).ok())
            .filter(|r| r.len() > NONCE_LEN)
            .ok_or(BoxError::Open)?;
        let (nonce, data) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| BoxError::Open)?;
        let mut data = data.to_vec();
        let plain = self
            .key
            .open_in_place(nonce, Aad::empty(), &mut data)
            .map_err(|_| BoxError::Open)?;
        String::from_utf8(plain.to_vec()).map_err(|_| BoxError::Open)
    }
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seals_and_opens_and_refuses_tampering_or_another_key() {
        let key = STANDARD.encode([7u8; 32]);
        let b = SecretBox::from_base64(&key).unwrap();
        let sealed = b.seal("whsec_abc").unwrap();
        assert!(!sealed.contains("whsec_abc"));
        assert_ne!(
            sealed,
            b.seal("whsec_abc").unwrap(),
            "fresh nonce each time"
        );
        assert_eq!(b.open(&sealed).unwrap(), "whsec_abc");
        let other = SecretBox::from_base64(&STANDARD.encode([8u8; 32])).unwrap();
        assert!(other.open(&sealed).is_err());
        let mut bytes = sealed.into_bytes();
        let last = bytes.len() - 2;
        bytes[last] = if bytes[last] == b'A' { b'B' } else { b'A' };
        assert!(b.open(&String::from_utf8(bytes).unwrap()).is_err());
        assert!(SecretBox::from_base64("short").is_err());
    }

    #[test]
    fn the_key_file_is_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = SecretBox::load(None, dir.path()).unwrap();
        let sealed = a.seal("x").unwrap();
        let b = SecretBox::load(None, dir.path()).unwrap();
        assert_eq!(b.open(&sealed).unwrap(), "x");
    }
}
