//! A model of the hand-over protocol between a source queue's holders and their lanes
//! (docs/contract.md §9 and §12, docs/fairness.md "The hand-over model"), checked over every
//! interleaving with `stateright`.
//!
//! A *source* (the commands queue, or a partition) is consumed by its holder. An account that is
//! congested has its commands *set aside*: published, confirmed, to the account queue
//! `<source>.account.<id>`, then acked on the source. The holder's *lane reader* takes them back
//! from there and runs them; the lane is *retired* (the account queue deleted) once the queue is
//! empty. Holders change at a start, a SIGTERM, a kill, a freeze past the hold's expiry, a
//! rebalance; the question is whether a command acked on the source can be lost, reordered or run
//! twice at once on the way.
//!
//! # Why a `Model` and not an actor model
//!
//! The protocol's state is mostly the broker's: queues with ready, returned and unacked
//! messages, single-active-consumer order, channels that return what they hold when they close,
//! a delete that drops what comes back later. Those are shared, atomic broker operations, not
//! messages between peers, and every AMQP method the worker awaits is one atomic step of the
//! broker. An actor model would add a network (with its own reordering, which AMQP's per-channel
//! order rules out) and a request/response pair per method, doubling the depth of every trace for
//! nothing the protocol depends on. So this is one `stateright::Model` whose state is the broker,
//! Redis's hold and each replica's program, and whose actions are the steps a replica takes
//! (each naming the code it stands for) and the events that happen to replicas.
//!
//! # What is modelled
//!
//! - The source queue `S` and one account queue `A` (one account is congested; the others only
//!   flow past, which is not in question here). Each has ready messages (FIFO), returned messages
//!   (delivered before the ready ones, in the order they came back: rabbit_fifo's `returns`),
//!   consumers in registration order (single active consumer: the first one not cancelled gets
//!   the deliveries), and unacked deliveries per channel. After every step the broker pushes
//!   messages to each queue's active consumer up to its prefetch, as rabbit_fifo checks out
//!   greedily. A channel that closes, or the connection under it, returns its unacked deliveries
//!   in delivery order; a consumer can also reject one (requeue). `A`'s `queue.delete` drops its
//!   ready messages, cancels its consumers and makes every later return of its deliveries vanish
//!   (an `A` declared afterwards is another queue). A passive declare answers the ready count
//!   only; the fixed protocol's count also answers the consumers (a cancelled one that still
//!   holds unacked messages counts), or, when it times out, 0 and 0.
//! - The source's list of its account queues (the fixed protocol only; today's code looked for
//!   `A` by its name): a holder writes `A` into it (a confirmed publish), a take-up finds `A`
//!   only if it is listed, and a delete takes it off in the same step (what follows a delete
//!   is best effort: a name listed whose queue is gone costs a look, nothing else).
//! - Redis's hold of `S` (with fleets): taken atomically when free, kept by heartbeats while its
//!   holder runs, expiring only when its holder is gone or frozen, given up with a
//!   compare-and-delete. A command's fleet claim: a command whose call is on the wire is not
//!   called elsewhere meanwhile.
//! - Replicas: start (the first one at once, the others as standbys or new replicas later),
//!   SIGTERM (a graceful hand-over with a grace that may run out), kill, freeze (past the hold's
//!   expiry, then wake), and with fleets a rebalance (the source moves away while the process
//!   stays, and may come back to it).
//! - Commands: a few, in sessions, published to `S` before anything starts. A delivery of `S` is
//!   handled in order: taken in (it runs in memory behind the commands of its session on that
//!   replica), or set aside (published to `A`, confirmed, then acked on `S`). The lane reader
//!   takes `A`'s deliveries in order and they run the same way.
//!
//! # What is abstracted away
//!
//! - Pacing, slots and congestion: whether an account is congested is a free choice at each
//!   delivery while its lane is off; a lane reader takes a delivery whenever it likes. Other
//!   accounts, and the intake's routing to partitions, are left out: the source is one queue.
//! - Once-only: a command that ended anywhere is answered from its record when it comes again
//!   (no call). A call whose delivery went back to its queue (a kill, a freeze, a grace that ran
//!   out) is *in doubt*: it no longer counts as on the wire and holds no claim, as the contract
//!   allows ("a call on the wire when its replica died can be sent again").
//! - Today's lane also keeps its own estimate of its queue's depth (`in_queue`) before it looks;
//!   the model lets the look decide (the estimate comes from the same counts, and in the traces
//!   that matter it is 0: a standby's comes from the very ready count that misleads it).
//! - One broker connection per replica and one channel per consumer; a publish and its confirm
//!   are one step (its ack on `S` is the next); a channel's close returns its deliveries in the
//!   same step that removes its consumer, so a count never sees one without the other.
//! - Redis is always reachable and heartbeats never fail while their replica runs; a connection
//!   dies only with its replica (kill, exit) or while it is frozen.
//! - Without Redis, the model lets a replica know when it became the source's active consumer
//!   (`TakeUp`), even if the source stays empty: the real code needs a way to learn it (see
//!   docs/fairness.md).
//!
//! # Invariants
//!
//! 1. *Nothing acked is lost*: a command acked on the source is ready or returned in a queue,
//!    unacked on a channel that is still open, or ended. (A command can be in the account queue
//!    twice, when a connection died between a publish and its ack: that is the contract's "at
//!    worst in both queues", answered from the record; what is checked is that it is somewhere.)
//! 2. *One call per session on the wire*: at most one call of a session at once, among the calls
//!    whose delivery their replica still holds.
//! 3. *Calls in publish order*: a command is called for the first time only after every earlier
//!    command of its session was called.
//! 4. *One holder per source*: at most one replica that runs and may act for the source: its
//!    active consumer (or, with a fleet, the replica that took the hold and has not given it up),
//!    or a replica with a lane of that source.
//! 5. *Listed* (the fixed protocol): an account queue that holds a command is in its source's
//!    list, so a new holder finds it.
//!
//! And, as an `eventually` property, every command ends (unless every replica is gone). Two
//! `sometimes` properties are examples, not failures: a backlog drains and its account queue is
//! deleted, and a backlog changes hands (the lanes and the hand-over really are exercised), and a
//! delivery comes back to a deleted account queue (how today's protocol loses a command).
//!
//! # The two protocols
//!
//! [`Variant::Today`] is the current code. [`Variant::Fixed`] is the intended protocol, whose
//! rules ([`Rule`]) can be knocked out one at a time to see what each one protects. Today's
//! protocol breaks every invariant; the fixed one keeps them all at every bound checked; without
//! [`Rule::StandbyTakesNoLane`], [`Rule::LanesCloseFirst`], [`Rule::ReturnInOrder`],
//! [`Rule::Generation`], [`Rule::ListFirst`] or [`Rule::ConnectionDiesBeforeExpiry`] it breaks
//! one, while the retirement's checks and [`Rule::WokenActsOnNothing`] are never decisive once
//! the others hold (docs/fairness.md, "The hand-over model").

