//! The model's state: the broker's two queues and the deliveries on its channels, Redis's hold,
//! and each replica's program.

/// A message in a queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Msg {
    /// A command, by its index in publish order.
    Command(u8),
    /// A retiring holder's marker (fixed protocol), by its replica and generation.
    Marker { replica: u8, generation: u8 },
}

/// A consumer registered on a queue, by its channel (a replica and the generation of the
/// ownership that opened it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Sub {
    pub replica: u8,
    pub generation: u8,
    /// Cancelled, its channel still open (it may hold unacked deliveries).
    pub cancelled: bool,
}

/// A queue at the broker.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Queue {
    pub exists: bool,
    /// Which queue of that name: a queue declared after a delete is another one.
    pub incarnation: u8,
    /// Returned messages, delivered before the ready ones, in the order they came back.
    pub returned: Vec<Msg>,
    pub ready: Vec<Msg>,
    /// Consumers in registration order: the first one not cancelled is the active one.
    pub subs: Vec<Sub>,
}

impl Queue {
    /// The ready count a passive declare answers (returned messages are ready too).
    pub fn depth(&self) -> usize {
        self.returned.len() + self.ready.len()
    }

    /// The single active consumer.
    pub fn active(&self) -> Option<(u8, u8)> {
        self.subs
            .iter()
            .find(|s| !s.cancelled)
            .map(|s| (s.replica, s.generation))
    }

    /// Takes the next message to deliver.
    pub fn pop(&mut self) -> Option<Msg> {
        if self.returned.is_empty() {
            (!self.ready.is_empty()).then(|| self.ready.remove(0))
        } else {
            Some(self.returned.remove(0))
        }
    }

    pub fn holds(&self, command: u8) -> bool {
        let m = Msg::Command(command);
        self.returned.contains(&m) || self.ready.contains(&m)
    }

    pub fn unsubscribe(&mut self, replica: u8, generation: u8) {
        self.subs
            .retain(|s| (s.replica, s.generation) != (replica, generation));
    }
}

/// Where a delivery came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum From {
    Source,
    /// The account queue, in this incarnation.
    Account(u8),
}

/// Where a delivery stands in its replica.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Pushed by the broker to the client, not yet handled (routed, or taken by the reader).
    Received,
    /// In memory, waiting for its session's turn (or, from the account queue, for a slot).
    Waiting,
    /// Its call is on the wire.
    Calling,
    /// Its call was on the wire when its replica froze: in doubt, until it is answered.
    Doubt,
    /// Set aside, waiting to be published to the account queue.
    Aside,
    /// Published to the account queue and confirmed; not yet acked on the source.
    Published,
    /// Let go in memory, unacked on its open channel: it goes back only when that channel
    /// closes, and nothing else happens to it meanwhile.
    Forgotten,
}

/// A command a replica took in, whose delivery went back to its queue (its channel closed)
/// before its turn came: still in the replica's memory, ahead of what its session received
/// since.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Ghost {
    pub replica: u8,
    /// The ownership whose channel it came on.
    pub generation: u8,
    pub command: u8,
}

/// A message delivered on a channel and not yet acked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Delivery {
    pub msg: Msg,
    pub from: From,
    pub replica: u8,
    /// The ownership whose channel it came on.
    pub generation: u8,
    pub stage: Stage,
}

/// A replica's process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Life {
    /// Not started yet.
    Off,
    Up,
    Frozen,
    /// Killed, or exited after a SIGTERM.
    Gone,
}

/// An ownership's consumer on the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Src {
    Registered,
    /// Cancelled, its channel still open.
    Cancelled,
    Closed,
}

/// An ownership's lane of the account.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Lane {
    Off,
    On {
        reader: Reader,
        retire: Retire,
    },
    /// Being let go: its reader is stopped, its channel not yet closed.
    Closing,
    Closed,
}

/// A lane's reader of the account queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reader {
    None,
    /// Consuming this incarnation of the account queue.
    On(u8),
}

/// Where a lane's retirement stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Retire {
    No,
    /// Today: the reader is stopped and a look found the queue empty; the delete comes next.
    Looked,
    /// Fixed: the marker is published, not yet read back.
    Marker,
    /// Fixed: a command was set aside after the marker: the marker no longer tells anything,
    /// and no new one is published until it is read back.
    Stale,
    /// Fixed: the marker came back with everything before it settled.
    Read,
    /// Fixed: the count allowed the delete.
    Counted,
}

