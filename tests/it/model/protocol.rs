//! The model's actions: what happens to replicas (events), and each step a replica takes, named
//! after the code it stands for. Paths are those of the crate's `src/`.

use stateright::{Model, Property};

use super::state::{
    Budget, Delivery, From, Ghost, Hold, Lane, Life, Msg, Own, Queue, Reader, Replica, Retire, Src,
    Stage, State, Sub, Which, bit,
};
use super::{Fleet, Handover, Rule};

/// One step of the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    // Events.
    /// A replica starts (a standby, or a new replica of a rolling update).
    Start(u8),
    Sigterm(u8),
    Kill(u8),
    /// A replica pauses (a VM or GC pause) past its hold's expiry.
    Freeze(u8),
    /// The broker gives up a frozen replica's connection (missed AMQP heartbeats).
    ConnectionDies(u8),
    /// Redis expires a hold its holder did not keep.
    HoldExpires,
    Wake(u8),
    /// The fleet's membership moves the source to another replica.
    Rebalance(u8),

    // A replica's connection and holds.
    Reconnect(u8),
    NoticeDeadline(u8),
    TakeHold(u8),
    TakeUp(u8),

    // Consuming the source.
    /// The source's consumer handles its next delivery: taken in, or set aside; `congested`
    /// turns the account's lane on first.
    Deliver {
        replica: u8,
        congested: bool,
        aside: bool,
    },
    /// The holder writes the account queue into its source's list.
    List(u8),
    Publish {
        replica: u8,
        command: u8,
    },
    AckAside {
        replica: u8,
        command: u8,
    },

    // The lane reader.
    StartReader(u8),
    LaneGone(u8),
    Read(u8, Which),

    // Running a command.
    Call {
        replica: u8,
        command: u8,
    },
    Finish {
        replica: u8,
        command: u8,
    },
    /// A command taken in (or, `ghost`, one whose delivery went back since) is set aside at
    /// its turn, with its session's commands waiting behind it.
    Defer {
        replica: u8,
        command: u8,
        ghost: bool,
    },
    /// A command whose delivery went back (`ghost`) is let go at its turn. Without
    /// [`Rule::DeferOwnTenure`], also one still on its channel whose lanes were let go: alone,
    /// unacked, while its session goes on.
    LetGo {
        replica: u8,
        command: u8,
        ghost: bool,
    },

    // Retiring a lane.
    Look(u8),
    Mark(u8),
    Count {
        replica: u8,
        timed_out: bool,
    },
    Delete(u8),

    // Letting a source go.
    CancelSource(u8, Which),
    StopLane(u8, Which),
    GraceOut(u8, Which),
    CloseLane(u8, Which),
    CloseSource(u8, Which),
    Exit(u8),
}

use Action as A;

impl Handover {
    fn session(&self, command: u8) -> u8 {
        self.sessions[usize::from(command)]
    }

    /// The state before anything happens: the commands are in the source; the first running
    /// replica holds it and has looked for its lanes (there are none), the other running ones
    /// have just started.
    pub fn initial(&self) -> State {
        assert!(self.replicas <= 3 && self.running >= 1 && self.running <= self.replicas);
        let commands = self.commands();
        assert!(commands <= 8);
        let mut s = State {
            replicas: vec![Replica::off(); usize::from(self.replicas)],
            source: Queue {
                exists: true,
                incarnation: 1,
                ready: (0..commands).map(Msg::Command).collect(),
                ..Queue::default()
            },
            account: Queue::default(),
            deliveries: Vec::new(),
            hold: None,
            generations: 0,
            acked: 0,
            ended: 0,
            called: 0,
            out_of_order: false,
            returned_to_nothing: false,
            listed: false,
            budget: Budget {
                kills: self.kills,
                freezes: self.freezes,
                sigterms: self.sigterms,
                rebalances: self.rebalances,
            },
            ghosts: Vec::new(),
            memory: self.deferral,
        };
        for r in 0..self.running {
            self.start(&mut s, r);
        }
        if self.fleet == Fleet::Holds {
            self.take_hold(&mut s, 0);
        }
        if let Some(own) = s.replicas[0].own.as_mut() {
            own.looked = true;
            own.holding = true;
        }
        self.push(&mut s);
        s
    }

    /// The broker pushes messages to each queue's active consumer as long as its prefetch
    /// allows (rabbit_fifo checks out greedily, returned messages first), after every step.
    fn push(&self, s: &mut State) {
        if let Some((r, g)) = s.source.active() {
            while s.of(r, g).filter(|d| d.from == From::Source).count() < usize::from(self.prefetch)
                && let Some(msg) = s.source.pop()
            {
                s.deliveries.push(Delivery {
                    msg,
                    from: From::Source,
                    replica: r,
                    generation: g,
                    stage: Stage::Received,
                });
            }
        }
        if s.account.exists
            && let Some((r, g)) = s.account.active()
        {
            let from = From::Account(s.account.incarnation);
            while s.of(r, g).filter(|d| d.from == from).count() < usize::from(self.prefetch)
                && let Some(msg) = s.account.pop()
            {
                s.deliveries.push(Delivery {
                    msg,
                    from,
                    replica: r,
                    generation: g,
                    stage: Stage::Received,
                });
            }
        }
    }

    /// Moves the delivery at `i` to the end: it enters the replica's memory now (its channel's
    /// deliveries keep their order, since each channel's are handled first come first).
    fn enter(s: &mut State, i: usize, stage: Stage) {
        let mut d = s.deliveries.remove(i);
        d.stage = stage;
        s.deliveries.push(d);
    }

