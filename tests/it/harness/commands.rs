//! The commands the tests publish.

use std::time::{Duration, SystemTime};

use serde_json::Value;
use transfer_worker::tools::simulator::RecordedRequest;

/// An agent transfer for session `session`.
pub fn agent_command(id: &str, session: &str) -> Value {
    serde_json::json!({
        "commandId": id,
        "orgId": "o-6a8a7a3e-5c9b-4f0e-9a57-1f1b2c3d4e5f",
        "botSessionId": session,
        "aId": "a-0e1f2a3b-agent",
    })
}

/// A queue transfer for session `session`.
pub fn queue_command(id: &str, session: &str) -> Value {
    serde_json::json!({
        "commandId": id,
        "orgId": "o-6a8a7a3e-5c9b-4f0e-9a57-1f1b2c3d4e5f",
        "botSessionId": session,
        "transferredType": "QUEUE",
        "queueId": "qu-7f8e9d-support",
    })
}

/// Gives `command` a deadline (`expiresAt`) `after` from now, and returns it.
pub fn expire_in(command: &mut Value, after: Duration) -> SystemTime {
    let at = SystemTime::now() + after;
    command["expiresAt"] = transfer_worker::contract::event::rfc3339_ms(at).into();
    at
}

/// A command of session `session` whose target names it (`a-{id}`, or `qu-{id}` for a
/// queue transfer), so the simulator's log tells which command each request was for.
pub fn session_command(id: &str, session: &str, queue: bool) -> Value {
    if queue {
        let mut c = queue_command(id, session);
        c["queueId"] = format!("qu-{id}").into();
        c
    } else {
        let mut c = agent_command(id, session);
        c["aId"] = format!("a-{id}").into();
        c
    }
}

/// The command a request was for, from a target [`session_command`] made.
pub fn command_of(request: &RecordedRequest) -> String {
    let body = &request.body;
    if let Some(agent) = body["aId"].as_str() {
        agent.trim_start_matches("a-").to_owned()
    } else {
        let queue = body["queueId"].as_str().expect("an agent or a queue");
        queue.trim_start_matches("qu-").to_owned()
    }
}
