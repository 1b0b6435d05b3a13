//! The shared storage conformance suite, on PostgreSQL. Each test gets its own schema in the
//! database named by `BURSAR_TEST_DATABASE_URL`; without it the tests pass vacuously and say
//! so on stderr (CI always sets it, and sets `BURSAR_TEST_REQUIRE_POSTGRES=1`).

use std::sync::Arc;

use bursar_storage::Storage;
use bursar_storage_postgres::{PostgresOptions, PostgresStore};

async fn fresh() -> Option<Arc<dyn Storage>> {
    let url = bursar_storage::conformance::postgres_test_url()?;
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let opts = PostgresOptions {
        max_connections: 8,
        schema: Some(schema),
        ..Default::default()
    };
    Some(Arc::new(PostgresStore::open(&url, &opts).await.unwrap()))
}

bursar_storage::conformance_tests!(fresh());

/// PostgreSQL hands leases on (`complete_and_hand_on`); the shared case accepts a backend that
/// does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn successes_hand_their_leases_on() {
    if let Some(s) = fresh().await {
        bursar_storage::conformance::successes_hand_their_leases_on(s).await;
    }
}