    /// The first delivery an ownership's channel on `from` received and did not handle yet.
    fn received(s: &State, r: u8, g: u8, from: impl Fn(From) -> bool) -> Option<usize> {
        s.deliveries.iter().position(|d| {
            d.replica == r && d.generation == g && from(d.from) && d.stage == Stage::Received
        })
    }

    // Helpers of the steps.

    fn start(&self, s: &mut State, r: u8) {
        let rep = &mut s.replicas[usize::from(r)];
        rep.life = Life::Up;
        rep.connected = true;
        if self.fleet == Fleet::Standby {
            self.register(s, r, false);
        }
    }

    /// A new ownership registers its consumer on the source.
    fn register(&self, s: &mut State, r: u8, holding: bool) {
        let generation = s.new_generation();
        s.source.subs.push(Sub {
            replica: r,
            generation,
            cancelled: false,
        });
        s.replicas[usize::from(r)].own = Some(Own::new(generation, holding));
    }

    fn take_hold(&self, s: &mut State, r: u8) {
        let generation = s.generations + 1;
        s.hold = Some(Hold {
            replica: r,
            generation,
        });
        self.register(s, r, true);
    }

    /// `lua/hold.lua` give: deletes the hold if it is this replica's (and, with generations,
    /// this ownership's).
    fn give_hold(&self, s: &mut State, r: u8, generation: u8) {
        if let Some(h) = s.hold
            && h.replica == r
            && (!self.rule(Rule::Generation) || h.generation == generation)
        {
            s.hold = None;
        }
    }

    /// Lets every ownership of a replica go with its connection, and gives its holds.
    fn let_go(&self, s: &mut State, r: u8) {
        if s.replicas[usize::from(r)].connected {
            s.close_connection(r);
        }
        let rep = &mut s.replicas[usize::from(r)];
        let generations: Vec<u8> = [rep.own.take(), rep.old.take()]
            .into_iter()
            .flatten()
            .map(|o| o.generation)
            .collect();
        rep.woke = false;
        for g in generations {
            self.give_hold(s, r, g);
        }
    }

    /// The replica's session `session` has commands taken in from the source, unsettled.
    fn pinned(&self, s: &State, r: u8, session: u8) -> bool {
        s.deliveries.iter().any(|d| {
            d.replica == r
                && d.from == From::Source
                && d.command().is_some_and(|c| self.session(c) == session)
                && matches!(d.stage, Stage::Waiting | Stage::Calling | Stage::Doubt)
        })
    }

    /// The delivery at `i` may start its call: nothing of its session runs on its replica, and
    /// nothing of it waits ahead.
    fn session_free(&self, s: &State, i: usize) -> bool {
        let d = s.deliveries[i];
        let Some(command) = d.command() else {
            return false;
        };
        let session = self.session(command);
        // What its replica remembers of its session is ahead of it.
        let remembered = s
            .ghosts
            .iter()
            .any(|g| g.replica == d.replica && self.session(g.command) == session);
        !remembered
            && s.deliveries.iter().enumerate().all(|(j, e)| {
                j == i
                    || e.replica != d.replica
                    || e.command().is_none_or(|c| self.session(c) != session)
                    || match e.stage {
                        Stage::Calling | Stage::Doubt => false,
                        Stage::Waiting => j > i,
                        Stage::Received | Stage::Aside | Stage::Published | Stage::Forgotten => {
                            true
                        }
                    }
            })
    }

    /// The ghosts of `r` whose turn it is: the first its replica remembers of their session,
    /// nothing of it running.
    fn ghosts_at_turn(&self, s: &State, r: u8) -> Vec<Ghost> {
        let mut seen = Vec::new();
        let mut out = Vec::new();
        for g in s.ghosts.iter().filter(|g| g.replica == r) {
            let session = self.session(g.command);
            if seen.contains(&session) {
                continue;
            }
            seen.push(session);
            let running = s.deliveries.iter().any(|d| {
                d.replica == r
                    && d.command().is_some_and(|c| self.session(c) == session)
                    && matches!(d.stage, Stage::Calling | Stage::Doubt)
            });
            if !running {
                out.push(*g);
            }
        }
        out
    }

    /// Whether the delivery at `i`, taken in and at its turn, may be set aside now
    /// (`SourceLanes::defer`): nothing of its session is set aside or taken back (the lane's
    /// count), its lane is not being deleted, and, with [`Rule::DeferOwnTenure`], what waits
    /// behind it is its own tenure's.
    fn deferrable(&self, s: &State, r: u8, i: usize) -> bool {
        let d = s.deliveries[i];
        let Some(command) = d.command() else {
            return false;
        };
        let session = self.session(command);
        let of_session = |c: u8| self.session(c) == session;
        let in_account =
            s.account.exists && (0..self.commands()).any(|c| of_session(c) && s.account.holds(c));
        let marked = in_account
            || s.deliveries.iter().any(|e| {
                e.replica == r
                    && e.command().is_some_and(of_session)
                    && (matches!(e.from, From::Account(_))
                        || matches!(e.stage, Stage::Aside | Stage::Published))
            });
        if marked {
            return false;
        }
        let rep = &s.replicas[usize::from(r)];
        let tenure = [rep.own, rep.old]
            .into_iter()
            .flatten()
            .find(|o| o.generation == d.generation);
        if let Some(Own {
            releasing: false,
            lane: Lane::On { retire, .. },
            ..
        }) = tenure
            && retire.deleting()
        {
            return false;
        }
        !self.rule(Rule::DeferOwnTenure)
            || s.deliveries.iter().all(|e| {
                e.replica != r
                    || e.from != From::Source
                    || e.stage != Stage::Waiting
                    || e.command().is_none_or(|c| !of_session(c))
                    || e.generation == d.generation
            })
    }

