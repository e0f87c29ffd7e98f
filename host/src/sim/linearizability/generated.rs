//! Histories that are linearizable by construction, and mutations that make
//! them not linearizable: material for this checker's own tests and benchmark,
//! and for anyone who wants to show a checker has teeth. Nothing here runs a
//! replica; the "execution" is a plain map applied one operation at a time.

use std::collections::BTreeMap;

use super::{KvInput, KvOutput, Operation};

/// splitmix64: a tiny seeded generator, enough for test histories.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    pub fn percent(&mut self, chance_percent: u64) -> bool {
        self.below(100) < chance_percent
    }
}

#[derive(Debug, Clone)]
pub struct GeneratorConfig {
    pub ops: u64,
    /// Keys are named `k0`, `k1`, ...
    pub keys: u64,
    /// Ticks between consecutive linearization points.
    pub spacing_ticks: u64,
    /// An operation's call is up to this many ticks before its linearization
    /// point, and its return up to this many after.
    pub window_ticks: u64,
    /// Chance that the client never learns an operation's outcome.
    pub unknown_percent: u64,
}

/// A history from a real sequential execution: operation `i` takes effect at
/// tick `10 + i * spacing_ticks` and its call and return are stretched randomly
/// around that point, so the history is linearizable by construction. Every
/// operation has its own client. Every write writes a value no other operation
/// writes. Unknown-outcome operations took effect or not, by a coin flip.
pub fn generate(seed: u64, config: &GeneratorConfig) -> Vec<Operation> {
    let mut rng = Rng(seed);
    let mut map = SequentialMap::default();
    let mut history = Vec::new();
    for i in 0..config.ops {
        let input = map.random_input(&mut rng, i, config.keys);
        let unknown_outcome = rng.percent(config.unknown_percent);
        let took_effect = !unknown_outcome || rng.percent(50);
        let output = map.run(&input, took_effect);
        let point = 10 + i * config.spacing_ticks;
        let call = point.saturating_sub(rng.below(config.window_ticks + 1));
        let ret = point + rng.below(config.window_ticks + 1);
        history.push(Operation {
            client: i,
            input,
            call,
            ret: (!unknown_outcome).then_some((ret, output)),
        });
    }
    history
}

/// Clients as the simulator has them: each runs one operation at a time.
#[derive(Debug, Clone)]
pub struct ClientsConfig {
    pub clients: u64,
    pub ops: u64,
    /// Keys are named `k0`, `k1`, ...
    pub keys: u64,
    /// An operation takes effect 1 to this many ticks after its call and
    /// returns 0 to this many ticks after taking effect.
    pub latency_ticks_max: u64,
    /// Chance that the client times out and never learns the outcome.
    pub unknown_percent: u64,
    /// A client that times out moves on this many ticks after its call.
    pub timeout_ticks: u64,
}

/// A history of `clients` sequential clients against one map: the timing of
/// each client's operations is drawn first, then the operations run on the map
/// in the order of their (distinct) linearization points, which gives the
/// outputs. Linearizable by construction; every write's value is unique.
pub fn generate_clients(seed: u64, config: &ClientsConfig) -> Vec<Operation> {
    assert!(
        config.clients > 0 && config.latency_ticks_max > 0,
        "degenerate config: {config:?}"
    );
    let mut rng = Rng(seed);
    // (point, client, call, ret or None, took effect) per operation.
    let mut timings: Vec<(u64, u64, u64, Option<u64>, bool)> = Vec::new();
    let mut client_free_tick = vec![0; config.clients as usize];
    for _ in 0..config.ops {
        let client = (0..config.clients)
            .min_by_key(|&client| (client_free_tick[client as usize], client))
            .expect("at least one client");
        let call = client_free_tick[client as usize] + rng.below(3);
        // Points are made distinct (ties would still be valid, but distinct
        // points make the sequential order the generator used unambiguous).
        let point =
            (call + 1 + rng.below(config.latency_ticks_max)) * config.ops + timings.len() as u64;
        let ret = point / config.ops + rng.below(config.latency_ticks_max + 1);
        let unknown_outcome = rng.percent(config.unknown_percent);
        let took_effect = !unknown_outcome || rng.percent(50);
        let free_tick = if unknown_outcome {
            call + config.timeout_ticks.max(ret - call)
        } else {
            ret
        };
        client_free_tick[client as usize] = free_tick + 1;
        timings.push((
            point,
            client,
            call,
            (!unknown_outcome).then_some(ret),
            took_effect,
        ));
    }
    timings.sort_unstable();
    let mut map = SequentialMap::default();
    let mut history: Vec<Operation> = timings
        .iter()
        .enumerate()
        .map(|(i, &(_, client, call, ret, took_effect))| {
            let input = map.random_input(&mut rng, i as u64, config.keys);
            let output = map.run(&input, took_effect);
            Operation {
                client,
                input,
                call,
                ret: ret.map(|ret| (ret, output)),
            }
        })
        .collect();
    // The simulator records operations as they are called.
    history.sort_by_key(|operation| operation.call);
    history
}

