//! The whole history checked, from the simulator's log (its own clock) and the events:
//!
//! - **lost**: commands published (confirmed) with no terminal event, less those an operator
//!   deleted (below);
//! - **deleted by the operator**: commands in an account queue when the operator deleted it.
//!   The broker says how many messages each deleted queue held, not which: the soak puts down to
//!   the operator, deletion after deletion, up to that many of the bursting account's commands
//!   that were confirmed before the deletion and never ended, oldest first (a session's
//!   commands set aside are older than those still on their way). Every other command that
//!   never ended is lost, whatever fault came before: those confirmed after the deletion, those
//!   of other accounts, and those beyond the broker's count (acked on their source after the
//!   queue was gone, say). The split is exact in number unless a deleted message also ended
//!   through another copy, or a command lost otherwise was put down to the operator: the
//!   report gives the losses as a count at least, and at most that count plus the deleted;
//! - **transferred twice**: commands accepted by the API more than once, less those whose call
//!   was on the wire when a replica was killed or frozen, or answered within the second
//!   before (its outcome perhaps not recorded yet): the contract allows those, *in doubt*.
//!   Redis killed comes back empty (no persistence), forgetting claims and the budget: calls
//!   again, overlaps and windows over the limit across such a restart are counted apart, as
//!   what a Redis without persistence costs;
//! - **reordered**: sessions whose commands were first called out of publish order;
//! - **overlapping**: sessions with a call arriving before the previous one was answered;
//! - **pacing**: for each account whose budget the worker reaches (20 per 5 s, 5 per 3 s), any
//!   `rate_window` of the simulator's arrival times (its own clock, as the vendor counts)
//!   holding more than `rate_limit` calls, probes and refused calls included;
//! - **SIGTERM not obeyed**: a replica asked to stop during the faults that had not exited
//!   15 s later, or exited with a failure.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use transfer_worker::tools::simulator::RecordedRequest;

use crate::Options;
use crate::feed::{BURST_SESSIONS, FREE_SESSIONS, FaultRecord, History, PACED_SESSIONS, Sent};
use crate::rig::{ACCOUNTS, Account, BUDGETED, BURST};

/// How long after its answer a killed replica may not have recorded a call's outcome yet.
const UNRECORDED: Duration = Duration::from_secs(1);
/// How far after a lost command's publish the report looks for the faults that followed.
const AFTERMATH: Duration = Duration::from_secs(30);

pub struct Report {
    pub text: String,
    pub failed: bool,
    /// Commands transferred twice or lost (a few): what the replicas' logs say of them is
    /// printed with a failed report.
    pub suspects: Vec<String>,
}

