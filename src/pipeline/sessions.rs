//! Per-session ordering: commands of one `botSessionId` run one after another in arrival
//! order, while different sessions run concurrently.
//!
//! Each busy session has a FIFO of waiting jobs. The first job of an idle session is handed
//! back to the caller to run; the runner, when done, asks for the next one of the same session
//! and stops when there is none. No task waits on a lock while a command runs.
//!
//! Jobs may be *pinned*: the session counts how many of its jobs in memory (running or
//! waiting) are, so a caller can tell whether a session holds any (see `pipeline::lanes`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};

/// Waiting jobs by session key.
#[derive(Debug)]
pub struct SessionQueues<J> {
    busy: Mutex<HashMap<String, Busy<J>>>,
}

/// A busy session: the jobs waiting behind the running one, and how many of its jobs in
/// memory are pinned.
#[derive(Debug)]
struct Busy<J> {
    waiting: VecDeque<J>,
    pinned: usize,
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
        self.push_marked(session, job, false)
    }

    /// [`SessionQueues::push`], counting the job as pinned if `pinned`.
    pub fn push_marked(&self, session: &str, job: J, pinned: bool) -> Option<J> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        match busy.get_mut(session) {
            Some(b) => {
                b.pinned += usize::from(pinned);
                b.waiting.push_back(job);
                None
            }
            None => {
                let b = Busy {
                    waiting: VecDeque::new(),
                    pinned: usize::from(pinned),
                };
                busy.insert(session.to_owned(), b);
                Some(job)
            }
        }
    }

    /// The session's next job after the running one finished, or `None` — and the session is
    /// idle again.
    pub fn next(&self, session: &str) -> Option<J> {
        self.next_after(session, false)
    }

    /// [`SessionQueues::next`], after a job that was pinned if `pinned`.
    pub fn next_after(&self, session: &str, pinned: bool) -> Option<J> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        let b = busy.get_mut(session)?;
        b.pinned = b.pinned.saturating_sub(usize::from(pinned));
        let next = b.waiting.pop_front();
        if next.is_none() {
            busy.remove(session);
        }
        next
    }

    /// How many pinned jobs the session has in memory.
    pub fn pinned(&self, session: &str) -> usize {
        self.busy
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(session)
            .map_or(0, |b| b.pinned)
    }

    /// Takes every job waiting in `session`, in order, and marks it idle (its running job was
    /// moved elsewhere, and they go with it), if every one of them may go (`may_go`); else
    /// `None`, and the session is left as it was.
    pub fn take_waiting_if(&self, session: &str, may_go: impl Fn(&J) -> bool) -> Option<Vec<J>> {
        let mut busy = self.busy.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(b) = busy.get(session) else {
            return Some(Vec::new());
        };
        if !b.waiting.iter().all(may_go) {
            return None;
        }
        busy.remove(session).map(|b| Vec::from(b.waiting))
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
        assert_eq!(q.push_marked("c", 20, true), Some(20));
        assert_eq!(q.push_marked("c", 21, true), None);
        assert_eq!(q.pinned("c"), 2, "the running job and the one waiting");
        assert_eq!(q.next_after("c", true), Some(21));
        assert_eq!(q.pinned("c"), 1);
        assert_eq!(q.next_after("c", true), None);
        assert_eq!(q.pinned("c"), 0, "idle");
        assert_eq!(
            q.push("a", 4),
            Some(4),
            "an idle session runs at once again"
        );
    }

    #[test]
    fn waiting_jobs_are_taken_only_if_every_one_may_go() {
        let q = SessionQueues::default();
        assert_eq!(q.push("a", 1), Some(1));
        assert_eq!(q.push("a", 2), None);
        assert_eq!(q.push("a", 3), None);
        assert_eq!(q.take_waiting_if("a", |j| *j != 3), None);
        assert_eq!(q.busy_sessions(), 1, "left as it was");
        assert_eq!(q.take_waiting_if("a", |j| *j > 1), Some(vec![2, 3]));
        assert_eq!(q.busy_sessions(), 0, "idle once they are taken");
        assert_eq!(q.take_waiting_if("b", |_| false), Some(vec![]));
    }
}