impl Retire {
    /// While the delete is under way, new commands are taken in, not set aside.
    pub fn deleting(self) -> bool {
        matches!(self, Retire::Looked | Retire::Read | Retire::Counted)
    }
}

/// A replica's ownership of the source: its consumer there, and its lane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Own {
    pub generation: u8,
    pub src: Src,
    /// It knows it holds the source: it took the hold (fleet), or it took up its lanes.
    pub holding: bool,
    /// It looked for the account queue.
    pub looked: bool,
    /// Its consumer received a delivery (today's code looks again at the first one).
    pub activated: bool,
    pub lane: Lane,
    /// Being let go (SIGTERM, rebalance).
    pub releasing: bool,
    /// Its grace ran out.
    pub grace_out: bool,
}

impl Own {
    pub fn new(generation: u8, holding: bool) -> Self {
        Self {
            generation,
            src: Src::Registered,
            holding,
            looked: false,
            activated: false,
            lane: Lane::Off,
            releasing: false,
            grace_out: false,
        }
    }

    /// Nothing of it is left open.
    pub fn done(&self) -> bool {
        self.src == Src::Closed && matches!(self.lane, Lane::Off | Lane::Closed)
    }
}

/// Which of a replica's ownerships.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Which {
    /// The current one.
    Own,
    /// An older one, still being let go after a rebalance.
    Old,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Replica {
    pub life: Life,
    /// Its connection is open.
    pub connected: bool,
    /// It woke from a freeze and has not noticed its hold's deadline passed (today's code).
    pub woke: bool,
    pub sigterm: bool,
    pub own: Option<Own>,
    pub old: Option<Own>,
}

impl Replica {
    pub fn off() -> Self {
        Self {
            life: Life::Off,
            connected: false,
            woke: false,
            sigterm: false,
            own: None,
            old: None,
        }
    }

    /// It runs and its connection is open.
    pub fn live(&self) -> bool {
        self.life == Life::Up && self.connected
    }

    pub fn get(&self, which: Which) -> Option<&Own> {
        match which {
            Which::Own => self.own.as_ref(),
            Which::Old => self.old.as_ref(),
        }
    }

    pub fn get_mut(&mut self, which: Which) -> Option<&mut Own> {
        match which {
            Which::Own => self.own.as_mut(),
            Which::Old => self.old.as_mut(),
        }
    }
}

/// Redis's hold of the source: its replica and the generation that took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Hold {
    pub replica: u8,
    pub generation: u8,
}

/// The events that may still happen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Budget {
    pub kills: u8,
    pub freezes: u8,
    pub sigterms: u8,
    pub rebalances: u8,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct State {
    pub replicas: Vec<Replica>,
    pub source: Queue,
    pub account: Queue,
    /// Every unacked delivery, in the order it reached its replica's memory.
    pub deliveries: Vec<Delivery>,
    pub hold: Option<Hold>,
    /// Generations handed out so far.
    pub generations: u8,
    /// Commands acked on the source (bit per command).
    pub acked: u8,
    /// Commands ended: called (or answered) and acked.
    pub ended: u8,
    /// Commands called at least once.
    pub called: u8,
    /// A command was called before an earlier one of its session.
    pub out_of_order: bool,
    /// A delivery of an account queue came back after the queue was deleted.
    pub returned_to_nothing: bool,
    /// The source's list of its account queues names the account queue (fixed protocol).
    pub listed: bool,
    pub budget: Budget,
    /// Commands remembered after their delivery went back ([`Handover::with_deferral`]).
    ///
    /// [`Handover::with_deferral`]: super::Handover::with_deferral
    pub ghosts: Vec<Ghost>,
    /// Whether ghosts are kept.
    pub memory: bool,
}

pub fn bit(command: u8) -> u8 {
    1 << command
}

impl Delivery {
    pub fn command(&self) -> Option<u8> {
        match self.msg {
            Msg::Command(c) => Some(c),
            Msg::Marker { .. } => None,
        }
    }
}

impl State {
    pub fn is(&self, set: u8, command: u8) -> bool {
        set & bit(command) != 0
    }