/// The sequential key-value map the generators execute operations on.
#[derive(Debug, Default)]
struct SequentialMap {
    values: BTreeMap<String, String>,
}

impl SequentialMap {
    /// A random operation: 40% get, 30% put, 30% cas expecting the current
    /// value, absence, or some value that may or may not be current. Operation
    /// `i` writes the value `v{i}`.
    fn random_input(&self, rng: &mut Rng, i: u64, keys: u64) -> KvInput {
        let key = format!("k{}", rng.below(keys));
        let new = format!("v{i}");
        match rng.below(10) {
            0..4 => KvInput::Get { key },
            4..7 => KvInput::Put { key, value: new },
            _ => {
                let expected = match rng.below(3) {
                    0 => None,
                    1 => Some(format!("v{}", rng.below(i + 1))),
                    _ => self.values.get(&key).cloned(),
                };
                KvInput::Cas { key, expected, new }
            }
        }
    }

    /// The output of `input` on the current map; the map changes only if the
    /// operation `took_effect`.
    fn run(&mut self, input: &KvInput, took_effect: bool) -> KvOutput {
        let current = self.values.get(input.key()).cloned();
        let (output, written) = match input {
            KvInput::Get { .. } => (KvOutput::Value(current), None),
            KvInput::Put { value, .. } => (KvOutput::Ok, Some(value)),
            KvInput::Cas { expected, new, .. } if *expected == current => (KvOutput::Ok, Some(new)),
            KvInput::Cas { .. } => (KvOutput::Mismatch(current), None),
        };
        if let (Some(written), true) = (written, took_effect) {
            self.values.insert(input.key().to_string(), written.clone());
        }
        output
    }
}

/// Turns a completed read into a stale one, if the history allows it: a read
/// `g` of the value written by a completed write `p` that was overwritten by a
/// completed put `w`, with `p` returning before `w` is called and `w` returning
/// before `g` is called. Every value is written once, so in any order that
/// respects real time the key no longer holds `p`'s value when `g` runs: the
/// mutated history is not linearizable. Returns the read's key.
pub fn make_stale_read(history: &mut [Operation], rng: &mut Rng) -> Option<String> {
    // Completed writes (p candidates) and completed puts (w candidates):
    // (index, key, return tick).
    let mut writes = Vec::new();
    let mut puts = Vec::new();
    for (index, operation) in history.iter().enumerate() {
        let Some((ret_tick, output)) = &operation.ret else {
            continue;
        };
        match (&operation.input, output) {
            (KvInput::Put { key, .. }, _) => {
                writes.push((index, key, *ret_tick));
                puts.push((index, key, *ret_tick));
            }
            (KvInput::Cas { key, .. }, KvOutput::Ok) => writes.push((index, key, *ret_tick)),
            _ => {}
        }
    }
    // For each put `w`, the writes `p` that returned before it was called.
    let overwritten: Vec<Vec<usize>> = puts
        .iter()
        .map(|&(w, w_key, _)| {
            let w_call = history[w].call;
            let before = writes
                .iter()
                .filter(|&&(_, p_key, p_ret)| p_key == w_key && p_ret < w_call);
            before.map(|&(p, _, _)| p).collect()
        })
        .collect();
    // Reads `g` with the puts `w` (that overwrote something) returned before their call.
    let reads: Vec<(usize, Vec<usize>)> = history
        .iter()
        .enumerate()
        .filter_map(|(g, read)| {
            let (KvInput::Get { key }, Some(_)) = (&read.input, &read.ret) else {
                return None;
            };
            let earlier_puts: Vec<usize> = (0..puts.len())
                .filter(|&w| {
                    let (_, w_key, w_ret) = puts[w];
                    w_key == key && w_ret < read.call && !overwritten[w].is_empty()
                })
                .collect();
            (!earlier_puts.is_empty()).then_some((g, earlier_puts))
        })
        .collect();
    if reads.is_empty() {
        return None;
    }
    let pick = |rng: &mut Rng, len: usize| rng.below(len as u64) as usize;
    let (g, earlier_puts) = &reads[pick(rng, reads.len())];
    let w = earlier_puts[pick(rng, earlier_puts.len())];
    let p = overwritten[w][pick(rng, overwritten[w].len())];
    let stale = match &history[p].input {
        KvInput::Put { value, .. } => value.clone(),
        KvInput::Cas { new, .. } => new.clone(),
        KvInput::Get { .. } => unreachable!("p is a write"),
    };
    let read = &mut history[*g];
    read.ret.as_mut().expect("chose a completed read").1 = KvOutput::Value(Some(stale));
    Some(read.input.key().to_string())
}

