//! Once-only across the fleet: a claim on a command for a lease, renewed while it runs, and
//! its terminal event recorded for every replica (`lua/claim.lua`, `renew.lua`,
//! `release.lua`, `record.lua`).

use std::time::Duration;

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
        self.claim_as(command_id, false).await
    }

    /// [`Fleet::claim`] for a command replayed from the dead-letter queue: only a recorded
    /// `transfer.succeeded` answers it; another recorded outcome is passed over, so the
    /// command is processed again and [`Fleet::record`] replaces that outcome.
    pub async fn claim_replayed(&self, command_id: &str) -> Result<Claim, FleetError> {
        self.claim_as(command_id, true).await
    }

    async fn claim_as(&self, command_id: &str, replayed: bool) -> Result<Claim, FleetError> {
        let mut invocation = scripts::CLAIM.prepare_invoke();
        invocation
            .key(self.key("outcome", command_id))
            .key(self.key("claim", command_id))
            .key(self.key("wire", command_id))
            .arg(&self.claimant)
            .arg(millis(self.lease))
            .arg(if replayed { "1" } else { "0" });
        let (state, detail): (String, Vec<u8>) = self.invoke("claim", &invocation).await?;
        match state.as_str() {
            "done" => stored::decode(command_id, &detail)
                .map(Claim::Done)
                .ok_or_else(|| FleetError::Unexpected {
                    op: "claim",
                    what: "an outcome that does not read back".into(),
                }),
            "mine" => Ok(Claim::Mine),
            "taken_over" => Ok(Claim::TakenOver),
            "held" => {
                let ms = std::str::from_utf8(&detail)
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

    /// Extends our claim; false if it is no longer ours.
    pub async fn renew(&self, command_id: &str) -> Result<bool, FleetError> {
        let mut invocation = scripts::RENEW.prepare_invoke();
        invocation
            .key(self.key("claim", command_id))
            .arg(&self.claimant)
            .arg(millis(self.lease));
        let renewed: i64 = self.invoke("renew", &invocation).await?;
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
        let _: i64 = self.invoke("record", &invocation).await?;
        Ok(())
    }
}