    /// The steps of commands set aside after they were taken in.
    fn deferral_steps(&self, s: &State, r: u8, out: &mut Vec<Action>) {
        for g in self.ghosts_at_turn(s, r) {
            out.push(A::LetGo {
                replica: r,
                command: g.command,
                ghost: true,
            });
            // Before the rule, its turn came like any other's: its account could not start it
            // soon, and its tenure's lanes set it aside.
            if !self.rule(Rule::DeferOwnTenure) {
                out.push(A::Defer {
                    replica: r,
                    command: g.command,
                    ghost: true,
                });
            }
        }
        for (i, d) in s.deliveries.iter().enumerate() {
            if d.replica == r
                && d.from == From::Source
                && d.stage == Stage::Waiting
                && self.session_free(s, i)
                && self.deferrable(s, r, i)
                && let Some(command) = d.command()
            {
                out.push(A::Defer {
                    replica: r,
                    command,
                    ghost: false,
                });
                // Before the rule, one whose lanes were let go (SIGTERM, a rebalance) was let
                // go alone at its turn, as if its delivery had gone back.
                let rep = &s.replicas[usize::from(r)];
                let let_go = [rep.own, rep.old]
                    .into_iter()
                    .flatten()
                    .any(|o| o.generation == d.generation && o.releasing);
                if !self.rule(Rule::DeferOwnTenure) && let_go {
                    out.push(A::LetGo {
                        replica: r,
                        command,
                        ghost: false,
                    });
                }
            }
        }
    }

    /// `SourceLanes::defer` by the lanes of tenure `generation` of `r`: the session's commands
    /// waiting in `r`'s memory go aside in those lanes if they are the tenure's and its lanes
    /// still set aside; else they are let go, unacked (`set_aside` after the source was let
    /// go, `forget`).
    fn defer(&self, s: &mut State, r: u8, session: u8, generation: u8) {
        s.ghosts
            .retain(|g| g.replica != r || self.session(g.command) != session);
        let rep = &s.replicas[usize::from(r)];
        let live = [rep.own, rep.old].into_iter().flatten().any(|o| {
            o.generation == generation
                && !o.releasing
                && matches!(o.lane, Lane::Off | Lane::On { .. })
        });
        let mut moved = false;
        for d in s.deliveries.iter_mut() {
            if d.replica == r
                && d.from == From::Source
                && d.stage == Stage::Waiting
                && d.command().is_some_and(|c| self.session(c) == session)
            {
                if live && d.generation == generation {
                    d.stage = Stage::Aside;
                    moved = true;
                } else {
                    d.stage = Stage::Forgotten;
                }
            }
        }
        if !moved {
            return;
        }
        let rep = &mut s.replicas[usize::from(r)];
        for o in [rep.own.as_mut(), rep.old.as_mut()].into_iter().flatten() {
            if o.generation != generation {
                continue;
            }
            match &mut o.lane {
                lane @ Lane::Off => {
                    *lane = Lane::On {
                        reader: Reader::None,
                        retire: Retire::No,
                    };
                }
                Lane::On { retire, .. } if *retire == Retire::Marker => *retire = Retire::Stale,
                _ => {}
            }
        }
    }

    fn find(&self, s: &State, r: u8, command: u8, stage: impl Fn(Stage) -> bool) -> Option<usize> {
        s.deliveries
            .iter()
            .position(|d| d.replica == r && d.msg == Msg::Command(command) && stage(d.stage))
    }

    /// The delivery a `Call` of `command` on `r` starts. With a fleet, a command whose call
    /// is on the wire elsewhere waits for that call's claim (fleet/claims.rs).
    fn callable(&self, s: &State, r: u8, command: u8) -> Option<usize> {
        let claimed = self.fleet == Fleet::Holds
            && s.deliveries
                .iter()
                .any(|d| d.msg == Msg::Command(command) && d.stage == Stage::Calling);
        if claimed {
            return None;
        }
        (0..s.deliveries.len()).find(|&i| {
            let d = s.deliveries[i];
            d.replica == r
                && d.msg == Msg::Command(command)
                && d.stage == Stage::Waiting
                && self.session_free(s, i)
        })
    }

    /// The source delivery the current ownership handles next, if it handles one now: it has
    /// looked for its lanes, and it is not letting the source go (today's intake without
    /// holds still hands what it received to the handler after its cancel).
    fn routable(&self, s: &State, r: u8, o: &Own) -> Option<usize> {
        let handing_over = self.today() && self.fleet == Fleet::Standby && o.src == Src::Cancelled;
        let handles = o.looked
            && ((o.src == Src::Registered && !o.releasing) || handing_over)
            && matches!(o.lane, Lane::Off | Lane::On { .. });
        if !handles {
            return None;
        }
        Self::received(s, r, o.generation, |f| f == From::Source)
    }

    /// Whether a retiring holder's conditions on itself hold: nothing of its lane unsettled or
    /// waiting to be set aside, its reader on the queue (the active consumer, when the holder
    /// rule is on).
    fn may_retire(&self, s: &State, r: u8, o: &Own, reader: Reader) -> bool {
        let holder = !self.rule(Rule::HolderDeletes)
            || (o.holding && s.account.active() == Some((r, o.generation)));
        s.reads_account(reader)
            && holder
            && !s.holds_from_account(r, o.generation)
            && !s.aside_pending(r, o.generation)
    }

    fn acts_for_source(&self, s: &State, r: u8, o: &Own) -> bool {
        let consumer = match self.fleet {
            Fleet::Standby => {
                o.src == Src::Registered && s.source.active() == Some((r, o.generation))
            }
            Fleet::Holds => o.holding && o.src != Src::Closed,
        };
        consumer || matches!(o.lane, Lane::On { .. } | Lane::Closing)
    }

