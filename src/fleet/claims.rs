//! Once-only across the fleet: a claim on a command for a lease (with its first start from its
//! account's budget, in the same round trip), renewed while it runs, and its terminal event
//! recorded for every replica (`lua/claim.lua`, `renew.lua`, `release.lua`, `record.lua`).

use std::time::Duration;

use super::pacing::{Reservation, StartRequest, reservation};
use super::{Fleet, FleetError, millis, scripts, stored};
use crate::contract::event::Event;

/// The outcome of a claim.
#[derive(Debug)]
pub enum Claim {
    /// Completed somewhere in the fleet: its recorded event.
    Done(Event),
    /// Ours.
    Mine,
    /// Ours, taken over from a replica that is gone and may have had a call on the wire.
    TakenOver,
    /// Another live replica holds it, for about this long still.
    Held(Duration),
}

impl Fleet {
    /// One claim attempt: the recorded outcome, the claim, or who holds it.
    pub async fn claim(&self, command_id: &str) -> Result<Claim, FleetError> {
        Ok(self.claim_as(command_id, false, None).await?.0)
    }

    /// [`Fleet::claim`] for a command replayed from the dead-letter queue: only a recorded
    /// `transfer.succeeded` answers it; another recorded outcome is passed over, so the
    /// command is processed again and [`Fleet::record`] replaces that outcome.
    pub async fn claim_replayed(&self, command_id: &str) -> Result<Claim, FleetError> {
        Ok(self.claim_as(command_id, true, None).await?.0)
    }

    /// [`Fleet::claim`] (or [`Fleet::claim_replayed`]) and, when the claim is ours, the
    /// command's first start from its account's budget, as [`Fleet::reserve`] would answer,
    /// in the same round trip. No start is asked when the answer is `Done` or `Held`.
    pub async fn claim_with_start(
        &self,
        command_id: &str,
        replayed: bool,
        start: &StartRequest,
    ) -> Result<(Claim, Option<Reservation>), FleetError> {
        self.claim_as(command_id, replayed, Some(start)).await
    }

    async fn claim_as(
        &self,
        command_id: &str,
        replayed: bool,
        start: Option<&StartRequest>,
    ) -> Result<(Claim, Option<Reservation>), FleetError> {
        let mut invocation = scripts::CLAIM.prepare_invoke();
        invocation
            .key(self.key("outcome", command_id))
            .key(self.key("claim", command_id))
            .key(self.key("wire", command_id));
        if let Some(start) = start {
            invocation
                .key(self.key("pace", &start.account))
                .key(self.key("pause", &start.account));
        }
        invocation
            .arg(&self.claimant)
            .arg(millis(self.lease))
            .arg(if replayed { "1" } else { "0" });
        let member = start.map(|start| self.start_args(&mut invocation, start));
        let (state, detail, started, delay): (String, Vec<u8>, i64, i64) =
            self.invoke_acknowledged("claim", &invocation).await?;
        let claim = read_claim(command_id, &state, &detail)?;
        let reservation = match (start, member) {
            (Some(start), Some(member)) if started >= 0 => {
                Some(reservation("claim", started, delay, start, member)?)
            }
            _ => None,
        };
        Ok((claim, reservation))
    }

    /// Extends our claim; false if it is no longer ours.
    pub async fn renew(&self, command_id: &str) -> Result<bool, FleetError> {
        let mut invocation = scripts::RENEW.prepare_invoke();
        invocation
            .key(self.key("claim", command_id))
            .arg(&self.claimant)
            .arg(millis(self.lease));
        let renewed: i64 = self.invoke_acknowledged("renew", &invocation).await?;
        Ok(renewed == 1)
    }

    /// Gives our claim on `command_id` up (the command goes back to the queue unfinished).
    pub async fn release(&self, command_id: &str) -> Result<(), FleetError> {
        let mut invocation = scripts::RELEASE.prepare_invoke();
        invocation
            .key(self.key("claim", command_id))
            .arg(&self.claimant);
        let _: i64 = self.invoke("release", &invocation).await?;
        Ok(())
    }

    /// Renews our claim on `command_id` every third of the lease, for as long as it is
    /// polled: the caller races it against the command, and it never ends by itself.
    pub async fn keep_claim(&self, command_id: &str) -> std::convert::Infallible {
        let every = self.lease / 3;
        loop {
            tokio::time::sleep(every).await;
            match self.renew(command_id).await {
                Ok(true) => {}
                Ok(false) => {
                    tracing::error!(
                        claimant = %self.claimant,
                        "the claim on this command was lost; another replica may call the API for it too"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "could not renew the claim"),
            }
        }
    }

    /// Records the terminal event of `command_id` for the fleet and lets the claim go.
    pub async fn record(&self, command_id: &str, event: &Event) -> Result<(), FleetError> {
        let mut invocation = scripts::RECORD.prepare_invoke();
        invocation
            .key(self.key("outcome", command_id))
            .key(self.key("claim", command_id))
            .key(self.key("wire", command_id))
            .arg(stored::encode(event))
            .arg(millis(self.outcome_ttl));
        let _: i64 = self.invoke_acknowledged("record", &invocation).await?;
        Ok(())
    }
}

/// `claim.lua`'s answer, read.
fn read_claim(command_id: &str, state: &str, detail: &[u8]) -> Result<Claim, FleetError> {
    match state {
        "done" => stored::decode(command_id, detail)
            .map(Claim::Done)
            .ok_or_else(|| FleetError::Unexpected {
                op: "claim",
                what: "an outcome that does not read back".into(),
            }),
        "mine" => Ok(Claim::Mine),
        "taken_over" => Ok(Claim::TakenOver),
        "held" => {
            let ms = std::str::from_utf8(detail)
                .ok()
                .and_then(|s| s.parse::<i64>().ok())
                .unwrap_or(0);
            Ok(Claim::Held(Duration::from_millis(
                u64::try_from(ms).unwrap_or(0),
            )))
        }
        other => Err(FleetError::Unexpected {
            op: "claim",
            what: other.to_owned(),
        }),
    }
}
