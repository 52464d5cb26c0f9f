//! The step's decisions, with the simulator as the API and no broker.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use serde_json::{Value, json};

use super::*;
use crate::agentassist::ApiClient;
use crate::agentassist::bots::Bots;
use crate::agentassist::breaker::Breakers;
use crate::agentassist::retry::RetryPolicy;
use crate::callbacks::token::TokenSigner;
use crate::config::Settings;
use crate::contract::event::EventKind;
use crate::pipeline::parser::Parser;
use crate::tools::simulator::{self, Reply, Simulator, SimulatorConfig};

/// The step against a simulator of its own, with the default bot.
struct Rig {
    decider: Decider,
    parser: Parser,
    sim: Simulator,
    /// The fleet it is a replica of, if any.
    fleet: Option<Arc<crate::fleet::Fleet>>,
    /// The breaker of every API host its bots call.
    breakers: Breakers,
}

impl Rig {
    async fn start() -> Self {
        Self::start_with(|_| {}).await
    }

    /// The rig, with `adjust` applied to its settings.
    async fn start_with(adjust: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = Settings::load_with_env(None, Some(HashMap::new())).unwrap();
        settings.retry.initial_delay = Duration::from_millis(1);
        settings.retry.max_delay = Duration::from_millis(5);
        adjust(&mut settings);
        let sim = Simulator::start(SimulatorConfig {
            listen: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            bots: simulator::bots_from_settings(&settings),
            callbacks: false,
            ..SimulatorConfig::default()
        })
        .await
        .unwrap();
        settings.agentassist.base_url = sim.base_url();
        let metrics = Arc::new(Metrics::new());
        let signer = TokenSigner::new(
            settings.callbacks.secret.clone(),
            Vec::new(),
            settings.callbacks.token_ttl,
        );
        let api = ApiClient::new(Duration::from_secs(5), 4, None).unwrap();
        let mut decider = Decider {
            transfers: Transfers::new(api, RetryPolicy::new(&settings.retry), metrics.clone()),
            relay: RelayUrls::new("http://relay.test", signer),
            outcomes: Outcomes::new(100, 1024 * 1024, Duration::from_secs(60)),
            metrics,
            shutdown: Shutdown::new(),
            ledger: Arc::new(crate::pipeline::ledger::Unshared),
        };
        let bots = Bots::new(&settings, &Metrics::new());
        let budget: Arc<dyn crate::fairness::budget::RateBudget> =
            Arc::new(crate::fairness::budget::OwnBudget);
        let (breakers, _probers) = Breakers::new(
            &settings,
            &bots,
            decider.transfers.api(),
            &budget,
            &decider.metrics,
        );
        decider.transfers = decider.transfers.clone().with_breakers(breakers.clone());
        let parser = Parser::new(bots, settings.commands.max_age);
        Self {
            decider,
            parser,
            sim,
            fleet: None,
            breakers,
        }
    }

    /// Makes the rig a replica of the fleet `name`, on the real Redis (`TEST_REDIS_URL`).
    fn in_fleet(mut self, name: &str) -> Self {
        let settings = crate::config::FleetSettings {
            redis_url: std::env::var("TEST_REDIS_URL")
                .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into()),
            redis_ca_file: Default::default(),
            name: String::new(),
            partitions: 1,
            heartbeat: Duration::from_secs(1),
            member_ttl: Duration::from_secs(5),
            lease: Duration::from_secs(5),
            redis_timeout: Duration::from_secs(1),
            redis_min_replicas: 0,
        };
        let fleet = Arc::new(
            crate::fleet::Fleet::new(
                &settings,
                name,
                Duration::from_secs(60),
                self.decider.metrics.clone(),
            )
            .unwrap(),
        );
        let budget = crate::fairness::budget::SharedBudget::new(fleet.clone());
        self.decider.transfers = self.decider.transfers.clone().with_budget(Arc::new(budget));
        let ledger =
            crate::pipeline::ledger::SharedLedger::new(fleet.clone(), self.decider.metrics.clone());
        self.decider.ledger = Arc::new(ledger);
        self.fleet = Some(fleet);
        self
    }

    fn read(&self, body: &Value, message_id: Option<&str>) -> Parsed {
        self.read_as(body, message_id, false)
    }

    /// A command as `dead-letters replay` brings it back from the dead-letter queue.
    fn read_replayed(&self, body: &Value) -> Parsed {
        self.read_as(body, None, true)
    }

    fn read_as(&self, body: &Value, message_id: Option<&str>, replayed: bool) -> Parsed {
        let envelope = Envelope {
            message_id: message_id.map(str::to_owned),
            timestamp: None,
            replayed,
            trace: Default::default(),
        };
        let body = serde_json::to_vec(body).unwrap();
        let command = self.parser.parse(&body, &envelope);
        Parsed { envelope, command }
    }
}