    /// Replicas that run and may act for the source.
    pub fn holders(&self, s: &State) -> usize {
        (0..self.replicas)
            .filter(|&r| {
                let rep = &s.replicas[usize::from(r)];
                rep.live()
                    && [rep.own, rep.old]
                        .iter()
                        .flatten()
                        .any(|o| self.acts_for_source(s, r, o))
            })
            .count()
    }

    fn events(&self, s: &State, r: u8, out: &mut Vec<Action>) {
        let rep = &s.replicas[usize::from(r)];
        match rep.life {
            Life::Off => out.push(A::Start(r)),
            Life::Up => {
                if !rep.sigterm && s.budget.sigterms > 0 {
                    out.push(A::Sigterm(r));
                }
                if s.budget.kills > 0 {
                    out.push(A::Kill(r));
                }
                if s.budget.freezes > 0 {
                    out.push(A::Freeze(r));
                }
                if self.fleet == Fleet::Holds
                    && s.budget.rebalances > 0
                    && rep.live()
                    && !rep.sigterm
                    && rep.old.is_none()
                    && rep.own.is_some_and(|o| o.holding && !o.releasing)
                {
                    out.push(A::Rebalance(r));
                }
            }
            Life::Frozen => {
                out.push(A::Wake(r));
                if rep.connected {
                    out.push(A::ConnectionDies(r));
                }
                if s.budget.kills > 0 {
                    out.push(A::Kill(r));
                }
            }
            Life::Gone => {}
        }
    }

    fn steps(&self, s: &State, r: u8, out: &mut Vec<Action>) {
        let rep = &s.replicas[usize::from(r)];
        if rep.life != Life::Up {
            return;
        }
        if !rep.connected {
            out.push(A::Reconnect(r));
            return;
        }
        if rep.woke {
            out.push(A::NoticeDeadline(r));
        }
        if self.fleet == Fleet::Holds
            && !rep.sigterm
            && rep.own.is_none()
            && match s.hold {
                None => true,
                Some(h) => !self.rule(Rule::Generation) && h.replica == r,
            }
        {
            out.push(A::TakeHold(r));
        }
        if let Some(o) = rep.own {
            self.own_steps(s, r, &o, out);
        }
        for which in [Which::Own, Which::Old] {
            if let Some(o) = rep.get(which) {
                self.read_step(s, r, which, o, out);
                if o.releasing {
                    self.release_steps(s, r, which, o, out);
                }
            }
        }
        // Commands in memory.
        for d in &s.deliveries {
            let Some(command) = d.command() else {
                continue;
            };
            if d.replica != r {
                continue;
            }
            match d.stage {
                Stage::Waiting => {
                    let call = A::Call {
                        replica: r,
                        command,
                    };
                    if self.callable(s, r, command).is_some() && !out.contains(&call) {
                        out.push(call);
                    }
                }
                Stage::Calling | Stage::Doubt => {
                    let finish = A::Finish {
                        replica: r,
                        command,
                    };
                    if !out.contains(&finish) {
                        out.push(finish);
                    }
                }
                Stage::Published => {
                    let ack = A::AckAside {
                        replica: r,
                        command,
                    };
                    if !out.contains(&ack) {
                        out.push(ack);
                    }
                }
                Stage::Received | Stage::Aside | Stage::Forgotten => {}
            }
        }
        if self.deferral {
            self.deferral_steps(s, r, out);
        }
        if rep.sigterm
            && rep.old.is_none()
            && rep.own.is_none_or(|o| {
                o.src == Src::Closed
                    && (o.lane == Lane::Closed
                        || (!self.rule(Rule::LanesCloseFirst) && o.grace_out))
            })
        {
            out.push(A::Exit(r));
        }
    }

    /// The steps of a replica's current ownership while it holds (or waits for) the source.
    fn own_steps(&self, s: &State, r: u8, o: &Own, out: &mut Vec<Action>) {
        let g = o.generation;
        if let Some(i) = self.routable(s, r, o) {
            let Msg::Command(head) = s.deliveries[i].msg else {
                unreachable!("only commands in the source")
            };
            let pinned = self.pinned(s, r, self.session(head));
            let deliver = |congested, aside| A::Deliver {
                replica: r,
                congested,
                aside,
            };
            match o.lane {
                _ if s.is(s.ended, head) => out.push(deliver(false, false)),
                // The first delivery looks for the account queue again (Today's second look).
                Lane::Off if !o.activated && s.account.exists => out.push(deliver(true, !pinned)),
                Lane::Off => {
                    out.push(deliver(false, false));
                    out.push(deliver(true, !pinned));
                }
                Lane::On { retire, .. } => out.push(deliver(false, !retire.deleting() && !pinned)),
                Lane::Closing | Lane::Closed => {}
            }
        }
        if o.releasing {
            return;
        }
        if !o.looked {
            let may = match self.fleet {
                Fleet::Holds => o.holding,
                Fleet::Standby => {
                    !self.rule(Rule::StandbyTakesNoLane) || s.source.active() == Some((r, g))
                }
            };
            if may {
                out.push(A::TakeUp(r));
            }
        }
        let Lane::On { reader, retire } = o.lane else {
            return;
        };
        let aside = s
            .of(r, g)
            .find(|d| d.stage == Stage::Aside)
            .and_then(Delivery::command);
        // Fixed: the account queue is listed before it is declared and published to; without
        // the rule, whenever the lane is on, also after a publish.
        if !self.today() && !s.listed && (aside.is_some() || s.account.exists) {
            out.push(A::List(r));
        }
        if !retire.deleting()
            && let Some(command) = aside
            && (!self.rule(Rule::ListFirst) || s.listed)
        {
            out.push(A::Publish {
                replica: r,
                command,
            });
        }
        if retire == Retire::No && s.account.exists && !s.reads_account(reader) {
            out.push(A::StartReader(r));
        }
        if retire == Retire::No && !s.account.exists && !s.aside_pending(r, g) {
            out.push(A::LaneGone(r));
        }
        if self.today() {
            if retire == Retire::No && !s.holds_from_account(r, g) && !s.aside_pending(r, g) {
                out.push(A::Look(r));
            }
            if retire == Retire::Looked {
                out.push(A::Delete(r));
            }
            return;
        }
        let ready = self.may_retire(s, r, o, reader);
        if self.rule(Rule::Marker) && retire == Retire::No && ready {
            out.push(A::Mark(r));
        }
        // At the count its own reader holds nothing: nothing came back to it since the marker.
        let count = if self.rule(Rule::Marker) {
            retire == Retire::Read && !s.holds_from_account(r, g)
        } else {
            retire == Retire::No && ready
        };
        if count && s.account.exists {
            for timed_out in [false, true] {
                out.push(A::Count {
                    replica: r,
                    timed_out,
                });
            }
        }
        let holder = !self.rule(Rule::HolderDeletes)
            || (o.holding && s.reads_account(reader) && s.account.active() == Some((r, g)));
        if retire == Retire::Counted && holder {
            out.push(A::Delete(r));
        }
    }

