//! The application assembled from settings: the worker, the callback relay and the admin
//! endpoints, started together and stopped together. Tests build the real thing on port 0.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use gauges::{Paired, paired};
use services::Services;

use crate::agentassist::bots::Bots;
use crate::agentassist::breaker::Breakers;
use crate::agentassist::breaker::Prober;
use crate::agentassist::retry::RetryPolicy;
use crate::agentassist::transfer::Transfers;
use crate::agentassist::{ApiClient, ClientError};
use crate::broker::consumer::{Consumer, ConsumerSettings, Partitioned};
use crate::broker::{BrokerError, CurrentLink};
use crate::callbacks::relay::{self, Relay};
use crate::callbacks::token::{RelayUrls, TokenSigner};
use crate::config::tls::certificates;
use crate::config::{ConfigError, Settings};
use crate::fairness::account::Account;
use crate::fleet::{Fleet, FleetError};
use crate::ops::admin::{self, Admin};
use crate::ops::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::pipeline::decision::Decider;
use crate::pipeline::intake::Router;
use crate::pipeline::outcomes::Outcomes;
use crate::pipeline::parser::Parser;
use crate::shutdown::Shutdown;

mod gauges;
mod roles;
mod services;

/// How long the HTTP listeners get to finish open requests once the worker has stopped.
const HTTP_DRAIN: Duration = Duration::from_secs(5);

/// The shortest wait before asking again for a queue another replica holds.
const HOLD_RETRY_MIN: Duration = Duration::from_millis(50);

/// Why the application could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A listener could not bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The configured address.
        addr: SocketAddr,
        /// Why it could not.
        source: std::io::Error,
    },
    /// The HTTP client could not be built.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A file the settings name cannot be used.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker refused something reconnecting cannot fix.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The fleet's Redis cannot be used as configured.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// A background service panicked (its message is in the log): the worker stopped.
    #[error("the {service} service panicked; the worker stopped")]
    Panicked {
        /// Which service.
        service: &'static str,
    },
}

/// How commands are consumed.
enum Worker {
    /// From the commands queue, every command here (alone, or the active one of standbys).
    Alone(Consumer<Pipeline>),
    /// Work shared by a fleet: this replica routes commands to partitions while it holds the
    /// commands queue, and runs the commands of the partitions it owns.
    InFleet {
        consumer: Consumer<Pipeline, Pipeline>,
        owned: tokio::sync::watch::Sender<std::collections::BTreeSet<u16>>,
        consuming: tokio::sync::watch::Receiver<std::collections::BTreeSet<u16>>,
    },
}

/// A built application, listening but not yet consuming.
pub struct App {
    worker: Worker,
    relay: (TcpListener, axum::Router),
    admin: (TcpListener, axum::Router),
    relay_addr: SocketAddr,
    admin_addr: SocketAddr,
    shutdown: Shutdown,
    broker: Arc<CurrentLink>,
    metrics: Arc<Metrics>,
    fleet: Option<Arc<Fleet>>,
    probers: Vec<Prober>,
    /// Every account, with its twin at the intake if any: for the gauges.
    accounts: Paired,
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), AppError> {
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| AppError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| AppError::Bind { addr, source })?;
    Ok((listener, local))
}

/// What every part of one application shares.
struct Common {
    metrics: Arc<Metrics>,
    broker: Arc<CurrentLink>,
    shutdown: Shutdown,
    fleet: Option<Arc<Fleet>>,
}

impl Common {
    /// Readiness (the broker link, and the fleet's Redis if any) and the series.
    fn admin_router(&self) -> axum::Router {
        let mut readiness: Vec<Arc<dyn admin::Readiness>> = vec![self.broker.clone()];
        if let Some(fleet) = &self.fleet {
            readiness.push(fleet.clone());
        }
        admin::router(Admin {
            readiness,
            metrics: self.metrics.clone(),
        })
    }

    fn new(settings: &Settings) -> Result<Self, AppError> {
        let metrics = Arc::new(Metrics::new());
        let fleet = match settings.fleet.enabled() {
            true => Some(Arc::new(Fleet::new(
                &settings.fleet,
                &settings.amqp.commands_queue,
                settings.commands.outcome_cache_ttl,
                metrics.clone(),
            )?)),
            false => None,
        };
        Ok(Self {
            metrics,
            broker: Arc::new(CurrentLink::default()),
            shutdown: Shutdown::new(),
            fleet,
        })
    }

    /// The API side: the client, the retry policy, the fleet's budgets and a breaker per API
    /// host, with their probers (each through the first configured bot of its host).
    fn transfers(
        &self,
        settings: &Settings,
        bots: &Bots,
    ) -> Result<(Transfers, Vec<Prober>), AppError> {
        let extra_roots = certificates("agentassist.ca_file", &settings.agentassist.ca_file)?;
        let api = ApiClient::new(
            settings.agentassist.request_timeout,
            usize::from(settings.amqp.prefetch),
            extra_roots.as_deref(),
        )?;
        let policy = RetryPolicy::new(&settings.retry);
        let budget = self.budget();
        let (breakers, probers) = Breakers::new(settings, bots, &api, &budget, &self.metrics);
        let transfers = Transfers::new(api, policy, self.metrics.clone())
            .with_budget(budget)
            .with_breakers(breakers);
        Ok((transfers, probers))
    }

