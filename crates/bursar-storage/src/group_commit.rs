//! Group commit, shared by the backends: for creates, and (SQLite) for the steps of phased
//! work.
//!
//! A write is queued; a collector takes every write waiting (up to `max_batch`, all of one
//! kind) and hands them to the backend's [`GroupWriter`], which writes them — each with its
//! outbox event — in one transaction and one round trip. Under light load a batch holds one
//! create, so nothing ever waits for company; under heavy load the per-create cost of a
//! transaction and of the hand-offs to the database is shared (docs/PERFORMANCE.md).
//!
//! Each caller still gets its own outcome: a create that matches no row (an unknown customer)
//! is answered with [`Create::missing`], and if a batch fails as a whole, each of its creates
//! is written again alone, so one bad create never fails its neighbours.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::{Semaphore, mpsc, oneshot};

use bursar_domain::OrderStatus;

use crate::{
    IdempotencyClaim, NewCustomer, NewOrder, Order, OrderResponder, StorageError, StoredResponse,
    WriteMeta, decode,
};

/// What one queued create inserts, in the form both backends bind.
#[derive(Clone)]
pub enum Create {
    Customer {
        name: Option<String>,
        email: Option<String>,
        metadata_json: String,
    },
    Order {
        customer_id: i64,
        amount_minor: i64,
        currency: &'static str,
        description: Option<String>,
        metadata_json: String,
        /// Under an `Idempotency-Key`: claimed, and answered, in the batch's transaction.
        keyed: Option<Keyed>,
    },
}

/// The idempotency side of a keyed create: the claim, and how to render the response that
/// is stored with it before the commit.
#[derive(Clone)]
pub struct Keyed {
    pub claim: IdempotencyClaim,
    pub respond: OrderResponder,
}

/// What [`Create::bound_bytes`] counts for the response of a keyed create, which is rendered
/// only when the batch is written (an order's 201 with its headers is about this size).
const RESPONSE_ALLOWANCE: usize = 480;

/// What one create came to, as a backend reports it.
pub enum Written<R> {
    /// Inserted; the row as returned.
    Row(R),
    /// Nothing inserted ([`Create::missing`] says why); for a keyed create this is not used.
    Missing,
    /// A keyed create ran and this response was stored with it.
    Stored(StoredResponse),
    /// A keyed create found its key already claimed: nothing was written; the caller reads
    /// the record (after the claimer commits) instead.
    Conflict,
}

impl<R> Written<R> {
    /// Whether the write took effect: a row inserted or a keyed create's response stored.
    pub fn took(&self) -> bool {
        matches!(self, Written::Row(_) | Written::Stored(_))
    }
}

impl Create {
    pub fn customer(new: NewCustomer) -> Create {
        Create::Customer {
            name: new.name,
            email: new.email,
            metadata_json: decode::metadata_json(&new.metadata),
        }
    }

    pub fn order(new: NewOrder, keyed: Option<Keyed>) -> Create {
        Create::Order {
            customer_id: new.customer_id,
            amount_minor: new.amount.minor,
            currency: new.amount.currency.code(),
            description: new.description,
            metadata_json: decode::metadata_json(&new.metadata),
            keyed,
        }
    }

    /// The idempotency side, if this is a keyed create.
    pub fn keyed(&self) -> Option<&Keyed> {
        match self {
            Create::Order { keyed, .. } => keyed.as_ref(),
            Create::Customer { .. } => None,
        }
    }

    /// The order this create inserts, as the record it becomes once written with `id` at
    /// `meta.at`: for backends that draw the id up front and render a keyed create's response
    /// before the write, so claim, insert, event and response go in one statement.
    pub fn order_record(&self, meta: &WriteMeta, id: i64) -> Result<Order, StorageError> {
        let Create::Order {
            customer_id,
            amount_minor,
            currency,
            description,
            metadata_json,
            ..
        } = self
        else {
            return Err(StorageError::Internal("not an order create".into()));
        };
        Ok(Order {
            id,
            account_id: meta.account_id,
            customer_id: *customer_id,
            amount: decode::money(*amount_minor, currency)?,
            status: OrderStatus::Pending,
            description: description.clone(),
            metadata: decode::metadata(metadata_json)?,
            version: 1,
            created_at: meta.at,
            updated_at: meta.at,
        })
    }

    /// The outcome of a create whose insert produced no row.
    pub fn missing(&self) -> StorageError {
        match self {
            Create::Order { .. } => StorageError::UnknownCustomer,
            Create::Customer { .. } => {
                StorageError::Internal("customer insert returned no row".into())
            }
        }
    }

