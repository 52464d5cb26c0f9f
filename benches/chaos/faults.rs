//! The faults, one at a time, each drawn and timed by the seeded generator.

use std::time::{Duration, Instant};

use lapin::options::QueueDeleteOptions;

use crate::amqp;
use crate::feed::Deletion;
use crate::rig::{BURST, FREE, LATENCY, MEMBER_TTL, PACED, Rig, SLOW, cluster, node_url};
use crate::{Rng, lock};

/// How long the operator waits for the bursting account to have a backlog in its queues.
const BACKLOG_WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL, started again 1–3 s later.
    Kill,
    /// SIGTERM, started again (same name) once it has exited.
    Restart,
    /// A new replica (new name) first; once it has joined, 0–4 s later, SIGTERM to an old one.
    Roll,
    /// SIGSTOP for 4–9 s (past `fleet.member_ttl`), then SIGCONT.
    Freeze,
    /// The bursting account's queues deleted while they hold a backlog.
    DeleteAccountQueues,
    /// Broker node 1 or 3 stopped or killed, 2–5 s.
    BrokerNode,
    /// Redis killed, 1–4 s, back empty: the primary and its replica.
    Redis,
    /// Redis's primary killed; the sentinels promote the replica, and the old primary comes
    /// back as the new one's replica.
    Failover,
    /// The API answering 503, 2–6 s.
    ApiDown,
    /// The API taking 2 s a call, 3–6 s.
    ApiSlow,
    /// What node 1 sends held back, 2–6 s.
    Stall,
}

impl Fault {
    /// Every kind, once: a round of faults.
    pub const ALL: [Fault; 11] = [
        Fault::Kill,
        Fault::Restart,
        Fault::Roll,
        Fault::Freeze,
        Fault::DeleteAccountQueues,
        Fault::BrokerNode,
        Fault::Redis,
        Fault::Failover,
        Fault::ApiDown,
        Fault::ApiSlow,
        Fault::Stall,
    ];
}

impl Rig {
    /// Applies `fault`; its name for the report, and what exactly happened.
    pub async fn apply(
        &mut self,
        fault: Fault,
        rng: &mut Rng,
    ) -> anyhow::Result<(&'static str, String)> {
        Ok(match fault {
            Fault::Kill => {
                let r = self.fleet.pick(rng);
                let down = rng.millis(1000, 3000);
                self.fleet.kill(r);
                tokio::time::sleep(down).await;
                self.fleet.start(r)?;
                let name = &self.fleet.replicas[r].name;
                ("replica killed", format!("{name}, back after {down:?}"))
            }
            Fault::Restart => {
                let r = self.fleet.pick(rng);
                self.fleet.stop(r).await;
                self.fleet.start(r)?;
                let name = &self.fleet.replicas[r].name;
                ("replica restarted (SIGTERM)", name.clone())
            }
            Fault::Roll => {
                let r = self.fleet.pick(rng);
                let old = self.fleet.replicas[r].name.clone();
                let settle = rng.millis(0, 4000);
                match self.fleet.roll(r, settle).await? {
                    Ok((new, joined)) => (
                        "rolling update (new replica first)",
                        format!(
                            "{new} joined in {:.1} s, {old} got SIGTERM {settle:?} later",
                            joined.as_secs_f64()
                        ),
                    ),
                    Err(why) => ("rolling update rolled back", why),
                }
            }
            Fault::Freeze => {
                let r = self.fleet.pick(rng);
                let frozen = rng.millis(4000, 9000);
                self.fleet.freeze(r, frozen).await?;
                let name = &self.fleet.replicas[r].name;
                (
                    "replica frozen (SIGSTOP)",
                    format!("{name} for {frozen:?} (member_ttl {MEMBER_TTL:?})"),
                )
            }
            Fault::DeleteAccountQueues => match self.delete_account_queues(rng).await? {
                Some(detail) => ("account queues deleted by the operator", detail),
                None => (
                    "account queue deletion skipped",
                    format!("no backlog in {BACKLOG_WAIT:?}"),
                ),
            },
            Fault::BrokerNode => {
                let n = if rng.below(2) == 0 { "1" } else { "3" };
                let kill = rng.below(2) == 0;
                cluster(&[if kill { "kill-node" } else { "stop-node" }, n])?;
                tokio::time::sleep(rng.millis(2000, 5000)).await;
                cluster(&["start-node", n])?;
                (
                    if kill {
                        "broker node killed"
                    } else {
                        "broker node stopped"
                    },
                    format!("node {n}"),
                )
            }
            Fault::Redis => {
                let killed = Instant::now();
                let down = rng.millis(1000, 4000);
                self.redis.kill_all(down).await?;
                lock(&self.history)
                    .redis_down
                    .push((killed, Instant::now()));
                ("Redis killed", format!("back after {down:?}, empty"))
            }
            Fault::Failover => {
                let (promoted, in_sync) = self.redis.fail_over().await?;
                (
                    "Redis primary failed over",
                    format!(
                        "replica promoted after {promoted:?}, a replica in sync again after {in_sync:?}"
                    ),
                )
            }
            Fault::ApiDown => {
                let down = rng.millis(2000, 6000);
                self.sim.start_outage(503);
                tokio::time::sleep(down).await;
                self.sim.end_outage();
                ("API down", format!("503 for {down:?}"))
            }
            Fault::ApiSlow => {
                let slow = rng.millis(3000, 6000);
                for a in [PACED, FREE, BURST] {
                    self.sim.set_latency(a.stream, SLOW);
                }
                tokio::time::sleep(slow).await;
                for a in [PACED, FREE, BURST] {
                    self.sim.set_latency(a.stream, LATENCY);
                }
                ("API slow", format!("{SLOW:?} a call for {slow:?}"))
            }
            Fault::Stall => {
                let stalled = rng.millis(2000, 6000);
                self.stall.send_replace(true);
                tokio::time::sleep(stalled).await;
                self.stall.send_replace(false);
                ("network to node 1 stalled", format!("for {stalled:?}"))
            }
        })
    }

