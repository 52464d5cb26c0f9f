//! Calls to the primary: each under `fleet.redis_timeout`, counted, and followed by the
//! readiness they say; the writes a failover must not lose wait for the replicas
//! (`fleet.redis_min_replicas`).

use std::sync::atomic::Ordering;
use std::time::Instant;

use super::{Fleet, FleetError, link, millis};

impl Fleet {
    /// Runs one script invocation on the primary under the timeout, counting it.
    pub(crate) async fn invoke<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, FleetError> {
        self.on_primary(op, async |primary| {
            let mut shared = primary.shared.clone();
            invocation
                .invoke_async(&mut shared)
                .await
                .map_err(|source| primary.error(op, source))
        })
        .await
    }

    /// Like [`Fleet::invoke`], for a write the fleet relies on across a failover (a claim and
    /// its renewals, a booked start, a departure, an outcome, a pause, a hold, a heartbeat): with `fleet.redis_min_replicas` set, it counts only
    /// once that many replicas acknowledged it (`WAIT`, on a connection of its own). When they
    /// do not in time, the write stays on the primary and the caller is told
    /// [`FleetError::Unacknowledged`]: it waits and asks again, as while Redis is down.
    pub(crate) async fn invoke_acknowledged<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, FleetError> {
        let wanted = self.min_replicas;
        if wanted == 0 {
            return self.invoke(op, invocation).await;
        }
        // Half the timeout for the replicas, so an answer that they did not comes in time.
        let wait = millis(self.timeout / 2);
        self.on_primary(op, async |primary| {
            let mut connection = self
                .link
                .dedicated(primary)
                .await
                .map_err(|source| primary.error(op, source))?;
            let value: T = invocation
                .invoke_async(&mut connection)
                .await
                .map_err(|source| primary.error(op, source))?;
            let acked: i64 = redis::cmd("WAIT")
                .arg(wanted)
                .arg(wait)
                .query_async(&mut connection)
                .await
                .map_err(|source| primary.error(op, source))?;
            self.link.give_back(primary, connection);
            self.unacknowledged
                .store(acked < i64::from(wanted), Ordering::Release);
            if acked < i64::from(wanted) {
                self.link.unacknowledged(primary);
                self.metrics
                    .redis_unacknowledged
                    .get_or_create(&crate::ops::metrics::RedisLabels { op })
                    .inc();
                return Err(FleetError::Unacknowledged {
                    op,
                    at: primary.at.clone(),
                    acked,
                    wanted,
                });
            }
            Ok(value)
        })
        .await
    }

    /// Runs `call` on the primary (found first if need be) within `fleet.redis_timeout`,
    /// counting it; a fault that says the primary moved has it looked for again.
    async fn on_primary<T>(
        &self,
        op: &'static str,
        call: impl AsyncFnOnce(&link::Primary) -> Result<T, FleetError>,
    ) -> Result<T, FleetError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.timeout;
        let result = match tokio::time::timeout_at(deadline, self.link.primary(op)).await {
            Err(_) => Err(FleetError::Timeout {
                op,
                at: self.link.named(),
            }),
            Ok(Err(e)) => Err(e),
            Ok(Ok(primary)) => match tokio::time::timeout_at(deadline, call(&primary)).await {
                Err(_) => {
                    self.link.failed(&primary, None);
                    Err(FleetError::Timeout {
                        op,
                        at: primary.at.clone(),
                    })
                }
                Ok(Err(e)) => {
                    if let FleetError::Redis { source, .. } = &e {
                        self.link.failed(&primary, Some(source));
                    }
                    Err(e)
                }
                Ok(Ok(value)) => Ok(value),
            },
        };
        self.observe(op, started, result.as_ref().err());
        result
    }

    fn observe(&self, op: &'static str, started: Instant, error: Option<&FleetError>) {
        self.metrics
            .redis_call(op, started.elapsed().as_secs_f64(), error.is_some());
        if let Some(e @ FleetError::ClusterMode { .. }) = error {
            tracing::error!(error = %e, "the fleet cannot use this Redis");
        }
        let was = self.healthy.swap(error.is_none(), Ordering::AcqRel);
        if was && let Some(error) = error {
            tracing::warn!(
                op,
                %error,
                "Redis does not answer; no API call starts until it does"
            );
        } else if !was && error.is_none() {
            tracing::info!(op, "Redis answers");
        }
    }

    /// Checks that Redis answers, so readiness recovers without traffic (and, with Sentinel,
    /// the primary is followed without traffic too).
    pub async fn ping(&self) -> Result<(), FleetError> {
        self.on_primary("ping", async |primary| {
            let mut shared = primary.shared.clone();
            redis::cmd("PING")
                .query_async::<String>(&mut shared)
                .await
                .map_err(|source| primary.error("ping", source))?;
            self.replicas_acknowledge(primary).await
        })
        .await
    }

    /// With `fleet.redis_min_replicas`, whether that many replicas acknowledge a write now:
    /// a probe key of this replica's, written and waited for as the fleet's own writes are
    /// (`WAIT` after no write would only count the replicas connected, however far behind).
    /// So readiness follows the replicas without traffic, on a standby too.
    async fn replicas_acknowledge(&self, primary: &link::Primary) -> Result<(), FleetError> {
        let wanted = self.min_replicas;
        if wanted == 0 {
            return Ok(());
        }
        let mut connection = self
            .link
            .dedicated(primary)
            .await
            .map_err(|source| primary.error("ping", source))?;
        redis::cmd("SET")
            .arg(self.key("probe", &self.claimant))
            .arg(1)
            .arg("PX")
            .arg(millis(self.member_ttl))
            .query_async::<()>(&mut connection)
            .await
            .map_err(|source| primary.error("ping", source))?;
        let acked: i64 = redis::cmd("WAIT")
            .arg(wanted)
            .arg(millis(self.timeout / 2))
            .query_async(&mut connection)
            .await
            .map_err(|source| primary.error("ping", source))?;
        self.link.give_back(primary, connection);
        let enough = acked >= i64::from(wanted);
        self.unacknowledged.store(!enough, Ordering::Release);
        if !enough {
            self.link.unacknowledged(primary);
        }
        if enough {
            Ok(())
        } else {
            Err(FleetError::Unacknowledged {
                op: "ping",
                at: primary.at.clone(),
                acked,
                wanted,
            })
        }
    }
}