    /// A create's reported outcome, with "nothing inserted" turned into its error: what a
    /// creates writer's [`GroupWriter::settle`] does.
    pub fn settle<R>(&self, outcome: Written<R>) -> Result<Written<R>, StorageError> {
        match outcome {
            Written::Missing => Err(self.missing()),
            written => Ok(written),
        }
    }
}

impl Batchable for Create {
    /// Only creates of one kind share a batch (one statement shape per batch).
    fn same_kind(&self, other: &Create) -> bool {
        std::mem::discriminant(self) == std::mem::discriminant(other)
            && self.keyed().is_some() == other.keyed().is_some()
    }

    /// Its text plus an allowance per column and, for a keyed create, for its claim and the
    /// response that will be rendered for it.
    fn bound_bytes(&self) -> usize {
        // A length prefix, or a fixed-width number.
        const PER_COLUMN: usize = 8;
        // The write's request id and trace id, bound with every create.
        const META: usize = 96;
        let len = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        match self {
            Create::Customer {
                name,
                email,
                metadata_json,
            } => META + 7 * PER_COLUMN + len(name) + len(email) + metadata_json.len(),
            Create::Order {
                description,
                metadata_json,
                keyed,
                ..
            } => {
                let own = META + 9 * PER_COLUMN + len(description) + metadata_json.len();
                own + keyed.as_ref().map_or(0, |k| {
                    12 * PER_COLUMN
                        + k.claim.key.len()
                        + k.claim.route.len()
                        + k.claim.fingerprint.len()
                        + RESPONSE_ALLOWANCE
                })
            }
        }
    }
}

/// What a batch carries.
pub trait Batchable: Clone + Send + Sync + 'static {
    /// Only writes of one kind share a batch: one statement shape per batch, so the
    /// backend's prepared statements are reused.
    fn same_kind(&self, other: &Self) -> bool;
    /// Roughly how many bytes this write binds as statement parameters. Lets a backend
    /// bound the size of one statement.
    fn bound_bytes(&self) -> usize;
}

/// A backend's way of writing a batch in one transaction.
#[async_trait]
pub trait GroupWriter: Send + Sync + 'static {
    type Item: Batchable;
    type Out: Send + 'static;
    /// The `writer` label of the collector's metrics (`creates`, `steps`): how full its
    /// batches are, how long a write waits for one, and how long one takes to write, so an
    /// operator can tell a saturated writer from an idle one.
    const NAME: &'static str;
    /// Writes every item in one transaction; `Ok` holds one outcome per item, in order.
    /// `Err` means nothing was committed; each item is then written again alone.
    async fn write(
        &self,
        batch: &[(WriteMeta, Self::Item)],
    ) -> Result<Vec<Self::Out>, StorageError>;
    /// What the caller of [`GroupCommit::submit`] gets for an item's outcome.
    fn settle(item: &Self::Item, out: Self::Out) -> Result<Self::Out, StorageError> {
        let _ = item;
        Ok(out)
    }
    /// Whether `out` says the item took effect in its batch, rather than writing nothing
    /// (fenced, refused) or being handed back to be written alone. Counted by
    /// [`GroupCommit::taken_together`].
    fn took(out: &Self::Out) -> bool {
        let _ = out;
        true
    }
}

struct Job<W: GroupWriter> {
    meta: WriteMeta,
    write: W::Item,
    reply: oneshot::Sender<Result<W::Out, StorageError>>,
    queued: Instant,
}

/// The queue in front of a [`GroupWriter`].
pub struct GroupCommit<W: GroupWriter> {
    jobs: mpsc::Sender<Job<W>>,
    together: Arc<AtomicU64>,
}

impl<W: GroupWriter> GroupCommit<W> {
    /// Starts the collector. At most `concurrency` batches are written at once (1 for SQLite's
    /// single writer; a few for PostgreSQL, where fuller batches measured faster). A batch
    /// holds at most `max_batch` writes and, beyond its first, `max_bytes` of
    /// [`Batchable::bound_bytes`].
    pub fn spawn(
        writer: W,
        max_batch: usize,
        max_bytes: usize,
        concurrency: usize,
    ) -> GroupCommit<W> {
        let (jobs, rx) = mpsc::channel(4 * max_batch.max(1));
        let together = Arc::new(AtomicU64::new(0));
        tokio::spawn(collect(
            Arc::new(writer),
            rx,
            Limits {
                creates: max_batch.max(1),
                bytes: max_bytes,
            },
            concurrency.max(1),
            together.clone(),
        ));
        GroupCommit { jobs, together }
    }

    /// How many writes so far took effect ([`GroupWriter::took`]) in a batch that held more
    /// than one. The outcomes of writes made together are the same whether they shared a
    /// transaction or each fell back to being written alone, so a test that means to cover
    /// the shared path reads this to show that it ran.
    pub fn taken_together(&self) -> u64 {
        self.together.load(Ordering::Relaxed)
    }

