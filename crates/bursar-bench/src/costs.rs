//! What a measured window cost per op, in each resource the targets share: Bursar's CPU (and
//! its busiest thread's, where a single writer would show), the database server's CPU, the
//! load tool's own CPU, what was written (PostgreSQL's WAL; on SQLite, Bursar's disk writes),
//! and how idle the machine was.
//!
//! Why: a ratio of two throughputs on one machine is set by what each op costs in whatever
//! the two share. The payments ratio (pay ops ÷ order creates) cannot pass 0.5× while a pay op
//! costs more than twice a create in a resource that is saturated, so these figures say which
//! part of a gap belongs to which resource instead of leaving it to be guessed.
//!
//! Read from Linux's `/proc` (CPU in `USER_HZ` ticks, 100 a second on every Linux the load
//! tool targets) and from `pg_current_wal_lsn()`; where either is missing (another OS, a
//! remote database) the column is left empty. The database's CPU is that of every local
//! process named `postgres`, so it is meaningful only with the server on this machine and
//! nothing else using it.

use std::collections::HashMap;
use std::time::Instant;

use sqlx::{Connection, PgConnection};
use tokio::sync::Mutex;

/// Microseconds per `/proc` CPU tick.
const TICK_US: u64 = 10_000;

/// Where to read from.
pub struct Meter {
    bursar: u32,
    /// A connection to the PostgreSQL server Bursar writes to, for its WAL position.
    wal: Option<Mutex<PgConnection>>,
}

impl Meter {
    /// Meters the `bursar` process and, given its server's URL, PostgreSQL's WAL. A server
    /// that cannot be reached is an error: the run would report no WAL for no visible reason.
    pub async fn new(bursar: u32, database_url: Option<&str>) -> anyhow::Result<Meter> {
        let wal = match database_url {
            Some(url) => Some(Mutex::new(PgConnection::connect(url).await?)),
            None => None,
        };
        Ok(Meter { bursar, wal })
    }

    /// Everything at once, as close together as it can be read.
    pub async fn read(&self) -> Reading {
        let written = match &self.wal {
            Some(conn) => {
                let mut conn = conn.lock().await;
                let lsn = "SELECT (pg_current_wal_lsn() - '0/0')::bigint";
                let lsn = sqlx::query_scalar::<_, i64>(lsn)
                    .fetch_one(&mut *conn)
                    .await;
                lsn.ok().and_then(|b| u64::try_from(b).ok())
            }
            None => written_bytes(self.bursar),
        };
        Reading {
            at: Instant::now(),
            bursar: process_ticks(self.bursar),
            threads: thread_ticks(self.bursar),
            written,
            database: self.wal.as_ref().and_then(|_| named_ticks("postgres")),
            own: process_ticks(std::process::id()),
            machine: machine_ticks(),
        }
    }
}

/// The counters at one moment; `None` where they could not be read.
pub struct Reading {
    at: Instant,
    bursar: Option<u64>,
    /// Bursar's threads by id: (name, CPU ticks).
    threads: HashMap<u32, (String, u64)>,
    /// PostgreSQL's WAL position in bytes, or on SQLite the bytes Bursar caused to be written.
    written: Option<u64>,
    database: Option<u64>,
    own: Option<u64>,
    /// (idle, all) ticks of the whole machine.
    machine: Option<(u64, u64)>,
}

/// What the measured windows of one (target, op) cost in all; windows add up over rounds.
#[derive(Default, Clone)]
pub struct Cost {
    ops: u64,
    seconds: f64,
    bursar: Option<u64>,
    /// The busiest thread of each window, summed: (name of the last, ticks).
    busiest: Option<(String, u64)>,
    written: Option<u64>,
    database: Option<u64>,
    own: Option<u64>,
    machine: Option<(u64, u64)>,
}

/// `b - a` where both were read.
fn delta(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    Some(b?.saturating_sub(a?))
}

/// Adds `more` to `sum`; a part missing from either leaves the sum missing.
fn add(sum: Option<u64>, more: Option<u64>, first: bool) -> Option<u64> {
    if first { more } else { Some(sum? + more?) }
}

impl Cost {
    /// The cost of one window from `a` to `b`, in which `ops` ops were measured.
    pub fn window(a: &Reading, b: &Reading, ops: u64) -> Cost {
        let busiest = b
            .threads
            .iter()
            .filter_map(|(id, (name, ticks))| {
                let before = a.threads.get(id).map_or(0, |(_, t)| *t);
                Some((name.clone(), ticks.checked_sub(before)?))
            })
            .max_by_key(|(_, ticks)| *ticks);
        let machine = a
            .machine
            .zip(b.machine)
            .map(|((i0, t0), (i1, t1))| (i1.saturating_sub(i0), t1.saturating_sub(t0)));
        Cost {
            ops,
            seconds: b.at.duration_since(a.at).as_secs_f64(),
            bursar: delta(a.bursar, b.bursar),
            busiest,
            written: delta(a.written, b.written),
            database: delta(a.database, b.database),
            own: delta(a.own, b.own),
            machine,
        }
    }

    /// Pools another window (another round) into this one.
    pub fn absorb(&mut self, other: Cost) {
        if other.is_empty() {
            // Not metered (a supply of orders, or a load task's share of a window).
            return;
        }
        let first = self.is_empty();
        self.bursar = add(self.bursar, other.bursar, first);
        self.written = add(self.written, other.written, first);
        self.database = add(self.database, other.database, first);
        self.own = add(self.own, other.own, first);
        self.busiest = match (first, self.busiest.take(), other.busiest) {
            (true, _, b) => b,
            (false, Some((_, a)), Some((name, b))) => Some((name, a + b)),
            _ => None,
        };
        self.machine = match (first, self.machine, other.machine) {
            (true, _, m) => m,
            (false, Some((i, t)), Some((i2, t2))) => Some((i + i2, t + t2)),
            _ => None,
        };
        self.ops += other.ops;
        self.seconds += other.seconds;
    }

