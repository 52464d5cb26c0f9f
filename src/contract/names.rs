//! The names of the queues the worker makes beside the contract's own (docs/contract.md §9,
//! §12): every component that declares, consumes or publishes to one spells it from here.

/// The name of partition `k` of `commands_queue`.
pub fn partition_queue(commands_queue: &str, k: u16) -> String {
    format!("{commands_queue}.p{k}")
}

/// A new queue beside `source` where the commands of a congested `account` wait
/// (docs/fairness.md): `<source>.account.<account>#<tag>`, with a tag drawn afresh for each
/// queue, so that a queue is never declared again under the name of one deleted before (a
/// broker node that comes back may still be removing that one).
pub fn account_queue(source: &str, account: &str) -> String {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("{source}.account.{account}#{}", &tag[..8])
}

/// The name earlier versions gave the one queue of `account` beside `source`: looked for once,
/// when a source has no list of its account queues yet.
pub fn account_queue_of_old(source: &str, account: &str) -> String {
    format!("{source}.account.{account}")
}

/// The queue beside `source` that lists its account queues (see
/// the broker module `lane_registry`).
pub fn lane_registry(source: &str) -> String {
    format!("{source}.lanes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_contract() {
        assert_eq!(
            partition_queue("transfer.commands", 3),
            "transfer.commands.p3"
        );
        assert_eq!(
            account_queue_of_old("transfer.commands.p3", "acct-1"),
            "transfer.commands.p3.account.acct-1"
        );
        let new = account_queue("transfer.commands.p3", "acct-1");
        assert!(
            new.starts_with("transfer.commands.p3.account.acct-1#"),
            "{new}"
        );
        assert_eq!(new.len(), "transfer.commands.p3.account.acct-1#".len() + 8);
        assert_ne!(new, account_queue("transfer.commands.p3", "acct-1"));
        assert_eq!(
            lane_registry("transfer.commands.p3"),
            "transfer.commands.p3.lanes"
        );
    }
}