    fn read_step(&self, s: &State, r: u8, which: Which, o: &Own, out: &mut Vec<Action>) {
        // A reader that is not stopped hands over what it received, also once its queue is
        // gone (lane off).
        if matches!(o.lane, Lane::On { .. } | Lane::Off)
            && Self::received(s, r, o.generation, |f| matches!(f, From::Account(_))).is_some()
        {
            out.push(A::Read(r, which));
        }
    }

    fn release_steps(&self, s: &State, r: u8, which: Which, o: &Own, out: &mut Vec<Action>) {
        let g = o.generation;
        let fixed_order = self.rule(Rule::LanesCloseFirst);
        if !fixed_order && o.src == Src::Registered {
            out.push(A::CancelSource(r, which));
        }
        if matches!(o.lane, Lane::Off | Lane::On { .. })
            && (fixed_order || o.src != Src::Registered)
        {
            out.push(A::StopLane(r, which));
        }
        if !o.grace_out && s.of(r, g).next().is_some() {
            out.push(A::GraceOut(r, which));
        }
        let taken = s
            .of(r, g)
            .any(|d| matches!(d.from, From::Account(_)) && d.stage != Stage::Received);
        if o.lane == Lane::Closing && (!taken || (fixed_order && o.grace_out)) {
            out.push(A::CloseLane(r, which));
        }
        let settled = !s.source_unsettled(r, g) || o.grace_out;
        let close = if fixed_order {
            o.src != Src::Closed
                && o.lane == Lane::Closed
                && !s.of(r, g).any(|d| d.stage == Stage::Published)
                && settled
        } else {
            o.src == Src::Cancelled
                && settled
                && (self.fleet == Fleet::Standby || o.lane == Lane::Closed || o.grace_out)
        };
        if close {
            out.push(A::CloseSource(r, which));
        }
    }