// In the bench, which includes this module by path, the tests' helpers are unused.
#![allow(dead_code)]

mod properties;
mod protocol;
mod state;
#[cfg(test)]
mod tests;

pub use protocol::Action;

/// The protocol the replicas follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variant {
    /// The current code, with its known bugs.
    Today,
    /// The intended protocol, with every [`Rule`] unless one is left out.
    Fixed,
}

/// How replicas share a source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fleet {
    /// Without Redis: the commands queue is single-active-consumer; other replicas are hot
    /// standbys, registered and waiting.
    Standby,
    /// With Redis: a replica registers on a partition only once it took the partition's hold.
    Holds,
}

/// One rule of the fixed protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rule {
    /// A standby takes up no lane until it is the source's active consumer. (The model lets it
    /// know when it is; the real code must learn it even while the source stays empty.)
    StandbyTakesNoLane,
    /// A holder gives the source up (cancels its consumer, closes its channel, gives its hold)
    /// only after its lane readers are stopped and their channels closed, and its set-aside
    /// commands are confirmed and acked.
    LanesCloseFirst,
    /// A stopping consumer (a lane reader, or a partition's) gives back what it holds only by
    /// closing its channel (once what it took settled, or the grace ran out), so the broker
    /// returns it all in delivery order. Rejecting what it received but did not take puts
    /// those ahead of what it took and gives back later: a session comes back reversed.
    ReturnInOrder,
    /// A lane is retired only after its holder published a marker of this attempt into the
    /// account queue and read it back, with everything before it settled and nothing set aside
    /// since (a command set aside after it voids it, and no new marker goes out until it is
    /// back), and, at the count that follows, its own reader holds nothing.
    Marker,
    /// ... and only if a count then answers 0 messages and exactly 1 consumer (its own).
    ConsumerCount,
    /// ... and only by the source's current holder, its own reader being the account queue's
    /// active consumer.
    HolderDeletes,
    /// A hold is taken only when free and given up only if it is still the same generation's:
    /// a new ownership is never undone by an older one finishing.
    Generation,
    /// A replica that wakes past its hold's expiry lets everything go before it acts.
    WokenActsOnNothing,
    /// A holder writes an account queue into its source's list before it declares it (and
    /// so before anything is set aside there), and a new holder takes up only what the list
    /// names: a look per listed queue, not per configured account.
    ListFirst,
    /// The broker closes a frozen replica's connection before its hold can expire: a
    /// configuration rule, `fleet.member_ttl − fleet.heartbeat` longer than the AMQP dead-peer
    /// detection (twice the connection's heartbeat).
    ConnectionDiesBeforeExpiry,
    /// A command taken in is set aside later (its account cannot start it soon) only while its
    /// delivery is still its tenure's, into that tenure's lanes, and it takes along only the
    /// commands of its session that tenure took in: a command whose delivery went back with a
    /// lost connection is let go at its turn, and one of a later tenure queued behind it in
    /// memory stays where it is. (Checked with [`Handover::with_deferral`].)
    DeferOwnTenure,
}

