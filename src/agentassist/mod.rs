//! Everything that talks to Kore.ai AgentAssist: the bots and their JWTs, the retry schedule,
//! the HTTP call and the classification of its answer, the circuit [`breaker`] that holds
//! attempts while the API is down, and [`transfer`], which carries one command through them to
//! an [`outcome`]. What an account allows (its starts, its last gate) it asks of
//! [`crate::fairness`].

pub mod attempts;
pub mod bots;
pub mod breaker;
pub mod client;
pub(crate) mod deadline;
pub mod jwt;
pub mod outcome;
pub mod retry;
pub mod terms;
pub mod transfer;

pub use client::{
    ApiClient, ApiError, ApiResponse, ClientError, ErrorKind, classify, request_body,
};