    /// Queues one write and waits until it is committed (or refused), with its outcome as
    /// the writer's [`GroupWriter::settle`] gives it.
    pub async fn submit(&self, meta: WriteMeta, write: W::Item) -> Result<W::Out, StorageError> {
        let (reply, answer) = oneshot::channel();
        let gone = || StorageError::Unavailable("the writer has stopped".into());
        self.jobs
            .send(Job {
                meta,
                write,
                reply,
                queued: Instant::now(),
            })
            .await
            .map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// How big one batch may grow.
struct Limits {
    creates: usize,
    bytes: usize,
}

async fn collect<W: GroupWriter>(
    writer: Arc<W>,
    mut rx: mpsc::Receiver<Job<W>>,
    limits: Limits,
    concurrency: usize,
    together: Arc<AtomicU64>,
) {
    let slots = Arc::new(Semaphore::new(concurrency));
    // Writes that arrived but have not been written yet, oldest first. Each kind is batched
    // on its own, so when kinds interleave in the queue (the key claim, order claim and
    // payment of different operations), a batch takes every waiting write of its kind
    // instead of stopping at the first of another.
    let mut waiting: VecDeque<Job<W>> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match rx.recv().await {
                Some(job) => waiting.push_back(job),
                None => return, // every sender is gone: the store was dropped
            }
        }
        // Wait for a free writer before draining, so writes that arrive meanwhile join in.
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        // Each submitter waits for its write, so what waits is bounded by the submitters.
        while let Ok(job) = rx.try_recv() {
            waiting.push_back(job);
        }
        // The oldest write sets the batch's kind, so no kind waits behind another for long.
        let Some(first) = waiting.pop_front() else {
            continue;
        };
        let mut bytes = first.write.bound_bytes();
        let mut batch = vec![first];
        let mut rest = VecDeque::with_capacity(waiting.len());
        for job in waiting.drain(..) {
            let size = job.write.bound_bytes();
            if batch.len() < limits.creates
                && job.write.same_kind(&batch[0].write)
                && bytes + size <= limits.bytes
            {
                bytes += size;
                batch.push(job);
            } else {
                rest.push_back(job);
            }
        }
        waiting = rest;
        let (writer, together) = (writer.clone(), together.clone());
        tokio::spawn(async move {
            run(writer.as_ref(), batch, &together).await;
            drop(permit);
        });
    }
}

async fn run<W: GroupWriter>(writer: &W, batch: Vec<Job<W>>, together: &AtomicU64) {
    let started = Instant::now();
    let waited = metrics::histogram!("group_commit_wait_seconds", "writer" => W::NAME);
    for job in &batch {
        waited.record(started.duration_since(job.queued));
    }
    let size = u32::try_from(batch.len()).unwrap_or(u32::MAX);
    metrics::histogram!("group_commit_batch_size", "writer" => W::NAME).record(size);
    let inputs: Vec<_> = batch
        .iter()
        .map(|j| (j.meta.clone(), j.write.clone()))
        .collect();
    let written = writer.write(&inputs).await;
    metrics::histogram!("group_commit_write_seconds", "writer" => W::NAME)
        .record(started.elapsed());
    match written {
        Ok(rows) => {
            if batch.len() > 1 {
                let took = rows.iter().filter(|out| W::took(out)).count();
                together.fetch_add(u64::try_from(took).unwrap_or(u64::MAX), Ordering::Relaxed);
            }
            answer(batch, rows)
        }
        Err(e) if batch.len() == 1 => {
            if let Some(job) = batch.into_iter().next() {
                let _ = job.reply.send(Err(e));
            }
        }
        Err(_) => {
            for (job, input) in batch.into_iter().zip(inputs) {
                let outcome = match writer.write(std::slice::from_ref(&input)).await {
                    Ok(mut rows) => settle::<W>(rows.pop(), &job.write),
                    Err(e) => Err(e),
                };
                let _ = job.reply.send(outcome);
            }
        }
    }
}

fn answer<W: GroupWriter>(batch: Vec<Job<W>>, rows: Vec<W::Out>) {
    let mut rows = rows.into_iter();
    for job in batch {
        let outcome = settle::<W>(rows.next(), &job.write);
        let _ = job.reply.send(outcome);
    }
}

fn settle<W: GroupWriter>(
    outcome: Option<W::Out>,
    write: &W::Item,
) -> Result<W::Out, StorageError> {
    match outcome {
        Some(out) => W::settle(write, out),
        None => Err(StorageError::Internal(
            "a batch reported no outcome for a write".into(),
        )),
    }
}
