//! Throughput of the sans-IO core alone: three replicas on a perfect in-memory
//! network with instant persists, a leader fed `COMMANDS_IN_FLIGHT` client commands
//! at a time. Prints commands per second with batching on, and the ratio against the
//! same run with one command per slot (the baseline), measured in the same process.
//!
//! Run: `cargo bench -p paxwasm --bench paxos_core`.

use std::collections::VecDeque;
use std::time::Instant;

use paxwasm::paxos::{
    Action, Applier, ApplyContext, Command, Configuration, Event, NodeId, Origin, Params, Replica,
    StateMachine, COMMAND_OVERHEAD_BYTES,
};

const COMMANDS_TOTAL: u64 = 200_000;
const COMMANDS_IN_FLIGHT: u64 = 512;
const PAYLOAD_BYTES: usize = 100;

struct Sink;

impl StateMachine for Sink {
    fn apply(&mut self, payload: &[u8], _context: &ApplyContext) -> Vec<u8> {
        vec![payload.len() as u8]
    }
}

struct Cluster {
    replicas: Vec<Replica>,
    appliers: Vec<Applier<Sink>>,
    network: VecDeque<(NodeId, NodeId, paxwasm::paxos::Message)>,
    actions: Vec<Action>,
    replies: Vec<(u64, Vec<u8>)>,
    answered: u64,
}

impl Cluster {
    fn new(params: Params) -> Cluster {
        let config = Configuration::new([1, 2, 3]);
        Cluster {
            replicas: (1..=3)
                .map(|id| Replica::new(id, config.clone(), params.clone(), 1))
                .collect(),
            appliers: (1..=3).map(|id| Applier::new(id, Sink)).collect(),
            network: VecDeque::new(),
            actions: Vec::new(),
            replies: Vec::new(),
            answered: 0,
        }
    }

    fn handle(&mut self, id: NodeId, event: Event) {
        let mut actions = std::mem::take(&mut self.actions);
        let mut persisted = Vec::new();
        self.replicas[(id - 1) as usize].handle(event, &mut actions);
        for action in actions.drain(..) {
            match action {
                Action::Persist { token, .. } => persisted.push(token),
                Action::Send { to, msg } => self.network.push_back((id, to, msg)),
                Action::Apply { slot, value } => {
                    self.appliers[(id - 1) as usize].apply(slot, &value, &mut self.replies);
                    self.answered += self.replies.len() as u64;
                    self.replies.clear();
                }
                Action::Reply { .. } | Action::SendSnapshot { .. } | Action::Compact { .. } => {}
            }
        }
        self.actions = actions;
        for token in persisted {
            self.handle(id, Event::Persisted { token });
        }
    }

    fn drain(&mut self) {
        while let Some((from, to, msg)) = self.network.pop_front() {
            self.handle(to, Event::Message { from, msg });
        }
    }

    fn tick(&mut self, now_ms: u64) {
        for id in 1..=3 {
            self.handle(id, Event::Tick { now_ms });
        }
        self.drain();
    }
}

/// Commands per second through the leader, from proposal to apply at the leader.
fn run(params: Params) -> f64 {
    let mut cluster = Cluster::new(params);
    let mut now_ms = 0;
    while cluster
        .replicas
        .iter()
        .all(|r| r.status().leading.is_none() || r.status().applied_index == 0)
    {
        now_ms += 10;
        cluster.tick(now_ms);
    }
    let leader = cluster
        .replicas
        .iter()
        .find(|r| r.status().leading.is_some())
        .expect("elected")
        .id();
    let started = Instant::now();
    let mut proposed = 0;
    let mut request = 0;
    while cluster.answered < COMMANDS_TOTAL {
        while proposed < COMMANDS_TOTAL && proposed - cluster.answered < COMMANDS_IN_FLIGHT {
            request += 1;
            let command = Command {
                payload: vec![7; PAYLOAD_BYTES],
                idempotency_key: None,
                origin: Origin {
                    node: leader,
                    request,
                },
            };
            cluster.handle(leader, Event::Propose { request, command });
            proposed += 1;
        }
        cluster.drain();
        now_ms += 10;
        cluster.tick(now_ms);
    }
    COMMANDS_TOTAL as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let batched = Params::default();
    let unbatched = Params {
        batch_bytes_max: PAYLOAD_BYTES + COMMAND_OVERHEAD_BYTES,
        ..Params::default()
    };
    let baseline = run(unbatched);
    let with_batching = run(batched);
    println!("paxos_core: one command per slot (baseline): {baseline:.0} commands/s");
    println!(
        "paxos_core: batching (batch_bytes_max 64 KiB, slots_in_flight_max 8): {with_batching:.0} commands/s, {:.1}x baseline",
        with_batching / baseline
    );
}
