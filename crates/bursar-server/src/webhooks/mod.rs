//! Events leave Bursar here (issue 5): the relay sequences committed outbox rows and fans
//! them out (`relay`), the worker sends webhook deliveries (`worker`), endpoint secrets are
//! sealed at rest (`crypto`), and every outbound connection goes through the SSRF guard
//! (`crate::ssrf`).

pub mod crypto;
pub mod relay;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::config::{Config, WebhooksConfig};
use crate::ssrf;

/// `User-Agent` of every delivery.
pub const USER_AGENT: &str = concat!("Bursar-Webhooks/", env!("CARGO_PKG_VERSION"));

/// What the relay, the worker and the endpoint API share.
pub struct Webhooks {
    pub config: WebhooksConfig,
    pub secrets: crypto::SecretBox,
    pub policy: Arc<ssrf::Policy>,
    pub client: reqwest::Client,
    /// Woken by the relay after a fan-out, so the worker does not wait for its poll.
    pub relayed: Notify,
    /// Woken after a write request of this process succeeded (it may have committed events),
    /// so the relay does not wait for its poll (`relay::wake_on_write`).
    pub committed: Notify,
}

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    pub fn from_config(config: &Config) -> anyhow::Result<Webhooks> {
        let c = &config.webhooks;
        let secrets = crypto::SecretBox::load(c.encryption_key.as_deref(), &config.data_dir)?;
        let mut policy = ssrf::Policy::new(&c.allow_cidrs)?;
        policy.require_https = c.https_required();
        let policy = Arc::new(policy);
        let client = ssrf::client(
            policy.clone(),
            Duration::from_millis(c.timeout_ms.max(1)),
            USER_AGENT,
        )?;
        Ok(Webhooks {
            config: c.clone(),
            secrets,
            policy,
            client,
            relayed: Notify::new(),
            committed: Notify::new(),
        })
    }

    pub fn poll_interval(&self) -> Duration {
        Duration::from_millis(self.config.poll_interval_ms.max(1))
    }

    /// How long a claimed or handed-on delivery is leased for.
    pub fn lease(&self) -> Duration {
        Duration::from_secs(self.config.lease_secs.max(1))
    }
}