/// Makes a client-visible value go back in time, if the history allows it: a
/// completed read `r1` saw `new` (written by `p_new`), and a completed read
/// `r2` called after `r1` returned is changed to see `old`, written by a
/// completed `p_old` that returned before `p_new` was called. With unique
/// values, `p_new` must precede `r1`, so `p_old < p_new < r2` in every order
/// and `r2` cannot see `old`: not linearizable. Unlike [`make_stale_read`],
/// `p_new` may still be running (or its outcome unknown) when `r2` is called,
/// so no single definite overwrite explains the violation; proving it takes a
/// search. Returns the key.
pub fn make_non_monotonic_read(history: &mut [Operation], rng: &mut Rng) -> Option<String> {
    // Writer of each value (unique by construction), with the call tick.
    let mut writer_of: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, operation) in history.iter().enumerate() {
        let written = match (&operation.input, &operation.ret) {
            (KvInput::Put { value, .. }, _) => value,
            (KvInput::Cas { new, .. }, None | Some((_, KvOutput::Ok))) => new,
            _ => continue,
        };
        let previous = writer_of.insert(written, index);
        assert!(
            previous.is_none(),
            "generated values are unique: {written:?}"
        );
    }
    // Candidates (r2, old value).
    let mut choices: Vec<(usize, String)> = Vec::new();
    for r1 in history.iter() {
        let Some((key, r1_ret, Some(new))) = completed_read(r1) else {
            continue;
        };
        let p_new = &history[writer_of[new]];
        // Completed writers of the key that returned before p_new was called.
        let olds: Vec<&str> = writer_of
            .iter()
            .filter(|&(_, &p)| {
                let p_old = &history[p];
                p_old.input.key() == key
                    && matches!(p_old.ret, Some((ret_tick, _)) if ret_tick < p_new.call)
            })
            .map(|(&value, _)| value)
            .collect();
        if olds.is_empty() {
            continue;
        }
        for (r2, read) in history.iter().enumerate() {
            match completed_read(read) {
                Some((r2_key, _, _)) if r2_key == key && read.call > r1_ret => {
                    let old = olds[rng.below(olds.len() as u64) as usize];
                    choices.push((r2, old.to_string()));
                }
                _ => {}
            }
        }
    }
    if choices.is_empty() {
        return None;
    }
    let (r2, old) = choices.swap_remove(rng.below(choices.len() as u64) as usize);
    let read = &mut history[r2];
    read.ret.as_mut().expect("chose a completed read").1 = KvOutput::Value(Some(old));
    Some(read.input.key().to_string())
}

/// A completed read's key, return tick and result.
fn completed_read(operation: &Operation) -> Option<(&str, u64, Option<&str>)> {
    match (&operation.input, &operation.ret) {
        (KvInput::Get { key }, Some((ret_tick, KvOutput::Value(seen)))) => {
            Some((key, *ret_tick, seen.as_deref()))
        }
        _ => None,
    }
}
