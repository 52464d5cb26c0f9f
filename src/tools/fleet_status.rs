//! `transfer-worker fleet`: the fleet as its Redis and its broker see it (docs/contract.md §9):
//! the live members with the partitions each says it consumes, then every partition queue with
//! its depth, its consumers and its owner, and the intake queue.

use std::fmt::{self, Write as _};
use std::sync::Arc;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;

use crate::broker::{BrokerError, connection, timed};
use crate::config::Settings;
use crate::fleet::membership::Member;
use crate::fleet::{Fleet, FleetError};
use crate::ops::metrics::Metrics;

/// Why the fleet could not be shown.
#[derive(Debug, thiserror::Error)]
pub enum FleetStatusError {
    /// There is no fleet to show.
    #[error("fleet.redis_url is empty: this worker runs alone, there is no fleet to show")]
    NoFleet,
    /// Redis failed.
    #[error(transparent)]
    Redis(#[from] FleetError),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// One queue, as the broker counts it.
#[derive(Debug, Clone)]
pub struct QueueState {
    /// Its name.
    pub name: String,
    /// Messages ready in it; `None` if it does not exist.
    pub depth: Option<u32>,
    /// Its consumers (waiting single-active consumers included).
    pub consumers: u32,
}

/// What `transfer-worker fleet` prints.
#[derive(Debug, Clone)]
pub struct FleetStatus {
    /// The fleet's name: its commands queue.
    pub name: String,
    /// The live members.
    pub members: Vec<Member>,
    /// The intake queue.
    pub intake: QueueState,
    /// Each partition queue and the member that says it consumes it.
    pub partitions: Vec<(QueueState, Option<String>)>,
}

/// Reads the fleet's members from Redis and its queues from the broker.
pub async fn fleet_status(settings: &Settings) -> Result<FleetStatus, FleetStatusError> {
    if !settings.fleet.enabled() {
        return Err(FleetStatusError::NoFleet);
    }
    let amqp = &settings.amqp;
    // It only reads: nothing it does needs the replicas' acknowledgement, and an operator
    // looks most when one of them is down.
    let reading = crate::config::FleetSettings {
        redis_min_replicas: 0,
        ..settings.fleet.clone()
    };
    let fleet = Fleet::new(
        &reading,
        &amqp.commands_queue,
        settings.commands.outcome_cache_ttl,
        Arc::new(Metrics::new()),
    )?;
    let members = fleet.members().await?;
    let connection = connection::connect(amqp, "transfer-worker fleet").await?;
    let result = async {
        let intake = queue_state(&connection, &amqp.commands_queue, amqp.operation_timeout).await?;
        let mut partitions = Vec::new();
        for k in 0..settings.fleet.partitions {
            let name = crate::contract::names::partition_queue(&amqp.commands_queue, k);
            let state = queue_state(&connection, &name, amqp.operation_timeout).await?;
            let owner = members
                .iter()
                .find(|m| m.partitions.contains(&k))
                .map(|m| m.id.clone());
            partitions.push((state, owner));
        }
        Ok::<_, BrokerError>((intake, partitions))
    }
    .await;
    connection::close(&connection, amqp, "done").await;
    let (intake, partitions) = result?;
    Ok(FleetStatus {
        name: amqp.commands_queue.clone(),
        members,
        intake,
        partitions,
    })
}

/// A passive declare on a channel of its own: a queue that does not exist closes the channel.
pub async fn queue_state(
    connection: &lapin::Connection,
    name: &str,
    t: Duration,
) -> Result<QueueState, BrokerError> {
    let channel = timed("channel.open", t, connection.create_channel()).await?;
    let options = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let declared = timed(
        "queue.declare",
        t,
        channel.queue_declare(name.into(), options, FieldTable::default()),
    )
    .await;
    let state = match declared {
        Ok(queue) => {
            let _ = timed("channel.close", t, channel.close(200, "done".into())).await;
            QueueState {
                name: name.to_owned(),
                depth: Some(queue.message_count()),
                consumers: queue.consumer_count(),
            }
        }
        Err(BrokerError::Amqp { .. }) => QueueState {
            name: name.to_owned(),
            depth: None,
            consumers: 0,
        },
        Err(e) => return Err(e),
    };
    Ok(state)
}

impl fmt::Display for FleetStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let members = self.members.len();
        writeln!(
            f,
            "fleet {}: {members} member{}, {} partitions",
            self.name,
            if members == 1 { "" } else { "s" },
            self.partitions.len()
        )?;
        writeln!(f)?;
        let width = self
            .members
            .iter()
            .map(|m| m.id.len())
            .max()
            .unwrap_or(0)
            .max("MEMBER".len());
        writeln!(
            f,
            "{:<width$}  {:>5}  {:>9}  PARTITIONS",
            "MEMBER", "OWNS", "SEEN"
        )?;
        for m in &self.members {
            let list = m.partitions.iter().fold(String::new(), |mut s, k| {
                let _ = write!(s, "{}{k}", if s.is_empty() { "" } else { "," });
                s
            });
            writeln!(
                f,
                "{:<width$}  {:>5}  {:>8.1}s  {}",
                m.id,
                m.partitions.len(),
                m.seen.as_secs_f64(),
                if list.is_empty() { "-" } else { &list }
            )?;
        }
        writeln!(f)?;
        let qwidth = self
            .partitions
            .iter()
            .map(|(q, _)| q.name.len())
            .chain([self.intake.name.len(), "QUEUE".len()])
            .max()
            .unwrap_or(0);
        let depth = |q: &QueueState| q.depth.map_or("missing".to_owned(), |d| d.to_string());
        writeln!(
            f,
            "{:<qwidth$}  {:>7}  {:>9}  OWNER",
            "QUEUE", "DEPTH", "CONSUMERS"
        )?;
        writeln!(
            f,
            "{:<qwidth$}  {:>7}  {:>9}  (intake)",
            self.intake.name,
            depth(&self.intake),
            self.intake.consumers
        )?;
        for (q, owner) in &self.partitions {
            writeln!(
                f,
                "{:<qwidth$}  {:>7}  {:>9}  {}",
                q.name,
                depth(q),
                q.consumers,
                owner.as_deref().unwrap_or("-")
            )?;
        }
        Ok(())
    }
}
