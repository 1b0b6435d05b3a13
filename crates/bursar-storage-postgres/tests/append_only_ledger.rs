//! The journal is append-only in the database itself, not only by the absence of code that
//! edits it: an `UPDATE` or `DELETE` of a journal entry or posting is refused by PostgreSQL.

use bursar_storage_postgres::{PostgresOptions, PostgresStore};
use sqlx::Connection;

#[tokio::test]
async fn postings_and_journal_entries_refuse_updates_and_deletes() {
    let Some(url) = bursar_storage::conformance::postgres_test_url() else {
        return;
    };
    let schema = format!("t_{}", uuid::Uuid::new_v4().simple());
    let opts = PostgresOptions {
        max_connections: 2,
        schema: Some(schema.clone()),
        ..Default::default()
    };
    let store = PostgresStore::open(&url, &opts).await.unwrap();
    let mut conn = sqlx::PgConnection::connect(&url).await.unwrap();
    let search_path = format!("SET search_path TO {schema}");
    sqlx::raw_sql(sqlx::AssertSqlSafe(search_path))
        .execute(&mut conn)
        .await
        .unwrap();
    for sql in [
        "INSERT INTO accounts (name, created_at) VALUES ('a', 0)",
        "INSERT INTO journal_entries (account_id, kind, reference_type, reference_id, \
         created_at) SELECT id, 'refund', 'refund', 1, 0 FROM accounts",
        "INSERT INTO postings (entry_id, account_id, ledger_account, currency, amount_minor) \
         SELECT e.id, e.account_id, v.l, 'USD', v.m FROM journal_entries e, \
         (VALUES ('available', -5), ('processor_clearing', 5)) AS v (l, m)",
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