    /// What an operator does in the management UI: waits until the bursting account has a
    /// backlog in one of its queues (`<source>.account.burst#<tag>`, as the sources list them), waits a little more (drawn),
    /// then deletes every one of them that exists, from a connection of its own. `None` when no
    /// backlog showed up in [`BACKLOG_WAIT`].
    async fn delete_account_queues(&mut self, rng: &mut Rng) -> anyhow::Result<Option<String>> {
        let connection = amqp::connect(&node_url(2), "chaos operator").await?;
        let burst = |q: &String| {
            q.contains(&format!(".account.{}#", BURST.id))
                || q.ends_with(&format!(".account.{}", BURST.id))
        };
        let until = Instant::now() + BACKLOG_WAIT;
        let mut queues: Vec<String>;
        let found = loop {
            // The queues the sources list now: a lane draws a new one after each retire.
            queues = self.names.account_queues(&connection).await;
            queues.retain(burst);
            let mut backlog = false;
            for q in &queues {
                if let Some((messages, _)) = amqp::queue_state(&connection, q).await?
                    && messages > 0
                {
                    backlog = true;
                }
            }
            if backlog || Instant::now() > until {
                break backlog;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        };
        if !found {
            let _ = connection.close(200, "no backlog".into()).await;
            return Ok(None);
        }
        tokio::time::sleep(rng.millis(0, 2000)).await;
        let mut existing = Vec::new();
        for q in &queues {
            if let Some((ready, _)) = amqp::queue_state(&connection, q).await? {
                existing.push((q.clone(), ready));
            }
        }
        let sent = Instant::now();
        let mut deleted = Vec::new();
        for (q, ready) in existing {
            // A failed operation closes its channel: one each.
            let channel = amqp::timed("channel.open", connection.create_channel()).await?;
            let delete = channel.queue_delete(q.as_str().into(), QueueDeleteOptions::default());
            // A delete the broker did not answer in time (a node stalled) may still happen:
            // counted as deleted, with what it held when looked at.
            let messages = amqp::timed("queue.delete", delete).await.unwrap_or(ready);
            deleted.push((q, messages));
        }
        let deletion = Deletion {
            sent,
            done: Instant::now(),
            queues: deleted,
        };
        let _ = connection.close(200, "deleted".into()).await;
        let prefix = format!("{}.", self.names.commands);
        let detail = deletion
            .queues
            .iter()
            .map(|(q, n)| {
                let source = q.strip_prefix(&prefix).unwrap_or(q);
                format!("{source} with {n} messages")
            })
            .collect::<Vec<_>>()
            .join(", ");
        lock(&self.history).deletions.push(deletion);
        Ok(Some(detail))
    }
}