    /// The deliveries on an ownership's channels.
    pub fn of(&self, replica: u8, generation: u8) -> impl Iterator<Item = &Delivery> {
        self.deliveries
            .iter()
            .filter(move |d| d.replica == replica && d.generation == generation)
    }

    /// An ownership holds deliveries of the account queue.
    pub fn holds_from_account(&self, replica: u8, generation: u8) -> bool {
        self.of(replica, generation)
            .any(|d| matches!(d.from, From::Account(_)))
    }

    /// An ownership has set-aside commands not yet acked on the source.
    pub fn aside_pending(&self, replica: u8, generation: u8) -> bool {
        self.of(replica, generation)
            .any(|d| matches!(d.stage, Stage::Aside | Stage::Published))
    }

    /// An ownership's deliveries of the source still being handled (taken in, or published and
    /// not yet acked).
    pub fn source_unsettled(&self, replica: u8, generation: u8) -> bool {
        self.of(replica, generation).any(|d| {
            d.from == From::Source
                && matches!(
                    d.stage,
                    Stage::Waiting | Stage::Calling | Stage::Doubt | Stage::Published
                )
        })
    }

    /// Consumers of the account queue as a count answers: those registered, and those
    /// cancelled that still hold unacked deliveries of it.
    pub fn account_consumers(&self) -> usize {
        let incarnation = self.account.incarnation;
        self.account
            .subs
            .iter()
            .filter(|s| {
                !s.cancelled
                    || self
                        .of(s.replica, s.generation)
                        .any(|d| d.from == From::Account(incarnation))
            })
            .count()
    }

    /// The account queue is there, and `reader` consumes this incarnation of it.
    pub fn reads_account(&self, reader: Reader) -> bool {
        self.account.exists && reader == Reader::On(self.account.incarnation)
    }

    /// Returns deliveries (those `which` picks) to their queues, in the order they were
    /// delivered (rabbit_fifo returns a channel's messages by message id); a delivery of an
    /// account queue that was deleted comes back to nothing.
    ///
    /// `deliveries` is in the order of entering memory; a channel's deliveries are handled
    /// first come first, so its handled ones (in that order) were delivered before those it
    /// received and did not handle yet.
    pub fn give_back(&mut self, which: impl Fn(&Delivery) -> bool) {
        let (back, kept): (Vec<Delivery>, Vec<Delivery>) = std::mem::take(&mut self.deliveries)
            .into_iter()
            .partition(|d| which(d));
        self.deliveries = kept;
        if self.memory {
            let waiting = back
                .iter()
                .filter(|d| d.from == From::Source && d.stage == Stage::Waiting);
            let ghosts: Vec<Ghost> = waiting
                .filter_map(|d| {
                    d.command().map(|command| Ghost {
                        replica: d.replica,
                        generation: d.generation,
                        command,
                    })
                })
                .collect();
            self.ghosts.extend(ghosts);
        }
        let (handled, received): (Vec<Delivery>, Vec<Delivery>) =
            back.into_iter().partition(|d| d.stage != Stage::Received);
        for d in handled.into_iter().chain(received) {
            let m = d.msg;
            match d.from {
                From::Source => self.source.returned.push(m),
                From::Account(i) if self.account.exists && self.account.incarnation == i => {
                    self.account.returned.push(m);
                }
                From::Account(_) => self.returned_to_nothing = true,
            }
        }
    }

    /// The broker closes a replica's connection: every channel on it returns what it holds, and
    /// its consumers go.
    pub fn close_connection(&mut self, replica: u8) {
        self.give_back(|d| d.replica == replica);
        self.source.subs.retain(|s| s.replica != replica);
        self.account.subs.retain(|s| s.replica != replica);
        self.replicas[usize::from(replica)].connected = false;
    }

    /// `queue.delete` of the account queue: its messages go, and its consumers are cancelled.
    pub fn delete_account(&mut self) {
        self.account.exists = false;
        self.account.returned.clear();
        self.account.ready.clear();
        self.account.subs.clear();
    }

    /// Declares the account queue if it is not there: a new incarnation.
    pub fn declare_account(&mut self) {
        if !self.account.exists {
            self.account = Queue {
                exists: true,
                incarnation: self.account.incarnation + 1,
                ..Queue::default()
            };
        }
    }

    pub fn new_generation(&mut self) -> u8 {
        self.generations += 1;
        self.generations
    }
}