impl Rule {
    /// Every rule.
    pub const ALL: [Rule; 11] = [
        Rule::StandbyTakesNoLane,
        Rule::LanesCloseFirst,
        Rule::ReturnInOrder,
        Rule::Marker,
        Rule::ConsumerCount,
        Rule::HolderDeletes,
        Rule::Generation,
        Rule::WokenActsOnNothing,
        Rule::ListFirst,
        Rule::ConnectionDiesBeforeExpiry,
        Rule::DeferOwnTenure,
    ];
}

/// What is checked: the protocol, the fleet, and the bounds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Handover {
    pub variant: Variant,
    /// A rule of [`Variant::Fixed`] left out.
    pub without: Option<Rule>,
    pub fleet: Fleet,
    /// Replicas, at most 3.
    pub replicas: u8,
    /// Replicas running from the start (the first of them holds the source).
    pub running: u8,
    /// The session of each command, in publish order (at most 8 commands).
    pub sessions: Vec<u8>,
    /// Each consumer's prefetch (the source's, and a lane reader's: the account's cap).
    pub prefetch: u8,
    /// How many of each event may happen.
    pub kills: u8,
    pub freezes: u8,
    pub sigterms: u8,
    pub rebalances: u8,
    /// Commands taken in may be set aside later, with their session's commands behind them,
    /// and a replica remembers what it took in after the delivery went back (a lost
    /// connection), until that command's turn comes.
    pub deferral: bool,
}

impl Handover {
    /// `variant` with `fleet`: two replicas, the first running, the second started later; two
    /// commands of one session; one SIGTERM; no kill, freeze or rebalance.
    pub fn new(variant: Variant, fleet: Fleet) -> Self {
        Self {
            variant,
            without: None,
            fleet,
            replicas: 2,
            running: 1,
            sessions: vec![0, 0],
            prefetch: 2,
            kills: 0,
            freezes: 0,
            sigterms: 1,
            rebalances: 0,
            deferral: false,
        }
    }

    /// With commands set aside after they were taken in (`SourceLanes::defer`), and the memory
    /// of commands whose delivery went back.
    pub fn with_deferral(mut self) -> Self {
        self.deferral = true;
        self
    }

    /// The fixed protocol without `rule`.
    pub fn without(mut self, rule: Rule) -> Self {
        self.without = Some(rule);
        self
    }

    pub fn sessions(mut self, sessions: &[u8]) -> Self {
        self.sessions = sessions.to_vec();
        self
    }

    pub fn replicas(mut self, replicas: u8, running: u8) -> Self {
        self.replicas = replicas;
        self.running = running;
        self
    }

    pub fn with_events(mut self, sigterms: u8, kills: u8, freezes: u8, rebalances: u8) -> Self {
        self.sigterms = sigterms;
        self.kills = kills;
        self.freezes = freezes;
        self.rebalances = rebalances;
        self
    }

    /// Whether the replicas follow `rule`.
    pub fn rule(&self, rule: Rule) -> bool {
        self.variant == Variant::Fixed && self.without != Some(rule)
    }

    pub fn today(&self) -> bool {
        self.variant == Variant::Today
    }

    pub fn commands(&self) -> u8 {
        u8::try_from(self.sessions.len()).expect("at most 8 commands")
    }
}

/// The names of the properties.
pub mod property {
    pub const NOTHING_LOST: &str = "a command acked on its source is in a queue or ended";
    pub const ONE_CALL: &str = "at most one call of a session on the wire";
    pub const ORDER: &str = "a session's calls in publish order";
    pub const ONE_HOLDER: &str = "at most one holder per source";
    pub const LISTED: &str = "an account queue holding a command is in its source's list";
    pub const ALL_END: &str = "every command ends";
    /// An example, not a failure: how today's protocol loses a command.
    pub const RETURNED_TO_NOTHING: &str = "a delivery comes back to a deleted account queue";
    /// An example: every command ended and the lane was retired.
    pub const DRAINED: &str = "the backlog drains and its account queue is deleted";
    /// An example: a replica other than the first runs a command taken back from the account
    /// queue (a backlog changed hands).
    pub const HANDED_OVER: &str = "another replica runs a command of the account queue";
    /// Every safety property.
    pub const SAFETY: [&str; 5] = [NOTHING_LOST, ONE_CALL, ORDER, ONE_HOLDER, LISTED];
}
