//! Fairness between accounts, and the vendor's limit kept per account (docs/contract.md §4,
//! §12; docs/fairness.md): what the API client and the pipeline ask of an account before a
//! call. An [`account::Account`] holds its budget ([`pacer`]), its calls on the wire and
//! recent answers ([`arrivals`]), its slots (commands in flight at most) and whether it is
//! congested. A command's starts and its last gate before the wire are asked of a
//! [`budget::RateBudget`], this process's or the fleet's in Redis ([`start`] and
//! [`departure`] hold the two ways of waiting for each).

pub mod account;
pub mod arrivals;
pub mod budget;
pub mod departure;
pub mod pacer;
pub mod start;