    fn apply(&self, s: &mut State, action: Action) {
        match action {
            // serve.rs serve(): connect, declare, and without holds register on the queue at
            // once (a standby waits behind the active consumer); H::open comes next (TakeUp).
            A::Start(r) => self.start(s, r),
            // serve.rs consume(): shutdown → hand_over(); with partitions release_all().
            A::Sigterm(r) => {
                s.budget.sigterms -= 1;
                let rep = &mut s.replicas[usize::from(r)];
                rep.sigterm = true;
                if let Some(o) = rep.own.as_mut() {
                    o.releasing = true;
                }
            }
            // The process dies; the OS closes its socket: the broker returns all it held. Its
            // hold stays until it expires.
            A::Kill(r) => {
                s.budget.kills -= 1;
                if s.replicas[usize::from(r)].connected {
                    s.close_connection(r);
                }
                s.ghosts.retain(|g| g.replica != r);
                let rep = &mut s.replicas[usize::from(r)];
                rep.life = Life::Gone;
                rep.own = None;
                rep.old = None;
            }
            // A pause: calls on the wire are in doubt from now on.
            A::Freeze(r) => {
                s.budget.freezes -= 1;
                s.replicas[usize::from(r)].life = Life::Frozen;
                for d in s.deliveries.iter_mut() {
                    if d.replica == r && d.stage == Stage::Calling {
                        d.stage = Stage::Doubt;
                    }
                }
            }
            // The broker's heartbeat timeout on a silent peer: connection closed, unacked
            // returned, consumers gone (the next single active consumer takes over).
            A::ConnectionDies(r) => s.close_connection(r),
            // lua/hold.lua: the hold's PX ran out, lua/heartbeat.lua did not keep it.
            A::HoldExpires => s.hold = None,
            // The process runs again. Its holds' deadline (fleet/holds.rs, member_ttl −
            // heartbeat) has passed. Fixed: it lets everything go before anything else runs.
            // Today: serve.rs consume() notices only when its `until(stop_by)` branch runs;
            // meanwhile the lane tasks and commands run on.
            A::Wake(r) => {
                let rep = &mut s.replicas[usize::from(r)];
                rep.life = Life::Up;
                let owns = rep.own.is_some() || rep.old.is_some();
                if self.fleet == Fleet::Holds && rep.connected && owns {
                    if self.rule(Rule::WokenActsOnNothing) {
                        self.let_go(s, r);
                    } else {
                        s.replicas[usize::from(r)].woke = true;
                    }
                }
            }
            // owned.rs rebalance() → release(): the source is handed over in the background;
            // the process goes on, and may be given the source again.
            A::Rebalance(r) => {
                s.budget.rebalances -= 1;
                let rep = &mut s.replicas[usize::from(r)];
                let mut o = rep.own.take().expect("holding");
                o.releasing = true;
                rep.old = Some(o);
            }
            // serve.rs let_go() after a lost connection: holds.give_all(); the consumer
            // connects again (consumer.rs run loop) and, without holds, registers again.
            A::Reconnect(r) => {
                self.let_go(s, r);
                let rep = &mut s.replicas[usize::from(r)];
                if rep.sigterm {
                    rep.life = Life::Gone;
                    return;
                }
                rep.connected = true;
                if self.fleet == Fleet::Standby {
                    self.register(s, r, false);
                }
            }
            // serve.rs consume(): `until(stop_by)` fires past the deadline → let_go(): the
            // connection is closed, holds.give_all().
            A::NoticeDeadline(r) => self.let_go(s, r),
            // lua/hold.lua take (free, or already this replica's) → serve.rs take_up() /
            // owned.rs take_up_partition(): holds.take, then subscribe (basic.consume).
            A::TakeHold(r) => self.take_hold(s, r),
            // lanes/mod.rs refresh() from Handler::open: account_queue::probe (passive
            // declare); a queue found turns the lane on, its task reads it (declared = true).
            // Fixed: lanes/registry.rs refresh(): lane_registry::take, then a look at each
            // queue listed (a source without a list is looked at per account, once).
            A::TakeUp(r) => {
                let exists = s.account.exists && (self.today() || s.listed);
                let o = s.replicas[usize::from(r)].own.as_mut().expect("own");
                o.looked = true;
                o.holding = true;
                if exists {
                    o.lane = Lane::On {
                        reader: Reader::None,
                        retire: Retire::No,
                    };
                }
            }
            // serve.rs delivered() / partition.rs read_partition() → Pipeline::accept →
            // lanes/mod.rs route(): taken in (queued behind its session), or set aside. The
            // first delivery of a queue runs Handler::open again (serve.rs `activated`).
            A::Deliver {
                replica: r,
                congested,
                aside,
            } => {
                let own = s.replicas[usize::from(r)].own.expect("own");
                let i = self.routable(s, r, &own).expect("a delivery");
                let Msg::Command(c) = s.deliveries[i].msg else {
                    unreachable!("a command")
                };
                let exists = s.account.exists && (self.today() || s.listed);
                let ended = s.is(s.ended, c);
                let o = s.replicas[usize::from(r)].own.as_mut().expect("own");
                if !o.activated {
                    o.activated = true;
                    if o.lane == Lane::Off && exists {
                        o.lane = Lane::On {
                            reader: Reader::None,
                            retire: Retire::No,
                        };
                    }
                }
                if ended {
                    // Answered from the record: acked at once.
                    s.deliveries.remove(i);
                    s.acked |= bit(c);
                    return;
                }
                let stage = if aside { Stage::Aside } else { Stage::Waiting };
                match &mut o.lane {
                    lane @ Lane::Off if congested => {
                        // lanes/mod.rs Lane::turn_on(); a pinned session's command is still
                        // taken in, behind the ones of its session in memory.
                        *lane = Lane::On {
                            reader: Reader::None,
                            retire: Retire::No,
                        };
                    }
                    // Fixed: a command set aside after the marker ends that retirement; the
                    // marker, when it comes back, tells nothing.
                    Lane::On { retire, .. } if aside && *retire == Retire::Marker => {
                        *retire = Retire::Stale;
                    }
                    _ => {}
                }
                Self::enter(s, i, stage);
            }
            // lanes/task.rs declare() when the queue is not there, then lanes/publish.rs
            // publish(): publish_to_queue (mandatory, confirmed).
            A::Publish {
                replica: r,
                command,
            } => {
                let g = s.replicas[usize::from(r)].own.expect("own").generation;
                s.declare_account();
                s.account.ready.push(Msg::Command(command));
                let d = s
                    .deliveries
                    .iter_mut()
                    .find(|d| {
                        d.replica == r
                            && d.generation == g
                            && d.msg == Msg::Command(command)
                            && d.stage == Stage::Aside
                    })
                    .expect("set aside");
                d.stage = Stage::Published;
            }
            // lanes/task.rs declare() → lanes/registry.rs register(): lane_registry::store,
            // confirmed, before account_queue::declare.
            A::List(_) => s.listed = true,
            // lanes/publish.rs publish(): acker.ack once the publish is confirmed.
            A::AckAside {
                replica: r,
                command,
            } => {
                let i = self
                    .find(s, r, command, |st| st == Stage::Published)
                    .expect("published");
                s.deliveries.remove(i);
                s.acked |= bit(command);
            }
            // lanes/task.rs read_if_declared() → lanes/reader.rs read(): basic.consume on the
            // account queue (single active consumer: it may wait behind another).
            A::StartReader(r) => {
                let incarnation = s.account.incarnation;
                let o = s.replicas[usize::from(r)].own.as_mut().expect("own");
                let generation = o.generation;
                o.lane = Lane::On {
                    reader: Reader::On(incarnation),
                    retire: Retire::No,
                };
                s.account.subs.push(Sub {
                    replica: r,
                    generation,
                    cancelled: false,
                });
            }
            // lanes/task.rs reader_ended(): the queue is gone (probe: not found) and nothing
            // waits to be set aside: the lane goes off.
            A::LaneGone(r) => {
                s.replicas[usize::from(r)].own.as_mut().expect("own").lane = Lane::Off;
            }
            // lanes/reader.rs take(): the next delivery of the account queue; it waits for one
            // of the account's slots, then runs behind its session. Fixed: the reader acks
            // markers at once, and its own marker tells the retirement whether everything
            // before it settled.
            A::Read(r, which) => {
                let g = s.replicas[usize::from(r)]
                    .get(which)
                    .expect("ownership")
                    .generation;
                let i =
                    Self::received(s, r, g, |f| matches!(f, From::Account(_))).expect("a delivery");
                match s.deliveries[i].msg {
                    Msg::Command(c) if s.is(s.ended, c) => {
                        s.deliveries.remove(i);
                    }
                    Msg::Command(_) => Self::enter(s, i, Stage::Waiting),
                    Msg::Marker {
                        replica,
                        generation,
                    } => {
                        s.deliveries.remove(i);
                        let clean = !s.holds_from_account(r, g) && !s.aside_pending(r, g);
                        if let Lane::On { retire, .. } = &mut s.replicas[usize::from(r)]
                            .get_mut(which)
                            .expect("ownership")
                            .lane
                            && (replica, generation) == (r, g)
                        {
                            *retire = match *retire {
                                Retire::Marker if clean => Retire::Read,
                                Retire::Marker | Retire::Stale => Retire::No,
                                other => other,
                            };
                        }
                    }
                }
            }
            // pipeline/sessions: the session's next command starts; with a fleet it claims the
            // command (fleet/claims.rs) and the API is called (a command already ended is
            // answered from its record and acked).
            A::Call {
                replica: r,
                command,
            } => {
                let i = self.callable(s, r, command).expect("callable");
                if s.is(s.ended, command) {
                    let d = s.deliveries.remove(i);
                    if d.from == From::Source {
                        s.acked |= bit(command);
                    }
                    return;
                }
                if !s.is(s.called, command) {
                    let session = self.session(command);
                    let earlier_uncalled =
                        (0..command).any(|e| self.session(e) == session && !s.is(s.called, e));
                    s.out_of_order |= earlier_uncalled;
                }
                s.called |= bit(command);
                s.deliveries[i].stage = Stage::Calling;
            }
            // The call's answer: the terminal event is confirmed, the delivery acked on its
            // channel (an ack for a deleted queue is a no-op, the command still ended).
            A::Finish {
                replica: r,
                command,
            } => {
                let i = self
                    .find(s, r, command, |st| {
                        matches!(st, Stage::Calling | Stage::Doubt)
                    })
                    .expect("calling");
                let d = s.deliveries.remove(i);
                s.ended |= bit(command);
                if d.from == From::Source {
                    s.acked |= bit(command);
                }
            }
            // pipeline/mod.rs run_session(): its account cannot start it within aside_after
            // (run_one) → lanes/route.rs defer(), with the session's jobs waiting behind it
            // (SessionQueues::take_waiting_if, SourceLanes::may_move).
            A::Defer {
                replica: r,
                command,
                ghost,
            } => {
                let generation = if ghost {
                    let k = s
                        .ghosts
                        .iter()
                        .position(|g| g.replica == r && g.command == command)
                        .expect("remembered");
                    s.ghosts[k].generation
                } else {
                    let i = self
                        .find(s, r, command, |st| st == Stage::Waiting)
                        .expect("taken in");
                    s.deliveries[i].generation
                };
                self.defer(s, r, self.session(command), generation);
            }
            // pipeline/mod.rs run_session(): `!job.ours()` → returned, and the next one runs.
            A::LetGo {
                replica: r,
                command,
                ghost: true,
            } => {
                let k = s
                    .ghosts
                    .iter()
                    .position(|g| g.replica == r && g.command == command)
                    .expect("remembered");
                s.ghosts.remove(k);
            }
            A::LetGo {
                replica: r,
                command,
                ghost: false,
            } => {
                let i = self
                    .find(s, r, command, |st| st == Stage::Waiting)
                    .expect("taken in");
                s.deliveries[i].stage = Stage::Forgotten;
            }
            // Today: lanes/task.rs wait() after LINGER → retire(): nothing queued, nothing taken
            // (in_queue: see the module's documentation); state.on = false; the reader stops
            // (basic.cancel, channel.close); account_queue::delete_if_empty: the passive
            // declare.
            A::Look(r) => {
                let depth = s.account.depth();
                let exists = s.account.exists;
                let o = s.replicas[usize::from(r)].own.as_mut().expect("own");
                let g = o.generation;
                let Lane::On { reader, .. } = o.lane else {
                    unreachable!("lane on")
                };
                o.lane = if !exists {
                    Lane::Off
                } else if depth == 0 {
                    Lane::On {
                        reader: Reader::None,
                        retire: Retire::Looked,
                    }
                } else {
                    Lane::On {
                        reader: Reader::None,
                        retire: Retire::No,
                    }
                };
                if s.reads_account(reader) {
                    s.account.unsubscribe(r, g);
                }
            }
            // Fixed: the retiring holder publishes its marker into the account queue.
            A::Mark(r) => {
                let o = s.replicas[usize::from(r)].own.as_mut().expect("own");
                let g = o.generation;
                if let Lane::On { retire, .. } = &mut o.lane {
                    *retire = Retire::Marker;
                }
                s.account.ready.push(Msg::Marker {
                    replica: r,
                    generation: g,
                });
            }
            // Fixed: the count of the account queue's messages and consumers (taken only while
            // the holder's own reader holds nothing); one that times out answers 0 and 0.
            A::Count {
                replica: r,
                timed_out,
            } => {
                let (ready, consumers) = if timed_out {
                    (0, 0)
                } else {
                    (s.account.depth(), s.account_consumers())
                };
                let ok = ready == 0 && (!self.rule(Rule::ConsumerCount) || consumers == 1);
                let o = s.replicas[usize::from(r)].own.as_mut().expect("own");
                if let Lane::On { retire, .. } = &mut o.lane {
                    *retire = if ok { Retire::Counted } else { Retire::No };
                }
            }
            // account_queue::delete_if_empty: queue.delete (today right after its look; fixed
            // after the count). Its consumers are cancelled; the lane goes off.
            A::Delete(r) => {
                if s.account.exists {
                    s.delete_account();
                }
                // Fixed: lanes/retire.rs, then SourceLanes::unregister: off the list once
                // deleted (a stale entry, should the holder die first, costs a look).
                s.listed = false;
                s.replicas[usize::from(r)].own.as_mut().expect("own").lane = Lane::Off;
            }
            // registered.rs Registered::stop() / partition.rs Subscription::stop():
            // basic.cancel on the source. The next single active consumer is activated now.
            A::CancelSource(r, which) => {
                let o = s.replicas[usize::from(r)]
                    .get_mut(which)
                    .expect("ownership");
                o.src = Src::Cancelled;
                let g = o.generation;
                s.source.unsubscribe(r, g);
                if self.fleet == Fleet::Holds && !self.rule(Rule::ReturnInOrder) {
                    // partition.rs release(): what it received and did not hand over is
                    // rejected back (without holds, registered.rs stop() hands it to the
                    // handler instead: `routable`).
                    s.give_back(|d| {
                        d.replica == r
                            && d.generation == g
                            && d.from == From::Source
                            && d.stage == Stage::Received
                    });
                }
            }
            // lanes/mod.rs SourceLanes::close() → task.rs hand_back() → reader.rs
            // LaneReader::stop(): basic.cancel of the reader; today what it had not taken goes
            // back at once (basic.reject, requeue), fixed it stays until the channel closes.
            // Unpublished set-asides stay with the source's channel.
            A::StopLane(r, which) => {
                let o = *s.replicas[usize::from(r)].get(which).expect("ownership");
                let g = o.generation;
                let lane = match o.lane {
                    Lane::On { reader, .. } => {
                        if s.reads_account(reader)
                            && let Some(sub) = s
                                .account
                                .subs
                                .iter_mut()
                                .find(|x| (x.replica, x.generation) == (r, g))
                        {
                            sub.cancelled = true;
                        }
                        if !self.rule(Rule::ReturnInOrder) {
                            s.give_back(|d| {
                                d.replica == r
                                    && d.generation == g
                                    && matches!(d.from, From::Account(_))
                                    && d.stage == Stage::Received
                            });
                        }
                        Lane::Closing
                    }
                    _ => Lane::Closed,
                };
                s.replicas[usize::from(r)]
                    .get_mut(which)
                    .expect("ownership")
                    .lane = lane;
            }
            // lanes/mod.rs close() / registered.rs close(): `timeout(grace, …)` runs out.
            A::GraceOut(r, which) => {
                s.replicas[usize::from(r)]
                    .get_mut(which)
                    .expect("ownership")
                    .grace_out = true;
            }
            // task.rs hand_back(): once what the reader took settled, channel.close (fixed:
            // also when the grace ran out: what it still holds goes back, its calls in doubt).
            A::CloseLane(r, which) => {
                let g = s.replicas[usize::from(r)]
                    .get(which)
                    .expect("ownership")
                    .generation;
                s.give_back(|d| {
                    d.replica == r && d.generation == g && matches!(d.from, From::Account(_))
                });
                s.account.unsubscribe(r, g);
                let rep = &mut s.replicas[usize::from(r)];
                rep.get_mut(which).expect("ownership").lane = Lane::Closed;
                if which == Which::Old && rep.old.is_some_and(|o| o.done()) {
                    rep.old = None;
                }
            }
            // registered.rs close() / partition.rs release(): channel.close of the source
            // (what it holds goes back), then holds.give. Fixed: only once the lanes are closed
            // and their set-asides acked; the consumer is cancelled only now.
            A::CloseSource(r, which) => {
                let g = s.replicas[usize::from(r)]
                    .get(which)
                    .expect("ownership")
                    .generation;
                s.source.unsubscribe(r, g);
                s.give_back(|d| d.replica == r && d.generation == g && d.from == From::Source);
                self.give_hold(s, r, g);
                let rep = &mut s.replicas[usize::from(r)];
                rep.get_mut(which).expect("ownership").src = Src::Closed;
                if which == Which::Old && rep.old.is_some_and(|o| o.done()) {
                    rep.old = None;
                }
            }
            // serve.rs hand_over() returned: the process exits and its connection closes;
            // whatever is still open returns what it holds.
            A::Exit(r) => {
                s.close_connection(r);
                s.ghosts.retain(|g| g.replica != r);
                let rep = &mut s.replicas[usize::from(r)];
                rep.life = Life::Gone;
                rep.own = None;
            }
        }
    }
}

impl Model for Handover {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        vec![self.initial()]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        for r in 0..self.replicas {
            self.events(s, r, out);
        }
        if let Some(h) = s.hold {
            let holder = &s.replicas[usize::from(h.replica)];
            let expires = match holder.life {
                Life::Gone => true,
                Life::Frozen => !self.rule(Rule::ConnectionDiesBeforeExpiry) || !holder.connected,
                Life::Off | Life::Up => false,
            };
            if expires {
                out.push(A::HoldExpires);
            }
        }
        for r in 0..self.replicas {
            self.steps(s, r, out);
        }
    }

    fn next_state(&self, s: &State, action: Action) -> Option<State> {
        let mut next = s.clone();
        self.apply(&mut next, action);
        self.push(&mut next);
        Some(next)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        super::properties::all()
    }
}
