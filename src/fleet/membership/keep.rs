//! Keeping a replica's membership: the heartbeat loop that turns changes in the fleet into
//! the partitions this replica consumes ([`Fleet::keep_membership`]).

use std::collections::BTreeSet;
use std::time::Instant;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Beat, Member};
use crate::fleet::{Fleet, FleetError, ownership};

impl Fleet {
    /// Heartbeats until `done`, publishing on `owned` the partitions this replica is to consume
    /// whenever they change, and reporting the ones it really consumes (`consuming`, kept by
    /// the consumer).
    ///
    /// A partition this replica owns but another live member still lists is not asked for
    /// yet: the other is letting it go (draining). This only saves the consumer from asking
    /// for a hold it cannot have; the hold is what keeps two consumers apart.
    ///
    /// While Redis does not answer the set stays as it is (no call starts anyway: the fleet
    /// fails closed), until the silence outlasts `fleet.member_ttl`: by then the others count
    /// this replica as gone, so it lets its partitions go. (Its consumer stopped earlier, at
    /// the holds' deadline.)
    ///
    /// At `stop` it keeps heartbeating, so its holds last while it hands the queues over, and
    /// leaves once it consumes none and holds none (or at `done`).
    ///
    /// Should another process have its name (this replica was silent past `fleet.member_ttl`
    /// and another started under the name), it steps down: it stops (`stop`), its holds are no
    /// longer kept, so its consumer lets go by the holds' deadline at the latest, and
    /// [`Fleet::displaced`] says why.
    pub async fn keep_membership(
        &self,
        owned: watch::Sender<BTreeSet<u16>>,
        mut consuming: watch::Receiver<BTreeSet<u16>>,
        stop: CancellationToken,
        done: CancellationToken,
    ) {
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heard = Instant::now();
        // Partitions this replica is to own that another still lets go: look again soon.
        let mut waiting = false;
        #[cfg(feature = "fault-injection")]
        let mut beats = 0u32;
        loop {
            tokio::select! {
                biased;
                () = done.cancelled() => break,
                _ = tick.tick() => {}
                // A partition taken or let go: said at once, so a replica waiting for it
                // takes it without a heartbeat's delay.
                Ok(()) = consuming.changed() => {}
                () = tokio::time::sleep(self.heartbeat / 4), if waiting => {}
            }
            waiting = false;
            let current = owned.borrow().clone();
            let really = consuming.borrow().clone();
            if stop.is_cancelled() && really.is_empty() && !self.holding() {
                break;
            }
            // Before the call, not after: Redis timed the membership after this instant.
            let sent = Instant::now();
            let beat = self.beat(Beat::Alive(&really)).await;
            #[cfg(feature = "fault-injection")]
            {
                beats = beats.saturating_add(1);
                if beats > 2 && self.name.starts_with(super::FAULT_MEMBERSHIP_PANIC_NAME) {
                    panic!("fault injection: the membership loop panics");
                }
            }
            if let Err(FleetError::NameInUse { holder, .. }) = &beat
                && !stop.is_cancelled()
            {
                tracing::error!(name = %self.name, %holder, "another live replica has this replica's fleet.name; stepping down");
                let _ = self.displaced_by.set(holder.clone());
                stop.cancel();
            }
            if stop.is_cancelled() {
                // Handing over: the consumer lets every partition go; only report it.
                continue;
            }
            let next = match beat {
                // Redis lost the fleet's state: the roster fills again within a heartbeat, and
                // the holds come back with it. Until the fleet has settled, partitions stay
                // where they are: a view of a roster still filling would move them for nothing.
                Ok(roster) if !roster.settling.is_zero() => {
                    heard = sent;
                    continue;
                }
                Ok(roster) => {
                    heard = sent;
                    let (next, withheld) = self.to_own(roster.members, &current, &really);
                    waiting = withheld;
                    next
                }
                Err(e) if heard.elapsed() >= self.member_ttl && !current.is_empty() => {
                    tracing::warn!(error = %e, "Redis has not answered for longer than fleet.member_ttl; letting every partition go, the other replicas take them");
                    BTreeSet::new()
                }
                Err(_) => continue,
            };
            if next != current {
                self.rebalanced(&owned, &current, next);
            }
        }
        self.metrics.fleet_partitions_owned.set(0);
        self.leave_at_the_end().await;
    }

    /// The partitions to consume, from the live `members` (their number goes to the metrics):
    /// those [`ownership::owned_by`] gives this replica, less any that another member still
    /// lists and this replica neither consumes (`really`) nor owned already (`current`): the
    /// other is letting it go; and whether any was left out so.
    fn to_own(
        &self,
        members: Vec<Member>,
        current: &BTreeSet<u16>,
        really: &BTreeSet<u16>,
    ) -> (BTreeSet<u16>, bool) {
        self.metrics
            .fleet_members
            .set(i64::try_from(members.len()).unwrap_or(i64::MAX));
        let listed_by_others: BTreeSet<u16> = members
            .iter()
            .filter(|m| m.id != self.claimant)
            .flat_map(|m| m.partitions.iter().copied())
            .collect();
        let ids: Vec<String> = members.into_iter().map(|m| m.id).collect();
        let due = ownership::owned_by(&ids, self.partitions, &self.claimant);
        let due_len = due.len();
        let next: BTreeSet<u16> = due
            .into_iter()
            .filter(|k| really.contains(k) || current.contains(k) || !listed_by_others.contains(k))
            .collect();
        let withheld = next.len() < due_len;
        (next, withheld)
    }

    /// Publishes `next` on `owned` in place of `current`, logged and counted.
    fn rebalanced(
        &self,
        owned: &watch::Sender<BTreeSet<u16>>,
        current: &BTreeSet<u16>,
        next: BTreeSet<u16>,
    ) {
        let assigned: Vec<u16> = next.difference(current).copied().collect();
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

    /// Leaves the fleet as the heartbeats end, within `fleet.redis_timeout`.
    async fn leave_at_the_end(&self) {
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