/// The command taken to its outcome, never set aside and always this replica's.
async fn plain(decider: &Decider, parsed: &Parsed) -> Decision {
    decider.decide(parsed, None, &|| true).await
}

fn command(id: &str) -> Value {
    json!({"commandId": id, "orgId": "o-1", "botSessionId": "s-1", "aId": "a-1"})
}

fn decided(handled: Decision) -> Arc<Event> {
    match handled {
        Decision::Decided(event) => event,
        other => panic!("expected a decision, got {other:?}"),
    }
}

fn body(event: &Event) -> Value {
    serde_json::from_slice(&event.body).unwrap()
}

#[tokio::test]
async fn a_valid_command_is_carried_out_once_and_then_answered_from_memory() {
    let rig = Rig::start().await;
    let parsed = rig.read(&command("c-1"), None);
    let first = decided(plain(&rig.decider, &parsed).await);
    assert_eq!(first.kind, EventKind::Succeeded);
    assert_eq!(body(&first)["attempts"], 1);
    let request = &rig.sim.requests()[0];
    let relayed = request.body["callbackUrl"].as_str().unwrap();
    assert!(
        relayed.starts_with("http://relay.test/callbacks/"),
        "{relayed}"
    );

    match rig
        .decider
        .decide(&rig.read(&command("c-1"), None), None, &|| true)
        .await
    {
        Decision::Remembered(again) => assert_eq!(again.id, first.id),
        other => panic!("expected the remembered outcome, got {other:?}"),
    }
    assert_eq!(
        rig.sim.stats().calls,
        1,
        "a completed command is not sent again"
    );
    assert_eq!(rig.decider.metrics.commands_deduplicated.get(), 1);
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn a_callback_url_the_command_brings_is_sent_as_is() {
    let rig = Rig::start().await;
    let mut c = command("c-own");
    c["callbackUrl"] = json!("https://upstream.test/cb");
    decided(plain(&rig.decider, &rig.read(&c, None)).await);
    assert_eq!(
        rig.sim.requests()[0].body["callbackUrl"],
        "https://upstream.test/cb"
    );
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn an_invalid_command_is_rejected_without_a_call_and_names_its_message_id() {
    let rig = Rig::start().await;
    let parsed = rig.read(&json!({"botSessionId": "s-1", "aId": "a-1"}), Some("m-7"));
    let event = decided(plain(&rig.decider, &parsed).await);
    assert_eq!(event.kind, EventKind::Rejected);
    let v = body(&event);
    assert_eq!(v["commandId"], "m-7");
    assert_eq!(v["messageId"], "m-7");
    assert_eq!(v["error"]["kind"], "invalid_command");
    assert_eq!(rig.sim.stats().calls, 0);
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn a_permanent_error_fails_with_the_error_detail_in_its_wire_order() {
    let rig = Rig::start().await;
    rig.sim.script([Reply::Raw {
        status: 400,
        headers: Vec::new(),
        body: b"no such agent".to_vec(),
    }]);
    let event = decided(plain(&rig.decider, &rig.read(&command("c-bad"), None)).await);
    assert_eq!(event.kind, EventKind::Failed);
    let text = std::str::from_utf8(&event.body).unwrap();
    assert!(
        text.contains(
            r#""error":{"kind":"http_status","status":400,"message":"AgentAssist answered HTTP 400","body":"no such agent"},"retryable":false"#
        ),
        "{text}"
    );
    assert_eq!(
        event.error.as_deref(),
        Some("AgentAssist answered HTTP 400")
    );
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn transient_errors_are_retried_within_the_budget() {
    let rig = Rig::start().await;
    rig.sim.script([Reply::Status(503), Reply::Status(502)]);
    let event = decided(plain(&rig.decider, &rig.read(&command("c-retry"), None)).await);
    assert_eq!(event.kind, EventKind::Succeeded);
    assert_eq!(body(&event)["attempts"], 3);
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn a_command_that_stops_being_ours_while_it_waits_to_retry_is_not_called_again() {
    // Its delivery goes back (the connection is lost, the holder token with it) right after
    // the first call: the queue's next holder carries it on, and this replica calls no more.
    let rig = Rig::start().await;
    rig.sim.script([Reply::Status(503)]);
    let ours = || rig.sim.stats().calls == 0;
    let parsed = rig.read(&command("c-gone"), None);
    assert!(matches!(
        rig.decider.decide(&parsed, None, &ours).await,
        Decision::NotOurs
    ));
    assert_eq!(rig.sim.stats().calls, 1);
    assert!(rig.decider.outcomes.get("c-gone").is_none());
    rig.sim.shutdown().await;
}

/// A ledger whose holds lapse, as a replica's do when their deadline passes before a renewal
/// answers: not held until `kept_at` (if ever), held from then on, in one term.
#[derive(Debug)]
struct Lapsing {
    kept_at: Option<std::time::Instant>,
}

impl Ledger for Lapsing {
    fn claim<'a>(
        &'a self,
        command_id: &'a str,
        replayed: bool,
        start: Option<crate::fleet::StartRequest>,
        shutdown: &'a Shutdown,
    ) -> futures_util::future::BoxFuture<'a, Result<Claimed, Abandoned>> {
        crate::pipeline::ledger::Unshared.claim(command_id, replayed, start, shutdown)
    }

    fn keep<'a>(
        &'a self,
        command_id: &'a str,
    ) -> futures_util::future::BoxFuture<'a, std::convert::Infallible> {
        crate::pipeline::ledger::Unshared.keep(command_id)
    }

    fn release<'a>(&'a self, command_id: &'a str) -> futures_util::future::BoxFuture<'a, ()> {
        crate::pipeline::ledger::Unshared.release(command_id)
    }

    fn record<'a>(
        &'a self,
        command_id: &'a str,
        event: &'a Event,
        shutdown: &'a Shutdown,
    ) -> futures_util::future::BoxFuture<'a, ()> {
        crate::pipeline::ledger::Unshared.record(command_id, event, shutdown)
    }

    fn holds(&self) -> crate::pipeline::ledger::Holds<'_> {
        let kept_at = self.kept_at;
        Box::new(move || kept_at.is_some_and(|at| std::time::Instant::now() >= at))
    }
}

