//! One connection's life: connect, declare the topology, open the publisher, register on the
//! queue (once held, with holds), take up the partitions owned; then feed deliveries to the
//! handler until the connection is lost or the shutdown comes. At shutdown everything is handed
//! over in order on the open connection; on a loss everything is let go with it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use lapin::Connection;
use lapin::message::Delivery;
use tokio::sync::{mpsc, watch};

use super::owned::Owned;
use super::registered::{Registered, next};
use super::standby::{InLine, Standby};
use super::{Consumer, Handler, InFlight, LIVENESS_CHECK, Source, Stop};
use crate::broker::account_links::AccountLinks;
use crate::broker::{BrokerError, Publisher, timed};

/// What lives as long as one connection.
pub(super) struct Connected {
    pub(super) connection: Arc<Connection>,
    pub(super) publisher: Arc<Publisher>,
    /// Reports a loss the consumer must reconnect for (a partition's reader, the handler).
    pub(super) lost: mpsc::Sender<String>,
    /// The connections the account queues of every source here are used on.
    pub(super) links: Arc<AccountLinks>,
    /// The queue itself, as the handler sees it.
    source: Source,
    /// The consumer registered on the queue: `None` while another replica holds it.
    intake: Option<Registered>,
    /// Without holds: this replica's place in line for the queue's hold (see `standby`).
    standby: Option<Standby>,
    /// The partitions consumed on this connection.
    pub(super) owned: Owned,
}

impl<H: Handler, P: Handler> Consumer<H, P> {
    /// One connection's life: connect, declare, consume until it ends. The flag says whether
    /// consuming began, so the backoff restarts from its first step after a healthy period.
    pub(super) async fn serve(&self) -> Result<(Stop, bool), BrokerError> {
        let (connection, publisher) = tokio::select! {
            r = self.connect() => r?,
            () = self.shutdown.cancelled() => return Ok((Stop::Stopped, false)),
        };
        let connection = Arc::new(connection);
        // Without holds, the broker's own hold: the queue is registered once it is held.
        let standby = match &self.holds {
            None => {
                Some(Standby::join(&connection, &self.settings.amqp, &self.settings.queue).await?)
            }
            Some(_) => None,
        };
        self.link.set_publisher(Some(publisher.clone()));
        self.link.set_consuming(true);
        if self.lost.swap(false, Ordering::Relaxed) {
            self.metrics.broker_reconnects.inc();
        }
        let (lost, lost_rx) = mpsc::channel::<String>(1);
        let links = AccountLinks::new(&self.settings.amqp, &connection_name());
        let source = self.source(&self.settings.queue, &connection, &publisher, &links);
        let owned = Owned::new(self.partitions.as_ref().map(|p| p.owned.clone()));
        let mut link = Connected {
            connection,
            publisher,
            lost,
            links,
            source,
            intake: None,
            standby,
            owned,
        };
        let settled = self.take_up(&mut link).await;
        self.consume(link, lost_rx, settled).await
    }

    /// Connects, declares the topology (with the partition queues) and opens the publisher.
    async fn connect(&self) -> Result<(Connection, Arc<Publisher>), BrokerError> {
        let amqp = &self.settings.amqp;
        let t = amqp.operation_timeout;
        let connection = crate::broker::connection::connect(amqp, &connection_name()).await?;
        let publisher = Arc::new(Publisher::open(&connection, amqp).await?);
        // Before the sources are declared: a source that is new gets its list of account
        // queues, empty.
        let mut sources = vec![amqp.commands_queue.clone()];
        if let Some(partitions) = &self.partitions {
            sources.extend(
                (0..partitions.count)
                    .map(|k| crate::contract::names::partition_queue(&amqp.commands_queue, k)),
            );
        }
        crate::broker::lane_registry::prepare(&connection, amqp, &publisher, &sources).await?;
        let setup = timed("channel.open", t, connection.create_channel()).await?;
        crate::broker::topology::declare(&setup, amqp).await?;
        if let Some(partitions) = &self.partitions {
            crate::broker::topology::declare_partitions(&setup, amqp, partitions.count).await?;
        }
        let _ = timed("channel.close", t, setup.close(200, "declared".into())).await;
        Ok((connection, publisher))
    }

