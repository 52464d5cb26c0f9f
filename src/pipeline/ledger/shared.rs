//! The fleet's ledger in Redis: a claim per command with a lease (docs/fleet.md), renewed
//! while the command runs, and its outcome recorded for every replica to answer from.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::BoxFuture;

use super::{Claimed, Holds, Ledger};
use crate::contract::event::Event;
use crate::fairness::start::FirstStart;
use crate::fleet::{Claim, Fleet, StartRequest};
use crate::ops::metrics::Metrics;
use crate::shutdown::{Abandoned, Shutdown};

/// The fleet's claims and outcomes.
#[derive(Debug, Clone)]
pub struct SharedLedger {
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
}

impl SharedLedger {
    /// The ledger of `fleet`.
    pub fn new(fleet: Arc<Fleet>, metrics: Arc<Metrics>) -> Self {
        Self { fleet, metrics }
    }

    /// One claim, and the start asked with it: one round trip. Waits while Redis does not
    /// answer.
    async fn ask(
        &self,
        command_id: &str,
        replayed: bool,
        start: Option<&StartRequest>,
        shutdown: &Shutdown,
    ) -> Result<(Claim, Option<FirstStart>), Abandoned> {
        let fleet = &self.fleet;
        let (asked_at, claim, first) = fleet
            .until_answered(shutdown, || async {
                let asked_at = Instant::now();
                let (claim, first) = match start {
                    Some(start) => fleet.claim_with_start(command_id, replayed, start).await?,
                    None if replayed => (fleet.claim_replayed(command_id).await?, None),
                    None => (fleet.claim(command_id).await?, None),
                };
                Ok((asked_at, claim, first))
            })
            .await
            .ok_or(Abandoned)?;
        let answered_at = Instant::now();
        let first = first.map(|answer| FirstStart {
            asked_at,
            answered_at,
            answer,
        });
        Ok((claim, first))
    }
}

impl Ledger for SharedLedger {
    fn claim<'a>(
        &'a self,
        command_id: &'a str,
        replayed: bool,
        start: Option<StartRequest>,
        shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, Result<Claimed, Abandoned>> {
        async move {
            loop {
                let (claim, first) = self
                    .ask(command_id, replayed, start.as_ref(), shutdown)
                    .await?;
                let left = match claim {
                    Claim::Done(event) => return Ok(Claimed::Done(event)),
                    Claim::Mine => return Ok(Claimed::Ours(first)),
                    Claim::TakenOver => {
                        self.metrics.fleet_claims_taken_over.inc();
                        tracing::warn!(
                            "took over a command whose replica is gone; a call it made may have reached the API"
                        );
                        return Ok(Claimed::Ours(first));
                    }
                    Claim::Held(left) => left,
                };
                self.metrics.fleet_claim_waits.inc();
                tracing::debug!(?left, "another replica holds this command; waiting for it");
                let wait = left.clamp(Duration::from_millis(50), Duration::from_millis(500));
                shutdown.sleep(wait).await?;
            }
        }
        .boxed()
    }

    fn keep<'a>(&'a self, command_id: &'a str) -> BoxFuture<'a, Infallible> {
        self.fleet.keep_claim(command_id).boxed()
    }

    fn release<'a>(&'a self, command_id: &'a str) -> BoxFuture<'a, ()> {
        async move {
            if let Err(e) = self.fleet.release(command_id).await {
                tracing::warn!(error = %e, "could not give the claim up; it lapses after the lease");
            }
        }
        .boxed()
    }

    /// Without Redis the command waits here, like everything that needs it, until the grace
    /// runs out: then it is published all the same.
    fn record<'a>(
        &'a self,
        command_id: &'a str,
        event: &'a Event,
        shutdown: &'a Shutdown,
    ) -> BoxFuture<'a, ()> {
        async move {
            let fleet = &self.fleet;
            let recorded = fleet
                .until_answered(shutdown, || fleet.record(command_id, event))
                .await;
            if recorded.is_none() {
                tracing::warn!(
                    "the grace ran out before the fleet could record the outcome; publishing it all the same"
                );
            }
        }
        .boxed()
    }

    /// A command that began under holds that lapsed since (a pause past `fleet.member_ttl`)
    /// has had its delivery returned to the queues' next holder: it must not call, even once
    /// this replica holds queues again.
    fn holds(&self) -> Holds<'_> {
        let term = self.fleet.hold_term();
        Box::new(move || self.fleet.holds_valid_in(term))
    }
}