    /// The fleet, if its replicas share work through partitions.
    fn shares_work(&self) -> Option<&Arc<Fleet>> {
        self.fleet.as_ref().filter(|f| f.partitions() > 0)
    }

    /// The intake's pipeline, when replicas share work, and its accounts: each account's
    /// budget admits its commands to the partitions there (docs/fairness.md).
    fn intake(
        &self,
        settings: &Settings,
        decider: &Decider,
    ) -> Option<(Pipeline, Vec<Arc<Account>>)> {
        let fleet = self.shares_work()?;
        let bots = Bots::at_intake(settings, &self.metrics);
        let accounts = bots.accounts();
        let router = Router::new(
            &settings.amqp.commands_queue,
            fleet.clone(),
            self.metrics.clone(),
            self.shutdown.clone(),
        );
        let parser = Parser::new(bots, settings.commands.max_age);
        let intake = Pipeline::intake(parser, decider.clone(), router);
        Some((intake, accounts))
    }

    /// How commands are consumed: the pipeline on the commands queue, or, with partitions,
    /// the intake there and the pipeline on the partitions this replica owns.
    fn worker(
        &self,
        settings: &Settings,
        intake: Option<Pipeline>,
        pipeline: Arc<Pipeline>,
    ) -> Worker {
        let consumer_settings = ConsumerSettings {
            amqp: settings.amqp.clone(),
            queue: settings.amqp.commands_queue.clone(),
            grace: settings.shutdown.grace,
            // After the grace: time for a call already on the wire to end and its outcome
            // to be confirmed.
            settle: settings.agentassist.request_timeout + settings.amqp.confirm_timeout,
        };
        let (link, metrics, shutdown) = (
            self.broker.clone(),
            self.metrics.clone(),
            self.shutdown.clone(),
        );
        let (Some(fleet), Some(intake)) = (self.shares_work(), intake) else {
            let consumer = Consumer::new(consumer_settings, pipeline, link, metrics, shutdown);
            return Worker::Alone(consumer);
        };
        let partitions = fleet.partitions();
        let (owned, watched) = tokio::sync::watch::channel(Default::default());
        let consuming = Arc::new(tokio::sync::watch::Sender::new(Default::default()));
        let hold_retry = (settings.fleet.heartbeat / 4).max(HOLD_RETRY_MIN);
        let consumer = Consumer::new(consumer_settings, Arc::new(intake), link, metrics, shutdown)
            .with_partitions(Partitioned {
                handler: pipeline,
                owned: watched,
                count: partitions,
                consuming: consuming.clone(),
            })
            .with_holds(fleet.clone(), hold_retry);
        Worker::InFleet {
            consumer,
            owned,
            consuming: consuming.subscribe(),
        }
    }
}

impl App {
    /// Binds the listeners and wires the parts. An empty `callbacks.public_url` means "the
    /// relay listener's own address", which is what tests on port 0 need.
    pub async fn build(settings: Settings) -> Result<Self, AppError> {
        let (relay_listener, relay_addr) = bind(settings.callbacks.listen).await?;
        let (admin_listener, admin_addr) = bind(settings.admin.listen).await?;
        let public_url = match settings.callbacks.public_url.as_str() {
            "" => format!("http://{relay_addr}"),
            url => url.to_owned(),
        };
        let common = Common::new(&settings)?;
        // One registry of bots and one parser, so one budget and one set of slots per
        // account in the process.
        let bots = Bots::new(&settings, &common.metrics);
        let accounts = bots.accounts();
        let (transfers, probers) = common.transfers(&settings, &bots)?;
        let signer = TokenSigner::new(
            settings.callbacks.secret.clone(),
            settings.callbacks.previous_secrets.clone(),
            settings.callbacks.token_ttl,
        );
        let decider = Decider {
            transfers,
            relay: RelayUrls::new(&public_url, signer.clone()),
            outcomes: Outcomes::new(
                settings.commands.outcome_cache_capacity,
                settings.commands.outcome_cache_max_bytes,
                settings.commands.outcome_cache_ttl,
            ),
            metrics: common.metrics.clone(),
            shutdown: common.shutdown.clone(),
            ledger: common.ledger(),
        };
        let (intake, at_intake) = common.intake(&settings, &decider).unzip();
        let accounts = paired(accounts, at_intake.unwrap_or_default());
        let parser = Parser::new(bots, settings.commands.max_age);
        let pipeline = Arc::new(Pipeline::new(parser, decider));
        let worker = common.worker(&settings, intake, pipeline);
        let relay_router = relay::router(Relay {
            signer,
            link: common.broker.clone(),
            metrics: common.metrics.clone(),
        });
        Ok(Self {
            worker,
            relay: (relay_listener, relay_router),
            admin: (admin_listener, common.admin_router()),
            relay_addr,
            admin_addr,
            shutdown: common.shutdown,
            broker: common.broker,
            metrics: common.metrics,
            fleet: common.fleet,
            probers,
            accounts,
        })
    }

