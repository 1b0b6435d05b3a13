//! Picks and opens the storage backend named by the configuration.

use std::sync::Arc;

use bursar_storage::{Storage, StorageError};
use bursar_storage_postgres::{PostgresOptions, PostgresStore};
use bursar_storage_sqlite::{SqliteOptions, SqliteStore};

use crate::Config;

/// `postgres://` / `postgresql://` select PostgreSQL; `sqlite:` a file; no URL means the
/// embedded SQLite file `<data_dir>/bursar.db`. Migrations run on open.
pub async fn open(config: &Config) -> Result<Arc<dyn Storage>, StorageError> {
    let url = config.effective_database_url();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let opts = PostgresOptions {
            max_connections: config.database.max_connections,
            acquire_timeout: config.database.acquire_timeout(),
            schema: config.database.schema.clone(),
        };
        Ok(Arc::new(PostgresStore::open(&url, &opts).await?))
    } else {
        if url == config.default_sqlite_url() {
            std::fs::create_dir_all(&config.data_dir)
                .map_err(|e| StorageError::Unavailable(Box::new(e)))?;
        }
        let opts = SqliteOptions {
            busy_timeout: config.database.busy_timeout(),
            readers: config.database.max_connections.clamp(1, 8),
        };
        Ok(Arc::new(SqliteStore::open(&url, &opts).await?))
    }
}
