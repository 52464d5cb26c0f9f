//! What every handler and task of the simulator shares: the configuration, the script, the
//! request log and the counters.

use super::*;

/// State every handler and task sees.
pub(super) struct Shared {
    pub(super) config: SimulatorConfig,
    pub(super) checker: Checker,
    pub(super) script: Mutex<VecDeque<Reply>>,
    pub(super) requests: Mutex<Log>,
    pub(super) counters: Counters,
    /// One client for all callbacks, so connections to a relay are reused.
    pub(super) http: reqwest::Client,
    /// Valid requests are answered from their own task, so a client that gives up (times
    /// out) does not cancel the transfer: as with the real API, it may still be carried out.
    pub(super) inflight: Mutex<JoinSet<()>>,
    pub(super) callbacks: Mutex<JoinSet<()>>,
    pub(super) stop: watch::Receiver<bool>,
    /// During a simulated outage, the status every API request is answered with; 0 otherwise.
    pub(super) outage: std::sync::atomic::AtomicU16,
    /// Latencies of particular bots, instead of the configured one.
    pub(super) latency_of: Mutex<HashMap<String, Duration>>,
}

#[derive(Default)]
pub(super) struct Counters {
    pub(super) calls: AtomicU64,
    pub(super) accepted: AtomicU64,
    // Updated together with `calls` and `accepted` under this lock, so a snapshot adds up.
    pub(super) by_status: Mutex<BTreeMap<u16, u64>>,
    pub(super) callbacks_delivered: AtomicU64,
    pub(super) callbacks_failed_attempts: AtomicU64,
}

/// The request log, with the count of requests in flight kept beside it.
#[derive(Default)]
pub(super) struct Log {
    pub(super) entries: VecDeque<RecordedRequest>,
    pub(super) next_seq: u64,
    pub(super) in_flight: usize,
    pub(super) max_in_flight: usize,
}

impl Log {
    pub(super) fn get_mut(&mut self, seq: u64) -> Option<&mut RecordedRequest> {
        let first = self.entries.front()?.seq;
        let index = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.entries.get_mut(index)
    }
}

impl Shared {
    /// The latency of calls for `stream_id`.
    pub(super) fn latency(&self, stream_id: &str) -> Duration {
        lock(&self.latency_of)
            .get(stream_id)
            .copied()
            .unwrap_or(self.config.latency)
    }

    /// Records a request as it arrives; returns its arrival number.
    pub(super) fn arrive(&self, mut request: RecordedRequest) -> u64 {
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        let mut log = lock(&self.requests);
        let seq = log.next_seq;
        log.next_seq += 1;
        request.seq = seq;
        if log.entries.len() >= MAX_RECORDED {
            log.entries.pop_front();
        }
        log.entries.push_back(request);
        log.in_flight += 1;
        log.max_in_flight = log.max_in_flight.max(log.in_flight);
        seq
    }

    /// Records the answer to request `seq`: its status, and when.
    pub(super) fn answered(&self, seq: u64, status: u16) {
        {
            let mut by_status = lock(&self.counters.by_status);
            if (200..300).contains(&status) {
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
            }
            *by_status.entry(status).or_default() += 1;
        }
        let mut log = lock(&self.requests);
        if let Some(entry) = log.get_mut(seq) {
            entry.status = status;
            entry.answered_at = Some(Instant::now());
        }
        log.in_flight = log.in_flight.saturating_sub(1);
    }

    /// A hung request released without an answer.
    pub(super) fn released(&self) {
        let mut log = lock(&self.requests);
        log.in_flight = log.in_flight.saturating_sub(1);
    }

    pub(super) fn stats(&self) -> SimulatorStats {
        let by_status = lock(&self.counters.by_status);
        SimulatorStats {
            calls: self.counters.calls.load(Ordering::Relaxed),
            accepted: self.counters.accepted.load(Ordering::Relaxed),
            by_status: by_status.clone(),
            callbacks_delivered: self.counters.callbacks_delivered.load(Ordering::Relaxed),
            callbacks_failed_attempts: self
                .counters
                .callbacks_failed_attempts
                .load(Ordering::Relaxed),
        }
    }

    /// The status of a simulated outage under way, if any.
    pub(super) fn outage(&self) -> Option<StatusCode> {
        match self.outage.load(Ordering::Relaxed) {
            0 => None,
            code => Some(StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE)),
        }
    }

    /// The scripted reply if any, else one roll against the rates.
    pub(super) fn next_reply(&self) -> Reply {
        if let Some(reply) = lock(&self.script).pop_front() {
            return reply;
        }
        let config = &self.config;
        let roll = fastrand::f64();
        if roll < config.fail_rate {
            Reply::Status(503)
        } else if roll < config.fail_rate + config.rate_limited_rate {
            Reply::RateLimited {
                retry_after: config.retry_after,
            }
        } else if roll < config.fail_rate + config.rate_limited_rate + config.reject_rate {
            Reply::Status(400)
        } else {
            Reply::Accept
        }
    }
}