    /// With holds, the queue is registered once held; the partitions owned before this
    /// connection came up are subscribed now (those held elsewhere once given up). Returns why
    /// the connection must go, if it must.
    async fn take_up(&self, link: &mut Connected) -> Option<String> {
        if self.holds.is_some()
            && let Err(e) = self.take_intake(link).await
        {
            return Some(e);
        }
        let watch = link.owned.watch.as_mut()?;
        link.owned.wanted = watch.borrow_and_update().clone();
        self.rebalance(link).await.err().map(|e| e.to_string())
    }

    /// Feeds deliveries and follows ownership until the connection goes or the shutdown
    /// comes.
    async fn consume(
        &self,
        mut link: Connected,
        mut lost: mpsc::Receiver<String>,
        mut settled: Option<String>,
    ) -> Result<(Stop, bool), BrokerError> {
        let mut deadline = self.holds.as_ref().map(|h| h.deadline());
        let mut retry = tokio::time::interval(self.hold_retry);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut liveness = tokio::time::interval(LIVENESS_CHECK);
        loop {
            let stop_by = deadline.as_mut().and_then(|d| *d.borrow_and_update());
            let waiting = self.holds.is_some() && (link.intake.is_none() || link.owned.waiting());
            let reason = tokio::select! {
                biased;
                Some(reason) = async { settled.take() }, if settled.is_some() => Some(reason),
                () = self.shutdown.cancelled() => return Ok(self.hand_over(link).await),
                () = until(stop_by), if stop_by.is_some() => {
                    let now = Instant::now();
                    match deadline.as_mut().and_then(|d| *d.borrow_and_update()) {
                        Some(by) if by <= now => Some("the fleet has not kept this replica's \
                            holds for fleet.member_ttl less fleet.heartbeat; letting every queue \
                            go (running commands keep their claims)".to_owned()),
                        _ => None,
                    }
                }
                changed = changed(&mut deadline), if deadline.is_some() => {
                    if changed.is_none() {
                        deadline = None;
                    }
                    None
                }
                delivery = next(&mut link.intake), if link.intake.is_some() => {
                    self.delivered(&mut link, delivery).await
                }
                Some(reason) = lost.recv() => Some(reason),
                line = Standby::next(&mut link.standby), if link.standby.is_some() => match line {
                    InLine::Held => {
                        tracing::info!(queue = self.settings.queue.as_str(), "holding the queue; this replica is the active one");
                        self.take_intake(&mut link).await.err()
                    }
                    InLine::Lost(reason) => Some(reason),
                },
                Some(done) = link.owned.releasing.join_next(), if !link.owned.releasing.is_empty() => {
                    if let Ok(Some(k)) = done {
                        link.owned.released(k);
                    }
                    self.rebalance(&mut link).await.err().map(|e| e.to_string())
                }
                changed = changed(&mut link.owned.watch), if link.owned.watch.is_some() => {
                    self.ownership_changed(&mut link, changed).await
                }
                _ = retry.tick(), if waiting => self.ask_again(&mut link).await,
                _ = liveness.tick() => link.loss(),
            };
            if let Some(reason) = reason {
                return Ok(self.let_go(link, reason).await);
            }
        }
    }

