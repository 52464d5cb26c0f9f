//! One circuit breaker per API host (docs/circuit-breaker.md). The vendor runs regional hosts,
//! and a company's bots may live in more than one: an outage in one region holds only the bots
//! that call it, and each breaker probes through a bot of its own host.

use std::collections::HashMap;
use std::sync::Arc;

use super::{Breaker, Prober};
use crate::agentassist::ApiClient;
use crate::agentassist::bots::{Bot, Bots};
use crate::config::Settings;
use crate::fairness::budget::RateBudget;
use crate::ops::metrics::Metrics;

/// The breakers, by the host their bots call.
#[derive(Debug, Clone, Default)]
pub struct Breakers {
    by_host: Arc<HashMap<String, Arc<Breaker>>>,
}

impl Breakers {
    /// A breaker for every host the bots call, and its prober (through the first bot of that
    /// host, in the order of the settings); none with `breaker.enabled = false`.
    pub fn new(
        settings: &Settings,
        bots: &Bots,
        api: &ApiClient,
        budget: &Arc<dyn RateBudget>,
        metrics: &Arc<Metrics>,
    ) -> (Self, Vec<Prober>) {
        let mut by_host = HashMap::new();
        let mut probers = Vec::new();
        if !settings.breaker.enabled {
            return (Self::default(), probers);
        }
        for bot in bots.in_order(settings) {
            if by_host.contains_key(&bot.host) {
                continue;
            }
            let breaker =
                Arc::new(Breaker::new(&settings.breaker, metrics.clone()).for_host(&bot.host));
            by_host.insert(bot.host.clone(), breaker.clone());
            probers.push(Prober::new(breaker, api.clone(), Some(bot), budget.clone()));
        }
        let by_host = Arc::new(by_host);
        (Self { by_host }, probers)
    }

    /// The breaker in front of `bot`'s host, if breakers are on.
    pub fn of(&self, bot: &Bot) -> Option<&Arc<Breaker>> {
        self.by_host.get(&bot.host)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::net::{Ipv4Addr, SocketAddr};
    use std::time::{Duration, SystemTime};

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::agentassist::outcome::Outcome;
    use crate::agentassist::retry::RetryPolicy;
    use crate::agentassist::transfer::{Begun, Transfers};
    use crate::contract::{Command, Target};
    use crate::shutdown::Shutdown;
    use crate::tools::simulator::{self, Simulator, SimulatorConfig};

    async fn simulator(settings: &Settings) -> Simulator {
        Simulator::start(SimulatorConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            bots: simulator::bots_from_settings(settings),
            callbacks: false,
            ..SimulatorConfig::default()
        })
        .await
        .unwrap()
    }

    fn command(id: &str, stream_id: &str) -> Command {
        Command {
            command_id: id.into(),
            stream_id: stream_id.into(),
            org_id: "o-1".into(),
            bot_session_id: format!("s-{id}"),
            target: Target::Agent("a-1".into()),
            callback_url: None,
            deadline: Some(SystemTime::now() + Duration::from_secs(30)),
        }
    }

    async fn until(what: &str, check: impl Fn() -> bool) {
        let by = tokio::time::Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(tokio::time::Instant::now() < by, "never happened: {what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Two regions, each its own simulator: the EU host is down, the US host is up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outage_in_one_region_holds_only_the_bots_of_that_region() {
        let mut settings = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
        settings.retry.initial_delay = Duration::from_millis(1);
        settings.retry.max_delay = Duration::from_millis(5);
        settings.breaker.open_after = Duration::from_millis(300);
        settings.breaker.probe_interval = Duration::from_millis(50);
        let mut eu = settings.bots[0].clone();
        eu.stream_id = "st-eu".into();
        eu.account_id = "eu-account".into();
        settings.bots.push(eu);
        let (us_sim, eu_sim) = (simulator(&settings).await, simulator(&settings).await);
        settings.agentassist.base_url = us_sim.base_url();
        settings.bots[1].base_url = Some(eu_sim.base_url());
        eu_sim.start_outage(503);

        let metrics = Arc::new(Metrics::new());
        let bots = Bots::new(&settings, &metrics);
        let api = ApiClient::new(Duration::from_secs(5), 8, None).unwrap();
        let budget: Arc<dyn RateBudget> = Arc::new(crate::fairness::budget::OwnBudget);
        let (breakers, probers) = Breakers::new(&settings, &bots, &api, &budget, &metrics);
        assert_eq!(probers.len(), 2, "a breaker, and its prober, per host");
        let stop = CancellationToken::new();
        let probing: Vec<_> = (probers.into_iter())
            .map(|p| tokio::spawn(p.run(stop.clone())))
            .collect();
        let policy = RetryPolicy::new(&settings.retry);
        let transfers =
            Transfers::new(api, policy, metrics.clone()).with_breakers(breakers.clone());
        let shutdown = Shutdown::new();
        let us = bots.get(&settings.bots[0].stream_id).unwrap();
        let eu = bots.get("st-eu").unwrap();

        // The EU command fails until its host's breaker opens, then waits on it.
        let held = tokio::spawn({
            let (transfers, shutdown, eu) = (transfers.clone(), shutdown.clone(), eu.clone());
            async move {
                let command = command("eu-1", "st-eu");
                transfers
                    .execute(
                        &command,
                        &eu,
                        "http://relay.test/t",
                        &shutdown,
                        &|| true,
                        Begun::now(),
                    )
                    .await
            }
        });
        until("the EU breaker opens", || {
            breakers.of(&eu).unwrap().is_open()
        })
        .await;
        assert!(!breakers.of(&us).unwrap().is_open());
        assert_eq!(metrics.breaker_open.get(), 1);

        // Meanwhile the US bots are not held: the call goes out and succeeds at once.
        let command = command("us-1", &us.stream_id);
        let run = transfers.execute(
            &command,
            &us,
            "http://relay.test/t",
            &shutdown,
            &|| true,
            Begun::now(),
        );
        let outcome = tokio::time::timeout(Duration::from_secs(5), run)
            .await
            .expect("a command of the region that is up is not held")
            .unwrap();
        assert!(
            matches!(outcome, Outcome::Succeeded { attempts: 1, .. }),
            "{outcome:?}"
        );
        assert!(
            !held.is_finished(),
            "the region that is down still holds its command"
        );

        // The EU host answers again: a probe through an EU bot closes its breaker, and the
        // held command completes.
        eu_sim.end_outage();
        let outcome = tokio::time::timeout(Duration::from_secs(10), held)
            .await
            .expect("the held command completes once its region is back")
            .unwrap()
            .unwrap();
        assert!(matches!(outcome, Outcome::Succeeded { .. }), "{outcome:?}");
        assert_eq!(metrics.breaker_open.get(), 0);
        // Each host saw only its own bots, probes included.
        assert!(us_sim.requests().iter().all(|r| r.stream_id != "st-eu"));
        assert!(eu_sim.requests().iter().all(|r| r.stream_id == "st-eu"));

        stop.cancel();
        for task in probing {
            task.await.unwrap();
        }
        us_sim.shutdown().await;
        eu_sim.shutdown().await;
    }
}
