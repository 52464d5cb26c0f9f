//! Tooling beside the worker, not part of it: a stand-in AgentAssist API ([`simulator`]),
//! and the `demo`, `publish` and `fleet` commands of the command line.

pub mod demo;
pub mod fleet_status;
pub mod publish;
pub mod simulator;
