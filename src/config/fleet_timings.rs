//! The fleet's timing rules: a replica's holds must outlast one heartbeat that fails, and a
//! frozen replica's broker connection must be gone before its holds can be taken
//! (docs/configuration.md, "Fleet timings").

use std::time::Duration;

use super::validate::shown;
use super::{ConfigError, FleetSettings, Settings, invalid};

/// The AMQP heartbeat (seconds) the worker proposes when a URL names none; the broker
/// connection's own (`broker::connection::DEFAULT_HEARTBEAT_SECS`, which the unit tests
/// compare it with: this component may use no other).
pub(super) const DEFAULT_AMQP_HEARTBEAT_SECS: u16 = 3;

impl Settings {
    /// A replica frozen past its holds (SIGSTOP, a VM or GC pause) must have lost its broker
    /// connection, and with it its consumers, before another replica can take those holds
    /// (docs/contract.md §9, "One holder at a time").
    ///
    /// Frozen at `f`, a replica sends nothing more. Its last heartbeat went out at some
    /// `t > f − heartbeat` (the next was due at `t + heartbeat`), and kept its holds until
    /// `t + member_ttl` at the earliest: another replica takes them after
    /// `f + member_ttl − heartbeat`, no sooner. The broker closes a connection it hears nothing
    /// on by its heartbeat check: RabbitMQ looks every heartbeat timeout `T` whether anything
    /// came and closes the connection at the second look in a row that finds nothing, so 2 `T`
    /// to 3 `T` after the last frame (`rabbit_heartbeat`; measured against RabbitMQ 3.10: a
    /// connection silent from its opening was closed after 2.96 s with `T` = 1 s, 8.96 s with
    /// `T` = 3 s). Hence `member_ttl − heartbeat ≥ 3 T`.
    ///
    /// `T` is at most what the worker proposes (the client takes the smaller of its value and
    /// the broker's): a URL's `heartbeat` parameter, else [`DEFAULT_AMQP_HEARTBEAT_SECS`]; with
    /// several nodes, the largest. `heartbeat=0` proposes none and leaves `T` to the broker
    /// (RabbitMQ's default: 60 s), which nothing here can bound: refused in a fleet.
    ///
    /// Without Redis nothing is held, so nothing is checked.
    pub(super) fn fleet_outlasts_the_brokers_detection(&self) -> Result<(), ConfigError> {
        if !self.fleet.enabled() {
            return Ok(());
        }
        // The node whose proposal is the longest, that proposal, and whether its URL names it.
        let mut longest: Option<(String, u16, bool)> = None;
        for (key, url) in self.amqp.node_keys() {
            let Ok(uri) = <lapin::uri::AMQPUri as std::str::FromStr>::from_str(url) else {
                continue;
            };
            let named = uri.query.heartbeat;
            let proposed = named.unwrap_or(DEFAULT_AMQP_HEARTBEAT_SECS);
            if proposed == 0 {
                return Err(invalid(
                    key,
                    "sets heartbeat=0 while fleet.redis_url is set: the broker then decides \
                     when a silent connection is dead (RabbitMQ: after up to 3 × 60 s), so a \
                     frozen replica could keep its consumers after another replica has taken \
                     its holds. Name a heartbeat of at most (fleet.member_ttl − \
                     fleet.heartbeat) / 3 seconds",
                ));
            }
            if longest.as_ref().is_none_or(|(_, t, _)| proposed > *t) {
                longest = Some((key, proposed, named.is_some()));
            }
        }
        let Some((key, proposed, named)) = longest else {
            return Ok(());
        };
        let fleet = &self.fleet;
        let detection = Duration::from_secs(3 * u64::from(proposed));
        let shortest = fleet.heartbeat.saturating_add(detection);
        if fleet.member_ttl < shortest {
            let source = match named {
                true => format!("{key}'s heartbeat"),
                false => format!("the worker's default, as {key} names none"),
            };
            return Err(invalid(
                "fleet.member_ttl",
                format!(
                    "{} must be at least fleet.heartbeat + 3 × the AMQP heartbeat = {} ({} + 3 × \
                     {proposed}s, {source}): the broker closes a frozen replica's connection up \
                     to 3 AMQP heartbeats after its last frame, and must have done so before \
                     another replica can take the frozen one's holds. Raise fleet.member_ttl, \
                     or name a shorter heartbeat in the AMQP URL (?heartbeat=1)",
                    shown(fleet.member_ttl),
                    shown(shortest),
                    shown(fleet.heartbeat),
                ),
            ));
        }
        Ok(())
    }
}

impl FleetSettings {
    /// One heartbeat that times out must not make a replica stop consuming.
    ///
    /// A replica whose holds were last kept by a heartbeat sent at `t` stops consuming them at
    /// `t + member_ttl − heartbeat` unless a later heartbeat keeps them (src/fleet/holds.rs).
    /// Heartbeats are sent every `heartbeat`, the next at once when one took longer (a missed
    /// tick is not skipped), and one that fails has taken at most `redis_timeout`. So with the
    /// heartbeat sent at `t` answered, the next (sent at `t + heartbeat`) timing out at
    /// `t + heartbeat + redis_timeout`, the one after is sent at
    /// `t + heartbeat + max(heartbeat, redis_timeout)` and must be answered before
    /// `t + member_ttl − heartbeat`. The rule
    ///
    /// `member_ttl − heartbeat ≥ 2 × heartbeat + redis_timeout
    ///                         = heartbeat + max(heartbeat, redis_timeout) + min(heartbeat, redis_timeout)`
    ///
    /// leaves it `min(heartbeat, redis_timeout)` to be answered in: with `redis_timeout` at
    /// most `heartbeat`, any answer at all (an answer comes within `redis_timeout`, or the call
    /// fails).
    pub(super) fn one_failed_heartbeat_is_survived(&self) -> Result<(), ConfigError> {
        let twice_and_timeout =
            (self.heartbeat.saturating_mul(2)).saturating_add(self.redis_timeout);
        let shortest = self.heartbeat.saturating_add(twice_and_timeout);
        if self.member_ttl < shortest {
            return Err(invalid(
                "fleet.member_ttl",
                format!(
                    "{} must be at least fleet.heartbeat + 2 × fleet.heartbeat + \
                     fleet.redis_timeout = {} ({} + 2 × {} + {}): a replica stops consuming \
                     fleet.heartbeat before its holds expire, and until then must outlast one \
                     heartbeat that times out and be kept by the next",
                    shown(self.member_ttl),
                    shown(shortest),
                    shown(self.heartbeat),
                    shown(self.heartbeat),
                    shown(self.redis_timeout),
                ),
            ));
        }
        Ok(())
    }
}
