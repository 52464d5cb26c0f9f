//! Who is in the fleet, and which partitions this replica consumes (docs/contract.md §9).
//!
//! Every `fleet.heartbeat` a replica renews its membership in Redis (`lua/heartbeat.lua`,
//! timed by Redis's clock) and reads the live members back; a member not heard from for
//! `fleet.member_ttl` is gone. From the members, [`super::ownership::assign`] gives every replica the
//! same owners, and [`Fleet::keep_membership`] turns changes into one event: the new set of
//! partitions this replica owns, which the consumer turns into subscriptions and drains.
//! A replica that stops leaves at once, so the others take its partitions at their next
//! heartbeat instead of after the time-to-live; one that lets a partition go says so at once,
//! and one waiting for a partition looks again a quarter heartbeat later (`keep.rs`).
//!
//! Views may differ for a heartbeat (one replica has seen a change, another not yet), so two
//! replicas may both think they own a partition. Only one holds it ([`super::holds`]): the
//! other registers no consumer until the holder has closed its channel and given the hold up.
//! The heartbeat also keeps this replica's holds.
//!
//! A name (`fleet.name`) is one live process's. Every member, hold and claim carries the
//! per-process id (`name/instance`), so two processes under one name never take each other's
//! holds; but the name is what ranks partitions ([`super::ownership`]), so two of them tie for every
//! partition, their split hangs on their random instances, and it flips whenever either
//! restarts: nothing in their logs or in `transfer-worker fleet` tells them apart but that
//! suffix. So the heartbeat also keeps the name, and a second process under a name a live one
//! has is not let in: at start it waits for the name a little longer than `fleet.member_ttl`
//! (a predecessor that was killed lets it lapse by then) and then refuses to start, naming the
//! other ([`Fleet::join`]); a replica that finds its name taken while it runs (it was silent
//! past `fleet.member_ttl`, and another process started under its name) steps down.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::{Fleet, FleetError, millis, scripts};

/// What this version says of itself (`lua/heartbeat.lua`'s traits): it admits at the intake.
const TRAITS: &str = "intake";

/// A replica whose `fleet.name` starts with this says nothing of itself, as a replica of an
/// earlier version.
#[cfg(feature = "fault-injection")]
pub const FAULT_EARLIER_VERSION_NAME: &str = "fault-injection-earlier-version";

/// A replica whose `fleet.name` starts with this panics in its membership loop after its
/// second heartbeat.
#[cfg(feature = "fault-injection")]
pub const FAULT_MEMBERSHIP_PANIC_NAME: &str = "fault-injection-membership-panic";

/// One live member, as the fleet's Redis last heard from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its id: `name/instance`.
    pub id: String,
    /// How long ago it last said it was alive.
    pub seen: Duration,
    /// The partitions it said it consumes.
    pub partitions: BTreeSet<u16>,
    /// It admits at the intake (docs/fairness.md); a replica of an earlier version does not.
    pub admits: bool,
}

impl Member {
    /// Its name, without the per-process instance.
    pub fn name(&self) -> &str {
        self.id.rsplit_once('/').map_or(&self.id, |(name, _)| name)
    }
}

pub(super) enum Beat<'a> {
    Alive(&'a BTreeSet<u16>),
    Leave,
    Look,
}

impl Fleet {
    pub(super) async fn beat(&self, beat: Beat<'_>) -> Result<Roster, FleetError> {
        let (mode, owned) = match beat {
            Beat::Alive(owned) => ("beat", join(owned)),
            Beat::Leave => ("leave", String::new()),
            Beat::Look => ("look", String::new()),
        };
        // The holds' expiry is set after this instant, never before it.
        let sent = Instant::now();
        let keep = match beat {
            Beat::Alive(_) => self.holds_to_keep(sent),
            Beat::Leave | Beat::Look => Vec::new(),
        };
        let ttl = millis(self.member_ttl);
        let mut invocation = scripts::HEARTBEAT.prepare_invoke();
        invocation
            .key(self.key("fleet", "members"))
            .key(self.key("fleet", "owned"))
            .key(self.key("name", &self.name))
            .key(self.key("fleet", "epoch"))
            .key(self.key("fleet", "traits"));
        for (queue, _) in &keep {
            invocation.key(self.key("hold", queue));
        }
        let in_time: String = keep
            .iter()
            .map(|(_, in_time)| if *in_time { '1' } else { '0' })
            .collect();
        let known = self.known_epoch().clone();
        invocation
            .arg(&self.claimant)
            .arg(ttl)
            .arg(mode)
            .arg(owned)
            .arg(known)
            .arg(in_time)
            .arg(self.traits());
        let reply: Vec<String> = self.invoke_acknowledged("heartbeat", &invocation).await?;
        let roster = parse_roster(&reply, ttl).ok_or_else(|| FleetError::Unexpected {
            op: "heartbeat",
            what: format!("{} fields", reply.len()),
        })?;
        if let Some(holder) = roster.named {
            return Err(FleetError::NameInUse {
                name: self.name.clone(),
                holder,
            });
        }
        if matches!(beat, Beat::Alive(_)) && !roster.epoch.is_empty() {
            let mut known = self.known_epoch();
            if *known != roster.epoch {
                if !known.is_empty() {
                    tracing::warn!(
                        settling = ?roster.settling,
                        "Redis lost the fleet's state (restarted without its data, or flushed): \
                         every replica takes its own holds back; nobody takes a hold anew, and \
                         the partitions stay where they are, while it settles"
                    );
                }
                known.clone_from(&roster.epoch);
            }
        }
        if !keep.is_empty() {
            self.holds_kept(sent, &keep, &roster.lost);
        }
        if matches!(beat, Beat::Alive(_)) {
            let all = roster.members.iter().all(|m| m.admits);
            self.everyone_admits.store(all, Ordering::Relaxed);
        }
        Ok(roster)
    }

