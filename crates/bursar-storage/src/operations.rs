//! Idempotent work that leaves the database (a payment processor call, an email): the
//! storage half of the phase machinery (spec `idempotency.md` §1 "External calls", §3.4).
//!
//! A create that only touches the database stores its response in its own transaction
//! (`OrderStore::create_order_idempotent`). Work with a foreign side effect cannot: the
//! foreign call cannot join a local transaction. So the idempotency record becomes the
//! work's durable progress marker instead:
//!
//! - **Recovery points.** The record names the last phase that committed (`started`, then
//!   whatever the operation defines, finally `finished`) plus a JSON `state` of what the
//!   phases learnt (a processor's charge id). Each phase's local writes commit together
//!   with the move to its recovery point, so a crash leaves the record at a phase boundary
//!   and a rerun resumes there.
//! - **Lease with fencing.** Whoever drives the work holds a lease (`locked_until`) and a
//!   fencing token (`fence`, bumped at every takeover). Every write is conditional on the
//!   token, so a driver that stalled past its lease and was replaced can no longer write.
//! - **Outbound key.** Foreign calls carry `bursar-<record id>` ([`Lease::outbound_key`]):
//!   stable across reruns, never the client's raw key, unique across accounts.
//! - **Completer.** Records whose lease lapsed without finishing are claimed in batches
//!   ([`OperationStore::claim_abandoned`]) and driven to the end without a client retry.
//!
//! An unfinished record never expires; its retention starts when it finishes.

use async_trait::async_trait;
use bursar_domain::{AccountId, Timestamp};

use crate::money::Payment;
use crate::{IdempotencyClaim, IdempotencyRecord, Order, Result, StoredResponse, WriteMeta};

/// The recovery point of a record the work has just been claimed for.
pub const STARTED: &str = "started";
/// The recovery point of a record whose response is stored. Records of single-transaction
/// creates are born finished.
pub const FINISHED: &str = "finished";

/// `Fenced` unless a fenced write changed exactly the one record it names: for backends,
/// whose conditional `UPDATE`s report the rows they changed.
pub fn fenced_unless_one(rows: u64) -> Result<()> {
    if rows == 1 {
        Ok(())
    } else {
        Err(crate::StorageError::Fenced)
    }
}

/// The right to drive one record's work, until another driver takes it over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    pub record_id: i64,
    /// The fencing token: writes carrying an older one are refused (`StorageError::Fenced`).
    pub fence: i64,
}

impl Lease {
    /// The idempotency key for calls to third parties: derived from the record, so every
    /// rerun of the same work sends the same key, and no client key ever leaves Bursar.
    pub fn outbound_key(&self) -> String {
        format!("bursar-{}", self.record_id)
    }
}

/// A record whose work the caller now drives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeasedOperation {
    pub lease: Lease,
    pub account_id: AccountId,
    pub method: String,
    pub route: String,
    /// Where the work stands: [`STARTED`] or a point the operation committed.
    pub recovery_point: String,
    /// JSON the phases committed so far (`{}` at the start).
    pub state: String,
    /// The request as the client sent it, so the work can be finished without the client.
    pub request: Vec<u8>,
    /// The originating call, for events and logs written by a later driver.
    pub request_id: String,
    pub trace_id: String,
    /// How many leases have been granted on the record, this one included.
    pub attempts: i64,
    /// What [`OperationStore::begin_operation`] was asked to read along with the claim, as
    /// it stood then; `None` if nothing was asked or the lease came another way.
    pub prefetched: Option<Box<Prefetched>>,
}

/// A record the first phase of new work reads (the order a payment pays, the payment a
/// capture settles), named when the work is claimed: the store reads it in the claim's
/// transaction, so the phase does not wait for a read of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefetch {
    Order(i64),
    Payment(i64),
}

/// A [`Prefetch`] as read, scoped to the work's account: `None` inside if there is no such
/// record there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Prefetched {
    Order(i64, Option<Order>),
    Payment(i64, Option<Payment>),
}

impl Prefetched {
    /// The order `id` as prefetched: `Some(found)` if it was read, `None` if it was not
    /// asked for (read it yourself).
    pub fn order(prefetched: Option<&Prefetched>, id: i64) -> Option<Option<Order>> {
        match prefetched {
            Some(Prefetched::Order(read, found)) if *read == id => Some(found.clone()),
            _ => None,
        }
    }

