//! The names of the queues the worker makes beside the contract's own (docs/contract.md §9,
//! §12): every component that declares, consumes or publishes to one spells it from here.

/// The name of partition `k` of `commands_queue`.
pub fn partition_queue(commands_queue: &str, k: u16) -> String {
    format!("{commands_queue}.p{k}")
}

/// The queue beside `source` where the commands of a congested `account` wait
/// (docs/fairness.md).
pub fn account_queue(source: &str, account: &str) -> String {
    format!("{source}.account.{account}")
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
            account_queue("transfer.commands.p3", "acct-1"),
            "transfer.commands.p3.account.acct-1"
        );
    }
}
