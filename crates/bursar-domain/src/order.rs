//! The order lifecycle as a state machine. Storage applies a transition with one conditional
//! `UPDATE … WHERE status IN (sources)`, so the rule here is also the concurrency guard.

use serde::{Deserialize, Serialize};

/// Where an order is in its life. `canceled` and `refunded` are terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Pending,
    Paid,
    Refunded,
    Canceled,
}

/// Something that moves an order to another status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderAction {
    /// The order's payment was captured in full.
    Pay,
    /// The captured payment was refunded in full.
    Refund,
    /// The customer or merchant abandoned the order before payment.
    Cancel,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 4] = [
        OrderStatus::Pending,
        OrderStatus::Paid,
        OrderStatus::Refunded,
        OrderStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Paid => "paid",
            OrderStatus::Refunded => "refunded",
            OrderStatus::Canceled => "canceled",
        }
    }

    pub fn parse(s: &str) -> Option<OrderStatus> {
        OrderStatus::ALL.into_iter().find(|st| st.as_str() == s)
    }

    /// The status `action` leads to from `self`, or `None` if the transition is illegal.
    pub fn apply(self, action: OrderAction) -> Option<OrderStatus> {
        use OrderAction::*;
        use OrderStatus::*;
        match (self, action) {
            (Pending, Pay) => Some(Paid),
            (Pending, Cancel) => Some(Canceled),
            (Paid, Refund) => Some(Refunded),
            _ => None,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, OrderStatus::Refunded | OrderStatus::Canceled)
    }
}

impl OrderAction {
    /// Statuses from which this action is legal; storage puts them in the `WHERE` clause.
    pub fn sources(self) -> Vec<OrderStatus> {
        OrderStatus::ALL
            .into_iter()
            .filter(|s| s.apply(self).is_some())
            .collect()
    }

    /// The status every legal source moves to (each action has exactly one target).
    pub fn target(self) -> OrderStatus {
        match self {
            OrderAction::Pay => OrderStatus::Paid,
            OrderAction::Refund => OrderStatus::Refunded,
            OrderAction::Cancel => OrderStatus::Canceled,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legal_and_illegal_transitions() {
        use OrderAction::*;
        use OrderStatus::*;
        assert_eq!(Pending.apply(Cancel), Some(Canceled));
        assert_eq!(Pending.apply(Pay), Some(Paid));
        assert_eq!(Paid.apply(Refund), Some(Refunded));
        assert_eq!(Paid.apply(Cancel), None);
        assert_eq!(Canceled.apply(Cancel), None);
        assert_eq!(Canceled.apply(Pay), None);
        assert_eq!(Refunded.apply(Refund), None);
        assert!(Canceled.is_terminal() && Refunded.is_terminal() && !Pending.is_terminal());
    }

    #[test]
    fn sources_and_targets_agree_with_apply() {
        for action in [OrderAction::Pay, OrderAction::Refund, OrderAction::Cancel] {
            for s in action.sources() {
                assert_eq!(s.apply(action), Some(action.target()));
            }
        }
        assert_eq!(OrderAction::Cancel.sources(), vec![OrderStatus::Pending]);
    }

    #[test]
    fn status_strings_round_trip() {
        for s in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(OrderStatus::parse("PAID"), None);
    }
}