    /// The payment `id` as prefetched (see [`Prefetched::order`]).
    pub fn payment(prefetched: Option<&Prefetched>, id: i64) -> Option<Option<Payment>> {
        match prefetched {
            Some(Prefetched::Payment(read, found)) if *read == id => Some(found.clone()),
            _ => None,
        }
    }
}

/// The step the first phase of new work would write, decided from the claimed work alone
/// (ADR 0007): the store writes it in the claim's transaction (SQLite: in the claim's
/// batch), so a payment goes from the key's claim to the processor with one step fewer.
/// Local work before the first foreign call may share one transaction (spec/idempotency.md,
/// atomic phases); the recovery point it records is the same.
#[derive(Debug, Clone)]
pub enum FirstStep {
    /// `MoneyStore::claim_order` with this step (an advance from [`STARTED`]).
    ClaimOrder {
        step: crate::money::Step,
        order_id: i64,
    },
}

/// Decides the [`FirstStep`] for work as claimed (its lease and what was prefetched), or
/// none. Pure and quick: it runs inside the claim's batch.
pub type FirstPhase = std::sync::Arc<dyn Fn(&LeasedOperation) -> Option<FirstStep> + Send + Sync>;

impl LeasedOperation {
    /// The work as it stands once `first` took.
    pub fn advanced_by(&mut self, first: &FirstStep) {
        let FirstStep::ClaimOrder { step, .. } = first;
        if let crate::money::StepEnd::Advance { to, .. } = &step.end {
            self.recovery_point = to.clone();
            self.state = step.state.clone();
        }
    }
}

/// The outcome of [`OperationStore::begin_operation`].
#[derive(Debug)]
pub enum Begun {
    /// New work, or work whose lease lapsed (a crashed or stalled driver): the caller drives
    /// it from `recovery_point`.
    Leased(LeasedOperation),
    /// The key holds a record the caller must not drive: finished (replay it), in flight
    /// under a live lease (409), or made by a different request (422).
    Existing(IdempotencyRecord),
}

#[async_trait]
pub trait OperationStore: Send + Sync {
    /// Claims `claim.key` for new work at [`STARTED`] with a lease until `lease_until`, or
    /// takes over the unfinished record of the same request whose lease has lapsed (bumping
    /// the fence). A finished record that expired counts as absent. `claim.expires_at` is not
    /// used: retention starts at [`OperationStore::finish_operation`]. A lease comes with
    /// `prefetch` read as it stood at the claim. With `first`, a lease's first step is
    /// decided and written too if it may be ([`FirstStep`]); the lease then comes back at
    /// the step's recovery point, or, if the step was refused, at the claim's, unchanged
    /// (the phase then runs as without it, and answers the refusal itself).
    async fn begin_operation(
        &self,
        meta: &WriteMeta,
        claim: &IdempotencyClaim,
        request: &[u8],
        lease_until: Timestamp,
        prefetch: Option<Prefetch>,
        first: Option<FirstPhase>,
    ) -> Result<Begun>;

    /// Commits a phase: moves the record from `from` to the recovery point `to`, replaces
    /// its state and renews the lease. `Fenced` if the lease was taken over or the record is
    /// no longer at `from`.
    async fn advance_operation(
        &self,
        lease: Lease,
        from: &str,
        to: &str,
        state: &str,
        now: Timestamp,
        lease_until: Timestamp,
    ) -> Result<()>;

    /// Stores the final response and releases the lease; the record is then an ordinary
    /// finished record, replayed until `expires_at`. `Fenced` as for `advance_operation`.
    async fn finish_operation(
        &self,
        lease: Lease,
        state: &str,
        response: &StoredResponse,
        now: Timestamp,
        expires_at: Timestamp,
    ) -> Result<()>;

    /// Gives the lease up early (the work failed in a retryable way), so that a client retry
    /// resumes at once instead of waiting out the lease. `Fenced` if it was taken over.
    async fn release_operation(&self, lease: Lease, now: Timestamp) -> Result<()>;

    /// Takes over up to `limit` unfinished records whose lease has lapsed at `now` and that
    /// have not run since `idle_since`, oldest first, each with a new lease until
    /// `lease_until`. Two completers never get the same record.
    async fn claim_abandoned(
        &self,
        now: Timestamp,
        idle_since: Timestamp,
        lease_until: Timestamp,
        limit: u32,
    ) -> Result<Vec<LeasedOperation>>;
}