    /// Where the callback relay listens.
    pub fn relay_addr(&self) -> SocketAddr {
        self.relay_addr
    }

    /// Where the admin endpoints listen.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The stop signals; cancel `stop` to shut down gracefully.
    pub fn shutdown(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// The broker link, for readiness checks.
    pub fn broker(&self) -> Arc<CurrentLink> {
        self.broker.clone()
    }

    /// The metrics every part counts into.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// Runs until the shutdown stops it and in-flight work has finished or been
    /// returned; then stops the services in order: the fleet membership, the health watch,
    /// probers and gauges, and last the HTTP listeners, which drain. A service that panics
    /// stops the worker, and the run ends in an error naming it.
    pub async fn run_until_stopped(self) -> Result<(), AppError> {
        let mut listeners = Services::new();
        let http_stop = listeners.stop_token();
        // The relay's listener is public: it bounds its connections and their timing itself.
        let (listener, router) = self.relay;
        listeners.spawn(
            "relay",
            relay::serve(listener, router, http_stop.clone(), HTTP_DRAIN),
        );
        let (listener, router) = self.admin;
        listeners.spawn("admin", async move {
            let server = axum::serve(listener, router)
                .with_graceful_shutdown(async move { http_stop.cancelled().await });
            if let Err(e) = server.await {
                tracing::error!(error = %e, "HTTP listener failed");
            }
        });
        let mut support = Services::new();
        let stop = support.stop_token();
        if let Some(fleet) = self.fleet.clone() {
            let stop = stop.clone();
            support.spawn(
                "redis health",
                async move { fleet.watch_health(stop).await },
            );
        }
        // Probes run until the consumer is done: held commands may wait on them in the grace.
        for prober in self.probers {
            support.spawn("breaker prober", prober.run(stop.clone()));
        }
        support.spawn(
            "account gauges",
            gauges::refresh(self.accounts.clone(), stop),
        );
        tracing::info!(relay = %self.relay_addr, admin = %self.admin_addr, "listening");
        let consume = consume(self.worker, self.fleet.clone(), &self.shutdown);
        tokio::pin!(consume);
        let mut panicked = None;
        let result = loop {
            tokio::select! {
                result = &mut consume => break result,
                name = support.panic(), if panicked.is_none() => panicked = Some(name),
                name = listeners.panic(), if panicked.is_none() => panicked = Some(name),
            }
            // Stopped as at SIGTERM: what is in flight finishes or goes back.
            self.shutdown.stop();
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, "worker stopped");
        }
        let support = support.stop(None).await;
        let listeners = listeners.stop(Some(HTTP_DRAIN)).await;
        match panicked.or(support).or(listeners) {
            Some(service) if result.is_ok() => Err(AppError::Panicked { service }),
            _ => result,
        }
    }
}

/// Consumes until the shutdown stops it: alone, or in the fleet under its own name (or not
/// at all), a member until every partition was handed over.
async fn consume(
    worker: Worker,
    fleet: Option<Arc<Fleet>>,
    shutdown: &Shutdown,
) -> Result<(), AppError> {
    let (consumer, owned, consuming) = match worker {
        Worker::Alone(consumer) => return consumer.run().await.map_err(AppError::from),
        Worker::InFleet {
            consumer,
            owned,
            consuming,
        } => (consumer, owned, consuming),
    };
    let fleet = fleet.expect("a worker in a fleet has a fleet");
    let (stop, member) = (shutdown.stop_token().clone(), fleet.clone());
    fleet.join(&stop).await?;
    let mut membership = Services::new();
    let leave = membership.stop_token();
    membership.spawn("fleet membership", async move {
        member.keep_membership(owned, consuming, stop, leave).await
    });
    let run = consumer.run();
    tokio::pin!(run);
    let mut watching = true;
    let result = loop {
        tokio::select! {
            result = &mut run => break result,
            // A membership that panicked keeps no holds: stop as at SIGTERM.
            _ = membership.panic(), if watching => {
                watching = false;
                shutdown.stop();
            }
        }
    };
    // Left once every partition was handed over; here at the latest.
    let panicked = membership.stop(None).await;
    match (fleet.displaced(), panicked) {
        (Some(e), _) => Err(AppError::from(e)),
        (None, Some(service)) if result.is_ok() => Err(AppError::Panicked { service }),
        (None, _) => result.map_err(AppError::from),
    }
}
