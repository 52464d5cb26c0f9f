//! Tooling beside the worker, not part of it: a stand-in AgentAssist API ([`simulator`]),
//! and the `demo` and `publish` commands of the command line.

pub mod demo;
pub mod publish;
pub mod simulator;
