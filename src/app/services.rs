//! The worker's background services (its listeners, health watch, probers, gauges, fleet
//! membership): each one named and owned by a [`Services`], stopped in a set order, and a
//! panic in any of them an error that ends the process non-zero, never a task that vanished.

use std::collections::HashMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{Id, JoinSet};
use tokio_util::sync::CancellationToken;

/// A group of named services stopped together by one token.
pub(super) struct Services {
    tasks: JoinSet<()>,
    names: HashMap<Id, &'static str>,
    stop: CancellationToken,
    /// The first service that panicked, once one did.
    panicked: Option<&'static str>,
}

impl Services {
    /// An empty group.
    pub(super) fn new() -> Self {
        Self {
            tasks: JoinSet::new(),
            names: HashMap::new(),
            stop: CancellationToken::new(),
            panicked: None,
        }
    }

    /// The token its services stop at.
    pub(super) fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Runs `service` as `name`, until it ends or is told to stop by [`Services::stop_token`].
    pub(super) fn spawn(
        &mut self,
        name: &'static str,
        service: impl Future<Output = ()> + Send + 'static,
    ) {
        let id = self.tasks.spawn(service).id();
        self.names.insert(id, name);
    }

    /// Waits until a service ends before it was told to: the name of one that panicked. One
    /// that ended by itself is logged and waited past; with none left this never resolves.
    pub(super) async fn panic(&mut self) -> &'static str {
        loop {
            match self.tasks.join_next_with_id().await {
                None => std::future::pending::<()>().await,
                Some(ended) => {
                    if let Some(name) = self.ended(ended) {
                        return name;
                    }
                }
            }
        }
    }

    /// Tells every service to stop and waits for them, up to `within` if given (what is left
    /// then is aborted); the first service that panicked, if any did.
    pub(super) async fn stop(mut self, within: Option<Duration>) -> Option<&'static str> {
        self.stop.cancel();
        let deadline = within.map(|d| tokio::time::Instant::now() + d);
        loop {
            let next = self.tasks.join_next_with_id();
            let ended = match deadline {
                None => next.await,
                Some(at) => match tokio::time::timeout_at(at, next).await {
                    Ok(ended) => ended,
                    Err(_) => {
                        self.tasks.abort_all();
                        while let Some(ended) = self.tasks.join_next_with_id().await {
                            self.ended(ended);
                        }
                        break;
                    }
                },
            };
            let Some(ended) = ended else { break };
            self.ended(ended);
        }
        self.panicked
    }

    /// Records a service that ended: the name of one that panicked.
    fn ended(&mut self, ended: Result<(Id, ()), tokio::task::JoinError>) -> Option<&'static str> {
        let (id, failure) = match ended {
            Ok((id, ())) => (id, None),
            Err(e) => (e.id(), e.is_panic().then_some(e)),
        };
        let name = self.names.remove(&id).unwrap_or("a service");
        match failure {
            Some(e) => {
                tracing::error!(service = name, error = %e, "a service panicked; the worker stops");
                self.panicked.get_or_insert(name);
                Some(name)
            }
            None => {
                if !self.stop.is_cancelled() {
                    tracing::warn!(service = name, "a service ended by itself");
                }
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that panics is named, by [`Services::panic`] while the rest run and by
    /// [`Services::stop`]; one that ends by itself is not a panic; one that does not stop
    /// within the bound is aborted.
    #[tokio::test]
    async fn a_panic_is_named_and_a_service_that_lingers_is_aborted() {
        let mut services = Services::new();
        services.spawn("quiet", async {});
        let stop = services.stop_token();
        services.spawn("polite", async move { stop.cancelled().await });
        services.spawn("broken", async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            panic!("on purpose");
        });
        services.spawn("deaf", std::future::pending());
        assert_eq!(services.panic().await, "broken");
        // The deaf one is aborted once the bound passes; else this would never return.
        assert_eq!(
            services.stop(Some(Duration::from_millis(200))).await,
            Some("broken")
        );

        let mut fine = Services::new();
        let stop = fine.stop_token();
        fine.spawn("polite", async move { stop.cancelled().await });
        assert_eq!(fine.stop(None).await, None);
    }
}
