//! The journal is append-only in the database itself, not only by the absence of code that
//! edits it: an `UPDATE` or `DELETE` of a journal entry or posting is refused by SQLite.

use bursar_storage_sqlite::{SqliteOptions, SqliteStore};
use sqlx::Connection;

#[tokio::test]
async fn postings_and_journal_entries_refuse_updates_and_deletes() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("bursar.db").display());
    let store = SqliteStore::open(&url, &SqliteOptions::default())
        .await
        .unwrap();
    let mut conn = sqlx::SqliteConnection::connect(&url).await.unwrap();
    for sql in [
        "INSERT INTO accounts (id, name, created_at) VALUES (1, 'a', 0)",
        "INSERT INTO journal_entries (id, account_id, kind, reference_type, reference_id, \
         created_at) VALUES (1, 1, 'refund', 'refund', 1, 0)",
        "INSERT INTO postings (entry_id, account_id, ledger_account, currency, amount_minor) \
         VALUES (1, 1, 'available', 'USD', -5), (1, 1, 'processor_clearing', 'USD', 5)",
    ] {
        sqlx::query(sql).execute(&mut conn).await.unwrap();
    }
    for sql in [
        "UPDATE postings SET amount_minor = 0",
        "DELETE FROM postings",
        "UPDATE journal_entries SET kind = 'capture'",
        "DELETE FROM journal_entries",
    ] {
        let refused = sqlx::query(sql).execute(&mut conn).await;
        let message = refused.expect_err(sql).to_string();
        assert!(message.contains("immutable"), "{sql}: {message}");
    }
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM postings")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 2);
    conn.close().await.unwrap();
    bursar_storage::Storage::close(&store).await;
}
