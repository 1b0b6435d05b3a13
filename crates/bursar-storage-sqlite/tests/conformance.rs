//! The shared storage conformance suite, on SQLite. Each test gets its own database file.

use std::sync::Arc;

use bursar_storage::Storage;
use bursar_storage_sqlite::{SqliteOptions, SqliteStore};

async fn fresh() -> Option<Arc<dyn Storage>> {
    // The directory is leaked on purpose: it must outlive the pools, and the OS temp dir is
    // cleaned by the OS; each test uses its own.
    let dir = tempfile::tempdir().unwrap().keep();
    let url = format!("sqlite://{}", dir.join("bursar.db").display());
    Some(Arc::new(
        SqliteStore::open(&url, &SqliteOptions::default())
            .await
            .unwrap(),
    ))
}

bursar_storage::conformance_tests!(fresh());
