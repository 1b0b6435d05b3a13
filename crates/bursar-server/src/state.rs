//! Shared state handed to every handler.

use std::sync::Arc;

use bursar_domain::{Clock, Timestamp};
use bursar_storage::Storage;

use crate::Config;

#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Storage>,
    pub clock: Arc<dyn Clock>,
    pub config: Arc<Config>,
}

impl AppState {
    pub fn new(store: Arc<dyn Storage>, clock: Arc<dyn Clock>, config: Config) -> AppState {
        AppState {
            store,
            clock,
            config: Arc::new(config),
        }
    }
}

/// The real clock. The only place in the server allowed to read the system time.
pub struct SystemClock;

impl Clock for SystemClock {
    #[allow(clippy::disallowed_methods)]
    fn now(&self) -> Timestamp {
        let ms = chrono::Utc::now().timestamp_millis();
        Timestamp(ms)
    }
}