    fn traits(&self) -> &'static str {
        #[cfg(feature = "fault-injection")]
        if self.name.starts_with(FAULT_EARLIER_VERSION_NAME) {
            return "";
        }
        TRAITS
    }

    fn known_epoch(&self) -> std::sync::MutexGuard<'_, String> {
        self.epoch
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Says this replica is alive and consumes `owned`; the live members, sorted by id.
    pub async fn heartbeat(&self, owned: &BTreeSet<u16>) -> Result<Vec<Member>, FleetError> {
        self.beat(Beat::Alive(owned)).await.map(|r| r.members)
    }

    /// Leaves the fleet now; the others take its partitions at their next heartbeat.
    pub async fn leave(&self) -> Result<Vec<Member>, FleetError> {
        self.beat(Beat::Leave).await.map(|r| r.members)
    }

    /// The live members, without joining: for `transfer-worker fleet`.
    pub async fn members(&self) -> Result<Vec<Member>, FleetError> {
        self.beat(Beat::Look).await.map(|r| r.members)
    }

    /// Joins the fleet under this replica's name, before anything is consumed. A name another
    /// process has is waited for up to `fleet.member_ttl` plus a heartbeat, for a predecessor
    /// that was killed lets it lapse by then; a name still taken after that was kept after
    /// this replica started, by a live process: [`FleetError::NameInUse`]. While Redis does not
    /// answer it keeps asking (the replica is not ready meanwhile); at `stop` it gives up
    /// without joining.
    pub async fn join(&self, stop: &CancellationToken) -> Result<(), FleetError> {
        let started = Instant::now();
        let patience = self.member_ttl + self.heartbeat;
        let mut told = false;
        let mut waits = crate::backoff::delays(super::RETRY_MIN, super::RETRY_MAX, None);
        loop {
            let sent = Instant::now();
            let wait = match self.heartbeat(&BTreeSet::new()).await {
                Ok(_) => return Ok(()),
                // Still there `member_ttl` after this replica started: kept since, by a live
                // process.
                Err(e @ FleetError::NameInUse { .. }) if sent >= started + patience => {
                    return Err(e);
                }
                Err(e @ FleetError::ClusterMode { .. }) => return Err(e),
                Err(FleetError::NameInUse { holder, .. }) => {
                    if !told {
                        told = true;
                        tracing::info!(name = %self.name, %holder, ?patience, "fleet.name is listed for another process; waiting for it to lapse (a predecessor that was killed), or refusing to start");
                    }
                    self.heartbeat
                }
                Err(e) => {
                    let wait = waits.next().unwrap_or(super::RETRY_MAX);
                    tracing::debug!(error = %e, ?wait, "cannot join the fleet yet; waiting");
                    wait
                }
            };
            tokio::select! {
                () = stop.cancelled() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The other process that took this replica's name while it ran, if one did: it stepped
    /// down then.
    pub fn displaced(&self) -> Option<FleetError> {
        self.displaced_by.get().map(|holder| FleetError::NameInUse {
            name: self.name.clone(),
            holder: holder.clone(),
        })
    }

    /// Whether every live member, as of this replica's last heartbeat, admits at the intake: a
    /// replica of an earlier version may take the intake, and would not read what it set aside.
    pub fn everyone_admits(&self) -> bool {
        self.everyone_admits.load(Ordering::Relaxed)
    }

    /// Partition queues of the fleet (`fleet.partitions`).
    pub fn partitions(&self) -> u16 {
        self.partitions
    }
}

fn join(owned: &BTreeSet<u16>) -> String {
    owned
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// A heartbeat's answer.
#[derive(Debug)]
pub(super) struct Roster {
    /// The other member that has this replica's name, if one does (then this one was not let
    /// in).
    pub(super) named: Option<String>,
    /// The fleet's epoch; empty when there is none.
    pub(super) epoch: String,
    /// How long the fleet is still settling after Redis lost its state.
    pub(super) settling: Duration,
    /// The live members, sorted by id.
    pub(super) members: Vec<Member>,
    /// The holds it could not keep, by position (0-based) among those it was given.
    pub(super) lost: Vec<usize>,
}

/// `{now, named, epoch, settling, lost, id, expires, partitions, traits, …}` → the roster; `None`
/// when it does not read.
fn parse_roster(reply: &[String], ttl_ms: u64) -> Option<Roster> {
    let (now, rest) = reply.split_first()?;
    let now: u64 = now.parse().ok()?;
    let (named, rest) = rest.split_first()?;
    let named = Some(named.clone()).filter(|n| !n.is_empty());
    let (epoch, rest) = rest.split_first()?;
    let (settling, rest) = rest.split_first()?;
    let settling = Duration::from_millis(settling.parse().ok()?);
    let (lost, rest) = rest.split_first()?;
    let lost = lost
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<usize>().ok()?.checked_sub(1))
        .collect::<Option<Vec<usize>>>()?;
    if rest.len() % 4 != 0 {
        return None;
    }
    let members = rest
        .chunks_exact(4)
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
                admits: m[3].split(',').any(|t| t == TRAITS),
            })
        })
        .collect::<Option<Vec<Member>>>()?;
    Some(Roster {
        named,
        epoch: epoch.clone(),
        settling,
        members,
        lost,
    })
}

mod keep;
#[cfg(test)]
mod tests;
