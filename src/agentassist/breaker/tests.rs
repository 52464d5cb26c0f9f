//! The breaker's states and waits, on tokio's paused clock.

use std::sync::atomic::{AtomicU32, Ordering};

use super::*;
use crate::agentassist::client::{ErrorKind, classify};

const OPEN_AFTER: Duration = Duration::from_secs(30);
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

fn breaker() -> Arc<Breaker> {
    let settings = BreakerSettings {
        enabled: true,
        open_after: OPEN_AFTER,
        probe_interval: PROBE_INTERVAL,
    };
    Arc::new(Breaker::new(&settings, Arc::new(Metrics::new())))
}

fn status(code: u16) -> Result<ApiResponse, ApiError> {
    classify(code, None, b"{}", false)
}

fn refused() -> Result<ApiResponse, ApiError> {
    Err(ApiError::without_status(
        ErrorKind::Connection,
        "connection refused",
    ))
}

async fn advance(by: Duration) {
    // Lets woken tasks start their waits before the clock moves, and finish after.
    tokio::task::yield_now().await;
    tokio::time::advance(by).await;
    tokio::task::yield_now().await;
}

fn in_(from_now: Duration) -> Option<std::time::Instant> {
    Some((Instant::now() + from_now).into_std())
}

#[tokio::test(start_paused = true)]
async fn opens_after_open_after_of_outage_failures_with_no_answer() {
    let b = breaker();
    assert!(
        b.record(&status(503)).is_some(),
        "a 503 is an outage failure"
    );
    advance(Duration::from_secs(29)).await;
    b.record(&refused());
    assert!(!b.is_open(), "29 s of failures is not yet open_after");
    // An answer closes the window: the count starts again.
    assert!(b.record(&status(400)).is_none());
    b.record(&status(503));
    advance(Duration::from_secs(29)).await;
    b.record(&status(500));
    assert!(!b.is_open());
    advance(Duration::from_secs(1)).await;
    b.record(&status(408));
    assert!(b.is_open());
    assert_eq!(b.metrics.breaker_open.get(), 1);
    assert_eq!(b.metrics.breaker_openings.get(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_rate_limit_is_an_answer_and_a_success_closes_an_open_breaker() {
    let b = breaker();
    b.record(&status(503));
    advance(OPEN_AFTER).await;
    assert!(
        b.record(&status(429)).is_none(),
        "a 429 comes from an API that is up"
    );
    b.record(&status(503));
    assert!(!b.is_open(), "the 429 closed the window");
    advance(OPEN_AFTER).await;
    b.record(&status(503));
    assert!(b.is_open());
    advance(Duration::from_secs(3)).await;
    // A call that was on the wire when it opened, answered: the API is back.
    b.record(&status(200));
    assert!(!b.is_open());
    assert_eq!(b.metrics.breaker_open.get(), 0);
    assert_eq!(b.metrics.breaker_open_time.get(), 3.0);
}

#[tokio::test(start_paused = true)]
async fn pass_holds_while_open_and_forgives_the_budget_after_a_confirmed_outage() {
    let b = breaker();
    let shutdown = Shutdown::new();
    let mut ticket = b.ticket();
    assert_eq!(b.pass(&mut ticket, None, &shutdown).await, Ok(false));
    b.record(&status(503));
    advance(OPEN_AFTER).await;
    b.record(&status(503));
    assert!(b.is_open());

    let waiting = {
        let b = b.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { b.pass(&mut ticket, None, &shutdown).await })
    };
    advance(Duration::from_secs(60)).await;
    assert!(!waiting.is_finished(), "held while open");
    assert_eq!(b.metrics.breaker_held.get(), 1);
    // A call still on the wire fails: the outage is confirmed.
    b.record(&refused());
    b.answered(ClosedBy::Probe(Some(401)));
    assert_eq!(waiting.await.unwrap(), Ok(true), "a fresh budget");
    assert_eq!(b.metrics.breaker_held.get(), 0);

    // An opening no failure confirmed ends without forgiving anything.
    let mut ticket = b.ticket();
    b.record(&status(503));
    advance(OPEN_AFTER).await;
    b.record(&status(503));
    assert!(b.is_open());
    b.answered(ClosedBy::Probe(Some(401)));
    assert_eq!(b.pass(&mut ticket, None, &shutdown).await, Ok(false));
}

#[tokio::test(start_paused = true)]
async fn waits_end_at_the_deadline_and_at_abandon() {
    let b = breaker();
    b.record(&status(503));
    advance(OPEN_AFTER).await;
    b.record(&status(503));
    let shutdown = Shutdown::new();
    let mut ticket = b.ticket();
    let deadline = in_(Duration::from_secs(7));
    assert_eq!(
        b.pass(&mut ticket, deadline, &shutdown).await,
        Err(Interrupted::Deadline)
    );
    shutdown.abandon();
    assert_eq!(
        b.pass(&mut ticket, None, &shutdown).await,
        Err(Interrupted::Abandoned)
    );
    assert_eq!(b.metrics.breaker_held.get(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_waits_for_an_answer_or_for_the_breaker_to_open() {
    let b = breaker();
    let shutdown = Shutdown::new();
    // Another command's success after this failure: the API answers, one last attempt.
    let failure = b.record(&status(503)).unwrap();
    let verdict = {
        let b = b.clone();
        let shutdown = shutdown.clone();
        tokio::spawn(async move { b.verdict(failure, None, &shutdown).await })
    };
    advance(Duration::from_secs(10)).await;
    assert!(!verdict.is_finished());
    b.record(&status(200));
    assert_eq!(verdict.await.unwrap(), Ok(Verdict::Answered));

    // No other call: when the window reaches open_after, the breaker opens by itself.
    let failure = b.record(&status(503)).unwrap();
    let started = Instant::now();
    assert_eq!(
        b.verdict(failure, None, &shutdown).await,
        Ok(Verdict::Opened)
    );
    assert_eq!(started.elapsed(), OPEN_AFTER);
    assert!(b.is_open());

    // And the deadline still ends the wait.
    b.answered(ClosedBy::Probe(None));
    let failure = b.record(&status(503)).unwrap();
    assert_eq!(
        b.verdict(failure, in_(Duration::from_secs(5)), &shutdown)
            .await,
        Err(Interrupted::Deadline)
    );
    assert!(!b.is_open());
}

#[tokio::test(start_paused = true)]
async fn run_probes_every_interval_while_open_until_the_api_answers() {
    let b = breaker();
    let probes = Arc::new(AtomicU32::new(0));
    let stop = CancellationToken::new();
    let prober = {
        let (b, probes, stop) = (b.clone(), probes.clone(), stop.clone());
        tokio::spawn(async move {
            b.run(
                || {
                    let n = probes.fetch_add(1, Ordering::SeqCst);
                    async move { Some(if n < 2 { status(503) } else { status(400) }) }
                },
                stop,
            )
            .await;
        })
    };
    advance(Duration::from_secs(120)).await;
    assert_eq!(probes.load(Ordering::SeqCst), 0, "no probe while closed");

    b.record(&status(502));
    advance(OPEN_AFTER).await;
    b.record(&status(502));
    assert!(b.is_open());
    let mut ticket = Ticket { recoveries: 0 };
    for expected in 1..=2 {
        advance(PROBE_INTERVAL).await;
        assert_eq!(probes.load(Ordering::SeqCst), expected);
        assert!(b.is_open(), "a failed probe keeps it open");
    }
    advance(PROBE_INTERVAL).await;
    assert_eq!(probes.load(Ordering::SeqCst), 3);
    assert!(!b.is_open(), "the 401 is an answer");
    let shutdown = Shutdown::new();
    assert_eq!(
        b.pass(&mut ticket, None, &shutdown).await,
        Ok(true),
        "failed probes confirmed the outage"
    );
    let m = &b.metrics;
    let probe = |result| {
        m.breaker_probes
            .get_or_create(&ProbeLabels { result })
            .get()
    };
    assert_eq!((probe("failed"), probe("answered")), (2, 1));
    advance(Duration::from_secs(120)).await;
    assert_eq!(probes.load(Ordering::SeqCst), 3, "no probe once closed");
    stop.cancel();
    prober.await.unwrap();
}
