//! The one write connection.
//!
//! SQLite takes one writer at a time, so every write of a store goes through one connection.
//! It is held here behind an async lock rather than in a pool of one: a pooled connection
//! goes back to its pool through a spawned task that first pings the connection's thread, so
//! each release left the connection idle for a scheduling delay and a round trip before the
//! next writer could have it (docs/PERFORMANCE.md measures the wait). Released here, the lock
//! passes straight to the next waiter.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::Duration;

use bursar_storage::Result;
use sqlx::SqliteConnection;
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::err;

/// The store's write connection, shared by its writers (cheap to clone).
#[derive(Clone)]
pub(crate) struct Writer {
    conn: Arc<Mutex<Option<SqliteConnection>>>,
    /// How long a writer waits for the connection before the store answers unavailable.
    wait: Duration,
}

impl Writer {
    pub(crate) fn new(conn: SqliteConnection, wait: Duration) -> Writer {
        Writer {
            conn: Arc::new(Mutex::new(Some(conn))),
            wait,
        }
    }

    /// The connection, once no other writer holds it. For statements that commit on their
    /// own; a transaction takes [`Writer::begin`] or [`Writer::deferred`].
    pub(crate) async fn lock(&self) -> Result<WriterConn> {
        let guard = tokio::time::timeout(self.wait, self.conn.clone().lock_owned())
            .await
            .map_err(|_| err(sqlx::Error::PoolTimedOut))?;
        if guard.is_none() {
            return Err(err(sqlx::Error::PoolClosed));
        }
        Ok(WriterConn(guard))
    }

    /// A transaction holding SQLite's write lock from its start (`BEGIN IMMEDIATE`).
    pub(crate) async fn begin(&self) -> Result<WriteTx> {
        let mut conn = self.lock().await?;
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *conn)
            .await
            .map_err(err)?;
        Ok(WriteTx { conn: Some(conn) })
    }

    /// The connection for a transaction the caller opens itself, with `BEGIN IMMEDIATE` at
    /// the head of its first call (one hand-off less). Until it commits or rolls back, the
    /// transaction counts as open.
    pub(crate) async fn deferred(&self) -> Result<WriteTx> {
        Ok(WriteTx {
            conn: Some(self.lock().await?),
        })
    }

    /// Closes the connection; every later use answers unavailable.
    pub(crate) async fn close(&self) {
        if let Some(conn) = self.conn.lock().await.take() {
            let _ = sqlx::Connection::close(conn).await;
        }
    }
}

/// The write connection while held.
pub(crate) struct WriterConn(OwnedMutexGuard<Option<SqliteConnection>>);

impl Deref for WriterConn {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.0
            .as_ref()
            .expect("a held writer is open (checked when locked)")
    }
}

impl DerefMut for WriterConn {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.0
            .as_mut()
            .expect("a held writer is open (checked when locked)")
    }
}

/// A write transaction. Dropped before [`WriteTx::commit`] or [`WriteTx::rollback`] (an
/// error returned early, a task stopped half-way), it is rolled back before the connection
/// passes to the next writer.
pub(crate) struct WriteTx {
    conn: Option<WriterConn>,
}

impl WriteTx {
    /// Errors are sqlx's, as `sqlx::Transaction`'s are, for the callers' `map_err(err)`.
    pub(crate) async fn commit(mut self) -> sqlx::Result<()> {
        let mut conn = self.conn.take().expect("a transaction ends once");
        match sqlx::query("COMMIT").execute(&mut *conn).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
                Err(e)
            }
        }
    }

    pub(crate) async fn rollback(mut self) -> sqlx::Result<()> {
        let mut conn = self.conn.take().expect("a transaction ends once");
        sqlx::query("ROLLBACK")
            .execute(&mut *conn)
            .await
            .map(|_| ())
    }

    /// The caller's own last call committed (`…; COMMIT`).
    pub(crate) fn committed(mut self) {
        self.conn = None;
    }
}

impl Deref for WriteTx {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.conn.as_ref().expect("a transaction ends once")
    }
}

impl DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn.as_mut().expect("a transaction ends once")
    }
}

impl Drop for WriteTx {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        // The lock moves into the task, so no other writer gets the connection before the
        // rollback ran. `ROLLBACK` with nothing open only errs.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bursar_storage::StorageError;
    use sqlx::ConnectOptions;
    use sqlx::sqlite::SqliteConnectOptions;

    async fn writer(dir: &tempfile::TempDir) -> Writer {
        let mut conn = SqliteConnectOptions::new()
            .filename(dir.path().join("w.db"))
            .create_if_missing(true)
            .connect()
            .await
            .unwrap();
        sqlx::query("CREATE TABLE t (x INTEGER NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        Writer::new(conn, Duration::from_millis(200))
    }

    async fn run(tx: &mut WriteTx, sql: &'static str) {
        sqlx::query(sql).execute(&mut **tx).await.unwrap();
    }

    async fn rows(w: &Writer) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM t")
            .fetch_one(&mut *w.lock().await.unwrap())
            .await
            .unwrap()
    }

    /// A transaction dropped half-way, whether the writer opened it or the caller did in
    /// its own first call, leaves nothing behind and no transaction open for the next writer.
    #[tokio::test]
    async fn a_dropped_transaction_is_rolled_back_before_the_next_writer() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(&dir).await;
        let mut tx = w.begin().await.unwrap();
        run(&mut tx, "INSERT INTO t (x) VALUES (1)").await;
        drop(tx);
        let mut tx = w.deferred().await.unwrap();
        run(&mut tx, "BEGIN IMMEDIATE; INSERT INTO t (x) VALUES (2)").await;
        drop(tx);
        // Both would fail inside a transaction left open.
        let mut tx = w.begin().await.unwrap();
        run(&mut tx, "INSERT INTO t (x) VALUES (3)").await;
        tx.commit().await.unwrap();
        assert_eq!(rows(&w).await, 1);
        // A caller's own `COMMIT` ends it too.
        let mut tx = w.deferred().await.unwrap();
        run(
            &mut tx,
            "BEGIN IMMEDIATE; INSERT INTO t (x) VALUES (4); COMMIT",
        )
        .await;
        tx.committed();
        assert_eq!(rows(&w).await, 2);
    }

    /// A writer that cannot get the connection in time, or finds it closed, is told the store
    /// is unavailable rather than waiting for ever.
    #[tokio::test]
    async fn a_held_or_closed_writer_answers_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let w = writer(&dir).await;
        let held = w.begin().await.unwrap();
        assert!(matches!(w.lock().await, Err(StorageError::Unavailable(_))));
        held.rollback().await.unwrap();
        assert_eq!(rows(&w).await, 0);
        w.close().await;
        assert!(matches!(w.begin().await, Err(StorageError::Unavailable(_))));
    }
}
