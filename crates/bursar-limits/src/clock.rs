//! The local store's clock: monotonic microseconds since the limiter was built. Monotonic
//! because a wall-clock step must never refund or steal burst; injectable so tests can move time
//! exactly instead of sleeping.

#[cfg(test)]
use std::sync::Arc;
#[cfg(test)]
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Where the local store and the fallback breaker read "now" from.
#[derive(Debug, Clone)]
pub(crate) enum Clock {
    /// Production: microseconds elapsed since this `Instant`.
    Monotonic(Instant),
    /// Tests: a value the test sets.
    #[cfg(test)]
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// A monotonic clock starting at 0 now.
    pub(crate) fn monotonic() -> Clock {
        Clock::Monotonic(Instant::now())
    }

    /// Microseconds on this clock.
    pub(crate) fn now_us(&self) -> u64 {
        match self {
            Clock::Monotonic(start) => {
                u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
            }
            #[cfg(test)]
            Clock::Manual(value) => value.load(Ordering::SeqCst),
        }
    }
}

/// A clock a test moves by hand.
#[cfg(test)]
#[derive(Debug, Clone, Default)]
pub(crate) struct ManualClock(pub(crate) Arc<AtomicU64>);

#[cfg(test)]
impl ManualClock {
    /// A manual clock at `start_us`.
    pub(crate) fn at(start_us: u64) -> ManualClock {
        ManualClock(Arc::new(AtomicU64::new(start_us)))
    }

    /// Moves the clock forward.
    pub(crate) fn advance(&self, by_us: u64) {
        self.0.fetch_add(by_us, Ordering::SeqCst);
    }

    /// Sets the clock.
    pub(crate) fn set(&self, to_us: u64) {
        self.0.store(to_us, Ordering::SeqCst);
    }

    /// Reads the clock.
    pub(crate) fn now_us(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }

    /// The `Clock` that reads this manual clock.
    pub(crate) fn clock(&self) -> Clock {
        Clock::Manual(Arc::clone(&self.0))
    }
}
