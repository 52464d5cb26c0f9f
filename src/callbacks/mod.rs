//! AgentAssist's callbacks: the signed relay URL handed to the API with each command
//! ([`token`]), and the HTTP endpoint that turns a callback posted to it into a
//! `transfer.callback` event ([`relay`]).

pub mod relay;
pub mod token;