    /// Whether no window was metered.
    pub fn is_empty(&self) -> bool {
        self.ops == 0 && self.seconds == 0.0
    }

    /// CPU microseconds per op of a tick count.
    fn per_op_us(&self, ticks: Option<u64>) -> Option<u64> {
        Some(ticks? * TICK_US / self.ops.max(1))
    }

    /// Bursar's CPU per op, in microseconds.
    pub fn bursar_us(&self) -> Option<u64> {
        self.per_op_us(self.bursar)
    }

    /// The database server's CPU per op, in microseconds.
    pub fn database_us(&self) -> Option<u64> {
        self.per_op_us(self.database)
    }

    /// Bytes written per op: the WAL on PostgreSQL, else Bursar's own disk writes.
    pub fn written_per_op(&self) -> Option<u64> {
        Some(self.written? / self.ops.max(1))
    }

    /// One markdown row: `| name | op | … |`.
    pub fn row(&self, name: &str, op: &str) -> String {
        let cell = |v: Option<u64>| v.map_or_else(|| "".to_owned(), |v| v.to_string());
        let busiest = self.busiest.as_ref().map_or_else(String::new, |(n, t)| {
            let busy = (*t * TICK_US) as f64 / (self.seconds * 1e6).max(1e-9) * 100.0;
            format!("{} {n} ({busy:.0} % busy)", t * TICK_US / self.ops.max(1))
        });
        let idle = self.machine.map_or_else(String::new, |(idle, all)| {
            format!("{:.0}", idle as f64 / all.max(1) as f64 * 100.0)
        });
        format!(
            "| {name:<8} | {op:<6} | {:>6} | {busiest} | {:>6} | {:>6} | {:>9} | {idle:>4} |",
            cell(self.bursar_us()),
            cell(self.database_us()),
            cell(self.per_op_us(self.own)),
            cell(self.written_per_op()),
        )
    }
}

/// The header of [`Cost::row`]'s table.
pub const HEADER: &str = "| target   | op     | Bursar CPU µs | its busiest thread: µs, name | database CPU µs | load tool CPU µs | written B | idle % |\n|----------|--------|-------:|---|-------:|-------:|---------:|-----:|";

/// utime + stime of a `/proc/.../stat` file's text (fields 14 and 15, after the name, which
/// is in parentheses and may hold spaces).
fn stat_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11);
    Some(fields.next()?.parse::<u64>().ok()? + fields.next()?.parse::<u64>().ok()?)
}

fn process_ticks(pid: u32) -> Option<u64> {
    stat_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn thread_ticks(pid: u32) -> HashMap<u32, (String, u64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return HashMap::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let id = task.file_name().to_str()?.parse().ok()?;
            let name = std::fs::read_to_string(task.path().join("comm")).ok()?;
            let ticks = stat_ticks(&std::fs::read_to_string(task.path().join("stat")).ok()?)?;
            Some((id, (name.trim().to_owned(), ticks)))
        })
        .collect()
}

/// The bytes a process caused to be written to storage (`write_bytes` of `/proc/PID/io`).
fn written_bytes(pid: u32) -> Option<u64> {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))?
        .trim()
        .parse()
        .ok()
}

/// The CPU ticks of every process named `name`, summed; `None` if there is none.
fn named_ticks(name: &str) -> Option<u64> {
    let mut sum = None;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        let named = std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == name);
        if let Some(ticks) = named
            .then(|| stat_ticks(&std::fs::read_to_string(path.join("stat")).ok()?))
            .flatten()
        {
            sum = Some(sum.unwrap_or(0) + ticks);
        }
    }
    sum
}

/// (idle, all) CPU ticks of the whole machine, from `/proc/stat`'s first line.
fn machine_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    Some((*ticks.get(3)?, ticks.iter().sum()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks_reads_utime_and_stime_after_a_name_with_spaces() {
        let text = "42 (tokio rt) S 1 2 3 4 5 6 7 8 9 10 250 31 0 0 20 0";
        assert_eq!(stat_ticks(text), Some(281));
    }

    #[test]
    fn this_process_can_be_read() {
        // The load tool runs where `/proc` exists; a silent `None` would blank the table.
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(process_ticks(std::process::id()).is_some());
            assert!(!thread_ticks(std::process::id()).is_empty());
            let (idle, all) = machine_ticks().expect("machine ticks");
            assert!(idle <= all && all > 0);
        }
    }

    #[test]
    fn windows_pool_and_a_missing_part_stays_missing() {
        let reading = |bursar, written| Reading {
            at: Instant::now(),
            bursar: Some(bursar),
            threads: HashMap::from([(7, ("writer".to_owned(), bursar / 2))]),
            written,
            database: None,
            own: Some(0),
            machine: Some((10, 100)),
        };
        let mut cost = Cost::window(&reading(100, Some(0)), &reading(300, Some(5000)), 100);
        assert_eq!(cost.bursar_us(), Some(200 * TICK_US / 100));
        assert_eq!(cost.written_per_op(), Some(50));
        cost.absorb(Cost::window(&reading(0, None), &reading(100, None), 100));
        assert_eq!(cost.bursar_us(), Some(300 * TICK_US / 200));
        assert_eq!(
            cost.written_per_op(),
            None,
            "a window without its writes blanks the sum"
        );
        assert_eq!(cost.busiest.as_ref().map(|b| b.1), Some(150));
        cost.absorb(Cost::default());
        assert_eq!(
            cost.bursar_us(),
            Some(300 * TICK_US / 200),
            "nothing metered, nothing added"
        );
    }
}
