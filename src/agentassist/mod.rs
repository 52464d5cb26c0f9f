//! Everything that talks to Kore.ai AgentAssist: the bots and their JWTs, the per-account
//! pacing, the retry schedule, the HTTP call and the classification of its answer, the
//! circuit [`breaker`] that holds attempts while the API is down, and [`transfer`], which
//! carries one command through them to an [`outcome`].

pub mod account;
pub mod arrivals;
pub mod attempts;
pub mod bots;
pub mod breaker;
pub mod budget;
pub mod client;
pub(crate) mod deadline;
pub mod departure;
pub mod jwt;
pub mod outcome;
pub mod pacer;
pub mod retry;
pub mod start;
pub mod terms;
pub mod transfer;

pub use client::{
    ApiClient, ApiError, ApiResponse, ClientError, ErrorKind, classify, request_body,
};