/// The commands that never ended, split between the operator's deletions and the worker.
struct Unended<'a> {
    /// Lost by the worker.
    lost: Vec<(&'a str, Sent)>,
    /// Put down to the operator's deletions, and to which deletion (index).
    deleted: Vec<(&'a str, usize)>,
}

fn unended<'a>(h: &'a History, open: &[&'a String]) -> Unended<'a> {
    let mut open: Vec<(&str, Sent)> = open
        .iter()
        .filter_map(|id| Some((id.as_str(), *h.commands.get(id.as_str())?)))
        .collect();
    open.sort_by_key(|(id, sent)| (sent.at, *id));
    let mut taken: HashSet<&str> = HashSet::new();
    let mut deleted = Vec::new();
    let mut deletions: Vec<(usize, &crate::feed::Deletion)> =
        h.deletions.iter().enumerate().collect();
    deletions.sort_by_key(|(_, d)| d.done);
    for (i, d) in deletions {
        let mut budget = d.messages();
        for (id, sent) in &open {
            if budget == 0 || sent.at > d.done {
                break;
            }
            if sent.account == BURST.id && taken.insert(id) {
                deleted.push((*id, i));
                budget -= 1;
            }
        }
    }
    let lost = open
        .into_iter()
        .filter(|(id, _)| !taken.contains(id))
        .collect();
    Unended { lost, deleted }
}

/// Whether every command in `open` (not ended) may be in a queue the operator deleted.
pub fn may_be_deleted(h: &History, open: &[&String]) -> bool {
    !open.is_empty() && unended(h, open).lost.is_empty()
}

fn aid(r: &RecordedRequest) -> &str {
    r.body["aId"]
        .as_str()
        .unwrap_or_default()
        .trim_start_matches("a-")
}

/// Windows of `account`'s calls, at the simulator's clock.
struct Windows {
    calls: usize,
    over: usize,
    over_at_redis: usize,
    /// Where windows over the limit began: the first call of each run of them.
    over_at: Vec<Instant>,
    /// The shortest time `limit + 1` consecutive calls took.
    tightest: Option<Duration>,
}

fn windows(h: &History, requests: &[RecordedRequest], account: &Account) -> Windows {
    let mut arrivals: Vec<Instant> = requests
        .iter()
        .filter(|r| r.account_id.as_deref() == Some(account.id))
        .map(|r| r.received_at)
        .collect();
    arrivals.sort();
    let limit = usize::try_from(account.limit).unwrap_or(usize::MAX);
    let mut w = Windows {
        calls: arrivals.len(),
        over: 0,
        over_at_redis: 0,
        over_at: Vec::new(),
        tightest: None,
    };
    let mut last_over: Option<Instant> = None;
    // Any `limit + 1` calls within less than a window: some window holds them all. The shared
    // budget is Redis's sliding log: a restart without persistence forgets it, so a window
    // reaching over a restart is counted apart.
    for calls in arrivals.windows(limit + 1) {
        let span = calls[limit] - calls[0];
        w.tightest = Some(w.tightest.map_or(span, |t| t.min(span)));
        if span < account.window {
            if h.redis_down
                .iter()
                .any(|&(_, up)| calls[0] <= up + account.window && up <= calls[limit])
            {
                w.over_at_redis += 1;
            } else {
                w.over += 1;
                if last_over.is_none_or(|l| calls[0] > l) {
                    w.over_at.push(calls[0]);
                }
                last_over = Some(calls[limit]);
            }
        }
    }
    w
}

pub fn check(
    o: &Options,
    h: &History,
    requests: &[RecordedRequest],
    started: Instant,
    took: Duration,
) -> Report {
    let secs = |t: Instant| t.saturating_duration_since(started).as_secs_f64();
    let mut by_command: HashMap<&str, Vec<&RecordedRequest>> = HashMap::new();
    for r in requests {
        if let Some(id) = r.body["aId"].as_str().and_then(|a| a.strip_prefix("a-")) {
            by_command.entry(id).or_default().push(r);
        }
    }
    let on_the_wire_at = |r: &RecordedRequest, k: Instant| {
        r.received_at <= k && r.answered_at.is_none_or(|a| a >= k)
    };
    // On the wire when its replica was killed or frozen, or answered so shortly before that
    // the replica may not have recorded the outcome yet.
    let in_flight_at_a_kill = |r: &RecordedRequest| {
        h.abrupt.iter().any(|&k| {
            on_the_wire_at(r, k)
                || r.received_at <= k && r.answered_at.is_some_and(|a| a + UNRECORDED >= k)
        })
    };
    // Redis restarted empty forgets claims: a call made before it was back and not answered
    // (and recorded) before it went down is in doubt, as at a replica's kill.
    let in_doubt_at_redis = |r: &RecordedRequest| {
        h.redis_down.iter().any(|&(down, up)| {
            r.received_at <= up && r.answered_at.is_none_or(|a| a + UNRECORDED >= down)
        })
    };
    // ... and the outcomes it recorded: a command answered before it went down but not ended by
    // then (its outcome was in Redis only, its publish held up by the broker) and called again
    // after is in doubt too.
    let recorded_only_at_redis = |id: &str, calls: &[&RecordedRequest]| {
        h.redis_down.iter().any(|&(down, _)| {
            calls
                .iter()
                .any(|r| r.answered_at.is_some_and(|a| a < down))
                && h.ended_at.get(id).is_none_or(|&e| e > down)
                && calls.iter().any(|r| r.received_at > down)
        })
    };

    // Lost, deleted by the operator.
    let open: Vec<&String> = h
        .commands
        .keys()
        .filter(|id| !h.ended.contains_key(*id))
        .collect();
    let Unended { lost, deleted } = unended(h, &open);
    let session_of: HashMap<&str, &str> = h
        .sessions
        .iter()
        .flat_map(|(s, ids)| ids.iter().map(move |id| (id.as_str(), s.as_str())))
        .collect();
    // The fault under way when a lost command was published, or the next one.
    let culprit = |at: Instant| -> Option<&FaultRecord> { h.log.iter().find(|f| f.end >= at) };
    let mut lost_after: BTreeMap<&str, usize> = BTreeMap::new();
    let mut lost_by_account: BTreeMap<&str, usize> = BTreeMap::new();
    for (_, sent) in &lost {
        *lost_after
            .entry(culprit(sent.at).map_or("no fault (after the last one)", |f| f.name))
            .or_default() += 1;
        *lost_by_account.entry(sent.account).or_default() += 1;
    }
    let lost_detail: Vec<String> = lost
        .iter()
        .take(10)
        .map(|(id, sent)| {
            let then: Vec<String> = h
                .log
                .iter()
                .filter(|f| f.end >= sent.at && f.start <= sent.at + AFTERMATH)
                .map(|f| format!("{} at {:.1} s", f.name, secs(f.start)))
                .collect();
            let called = by_command.get(id).map_or(0, Vec::len);
            format!(
                "{id} ({}, {}, published at {:.1} s, {called} calls; faults from then on: {})",
                sent.account,
                session_of.get(id).copied().unwrap_or("?"),
                secs(sent.at),
                if then.is_empty() {
                    "none".to_owned()
                } else {
                    then.join(", ")
                }
            )
        })
        .collect();

    // Twice.
    let (mut twice, mut in_doubt, mut in_doubt_redis) = (Vec::new(), 0usize, 0usize);
    for (id, calls) in &by_command {
        let accepted = calls
            .iter()
            .filter(|r| (200..300).contains(&r.status))
            .count();
        if accepted > 1 {
            if calls.iter().any(|r| in_flight_at_a_kill(r)) {
                in_doubt += 1;
            } else if calls.iter().any(|r| in_doubt_at_redis(r))
                || recorded_only_at_redis(id, calls)
            {
                in_doubt_redis += 1;
            } else {
                twice.push(*id);
            }
        }
    }
    // What each call of a command transferred twice met: when it came and was answered, how,
    // and when the command's first terminal event came.
    twice.sort_unstable();
    let twice_detail: Vec<String> = twice
        .iter()
        .take(5)
        .map(|id| {
            let calls: Vec<String> = by_command.get(id).map_or_else(Vec::new, |calls| {
                calls
                    .iter()
                    .map(|r| {
                        format!(
                            "{} at {:.3} s, answered {}",
                            r.status,
                            secs(r.received_at),
                            r.answered_at
                                .map_or("never".to_owned(), |a| format!("{:.3} s", secs(a)))
                        )
                    })
                    .collect()
            });
            let sent = h.commands.get(*id);
            format!(
                "{id} ({}, {}, published at {}, ended at {}): {}",
                sent.map_or("?", |s| s.account),
                session_of.get(id).copied().unwrap_or("?"),
                sent.map_or("?".to_owned(), |s| format!("{:.3} s", secs(s.at))),
                h.ended_at
                    .get(*id)
                    .map_or("never".to_owned(), |&e| format!("{:.3} s", secs(e))),
                calls.join("; ")
            )
        })
        .collect();
    // Reordered, overlapping (per session, from every call of its commands).
    let (mut reordered, mut overlapping, mut overlap_at_redis) = (Vec::new(), Vec::new(), 0usize);
    for (session, ids) in &h.sessions {
        let mut calls: Vec<&RecordedRequest> = ids
            .iter()
            .filter_map(|id| by_command.get(id.as_str()))
            .flatten()
            .copied()
            .collect();
        calls.sort_by_key(|r| r.seq);
        let mut first: Vec<&str> = Vec::new();
        for r in &calls {
            if !first.contains(&aid(r)) {
                first.push(aid(r));
            }
        }
        let wanted: Vec<&str> = ids
            .iter()
            .map(String::as_str)
            .filter(|id| first.contains(id))
            .collect();
        if first != wanted {
            let origin = calls.first().map(|r| r.received_at);
            let detail: Vec<String> = calls
                .iter()
                .map(|r| {
                    format!(
                        "{}:{}@{}",
                        aid(r).rsplit('c').next().unwrap_or_default(),
                        r.status,
                        origin.map_or(0, |o| (r.received_at - o).as_millis())
                    )
                })
                .collect();
            reordered.push(format!("{session} {detail:?}"));
        }
        for w in calls.windows(2) {
            if w[0].answered_at.is_none_or(|a| w[1].received_at < a) {
                if in_flight_at_a_kill(w[0]) || in_flight_at_a_kill(w[1]) {
                    continue;
                }
                if in_doubt_at_redis(w[0]) || in_doubt_at_redis(w[1]) {
                    overlap_at_redis += 1;
                    continue;
                }
                overlapping.push(format!(
                    "{session}: {} at {:.1} s while {}",
                    aid(w[1]),
                    secs(w[1].received_at),
                    aid(w[0])
                ));
                break;
            }
        }
    }
    // Pacing, at the simulator's clock.
    let paced: Vec<(&Account, Windows)> = BUDGETED
        .iter()
        .map(|a| (a, windows(h, requests, a)))
        .collect();
    let over: usize = paced.iter().map(|(_, w)| w.over).sum();
    let over_at_redis: usize = paced.iter().map(|(_, w)| w.over_at_redis).sum();
    // SIGTERM.
    let disobeyed: Vec<String> = h
        .stopped
        .iter()
        .filter(|s| !s.status.is_some_and(|s| s.success()))
        .map(|s| {
            format!(
                "{} at {:.1} s: {}",
                s.name,
                secs(s.at),
                s.status
                    .map_or("killed after 15 s".to_owned(), |s| s.to_string())
            )
        })
        .collect();
    let unclean_at_end: Vec<String> = h
        .stopped_at_end
        .iter()
        .filter(|s| !s.status.is_some_and(|s| s.success()))
        .map(|s| format!("{}: {:?}", s.name, s.status))
        .collect();

    let published = h.commands.len();
    let per_account = |a: &str| h.commands.values().filter(|s| s.account == a).count();
    let ended = h.ended.len();
    let statuses = requests.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(r.status).or_insert(0u64) += 1;
        m
    });
    let failed_events = h
        .ended
        .values()
        .filter(|names| names.iter().any(|n| n != "transfer.succeeded"))
        .count();
    let mut text = String::new();
    let _ = writeln!(
        text,
        "chaos soak: seed {}, {:.0} s ({} s of faults), {} replicas, 3 broker nodes, Redis, the simulator",
        o.seed,
        took.as_secs_f64(),
        o.duration.as_secs(),
        crate::rig::REPLICAS,
    );
    let _ = writeln!(
        text,
        "  fed {published} commands in {} sessions: {} {} ({PACED_SESSIONS} sessions), {} {} \
         ({FREE_SESSIONS}), {} {} ({BURST_SESSIONS}, in {} bursts); {ended} ended ({failed_events} \
         not with transfer.succeeded); {} API requests by status {statuses:?}",
        h.sessions.len(),
        per_account(ACCOUNTS[0].id),
        ACCOUNTS[0].id,
        per_account(ACCOUNTS[1].id),
        ACCOUNTS[1].id,
        per_account(BURST.id),
        BURST.id,
        h.bursts.0,
        requests.len(),
    );
    let total_faults: u32 = h.faults.values().sum();
    let _ = writeln!(text, "  faults ({total_faults}): {:?}", h.faults);
    for f in &h.log {
        let _ = writeln!(text, "{}", f.line);
    }
    let deleted_messages: u64 = h
        .deletions
        .iter()
        .map(crate::feed::Deletion::messages)
        .sum();
    for (i, d) in h.deletions.iter().enumerate() {
        let put = deleted.iter().filter(|(_, k)| *k == i).count();
        let _ = writeln!(
            text,
            "  operator's deletion at {:.1} s: {} queues holding at most {} messages (the broker's \
             ready count, and what each queue's reader may have held); {put} unended commands put \
             down to it",
            secs(d.sent),
            d.queues.len(),
            d.messages(),
        );
    }
    let _ = writeln!(
        text,
        "  totals: published {published}, ended {ended}, lost {}, doubled {}, over-limit \
         windows {over}, deleted by the operator {}",
        lost.len(),
        twice.len(),
        deleted.len()
    );
    let verdicts = [
        (
            "lost",
            lost.len(),
            format!(
                "by account {lost_by_account:?}; by the fault under way at publish or next: \
                 {lost_after:?}; first ones: {lost_detail:#?}"
            ),
        ),
        (
            "transferred twice",
            twice.len(),
            format!("{twice_detail:#?}"),
        ),
        (
            "sessions reordered",
            reordered.len(),
            format!("{:?}", reordered.iter().take(5).collect::<Vec<_>>()),
        ),
        (
            "sessions overlapping",
            overlapping.len(),
            format!("{:?}", overlapping.iter().take(5).collect::<Vec<_>>()),
        ),
        (
            "pacing windows over the limit (the simulator's arrivals)",
            over,
            String::new(),
        ),
        (
            "SIGTERM not obeyed",
            disobeyed.len(),
            format!("{disobeyed:?}"),
        ),
    ];
    let mut failed = false;
    for (what, n, detail) in verdicts {
        failed |= n > 0;
        let _ = writeln!(
            text,
            "  {what}: {n} {}",
            if n > 0 { detail } else { String::new() }
        );
    }
    for (a, w) in &paced {
        let _ = writeln!(
            text,
            "    {} ({} per {:?}): {} calls, {} windows over, {} more across a Redis restart; \
             tightest {} calls within {}{}",
            a.id,
            a.limit,
            a.window,
            w.calls,
            w.over,
            w.over_at_redis,
            a.limit + 1,
            w.tightest
                .map_or("-".to_owned(), |t| format!("{:.3} s", t.as_secs_f64())),
            if w.over_at.is_empty() {
                String::new()
            } else {
                let at: Vec<String> = w
                    .over_at
                    .iter()
                    .map(|&t| format!("{:.1} s", secs(t)))
                    .collect();
                format!("; over from {}", at.join(", "))
            },
        );
    }
    let _ = writeln!(
        text,
        "  deleted by the operator: {} commands of {BURST} (at most {deleted_messages} messages \
         were in the {} queues deleted: the broker's ready count, and what their readers may \
         have held); losses are thus at least {} and at most {} (if \
         none of those was in a deleted queue after all)",
        deleted.len(),
        h.deletions.iter().map(|d| d.queues.len()).sum::<usize>(),
        lost.len(),
        lost.len() + deleted.len(),
        BURST = BURST.id,
    );
    let _ = writeln!(
        text,
        "  in doubt, as the contract allows: {in_doubt} commands called again after a replica \
         was killed or frozen with the call on the wire\n  outside the contract, Redis restarted \
         without its data (claims and budgets forgotten): {in_doubt_redis} commands called again, \
         {overlap_at_redis} calls overlapping, {over_at_redis} windows over the limit"
    );
    if !unclean_at_end.is_empty() {
        let _ = writeln!(
            text,
            "  at the end, replicas that did not exit cleanly on SIGTERM: {unclean_at_end:?}"
        );
    }
    let _ = writeln!(text, "  verdict: {}", if failed { "FAILED" } else { "ok" });
    let suspects = twice
        .iter()
        .map(|id| (*id).to_owned())
        .chain(lost.iter().map(|(id, _)| (*id).to_owned()))
        .take(3)
        .collect();
    Report {
        text,
        failed,
        suspects,
    }
}
