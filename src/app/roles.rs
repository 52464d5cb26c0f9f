//! Alone or in a fleet, decided here once: the two roles the fleet's Redis plays for a
//! command, each with an implementation for a worker alone and one for a fleet. Nothing past
//! this point asks which it has.

use std::sync::Arc;

use super::Common;
use crate::fairness::budget::{OwnBudget, RateBudget, SharedBudget};
use crate::pipeline::ledger::{Ledger, SharedLedger, Unshared};

impl Common {
    /// The accounts' rate budgets (reserve a start, pause, pass the last gate): the fleet's in
    /// Redis, or this process's own.
    pub(super) fn budget(&self) -> Arc<dyn RateBudget> {
        match &self.fleet {
            Some(fleet) => Arc::new(SharedBudget::new(fleet.clone())),
            None => Arc::new(OwnBudget),
        }
    }

    /// The ledger of claims and outcomes (claim, keep, record, release): the fleet's, or
    /// nobody's beyond this process's memory.
    pub(super) fn ledger(&self) -> Arc<dyn Ledger> {
        match &self.fleet {
            Some(fleet) => Arc::new(SharedLedger::new(fleet.clone(), self.metrics.clone())),
            None => Arc::new(Unshared),
        }
    }
}
