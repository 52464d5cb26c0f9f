//! Per-session ordering: commands of one `botSessionId` run one after another in arrival
//! order, while different sessions run concurrently.
//!
//! Each busy session has a FIFO of waiting jobs. The first job of an idle session is handed
//! back to the caller to run; the runner, when done, asks for the next one of the same session
//! and stops when there is none. No task waits on a lock while a command runs.

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

/// Waiting jobs by session key.
#[derive(Debug)]
pub struct SessionQueues<J> {
    busy: Mutex<HashMap<String, VecDeque<J>>>,
}

impl<J> Default for SessionQueues<J> {
    fn default() -> Self {
        Self {
            busy: Mutex::new(HashMap::new()),
        }
    }
}

impl<J> SessionQueues<J> {
    /// Queues `job` behind its session's running job, or, if the session is idle, marks it
    /// busy and returns the job for the caller to run now.
    pub fn push(&self, session: &str, job: J) -> Option<J> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        match busy.get_mut(session) {
            Some(waiting) => {
                waiting.push_back(job);
                None
            }
            None => {
                busy.insert(session.to_owned(), VecDeque::new());
                Some(job)
            }
        }
    }

    /// The session's next job after the running one finished, or `None` — and the session is
    /// idle again.
    pub fn next(&self, session: &str) -> Option<J> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        let waiting = busy.get_mut(session)?;
        let next = waiting.pop_front();
        if next.is_none() {
            busy.remove(session);
        }
        next
    }

    /// Takes every job waiting in `session` and marks it idle: its running job was moved
    /// elsewhere, and they go with it, in order.
    pub fn take_waiting(&self, session: &str) -> Vec<J> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        busy.remove(session).map(Vec::from).unwrap_or_default()
    }

    /// Runs `job` and then, one after another, the session's jobs queued behind it, until the
    /// session is idle: what the task that got a job from [`SessionQueues::push`] does.
    pub async fn run_in_order<F, Fut>(&self, session: &str, mut job: J, mut run: F)
    where
        F: FnMut(J) -> Fut,
        Fut: Future<Output = ()>,
    {
        loop {
            run(job).await;
            match self.next(session) {
                Some(next) => job = next,
                None => return,
            }
        }
    }

    /// Sessions with a running job.
    pub fn busy_sessions(&self) -> usize {
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_session_waits_and_resumes_in_order() {
        let q = SessionQueues::default();
        assert_eq!(q.push("a", 1), Some(1));
        assert_eq!(q.push("a", 2), None);
        assert_eq!(q.push("b", 10), Some(10), "another session runs at once");
        assert_eq!(q.push("a", 3), None);
        assert_eq!(q.next("a"), Some(2));
        assert_eq!(q.next("a"), Some(3));
        assert_eq!(q.next("a"), None);
        assert_eq!(q.busy_sessions(), 1);
        assert_eq!(
            q.push("a", 4),
            Some(4),
            "an idle session runs at once again"
        );
    }
}
