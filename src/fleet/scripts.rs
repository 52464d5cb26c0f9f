//! The fleet's Lua scripts, one a file in `lua/`, loaded at compile time. Each runs atomically
//! in Redis; `EVALSHA` is tried first and the script is loaded once when Redis lacks it.

use std::sync::LazyLock;

use redis::Script;

/// `lua/reserve_fn.lua`: the sliding log of an account's starts, a function the scripts that
/// reserve begin with.
macro_rules! with_reserve {
    ($file:literal) => {
        concat!(
            include_str!("../../lua/reserve_fn.lua"),
            include_str!(concat!("../../lua/", $file))
        )
    };
}

/// `lua/claim.lua`, with the first start when asked.
pub static CLAIM: LazyLock<Script> = LazyLock::new(|| Script::new(with_reserve!("claim.lua")));
/// `lua/renew.lua`.
pub static RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/renew.lua")));
/// `lua/reserve.lua`.
pub static RESERVE: LazyLock<Script> = LazyLock::new(|| Script::new(with_reserve!("reserve.lua")));
/// `lua/booked.lua`.
pub static BOOKED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/booked.lua")));
/// `lua/pause.lua`.
pub static PAUSE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/pause.lua")));
/// `lua/record.lua`.
pub static RECORD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/record.lua")));
/// `lua/release.lua`.
pub static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/release.lua")));
/// `lua/unreserve.lua`.
pub static UNRESERVE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/unreserve.lua")));
/// `lua/heartbeat.lua`.
pub static HEARTBEAT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/heartbeat.lua")));
/// `lua/hold.lua`.
pub static HOLD: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/hold.lua")));
/// `lua/depart.lua`.
pub static DEPART: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/depart.lua")));
/// `lua/arrived.lua`.
pub static ARRIVED: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("../../lua/arrived.lua")));
