//! The per-account gauges (waiting, oldest wait), brought up to date every second from each
//! account and its twin at the intake.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::fairness::account::Account;

/// How often the gauges are brought up to date.
const EVERY: Duration = Duration::from_secs(1);

/// Every account, with its twin at the intake if it has one.
pub(super) type Paired = Vec<(Arc<Account>, Option<Arc<Account>>)>;

/// Each account with its twin at the intake, if it has one.
pub(super) fn paired(accounts: Vec<Arc<Account>>, at_intake: Vec<Arc<Account>>) -> Paired {
    accounts
        .into_iter()
        .map(|a| {
            let twin = at_intake.iter().find(|t| t.id == a.id).cloned();
            (a, twin)
        })
        .collect()
}

/// Brings the gauges up to date every second until `stop`.
pub(super) async fn refresh(accounts: Paired, stop: CancellationToken) {
    let mut every = tokio::time::interval(EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => accounts
                .iter()
                .for_each(|(a, twin)| a.refresh_gauges(twin.as_deref())),
        }
    }
}