#[tokio::test]
async fn a_command_whose_holds_lapse_for_a_moment_is_carried_on_in_its_place() {
    // The renewal answered after the deadline and was kept: the delivery never went back, so
    // dropping the command would leave it unacked on an open channel while its session's next
    // command ran.
    let mut rig = Rig::start().await;
    let kept_at = std::time::Instant::now() + Duration::from_millis(300);
    rig.decider.ledger = Arc::new(Lapsing {
        kept_at: Some(kept_at),
    });
    let event = decided(plain(&rig.decider, &rig.read(&command("c-lapse"), None)).await);
    assert_eq!(event.kind, EventKind::Succeeded);
    assert_eq!(
        rig.sim.stats().calls,
        1,
        "called once, once the holds were kept"
    );
    assert!(std::time::Instant::now() >= kept_at);
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn holds_lapsed_with_the_channel_open_wait_and_the_grace_running_out_returns_it_uncalled() {
    // The command waits (no nack while its channel is open) until its shutdown's grace runs
    // out; then it is returned like every other command still on that channel.
    let mut rig = Rig::start().await;
    rig.decider.ledger = Arc::new(Lapsing { kept_at: None });
    let shutdown = rig.decider.shutdown.clone();
    let grace = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        shutdown.stop();
        shutdown.abandon();
    });
    let begun = std::time::Instant::now();
    let decision = plain(&rig.decider, &rig.read(&command("c-lapsed"), None)).await;
    assert!(
        matches!(decision, Decision::Requeue("shutdown grace ran out")),
        "{decision:?}"
    );
    assert!(begun.elapsed() >= Duration::from_millis(500), "it waited");
    assert_eq!(rig.sim.stats().calls, 0);
    grace.await.unwrap();
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn a_past_deadline_expires_the_command_without_a_call() {
    let rig = Rig::start().await;
    let mut c = command("c-late");
    c["expiresAt"] = json!("2000-01-01T00:00:00Z");
    let event = decided(plain(&rig.decider, &rig.read(&c, None)).await);
    assert_eq!(event.kind, EventKind::Expired);
    assert_eq!(body(&event)["expiresAt"], "2000-01-01T00:00:00.000Z");
    assert_eq!(rig.sim.stats().calls, 0);
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn at_shutdown_a_command_goes_back_to_the_queue_and_nothing_is_remembered() {
    let rig = Rig::start().await;
    rig.decider.shutdown.abandon();
    let parsed = rig.read(&command("c-stop"), None);
    assert!(matches!(
        plain(&rig.decider, &parsed).await,
        Decision::Requeue("shutting down")
    ));
    assert!(rig.decider.outcomes.get("c-stop").is_none());
    assert_eq!(rig.sim.stats().calls, 0);
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn a_shutdown_while_waiting_to_retry_gives_the_command_back() {
    let rig = Rig::start().await;
    rig.sim.script([Reply::RateLimited {
        retry_after: Duration::from_secs(30),
    }]);
    let parsed = rig.read(&command("c-wait"), None);
    let shutdown = rig.decider.shutdown.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        shutdown.abandon();
    });
    assert!(matches!(
        plain(&rig.decider, &parsed).await,
        Decision::Requeue("shutdown grace ran out")
    ));
    assert!(rig.decider.outcomes.get("c-wait").is_none());
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn a_command_completed_by_one_replica_is_answered_by_another_from_the_fleet_record() {
    let fleet = format!("tw-unit-{}", uuid::Uuid::new_v4().simple());
    let a = Rig::start().await.in_fleet(&fleet);
    let b = Rig::start().await.in_fleet(&fleet);
    let first = decided(plain(&a.decider, &a.read(&command("c-f1"), None)).await);
    match plain(&b.decider, &b.read(&command("c-f1"), None)).await {
        Decision::Remembered(again) => {
            assert_eq!(again.id, first.id);
            assert_eq!(again.body, first.body);
        }
        other => panic!("expected the fleet's record, got {other:?}"),
    }
    assert_eq!(a.sim.stats().calls, 1);
    assert_eq!(
        b.sim.stats().calls,
        0,
        "no second call anywhere in the fleet"
    );
    a.sim.shutdown().await;
    b.sim.shutdown().await;
}

#[tokio::test]
async fn a_command_claimed_by_a_live_replica_is_waited_for_not_sent_again() {
    let fleet = format!("tw-unit-{}", uuid::Uuid::new_v4().simple());
    let a = Rig::start().await.in_fleet(&fleet);
    let b = Rig::start().await.in_fleet(&fleet);
    // A holds the claim, as while its call is on the wire.
    let a_fleet = a.fleet.clone().unwrap();
    assert!(matches!(
        a_fleet.claim("c-f2").await.unwrap(),
        crate::fleet::Claim::Mine
    ));
    let parsed = b.read(&command("c-f2"), None);
    let waiting = plain(&b.decider, &parsed);
    let finishing = async {
        tokio::time::sleep(Duration::from_millis(600)).await;
        decided(plain(&a.decider, &a.read(&command("c-f2"), None)).await)
    };
    let (handled, done) = tokio::join!(waiting, finishing);
    match handled {
        Decision::Remembered(event) => assert_eq!(event.id, done.id),
        other => panic!("expected to wait for the holder's outcome, got {other:?}"),
    }
    assert_eq!(b.sim.stats().calls, 0);
    assert!(b.decider.metrics.fleet_claim_waits.get() >= 1);
    a.sim.shutdown().await;
    b.sim.shutdown().await;
}

fn remembered(handled: Decision) -> Arc<Event> {
    match handled {
        Decision::Remembered(event) => event,
        other => panic!("expected the remembered outcome, got {other:?}"),
    }
}

fn permanent_error() -> Reply {
    Reply::Raw {
        status: 400,
        headers: Vec::new(),
        body: b"no such agent".to_vec(),
    }
}

#[tokio::test]
async fn a_replayed_failed_command_is_processed_again_and_a_completed_one_is_not() {
    let rig = Rig::start().await;
    rig.sim.script([permanent_error()]);
    let failed = decided(plain(&rig.decider, &rig.read(&command("c-r1"), None)).await);
    assert_eq!(failed.kind, EventKind::Failed);
    // Published again as it was: answered from memory, failed.
    let again = remembered(plain(&rig.decider, &rig.read(&command("c-r1"), None)).await);
    assert_eq!(again.id, failed.id);
    assert_eq!(rig.sim.stats().calls, 1);

    // Replayed from the dead-letter queue: processed as new, and its outcome replaces the old.
    let replayed = decided(plain(&rig.decider, &rig.read_replayed(&command("c-r1"))).await);
    assert_eq!(replayed.kind, EventKind::Succeeded);
    assert_ne!(replayed.id, failed.id);
    assert_eq!(rig.sim.stats().calls, 2);

    // Completed now: a replay, like any other copy, is answered from memory.
    let completed = remembered(plain(&rig.decider, &rig.read_replayed(&command("c-r1"))).await);
    assert_eq!(completed.id, replayed.id);
    let plain = remembered(plain(&rig.decider, &rig.read(&command("c-r1"), None)).await);
    assert_eq!(plain.id, replayed.id);
    assert_eq!(
        rig.sim.stats().calls,
        2,
        "a completed command is not sent again"
    );
    rig.sim.shutdown().await;
}

#[tokio::test]
async fn a_replayed_failed_command_passes_over_the_fleet_record_and_replaces_it() {
    let fleet = format!("tw-unit-{}", uuid::Uuid::new_v4().simple());
    let a = Rig::start().await.in_fleet(&fleet);
    let b = Rig::start().await.in_fleet(&fleet);
    let c = Rig::start().await.in_fleet(&fleet);
    a.sim.script([permanent_error()]);
    let failed = decided(plain(&a.decider, &a.read(&command("c-r2"), None)).await);
    assert_eq!(failed.kind, EventKind::Failed);
    // Another replica answers a plain copy from the record...
    let recorded = remembered(plain(&b.decider, &b.read(&command("c-r2"), None)).await);
    assert_eq!(recorded.id, failed.id);
    assert_eq!(b.sim.stats().calls, 0);
    // ...but not a replay: that is processed again, even where the failure is in memory.
    let replayed = decided(
        b.decider
            .decide(&b.read_replayed(&command("c-r2")), None, &|| true)
            .await,
    );
    assert_eq!(replayed.kind, EventKind::Succeeded);
    assert_eq!(b.sim.stats().calls, 1);
    // The new outcome replaced the record: a third replica answers any copy with it.
    let plain = remembered(plain(&c.decider, &c.read(&command("c-r2"), None)).await);
    assert_eq!(plain.id, replayed.id);
    let replay = remembered(
        c.decider
            .decide(&c.read_replayed(&command("c-r2")), None, &|| true)
            .await,
    );
    assert_eq!(replay.id, replayed.id);
    assert_eq!(c.sim.stats().calls, 0);
    for rig in [a, b, c] {
        rig.sim.shutdown().await;
    }
}

/// `from_now` from now, as a command's `expiresAt`.
fn expires_in(from_now: Duration) -> String {
    let at = time::OffsetDateTime::now_utc() + from_now;
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A command that waits for its first start keeps its whole deadline: the wait is not counted
/// against it a second time once its execution begins.
#[tokio::test]
async fn a_command_that_waits_for_its_first_start_keeps_its_whole_deadline() {
    let rig = Rig::start_with(|s| {
        s.bots[0].rate_limit = 1;
        s.bots[0].rate_window = Duration::from_secs(2);
    })
    .await;
    decided(plain(&rig.decider, &rig.read(&command("c-a"), None)).await);
    // Its start is about 2 s away, well within its 3.5 s.
    let mut c = command("c-b");
    c["expiresAt"] = json!(expires_in(Duration::from_millis(3500)));
    let event = decided(plain(&rig.decider, &rig.read(&c, None)).await);
    assert_eq!(event.kind, EventKind::Succeeded, "{}", body(&event));
    assert_eq!(rig.sim.stats().calls, 2);
}

/// A command that arrives while its API host is down waits for the breaker before it asks for
/// a start; once the breaker closes, a start further away than its aside sends it to its
/// account's queue, as for any other command, nothing called.
#[tokio::test]
async fn a_command_held_by_the_breaker_may_still_be_set_aside_once_it_closes() {
    let rig = Rig::start_with(|s| {
        s.bots[0].rate_limit = 1;
        s.bots[0].rate_window = Duration::from_secs(3);
        s.breaker.enabled = true;
        s.breaker.open_after = Duration::from_millis(10);
    })
    .await;
    decided(plain(&rig.decider, &rig.read(&command("c-a"), None)).await);
    let parsed = rig.read(&command("c-b"), None);
    let Ok(valid) = &parsed.command else {
        panic!("a valid command")
    };
    let breaker = rig.breakers.of(&valid.bot).unwrap().clone();
    let refused = || {
        Err(crate::agentassist::ApiError::without_status(
            crate::agentassist::ErrorKind::Connection,
            "connection refused",
        ))
    };
    breaker.record(&refused());
    tokio::time::sleep(Duration::from_millis(20)).await;
    breaker.record(&refused());
    assert!(breaker.is_open());
    let deciding = rig
        .decider
        .decide(&parsed, Some(Duration::from_secs(1)), &|| true);
    let closing = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        breaker.record(&crate::agentassist::classify(200, None, b"{}", false));
    };
    let (decision, ()) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(10), deciding),
        closing
    );
    let decision = decision.expect("decided");
    assert!(matches!(decision, Decision::Aside), "{decision:?}");
    assert_eq!(
        rig.sim.stats().calls,
        1,
        "nothing called for the command set aside"
    );
}

