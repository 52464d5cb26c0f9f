//! Tooling beside the worker, not part of it: a stand-in AgentAssist API ([`simulator`]),
//! and the `demo`, `publish`, `fleet` ([`fleet_status`]), `status` ([`account_status`]) and
//! `dead-letters` ([`dead_letters`]) commands of the command line.

pub mod account_status;
pub mod dead_letters;
pub mod demo;
pub mod fleet_status;
pub mod publish;
pub mod simulator;
