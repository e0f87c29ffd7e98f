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
/// write writes a value no other operation writes. Unknown-outcome operations
/// took effect or not, by a coin flip.
pub fn generate(seed: u64, config: &GeneratorConfig) -> Vec<Operation> {
    let mut rng = Rng(seed);
    let mut state: BTreeMap<String, String> = BTreeMap::new();
    let mut history = Vec::new();
    for i in 0..config.ops {
        let key = format!("k{}", rng.below(config.keys));
        let current = state.get(&key).cloned();
        let new = format!("v{i}");
        let input = match rng.below(10) {
            0..4 => KvInput::Get { key: key.clone() },
            4..7 => KvInput::Put {
                key: key.clone(),
                value: new,
            },
            _ => {
                let expected = match rng.below(3) {
                    0 => None,
                    1 => Some(format!("v{}", rng.below(i + 1))),
                    _ => current.clone(),
                };
                KvInput::Cas {
                    key: key.clone(),
                    expected,
                    new,
                }
            }
        };
        let output = match &input {
            KvInput::Get { .. } => KvOutput::Value(current.clone()),
            KvInput::Put { .. } => KvOutput::Ok,
            KvInput::Cas { expected, .. } if *expected == current => KvOutput::Ok,
            KvInput::Cas { .. } => KvOutput::Mismatch(current.clone()),
        };
        let unknown_outcome = rng.percent(config.unknown_percent);
        let took_effect = !unknown_outcome || rng.percent(50);
        if took_effect {
            match &input {
                KvInput::Put { value, .. } => {
                    state.insert(key.clone(), value.clone());
                }
                KvInput::Cas { new, .. } if output == KvOutput::Ok => {
                    state.insert(key.clone(), new.clone());
                }
                _ => {}
            }
        }
        let point = 10 + i * config.spacing_ticks;
        let call = point.saturating_sub(rng.below(config.window_ticks + 1));
        let ret = point + rng.below(config.window_ticks + 1);
        let client = i;
        history.push(Operation {
            client,
            input,
            call,
            ret: (!unknown_outcome).then_some((ret, output)),
        });
    }
    history
}

/// Turns a completed read into a stale one, if the history allows it: a read
/// `g` of the value written by a completed write `p` that was overwritten by a
/// completed put `w`, with `p` returning before `w` is called and `w` returning
/// before `g` is called. Every value is written once, so in any order that
/// respects real time the key no longer holds `p`'s value when `g` runs: the
/// mutated history is not linearizable. Returns the read's key.
pub fn make_stale_read(history: &mut [Operation], rng: &mut Rng) -> Option<String> {
    let completed = |op: &Operation| op.ret.as_ref().map(|(tick, _)| *tick);
    let mut choices = Vec::new();
    for (g, read) in history.iter().enumerate() {
        let (KvInput::Get { key }, Some(_)) = (&read.input, &read.ret) else {
            continue;
        };
        for (w, overwrite) in history.iter().enumerate() {
            let KvInput::Put { key: w_key, .. } = &overwrite.input else {
                continue;
            };
            let Some(w_ret) = completed(overwrite) else {
                continue;
            };
            if w_key != key || w_ret >= read.call {
                continue;
            }
            for (p, write) in history.iter().enumerate() {
                let written = match (&write.input, &write.ret) {
                    (KvInput::Put { key: p_key, value }, Some(_)) if p_key == key => value,
                    (
                        KvInput::Cas {
                            key: p_key, new, ..
                        },
                        Some((_, KvOutput::Ok)),
                    ) if p_key == key => new,
                    _ => continue,
                };
                if completed(write).expect("matched a completed write") < overwrite.call {
                    choices.push((g, w, p, written.clone()));
                }
            }
        }
    }
    if choices.is_empty() {
        return None;
    }
    let (g, _, _, stale) = choices[rng.below(choices.len() as u64) as usize].clone();
    let read = &mut history[g];
    read.ret.as_mut().expect("chose a completed read").1 = KvOutput::Value(Some(stale));
    Some(read.input.key().to_string())
}