/// A command whose source this replica let go while it waited (its holds lapsed with Redis
/// away, its channel closed) is not set aside: it would land in a lane no holder reads, while
/// the source's new holder runs the rest of its session. Nor is it nacked, which would put it
/// behind its session's later commands: it goes back with its channel.
#[tokio::test]
async fn a_command_no_longer_ours_is_returned_not_set_aside() {
    let rig = Rig::start_with(|s| {
        s.bots[0].rate_limit = 1;
        s.bots[0].rate_window = Duration::from_secs(3);
    })
    .await;
    decided(plain(&rig.decider, &rig.read(&command("c-a"), None)).await);
    let parsed = rig.read(&command("c-b"), None);
    // Its account's next start is 3 s away, past the 1 s it may wait: it would be set aside.
    let aside = rig
        .decider
        .decide(&parsed, Some(Duration::from_secs(1)), &|| true)
        .await;
    assert!(matches!(aside, Decision::Aside), "{aside:?}");
    // The same, with its delivery no longer this replica's.
    let gone = rig
        .decider
        .decide(&parsed, Some(Duration::from_secs(1)), &|| false)
        .await;
    assert!(matches!(gone, Decision::NotOurs), "{gone:?}");
    assert_eq!(rig.sim.stats().calls, 1, "nothing called for c-b");
}