    /// A delivery (or the end) from the queue's own consumer: handed to the handler, or why
    /// the connection must go.
    async fn delivered(
        &self,
        link: &mut Connected,
        delivery: Option<Result<Delivery, lapin::Error>>,
    ) -> Option<String> {
        let queue = self.settings.queue.as_str();
        match delivery {
            Some(Ok(delivery)) => {
                let in_flight = link.intake.as_ref().map(|i| InFlight::tracked(&i.settled));
                let in_flight = in_flight.unwrap_or_default();
                let publisher = &link.publisher;
                let delivery =
                    crate::broker::Delivery::new(delivery, self.settings.amqp.operation_timeout);
                if let Some(task) = H::accept(&self.handler, delivery, publisher, in_flight, queue)
                {
                    self.tracker.spawn(task);
                }
                None
            }
            Some(Err(e)) => Some(e.to_string()),
            // The queue was deleted, say: a fresh connection re-declares it.
            None => Some("the broker cancelled the consumer".to_owned()),
        }
    }

    /// The fleet's membership changed what this replica owns.
    async fn ownership_changed(&self, link: &mut Connected, changed: Option<()>) -> Option<String> {
        if changed.is_none() {
            // The membership stopped (shutdown): ownership changes no more.
            link.owned.watch = None;
            return None;
        }
        let owned = link
            .owned
            .watch
            .as_mut()
            .map(|o| o.borrow_and_update().clone());
        link.owned.wanted = owned.unwrap_or_default();
        self.rebalance(link).await.err().map(|e| e.to_string())
    }

    /// Queues held by another replica (or not yet asked for) are asked for again.
    async fn ask_again(&self, link: &mut Connected) -> Option<String> {
        if link.intake.is_none()
            && let Err(e) = self.take_intake(link).await
        {
            return Some(e);
        }
        self.rebalance(link).await.err().map(|e| e.to_string())
    }

    /// Registers on the queue itself (once held, with holds) and takes up what the handler
    /// consumes beside it, before its first delivery; why the connection must go, if it must.
    async fn take_intake(&self, link: &mut Connected) -> Result<(), String> {
        let Some(registered) = self
            .register(&link.connection)
            .await
            .map_err(|e| e.to_string())?
        else {
            return Ok(());
        };
        H::open(&self.handler, link.source.clone()).await;
        link.intake = Some(registered);
        Ok(())
    }

    /// The shutdown, on a connection still up: every partition is handed over in order, as
    /// in a rebalance; what the queue's consumer still holds is handled here, rather than
    /// returned behind newer commands, since the next consumer may start at once; in-flight
    /// work drains while the consuming channels are open, since its acks go to them and
    /// closing them would hand it all back to the broker.
    async fn hand_over(&self, mut link: Connected) -> (Stop, bool) {
        self.link.set_consuming(false);
        let t = self.settings.amqp.operation_timeout;
        let queue = self.settings.queue.as_str();
        self.release_all(&mut link.owned);
        let handover = match link.intake.take() {
            Some(intake) => {
                let (handler, tracker) = (&self.handler, &self.tracker);
                Some(
                    intake
                        .stop(t, handler, &link.publisher, tracker, queue)
                        .await,
                )
            }
            None => None,
        };
        let limit = self.settings.grace + self.settings.settle;
        let releasing = &mut link.owned.releasing;
        let source = &link.source;
        let mut deadline = self.holds.as_ref().map(|h| h.deadline());
        let handed = async {
            tokio::join!(
                self.drain(),
                // What was taken up beside the queue is let go first: its set-aside commands
                // are acked on the queue's channel, so that channel closes (and the hold goes)
                // after.
                async {
                    if handover.is_some() {
                        H::close(&self.handler, source).await;
                    }
                    if let Some(intake) = handover {
                        intake.close(t, limit, self.holds.as_deref(), queue).await;
                    }
                },
                async { while releasing.join_next().await.is_some() {} },
            );
        };
        let lapsed = tokio::select! {
            () = handed => false,
            () = lapse(&mut deadline) => true,
        };
        // The account queues' connections: every lane on them is let go by now (or, lapsed,
        // goes with them at once).
        link.links.close("handed over").await;
        if lapsed {
            // Another replica may take the queues now: everything still in hand goes back with
            // the connection at once, rather than behind what the next holder takes.
            tracing::error!(
                "the holds lapsed during the hand-over (Redis away); letting every queue go with the connection"
            );
            crate::broker::connection::close(&link.connection, &self.settings.amqp, "holds lapsed")
                .await;
            if let Some(holds) = &self.holds {
                holds.give_all().await;
            }
            return (Stop::Shutdown(link.connection), true);
        }
        link.publisher.close(t).await;
        // Last, the broker's hold: the next replica in line takes over only now.
        if let Some(standby) = link.standby.take() {
            standby.give().await;
        }
        (Stop::Shutdown(link.connection), true)
    }

