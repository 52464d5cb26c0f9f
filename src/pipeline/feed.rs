//! How a consumer feeds the [`Pipeline`]: each delivery is read and routed past its account's
//! lane, and each source opened or let go with its lanes.

use std::future::Future;
use std::sync::{Arc, PoisonError};

use super::Pipeline;
use super::lanes::{Route, SourceLanes};
use crate::broker::consumer::{Handler, InFlight, Source};
use crate::broker::{Delivery, Publisher};

impl Handler for Pipeline {
    fn accept(
        this: &Arc<Self>,
        delivery: Delivery,
        publisher: &Arc<Publisher>,
        in_flight: InFlight,
        source: &str,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let job = this.read(delivery, publisher, in_flight, true);
        let lanes = this.lanes_of(source);
        match (&job.parsed.command, lanes) {
            (Ok(command), Some(lanes)) => {
                let account = command.bot.account.clone();
                match lanes.route(&account, job, &this.sessions) {
                    Route::Here(job) => job.map(|job| this.clone().run_session(job)),
                    Route::Aside => None,
                }
            }
            _ => this.queue_up(job).map(|job| this.clone().run_session(job)),
        }
    }

    fn open(this: &Arc<Self>, source: Source) -> impl Future<Output = ()> + Send {
        if let Some(router) = &this.router {
            router.new_tenure();
        }
        let lanes = {
            let mut all = this.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            let fresh = || {
                Arc::new(SourceLanes::new(
                    source.clone(),
                    Arc::downgrade(this),
                    this.accounts.clone(),
                ))
            };
            match all.get(&source.queue) {
                Some(open) if open.tenure() == source.tenure => open.clone(),
                _ => {
                    let lanes = fresh();
                    if let Some(stale) = all.insert(source.queue.clone(), lanes.clone()) {
                        lanes.succeed(stale);
                    }
                    lanes
                }
            }
        };
        lanes.refresh();
        std::future::ready(())
    }

    fn close(this: &Arc<Self>, source: &Source) -> impl Future<Output = ()> + Send + 'static {
        let lanes = {
            let mut all = this.lanes.lock().unwrap_or_else(PoisonError::into_inner);
            match all.get(&source.queue) {
                Some(open) if open.tenure() == source.tenure => all.remove(&source.queue),
                _ => None,
            }
        };
        async move {
            if let Some(lanes) = lanes {
                lanes.close().await;
            }
        }
    }
}
