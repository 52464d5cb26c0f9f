//! The vendor's limit at the vendor's clock, fleet-wide (docs/contract.md §4): the last gate a
//! call passes before it leaves, shared by every replica through Redis (`lua/depart.lua`,
//! `lua/arrived.lua`). The rule and why it holds: `fairness::arrivals`, its counterpart in
//! one process.

use std::time::Duration;

use super::{Fleet, FleetError, micros, scripts};

/// One call asking to leave.
#[derive(Debug, Clone)]
pub struct DepartRequest<'a> {
    /// The account.
    pub account: &'a str,
    /// Calls per window at the API.
    pub limit: usize,
    /// The window.
    pub window: Duration,
    /// Until when, from now, the API may see a call that gets no answer: the request timeout,
    /// plus the most the caller lets pass between this answer and sending.
    pub unanswered: Duration,
}

/// The gate's answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Gate {
    /// The call may leave; it is recorded under its member (see [`Fleet::arrived`]).
    Open,
    /// Enough recorded calls leave the window (or the account's pause ends) after this long.
    Closed(Duration),
    /// A call still on the wire stands in the way: its answer frees the gate, at the latest
    /// after this long.
    OnTheWire(Duration),
}

impl Fleet {
    /// Asks whether a call of `request.account` may leave now, timed by Redis; recorded as
    /// `member` if it may. The same member, asked again (after an answer that timed out, say),
    /// is let through once, not counted twice.
    pub async fn depart(
        &self,
        request: &DepartRequest<'_>,
        member: &str,
    ) -> Result<Gate, FleetError> {
        let mut invocation = scripts::DEPART.prepare_invoke();
        invocation
            .key(self.key("arrivals", request.account))
            .key(self.key("pause", request.account))
            .arg(request.limit)
            .arg(micros(request.window))
            .arg(micros(request.unanswered))
            .arg(member);
        let (state, delay): (i64, i64) = self.invoke_acknowledged("depart", &invocation).await?;
        let delay = Duration::from_micros(u64::try_from(delay).unwrap_or(0));
        match state {
            1 => Ok(Gate::Open),
            0 => Ok(Gate::Closed(delay)),
            2 => Ok(Gate::OnTheWire(delay)),
            other => Err(FleetError::Unexpected {
                op: "depart",
                what: other.to_string(),
            }),
        }
    }

    /// The answer of the call recorded as `member` came back: the API saw it by now.
    pub async fn arrived(&self, account: &str, member: &str) -> Result<(), FleetError> {
        let mut invocation = scripts::ARRIVED.prepare_invoke();
        invocation.key(self.key("arrivals", account)).arg(member);
        let _: i64 = self.invoke("arrived", &invocation).await?;
        Ok(())
    }

    /// The call recorded as `member` was not sent after all: it counts for nothing.
    pub async fn unsent(&self, account: &str, member: &str) -> Result<(), FleetError> {
        // The same removal as a start given back, on the arrivals instead of the log.
        let mut invocation = scripts::UNRESERVE.prepare_invoke();
        invocation.key(self.key("arrivals", account)).arg(member);
        let _: i64 = self.invoke("unsent", &invocation).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
