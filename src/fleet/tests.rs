//! The scripts against the real Redis on 127.0.0.1:6379 (`TEST_REDIS_URL` to use another),
//! each test under a fleet name of its own.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::broker::holds::Holds;
use crate::contract::Rejection;
use crate::contract::event::Event;

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A replica of a fleet of its own name, with this lease.
fn replica(fleet: &str, lease: Duration) -> Fleet {
    let settings = FleetSettings {
        redis_url: redis_url(),
        redis_ca_file: Default::default(),
        name: String::new(),
        partitions: 1,
        heartbeat: Duration::from_secs(1),
        member_ttl: Duration::from_secs(5),
        lease,
        redis_timeout: Duration::from_millis(900),
        redis_min_replicas: 0,
    };
    Fleet::new(
        &settings,
        fleet,
        Duration::from_secs(60),
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

/// A replica of the fleet `fleet` with quick membership: heartbeats every 100 ms, gone after
/// 500 ms.
fn quick_replica(fleet: &str) -> Fleet {
    Fleet::new(
        &quick_settings(),
        fleet,
        Duration::from_secs(60),
        Arc::new(Metrics::new()),
    )
    .unwrap()
}

/// Quick membership: heartbeats every 100 ms, gone after 500 ms; the default name.
fn quick_settings() -> FleetSettings {
    FleetSettings {
        redis_url: redis_url(),
        redis_ca_file: Default::default(),
        name: String::new(),
        partitions: 1,
        heartbeat: Duration::from_millis(100),
        member_ttl: Duration::from_millis(500),
        lease: Duration::from_secs(3),
        redis_timeout: Duration::from_millis(900),
        redis_min_replicas: 0,
    }
}

/// Two replicas of a fleet of their own.
fn two_replicas(lease: Duration) -> (Fleet, Fleet) {
    let name = fleet_name();
    (replica(&name, lease), replica(&name, lease))
}

fn fleet_name() -> String {
    format!("tw-unit-{}", uuid::Uuid::new_v4().simple())
}

fn event(command_id: &str) -> Event {
    Event::rejected(
        &Rejection {
            command_id: command_id.into(),
            stream_id: None,
            bot_session_id: None,
            target: None,
            message: "test".into(),
        },
        None,
    )
}

/// A start of `account`'s budget: `limit` calls per `window`.
fn ask(
    account: &str,
    limit: usize,
    window: Duration,
    deadline_in: Option<Duration>,
) -> StartRequest {
    StartRequest::new(account, limit, window, deadline_in)
}

fn booked(r: Reservation) -> Duration {
    match r {
        Reservation::Booked { delay, .. } => delay,
        other => panic!("expected a booked start, got {other:?}"),
    }
}

#[tokio::test]
async fn starts_beyond_the_horizon_are_told_not_booked_and_unused_ones_are_given_back() {
    // Lease 3 s: the horizon is 1 s.
    let (a, b) = two_replicas(Duration::from_secs(3));
    let window = Duration::from_secs(4);
    let first = a
        .reserve(&ask("acct", 1, window, None), "c1")
        .await
        .unwrap();
    assert!(booked(first) < Duration::from_millis(100));
    // The next start is a window away, beyond the horizon: not booked, so a replica that
    // died now would hold nothing of the account's budget but the call it made.
    match b
        .reserve(&ask("acct", 1, window, None), "c2")
        .await
        .unwrap()
    {
        Reservation::NotYet { delay } => assert!(delay > Duration::from_secs(3), "{delay:?}"),
        other => panic!("{other:?}"),
    }
    match b
        .reserve(&ask("acct", 1, window, None), "c3")
        .await
        .unwrap()
    {
        Reservation::NotYet { .. } => {}
        other => panic!("the log is unchanged, so is the answer: {other:?}"),
    }
    // A start booked and given back frees the budget for the next caller.
    let other = a
        .reserve(&ask("acct2", 1, window, None), "c4")
        .await
        .unwrap();
    let Reservation::Booked { booking, .. } = other else {
        panic!("{other:?}")
    };
    a.unreserve(&booking).await.unwrap();
    assert!(
        booked(
            b.reserve(&ask("acct2", 1, window, None), "c5")
                .await
                .unwrap()
        ) < Duration::from_millis(100)
    );
}

#[tokio::test]
async fn the_shared_log_paces_every_replica_of_the_fleet() {
    // Lease 9 s: the horizon (3 s) is beyond the window (2 s), so every start is booked.
    let (a, b) = two_replicas(Duration::from_secs(9));
    let window = Duration::from_secs(2);
    let mut delays = Vec::new();
    for (i, r) in [&a, &b, &a, &b, &a].into_iter().enumerate() {
        let d = r
            .reserve(&ask("acct", 3, window, None), &format!("c{i}"))
            .await
            .unwrap();
        delays.push(booked(d));
    }
    // Three start at once, whoever asks; the fourth and fifth wait a whole window after the
    // first and second.
    for d in &delays[..3] {
        assert!(*d < Duration::from_millis(100), "{delays:?}");
    }
    for d in &delays[3..] {
        assert!(*d > Duration::from_millis(1_800), "{delays:?}");
    }
    // A deadline before the next free start reserves nothing.
    let refused = b
        .reserve(
            &ask("acct", 3, window, Some(Duration::from_millis(500))),
            "c9",
        )
        .await
        .unwrap();
    assert!(
        matches!(refused, Reservation::DeadlineFirst { .. }),
        "{refused:?}"
    );
    // Another account has its own budget.
    let other = a
        .reserve(&ask("other", 3, window, None), "c10")
        .await
        .unwrap();
    assert!(booked(other) < Duration::from_millis(100));
    assert!(a.is_healthy());
}

#[tokio::test]
async fn a_pause_holds_every_replica() {
    let (a, b) = two_replicas(Duration::from_secs(5));
    a.pause("acct", Duration::from_secs(3)).await.unwrap();
    match b
        .reserve(&ask("acct", 100, Duration::from_secs(1), None), "c1")
        .await
        .unwrap()
    {
        // Beyond the horizon (5 s / 3), so told rather than booked.
        Reservation::NotYet { delay } => {
            assert!(delay > Duration::from_millis(2_500), "{delay:?}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_claim_is_held_by_one_replica_and_the_outcome_answers_the_others() {
    let (a, b) = two_replicas(Duration::from_secs(5));
    assert!(matches!(a.claim("c1").await.unwrap(), Claim::Mine));
    assert!(
        matches!(a.claim("c1").await.unwrap(), Claim::Mine),
        "a claim is re-entrant"
    );
    match b.claim("c1").await.unwrap() {
        Claim::Held(left) => assert!(left > Duration::from_secs(4), "{left:?}"),
        other => panic!("{other:?}"),
    }
    let recorded = event("c1");
    a.record("c1", &recorded).await.unwrap();
    match b.claim("c1").await.unwrap() {
        Claim::Done(e) => {
            assert_eq!(e.id, recorded.id);
            assert_eq!(e.body, recorded.body);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_claim_lapses_after_its_lease_and_one_with_a_call_on_the_wire_is_taken_over() {
    let lease = Duration::from_secs(1);
    let (a, b) = two_replicas(lease);
    // Claimed, released: the next replica need not wait.
    assert!(matches!(a.claim("quiet").await.unwrap(), Claim::Mine));
    a.release("quiet").await.unwrap();
    assert!(matches!(b.claim("quiet").await.unwrap(), Claim::Mine));
    // Claimed and a start reserved (a call may be on the wire), then the replica is gone.
    assert!(matches!(a.claim("wired").await.unwrap(), Claim::Mine));
    booked(
        a.reserve(&ask("acct", 10, Duration::from_secs(1), None), "wired")
            .await
            .unwrap(),
    );
    assert!(matches!(b.claim("wired").await.unwrap(), Claim::Held(_)));
    tokio::time::sleep(lease + Duration::from_millis(200)).await;
    assert!(matches!(b.claim("wired").await.unwrap(), Claim::TakenOver));
    // A renewed claim does not lapse.
    assert!(matches!(a.claim("kept").await.unwrap(), Claim::Mine));
    for _ in 0..3 {
        tokio::time::sleep(lease / 2).await;
        assert!(a.renew("kept").await.unwrap());
    }
    assert!(matches!(b.claim("kept").await.unwrap(), Claim::Held(_)));
    assert!(!b.renew("kept").await.unwrap(), "only the holder renews");
}

#[tokio::test]
async fn an_unreachable_redis_is_an_error_within_the_timeout_and_unhealthy() {
    let settings = FleetSettings {
        // Nothing listens on port 1.
        redis_url: "redis://127.0.0.1:1/0".into(),
        redis_ca_file: Default::default(),
        name: "r".into(),
        partitions: 1,
        heartbeat: Duration::from_secs(1),
        member_ttl: Duration::from_secs(5),
        lease: Duration::from_secs(5),
        redis_timeout: Duration::from_millis(300),
        redis_min_replicas: 0,
    };
    let fleet = Fleet::new(
        &settings,
        "x",
        Duration::from_secs(60),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let started = std::time::Instant::now();
    assert!(fleet.claim("c").await.is_err());
    assert!(fleet.ping().await.is_err());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert!(!fleet.is_healthy());
    let shutdown = Shutdown::new();
    shutdown.abandon();
    assert!(
        fleet
            .until_answered(&shutdown, || fleet.claim("c"))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn a_claim_asked_with_a_start_books_it_only_when_the_claim_is_ours() {
    let (a, b) = two_replicas(Duration::from_secs(9));
    let window = Duration::from_secs(4);
    // Each start asked is one of its own (a member of its own).
    let start = || ask("acct", 2, window, None);
    // Ours: claimed and booked in one call, the command marked as possibly on the wire.
    let (claim, first) = a.claim_with_start("c1", false, &start()).await.unwrap();
    assert!(matches!(claim, Claim::Mine), "{claim:?}");
    assert!(booked(first.expect("a start with the claim")) < Duration::from_millis(100));
    // Held by another replica: nothing is booked, so the account's second start is free.
    let (claim, first) = b.claim_with_start("c1", false, &start()).await.unwrap();
    assert!(matches!(claim, Claim::Held(_)), "{claim:?}");
    assert!(first.is_none(), "{first:?}");
    assert!(booked(b.reserve(&start(), "c2").await.unwrap()) < Duration::from_millis(100));
    match b.reserve(&start(), "c3").await.unwrap() {
        Reservation::NotYet { .. } => {}
        other => panic!("two starts were booked, the budget is spent: {other:?}"),
    }
    // Completed: its outcome answers, and nothing is booked either.
    a.record("c1", &event("c1")).await.unwrap();
    let (claim, first) = b.claim_with_start("c1", false, &start()).await.unwrap();
    assert!(matches!(claim, Claim::Done(_)), "{claim:?}");
    assert!(first.is_none(), "{first:?}");
    // Ours, but the budget is spent: the claim is taken, the start only told.
    let (claim, first) = b.claim_with_start("c4", false, &start()).await.unwrap();
    assert!(matches!(claim, Claim::Mine), "{claim:?}");
    assert!(
        matches!(first, Some(Reservation::NotYet { .. })),
        "{first:?}"
    );
    // And a deadline before the next start says so, booking nothing.
    let soon = ask("acct", 2, window, Some(Duration::from_millis(200)));
    let (_, first) = a.claim_with_start("c5", false, &soon).await.unwrap();
    assert!(
        matches!(first, Some(Reservation::DeadlineFirst { .. })),
        "{first:?}"
    );
}

#[tokio::test]
async fn one_name_is_one_live_process_and_holds_carry_the_process() {
    use std::collections::BTreeSet;
    let name = fleet_name();
    // Two processes under one name (both take the host name and this process's id).
    let (a, b) = (quick_replica(&name), quick_replica(&name));
    assert_eq!(a.name(), b.name());
    assert_ne!(a.claimant(), b.claimant());
    let none = BTreeSet::new();
    a.heartbeat(&none).await.unwrap();
    match b.heartbeat(&none).await {
        Err(FleetError::NameInUse { holder, .. }) => assert_eq!(holder, a.claimant()),
        other => panic!("b was let in under a's name: {other:?}"),
    }
    let ids: Vec<String> = a
        .members()
        .await
        .unwrap()
        .into_iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, [a.claimant().to_owned()], "b is not a member");
    assert_eq!(a.take_hold("q").await.unwrap(), None);
    assert_eq!(
        b.take_hold("q").await.unwrap().as_deref(),
        Some(a.claimant()),
        "a's hold is not b's"
    );

    // While a lives, b's join waits a little past member_ttl, then refuses, naming a.
    let stop = CancellationToken::new();
    let alive = CancellationToken::new();
    let beating = async {
        while !alive.is_cancelled() {
            a.heartbeat(&none).await.unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let started = std::time::Instant::now();
    let (joined, ()) = tokio::join!(
        async {
            let joined = b.join(&stop).await;
            alive.cancel();
            joined
        },
        beating
    );
    match joined {
        Err(e @ FleetError::NameInUse { .. }) => {
            assert!(e.to_string().contains("fleet.name") && e.to_string().contains(a.claimant()));
            assert!(
                started.elapsed() >= Duration::from_millis(600),
                "{:?}",
                started.elapsed()
            );
        }
        other => panic!("b joined beside a live a: {other:?}"),
    }
    // a dies (no more heartbeats): b joins once a's name lapses.
    let started = std::time::Instant::now();
    b.join(&stop).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(2));
    match a.heartbeat(&none).await {
        Err(FleetError::NameInUse { holder, .. }) => assert_eq!(holder, b.claimant()),
        other => panic!("a came back beside b: {other:?}"),
    }
    b.leave().await.unwrap();
    a.heartbeat(&none).await.unwrap();
    a.leave().await.unwrap();
}

/// Deletes every key of the fleet `fleet`: Redis losing its state, as a restart without
/// persistence or a flush does (the shared test server is not flushed whole).
async fn lose_state(fleet_of: &Fleet, fleet: &str) {
    let mut redis = fleet_of.link.primary("test").await.unwrap().shared;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{fleet}:*"))
        .query_async(&mut redis)
        .await
        .unwrap();
    if !keys.is_empty() {
        let _: i64 = redis::cmd("DEL")
            .arg(&keys)
            .query_async(&mut redis)
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn after_redis_lost_its_state_holders_take_their_holds_back_and_nobody_takes_one_anew() {
    use std::collections::BTreeSet;
    let fleet = format!("tw-unit-{}", uuid::Uuid::new_v4().simple());
    let settings = |name: &str| FleetSettings {
        redis_url: redis_url(),
        redis_ca_file: Default::default(),
        name: name.to_owned(),
        partitions: 1,
        heartbeat: Duration::from_millis(100),
        // Long enough that b's hold, taken before the loss, is still in time at b's beat after
        // the seven round trips between them on a loaded machine.
        member_ttl: Duration::from_secs(3),
        lease: Duration::from_secs(6),
        redis_timeout: Duration::from_millis(900),
        redis_min_replicas: 0,
    };
    let replica = |name: &str| {
        let metrics = Arc::new(Metrics::new());
        Fleet::new(&settings(name), &fleet, Duration::from_secs(60), metrics).unwrap()
    };
    let none = BTreeSet::new();
    let (a, b) = (replica("a"), replica("b"));
    // A fleet that starts takes its holds at once: no settling.
    assert!(
        a.take_hold("qa").await.unwrap().is_some(),
        "a hold before any epoch"
    );
    a.heartbeat(&none).await.unwrap();
    b.heartbeat(&none).await.unwrap();
    assert_eq!(a.take_hold("qa").await.unwrap(), None);
    assert_eq!(b.take_hold("qb").await.unwrap(), None);

    // Redis loses everything; a heartbeats first and sees itself alone.
    lose_state(&a, &fleet).await;
    assert!(
        a.take_hold("qb").await.unwrap().is_some(),
        "a hold with no epoch"
    );
    let roster = a.beat(super::membership::Beat::Alive(&none)).await.unwrap();
    assert!(!roster.settling.is_zero(), "{roster:?}");
    assert_eq!(roster.members.len(), 1);
    // b's hold is gone from Redis, but a may not take it: b takes it back.
    assert!(a.take_hold("qb").await.unwrap().is_some());
    assert!(
        a.take_hold("qc").await.unwrap().is_some(),
        "a new hold while settling"
    );
    let roster = b.beat(super::membership::Beat::Alive(&none)).await.unwrap();
    assert!(roster.lost.is_empty(), "b lost its hold: {roster:?}");
    assert_eq!(b.take_hold("qb").await.unwrap(), None);
    assert_eq!(
        a.take_hold("qb").await.unwrap().as_deref(),
        Some(b.claimant())
    );
    // Settled after member_ttl: holds are taken anew again.
    tokio::time::sleep(Duration::from_millis(3050)).await;
    a.heartbeat(&none).await.unwrap();
    b.heartbeat(&none).await.unwrap();
    assert_eq!(a.take_hold("qc").await.unwrap(), None);

    // Lost again, and a replica that just started heartbeats first: it knows no epoch, so the
    // next one that knew the old one marks the new one as made after a loss.
    lose_state(&a, &fleet).await;
    let c = replica("c");
    let roster = c.beat(super::membership::Beat::Alive(&none)).await.unwrap();
    assert!(roster.settling.is_zero());
    let roster = a.beat(super::membership::Beat::Alive(&none)).await.unwrap();
    assert!(!roster.settling.is_zero(), "{roster:?}");
    assert!(
        c.take_hold("qd").await.unwrap().is_some(),
        "c took a hold while settling"
    );
    for r in [&a, &b, &c] {
        r.leave().await.unwrap();
    }
}

#[tokio::test]
async fn holds_are_valid_until_their_deadline_and_one_that_expired_is_not_taken_back() {
    use std::collections::BTreeSet;
    let fleet = fleet_name();
    let a = quick_replica(&fleet);
    // Under a name of its own: in this process it would share a's default one.
    let settings = FleetSettings {
        name: "b".into(),
        ..quick_settings()
    };
    let b = Fleet::new(
        &settings,
        &fleet,
        Duration::from_secs(60),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    let none = BTreeSet::new();
    // A replica that never held a queue is not fenced.
    assert!(a.holds_valid());
    a.heartbeat(&none).await.unwrap();
    assert_eq!(a.take_hold("q").await.unwrap(), None);
    let term = a.hold_term();
    assert!(a.holds_valid() && a.holds_valid_in(term));

    // Frozen past member_ttl (500 ms): the deadline (400 ms) passes, the hold expires.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!a.holds_valid(), "valid past the deadline");
    // Nobody took it: still a's heartbeat does not set it again, it counts it lost.
    a.heartbeat(&none).await.unwrap();
    assert!(!a.holds_valid());
    assert_ne!(a.hold_term(), term, "the holds lapsed: a new term");
    b.heartbeat(&none).await.unwrap();
    assert_eq!(b.take_hold("q").await.unwrap(), None, "the hold is free");

    // Given up after the consumer let go; taken again later: valid, but not for the old term.
    Holds::give_all(&a).await;
    assert!(!a.holds_valid(), "valid while nothing is held");
    Holds::give_all(&b).await;
    assert_eq!(a.take_hold("q").await.unwrap(), None);
    assert!(a.holds_valid());
    assert!(
        !a.holds_valid_in(term),
        "a command of the lapsed term may not call"
    );
    Holds::give_all(&a).await;
    a.leave().await.unwrap();
    b.leave().await.unwrap();
}

/// A replica of fleet `fleet` named `name`, with four partitions and this heartbeat.
fn beating(fleet: &str, name: &str, heartbeat: Duration) -> Arc<Fleet> {
    let settings = FleetSettings {
        name: name.into(),
        partitions: 4,
        heartbeat,
        member_ttl: heartbeat * 3 + Duration::from_secs(1),
        ..quick_settings()
    };
    Arc::new(
        Fleet::new(
            &settings,
            fleet,
            Duration::from_secs(60),
            Arc::new(Metrics::new()),
        )
        .unwrap(),
    )
}

/// Runs `fleet`'s membership with a consumer that takes each partition it is given, and lets
/// each go, 100 ms after it is told; the partitions it is to own. Stopped by `done`.
fn keeping(
    fleet: &Arc<Fleet>,
    done: &tokio_util::sync::CancellationToken,
) -> tokio::sync::watch::Receiver<std::collections::BTreeSet<u16>> {
    let (owned, mut told) = tokio::sync::watch::channel(std::collections::BTreeSet::new());
    let (consuming, report) = tokio::sync::watch::channel(std::collections::BTreeSet::new());
    let seen = told.clone();
    tokio::spawn(async move {
        while told.changed().await.is_ok() {
            let now = told.borrow_and_update().clone();
            tokio::time::sleep(Duration::from_millis(100)).await;
            consuming.send_replace(now);
        }
    });
    let (fleet, done) = (fleet.clone(), done.clone());
    tokio::spawn(async move {
        let stop = tokio_util::sync::CancellationToken::new();
        fleet.keep_membership(owned, report, stop, done).await;
    });
    seen
}

/// What `look` says `id` consumes.
async fn listed(look: &Fleet, id: &str) -> std::collections::BTreeSet<u16> {
    let members = look.members().await.unwrap();
    members
        .into_iter()
        .find(|m| m.id == id)
        .map(|m| m.partitions)
        .unwrap_or_default()
}

/// A replica says what it consumes as soon as that changes, not at its next heartbeat: with a
/// heartbeat of 30 s, the partitions it took are listed within seconds.
#[tokio::test]
async fn a_replica_says_at_once_what_it_consumes_now() {
    let name = fleet_name();
    let a = beating(&name, "a", Duration::from_secs(30));
    let done = tokio_util::sync::CancellationToken::new();
    let _owned = keeping(&a, &done);
    let look = beating(&name, "look", Duration::from_secs(30));
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while listed(&look, a.claimant()).await.len() < 4 {
        assert!(
            std::time::Instant::now() < until,
            "the partitions taken were not listed before the next heartbeat"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done.cancel();
}

/// A replica that joins is to own partitions another still consumes: once the other has let
/// them go (it notices at its own heartbeat, 1 s), the one waiting takes them within a quarter
/// of its heartbeat (here 20 s), not at its next heartbeat.
#[tokio::test]
async fn a_replica_waiting_for_partitions_takes_them_soon_after_they_are_let_go() {
    let name = fleet_name();
    let a = beating(&name, "a", Duration::from_secs(1));
    let done = tokio_util::sync::CancellationToken::new();
    let a_owns = keeping(&a, &done);
    let look = beating(&name, "look", Duration::from_secs(30));
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while listed(&look, a.claimant()).await.len() < 4 {
        assert!(
            std::time::Instant::now() < until,
            "a never consumed all four"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let b = beating(&name, "b", Duration::from_secs(20));
    let b_owns = keeping(&b, &done);
    let until = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (a_now, b_now) = (a_owns.borrow().len(), b_owns.borrow().len());
        if a_now + b_now == 4 && b_now >= 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < until,
            "b owns {b_now} and a {a_now} 15 s after b joined (b's heartbeat is 20 s)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done.cancel();
}

/// A managed service's user may be kept from Redis's "dangerous" commands (INFO and ROLE among
/// them): the primary is then taken at its word, and the fleet still works.
#[tokio::test]
async fn a_user_kept_from_info_and_role_still_reaches_its_primary() {
    let user = format!("tw-unit-{}", uuid::Uuid::new_v4().simple());
    let admin = redis::Client::open(redis_url()).unwrap();
    let mut admin = admin.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            &user,
            "on",
            ">secret-of-the-test",
            "~*",
            "+@all",
            "-@dangerous",
        ])
        .query_async(&mut admin)
        .await
        .unwrap();
    let url = redis_url().replacen(
        "redis://",
        &format!("redis://{user}:secret-of-the-test@"),
        1,
    );
    let fleet = replica_at(url);
    let answered = fleet.ping().await;
    let claimed = fleet.claim("c-1").await;
    let _: i64 = redis::cmd("ACL")
        .arg(&["DELUSER", &user])
        .query_async(&mut admin)
        .await
        .unwrap();
    answered.unwrap();
    claimed.unwrap();
}

/// A start asked again under its member (its first answer lost, or not acknowledged by the
/// replicas) is booked once: the account's log holds one start, not one per try.
#[tokio::test]
async fn a_start_asked_again_under_its_member_is_booked_once() {
    let fleet = replica(&fleet_name(), Duration::from_secs(3));
    let account = format!("acct-{}", uuid::Uuid::new_v4().simple());
    let request = ask(&account, 5, Duration::from_secs(60), None);
    for _ in 0..3 {
        booked(fleet.reserve(&request, "c-1").await.unwrap());
    }
    let booked = fleet
        .booked(&account, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(booked.starts.len(), 1, "{booked:?}");
    // Another start of the same account is one more.
    booked_start(&fleet, &account).await;
    let booked = fleet
        .booked(&account, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(booked.starts.len(), 2, "{booked:?}");
}

async fn booked_start(fleet: &Fleet, account: &str) {
    let other = ask(account, 5, Duration::from_secs(60), None);
    booked(fleet.reserve(&other, "c-2").await.unwrap());
}

/// A `redis-server` of a test's own, killed when dropped.
struct OwnServer(std::process::Child);

impl Drop for OwnServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A Redis Cluster node is refused with an error that says why, never written to.
#[tokio::test]
async fn a_redis_cluster_node_is_refused_with_why() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let _server = OwnServer(
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--cluster-enabled",
                "yes",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server starts"),
    );
    let url = format!("redis://127.0.0.1:{port}/0");
    let client = redis::Client::open(url.as_str()).unwrap();
    for _ in 0..100 {
        if client.get_multiplexed_async_connection().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let fleet = replica_at(url);
    let refused = fleet.ping().await.expect_err("a cluster node is refused");
    assert!(
        matches!(refused, FleetError::ClusterMode { .. }),
        "{refused}"
    );
    assert!(refused.to_string().contains("cluster mode"), "{refused}");
    assert!(!fleet.is_healthy());
}

/// A replica of a fleet of its own name, with quick membership, on the Redis at `url`.
fn replica_at(url: String) -> Fleet {
    let settings = FleetSettings {
        redis_url: url,
        ..quick_settings()
    };
    Fleet::new(
        &settings,
        &fleet_name(),
        Duration::from_secs(60),
        Arc::new(Metrics::new()),
    )
    .unwrap()
}
