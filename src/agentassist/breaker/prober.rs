//! The breaker's probe: one request that cannot transfer anything, sent while the breaker is
//! open to learn whether the API answers.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Breaker;
use crate::agentassist::bots::Bot;
use crate::agentassist::client::{ApiClient, ApiError, ApiResponse, how_ended};
use crate::fairness::budget::RateBudget;
use crate::shutdown::Shutdown;

/// The breaker and what it probes with, run by the application beside the consumer.
///
/// A probe passes the vendor's front door: it is signed with the first bot's token and carries
/// its `accountid`, with a body the API must refuse (`{}`: no target, no session). An API that
/// is up answers 400; one that is down answers 5xx or not at all. (An unsigned probe would be
/// answered 401 by an edge that authenticates before it routes, even while the service behind
/// it is down.) Being a call to the account, each probe takes a start from the account's
/// budget like any call, and passes the account's last gate (its arrivals); a probe the
/// budget has no start for within `probe_interval` is not sent that time.
#[derive(Debug)]
pub struct Prober {
    breaker: Arc<Breaker>,
    api: ApiClient,
    bot: Option<Arc<Bot>>,
    budget: Arc<dyn RateBudget>,
    interval: Duration,
}

impl Prober {
    /// Probes the assign-conversation route of `bot` (the first configured), through `api`,
    /// paced by the account's budget (the fleet's, with one).
    pub fn new(
        breaker: Arc<Breaker>,
        api: ApiClient,
        bot: Option<Arc<Bot>>,
        budget: Arc<dyn RateBudget>,
    ) -> Self {
        let interval = breaker.probe_interval;
        Self {
            breaker,
            api,
            bot,
            budget,
            interval,
        }
    }

    /// Probes while the breaker is open, until `stop`.
    pub async fn run(self, stop: CancellationToken) {
        let breaker = self.breaker.clone();
        breaker.run(|| self.probe(), stop).await;
    }

    async fn probe(&self) -> Option<Result<ApiResponse, ApiError>> {
        let Some(bot) = self.bot.as_ref() else {
            tracing::warn!(
                "no bot to probe the API through; the breaker closes only when a call is answered"
            );
            return None;
        };
        let start = self.start(bot).await?;
        tokio::time::sleep_until(Instant::from_std(start)).await;
        // The last gate, as for any call; the wait is cut short by the breaker's stop.
        let until = std::time::Instant::now().checked_add(self.interval);
        let unstopped = Shutdown::new();
        let departure = self.budget.depart(&bot.account, until, &unstopped);
        let departure = departure.await.ok()??;
        let token = match bot.tokens.token() {
            Ok(token) => token,
            Err(e) => {
                departure.unsent().await;
                tracing::warn!(error = %e, "cannot sign the breaker's probe");
                return None;
            }
        };
        let result = self.api.probe(bot, &token).await;
        departure.ended(how_ended(&result)).await;
        Some(result)
    }

    /// When the probe may go, if within the probe interval.
    async fn start(&self, bot: &Bot) -> Option<std::time::Instant> {
        self.budget.probe_start(&bot.account, self.interval).await
    }
}
