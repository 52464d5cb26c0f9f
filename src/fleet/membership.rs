//! Who is in the fleet, and which partitions this replica consumes (docs/contract.md §9).
//!
//! Every `fleet.heartbeat` a replica renews its membership in Redis (`lua/heartbeat.lua`,
//! timed by Redis's clock) and reads the live members back; a member not heard from for
//! `fleet.member_ttl` is gone. From the members, [`ownership::assign`] gives every replica the
//! same owners, and [`Fleet::keep_membership`] turns changes into one event: the new set of
//! partitions this replica owns, which the consumer turns into subscriptions and drains.
//! A replica that stops leaves at once, so the others take its partitions at their next
//! heartbeat instead of after the time-to-live.
//!
//! Views may differ for a heartbeat (one replica has seen a change, another not yet). Each
//! partition queue is single-active-consumer, so two replicas that both think they own a
//! partition cannot both receive from it: the later one waits until the earlier lets go.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Fleet, FleetError, millis, ownership, scripts};

/// One live member, as the fleet's Redis last heard from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id: `name/instance`.
    pub id: String,
    /// How long ago it last said it was alive.
    pub seen: Duration,
    /// The partitions it said it consumes.
    pub partitions: BTreeSet<u16>,
}

impl Member {
    /// Its name, without the per-process instance.
    pub fn name(&self) -> &str {
        self.id.rsplit_once('/').map_or(&self.id, |(name, _)| name)
    }
}

enum Beat<'a> {
    Alive(&'a BTreeSet<u16>),
    Leave,
    Look,
}

impl Fleet {
    async fn beat(&self, beat: Beat<'_>) -> Result<Vec<Member>, FleetError> {
        let (mode, owned) = match beat {
            Beat::Alive(owned) => ("beat", join(owned)),
            Beat::Leave => ("leave", String::new()),
            Beat::Look => ("look", String::new()),
        };
        let ttl = millis(self.member_ttl);
        let mut invocation = scripts::HEARTBEAT.prepare_invoke();
        invocation
            .key(self.key("fleet", "members"))
            .key(self.key("fleet", "owned"))
            .arg(&self.claimant)
            .arg(ttl)
            .arg(mode)
            .arg(owned);
        let reply: Vec<String> = self.invoke("heartbeat", &invocation).await?;
        parse_roster(&reply, ttl).ok_or_else(|| FleetError::Unexpected {
            op: "heartbeat",
            what: format!("{} fields", reply.len()),
        })
    }

    /// Says this replica is alive and consumes `owned`; the live members, sorted by id.
    pub async fn heartbeat(&self, owned: &BTreeSet<u16>) -> Result<Vec<Member>, FleetError> {
        self.beat(Beat::Alive(owned)).await
    }

    /// Leaves the fleet now; the others take its partitions at their next heartbeat.
    pub async fn leave(&self) -> Result<Vec<Member>, FleetError> {
        self.beat(Beat::Leave).await
    }

    /// The live members, without joining: for `transfer-worker fleet`.
    pub async fn members(&self) -> Result<Vec<Member>, FleetError> {
        self.beat(Beat::Look).await
    }

    /// Partition queues of the fleet (`fleet.partitions`).
    pub fn partitions(&self) -> u16 {
        self.partitions
    }

    /// Heartbeats until `stop`, publishing on `owned` the partitions this replica owns
    /// whenever they change; then leaves. While Redis does not answer the set stays as it is
    /// (no call starts anyway: the fleet fails closed), until the silence outlasts
    /// `fleet.member_ttl`: by then the others count this replica as gone and take its
    /// partitions, so it lets them go.
    pub async fn keep_membership(
        &self,
        owned: watch::Sender<BTreeSet<u16>>,
        stop: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        loop {
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let current = owned.borrow().clone();
            let next = match self.heartbeat(&current).await {
                Ok(members) => {
                    heard = Instant::now();
                    let ids: Vec<String> = members.into_iter().map(|m| m.id).collect();
                    self.metrics
                        .fleet_members
                        .set(i64::try_from(ids.len()).unwrap_or(i64::MAX));
                    ownership::owned_by(&ids, self.partitions, &self.claimant)
                }
                Err(e) if heard.elapsed() >= self.member_ttl && !current.is_empty() => {
                    tracing::warn!(error = %e, "Redis has not answered for longer than fleet.member_ttl; letting every partition go, the other replicas take them");
                    BTreeSet::new()
                }
                Err(_) => continue,
            };
            if next != current {
                let assigned: Vec<u16> = next.difference(&current).copied().collect();
                let revoked: Vec<u16> = current.difference(&next).copied().collect();
                tracing::info!(
                    ?assigned,
                    ?revoked,
                    owned = next.len(),
                    "partitions rebalanced"
                );
                self.metrics.fleet_rebalances.inc();
                self.metrics
                    .fleet_partitions_owned
                    .set(i64::try_from(next.len()).unwrap_or(i64::MAX));
                owned.send_replace(next);
            }
        }
        match tokio::time::timeout(self.timeout, self.leave()).await {
            Ok(Ok(_)) => tracing::info!("left the fleet"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "could not leave the fleet; the others notice within fleet.member_ttl")
            }
            Err(_) => tracing::warn!(
                "leaving the fleet timed out; the others notice within fleet.member_ttl"
            ),
        }
    }
}

fn join(owned: &BTreeSet<u16>) -> String {
    owned
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `{now, id, expires, partitions, …}` → members; `None` when it does not read.
fn parse_roster(reply: &[String], ttl_ms: u64) -> Option<Vec<Member>> {
    let (now, rest) = reply.split_first()?;
    let now: u64 = now.parse().ok()?;
    if rest.len() % 3 != 0 {
        return None;
    }
    rest.chunks_exact(3)
        .map(|m| {
            let expires = m[1]
                .parse::<f64>()
                .ok()
                .filter(|e| e.is_finite() && *e >= 0.0)?;
            // Saturating float→int: a score past u64 reads as "far future".
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let expires = expires as u64;
            let last = expires.saturating_sub(ttl_ms);
            let partitions = m[2]
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.parse::<u16>().ok())
                .collect::<Option<BTreeSet<u16>>>()?;
            Some(Member {
                id: m[0].clone(),
                seen: Duration::from_millis(now.saturating_sub(last)),
                partitions,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_roster_reads() {
        let reply: Vec<String> = ["10000", "a/1", "14000", "0,3", "b/2", "15000", ""]
            .map(String::from)
            .to_vec();
        let members = parse_roster(&reply, 5000).unwrap();
        assert_eq!(members.len(), 2);
        assert_eq!(members[0].name(), "a");
        assert_eq!(members[0].seen, Duration::from_millis(1000));
        assert_eq!(members[0].partitions, BTreeSet::from([0, 3]));
        assert_eq!(members[1].seen, Duration::ZERO);
        assert!(members[1].partitions.is_empty());
        assert!(parse_roster(&["1".into(), "a".into()], 5000).is_none());
        assert!(parse_roster(&[], 5000).is_none());
    }

    proptest! {
        #[test]
        fn any_reply_reads_or_is_refused_without_panicking(
            reply in proptest::collection::vec(".{0,12}", 0..10), ttl in any::<u64>(),
        ) {
            let _ = parse_roster(&reply, ttl);
        }
    }
}
