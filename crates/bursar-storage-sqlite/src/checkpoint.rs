//! WAL checkpoints mostly off the writer's timeline.
//!
//! By default SQLite checkpoints inside the commit that takes the write-ahead log past 1,000
//! pages: the committing connection copies the log into the database file and syncs it while
//! it still holds the one write lock, so every writer queued behind it waits (about 6 % of the
//! writer's time in the payments bench, plus the syncs, and the slowest commits). Here a
//! connection of its own runs a `PASSIVE` checkpoint every [`EVERY`]: it takes no write lock
//! and waits for nobody, so commits go on while it copies.
//!
//! The writer still checkpoints, but only past [`WRITER_PAGES`] (`wal_autocheckpoint`): a
//! checkpoint that runs alongside commits never catches up with the last one, and only a log
//! copied to its end lets the next writer restart it from the beginning. Without this the log
//! grew by about 80 MB a second in the payments bench; with it the log stays under
//! `WRITER_PAGES` pages, and the writer's own checkpoint finds most of it already copied.
//! Durability does not change: a commit is durable (to the extent `synchronous = NORMAL`
//! promises) once it is in the log, whenever the log is copied.

use std::sync::Arc;
use std::time::Duration;

use bursar_storage::Result;
use sqlx::sqlite::{SqliteConnectOptions, SqliteConnection};
use sqlx::{ConnectOptions, Connection};
use tokio::sync::watch;

/// How often the log is copied into the database file in the background.
pub const EVERY: Duration = Duration::from_millis(50);

/// The log's length in pages (4 KiB each) past which the writer's commit checkpoints too.
/// Measured in the payments bench (one-step, pay ops/s): 1,000 (SQLite's default) 1,913–1,938;
/// 2,000 with copies every 50 ms 2,113; 4,000 every 100 ms 2,130–2,153; 8,000 every 50 ms
/// 2,304; 16,000 every 100 ms 2,253 (docs/PERFORMANCE.md).
pub const WRITER_PAGES: u32 = 8_000;

/// Runs the checkpoints until [`Checkpointer::stop`] or until the last handle is dropped.
pub(crate) struct Checkpointer {
    stop: watch::Sender<bool>,
}

impl Checkpointer {
    /// Opens the checkpointer's connection (a failure fails the store's open, as the other
    /// connections' do) and starts the task.
    pub(crate) async fn start(connect: &SqliteConnectOptions) -> Result<Arc<Checkpointer>> {
        let mut conn = connect.connect().await.map_err(crate::err)?;
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticks.tick() => checkpoint(&mut conn).await,
                    // Stopped, or every handle dropped.
                    _ = stopped.changed() => break,
                }
            }
            // A last copy, so a closed store leaves a short log behind.
            checkpoint(&mut conn).await;
            let _ = conn.close().await;
        });
        Ok(Arc::new(Checkpointer { stop }))
    }

    pub(crate) fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

async fn checkpoint(conn: &mut SqliteConnection) {
    // A failed checkpoint loses nothing (the log keeps every commit); the next one retries.
    if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
        .execute(&mut *conn)
        .await
    {
        tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{SqliteOptions, SqliteStore};
    use bursar_storage::Storage;

    /// Far fewer pages than `WRITER_PAGES`, so the writer never copies them itself: what the
    /// database file holds (read with `immutable`, which ignores the log) the background
    /// checkpointer put there.
    #[tokio::test]
    async fn commits_reach_the_database_file_without_the_writer_checkpointing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.db");
        let store = SqliteStore::open(path.to_str().unwrap(), &SqliteOptions::default())
            .await
            .unwrap();
        sqlx::query("CREATE TABLE scratch (x INTEGER NOT NULL)")
            .execute(&mut *store.writer.lock().await.unwrap())
            .await
            .unwrap();
        for x in 0..100 {
            sqlx::query("INSERT INTO scratch (x) VALUES (?)")
                .bind(x)
                .execute(&mut *store.writer.lock().await.unwrap())
                .await
                .unwrap();
        }
        let file_only = SqliteConnectOptions::new()
            .filename(&path)
            .read_only(true)
            .immutable(true);
        let mut copied = None;
        for _ in 0..40 {
            tokio::time::sleep(EVERY).await;
            let mut conn = file_only.connect().await.unwrap();
            copied = sqlx::query_scalar::<_, i64>("SELECT count(*) FROM scratch")
                .fetch_one(&mut conn)
                .await
                .ok();
            conn.close().await.unwrap();
            if copied == Some(100) {
                break;
            }
        }
        assert_eq!(
            copied,
            Some(100),
            "every commit copied into the database file"
        );
        store.close().await;
    }
}