    /// The connection is lost (or must go): everything on it is let go with it. Closing it
    /// hands every unacked delivery back to the broker at once, in order (a lost consumer's
    /// messages come back before it is replaced); the next connection re-declares the topology
    /// and takes them again.
    async fn let_go(&self, mut link: Connected, reason: String) -> (Stop, bool) {
        for (_, subscription) in link.owned.subscriptions.drain() {
            subscription.reader.abort();
            if let Some(partitions) = &self.partitions {
                self.closing
                    .spawn(P::close(&partitions.handler, &subscription.source));
            }
        }
        link.owned.releasing.abort_all();
        if link.intake.is_some() {
            self.closing.spawn(H::close(&self.handler, &link.source));
        }
        if let Some(partitions) = &self.partitions {
            partitions.consuming.send_replace(BTreeSet::new());
        }
        // The account queues' readers first: what they hold goes back before the queue's hold
        // (the broker's, without Redis) goes with the connection.
        link.links.close(&reason).await;
        crate::broker::connection::close(&link.connection, &self.settings.amqp, &reason).await;
        // Every consuming channel went with the connections: the holds may go too.
        if let Some(holds) = &self.holds {
            holds.give_all().await;
        }
        (Stop::Lost(reason), true)
    }
}

impl Connected {
    /// Why the connection must go, if a periodic look finds it, or a channel on it, closed.
    fn loss(&self) -> Option<String> {
        let reason = if !self.connection.status().connected() {
            "connection closed"
        } else if self
            .intake
            .as_ref()
            .is_some_and(|i| !i.channel.status().connected())
        {
            "consumer channel closed"
        } else if self.standby.as_ref().is_some_and(|s| !s.is_open()) {
            // The hold's line is gone: the hold may be someone else's now.
            "the hold's channel closed"
        } else if !self.publisher.is_connected() {
            // The broker closes a channel on errors such as publishing to an exchange that
            // was deleted. Without a publisher nothing can finish here.
            "publisher channel closed"
        } else {
            return None;
        };
        Some(reason.to_owned())
    }
}

/// How this process's connections are named in the management UI.
fn connection_name() -> String {
    format!("transfer-worker {}", std::process::id())
}

/// Resolves once the holds' deadline has passed; never without holds, or while none is set.
async fn lapse(deadline: &mut Option<watch::Receiver<Option<Instant>>>) {
    let Some(deadline) = deadline else {
        return std::future::pending().await;
    };
    loop {
        let by = *deadline.borrow_and_update();
        match by {
            Some(by) if by <= Instant::now() => return,
            Some(by) => {
                tokio::select! {
                    () = tokio::time::sleep_until(by.into()) => {}
                    changed = deadline.changed() => if changed.is_err() {
                        return std::future::pending().await;
                    },
                }
            }
            None => {
                if deadline.changed().await.is_err() {
                    return std::future::pending().await;
                }
            }
        }
    }
}

/// Sleeps until `at`; forever when there is none.
async fn until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The next change of a watched value: `None` when its sender is gone (or there is none).
async fn changed<T>(watch: &mut Option<watch::Receiver<T>>) -> Option<()> {
    watch.as_mut()?.changed().await.ok()
}
