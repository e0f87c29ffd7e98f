//! A fast pass over one key's operations that finds the most common violation,
//! a stale observation, without any search: an operation observes a value
//! (a read returns it, a cas expects it and succeeds, or reports it as
//! current) although every write of that value was definitely overwritten
//! before the operation was called. A lost acknowledged write shows up exactly
//! like this: the old value is read after the write was acknowledged.
//!
//! The pass only reports what no ordering can explain, so it can run before the
//! search and spare it the exhaustive work a violation costs (to prove one, the
//! search must try every order of everything before it). It finds nothing the
//! search would not; it is a shortcut, not a second opinion.
//!
//! Why a hit is a violation: say `g` observes `v` and every operation that may
//! write `v` (a put of `v`, or a cas to `v` that was not seen to fail) is a
//! completed `p` followed by a definite overwrite `w` (a completed put, or a
//! cas seen to succeed, of a value other than `v`) with `p` returning before
//! `w` is called and `w` returning before `g` is called. In any linearization
//! the key holds `v` at `g` only if the last write of `v` before `g`, some `p`,
//! is not followed by a write of another value before `g`; but `w` comes after
//! `p` and before `g`. Observing "absent" is the case with no writer at all:
//! keys are never deleted, so any definite write before `g` is enough.

use std::collections::HashMap;

use super::{KvInput, KvOutput, Operation};

/// A definite write: completed, and known to have changed the value.
#[derive(Debug, Clone, Copy)]
struct Overwrite<'h> {
    index: usize,
    ret_tick: u64,
    value: &'h str,
}

/// The earliest-returning overwrites among those called after some tick: the
/// earliest, and the earliest of a different value (so that for any value
/// there is an answer that does not write it).
#[derive(Debug, Clone, Copy, Default)]
struct EarliestTwo<'h> {
    first: Option<Overwrite<'h>>,
    second: Option<Overwrite<'h>>,
}

impl<'h> EarliestTwo<'h> {
    fn add(&mut self, candidate: Overwrite<'h>) {
        let Some(first) = self.first else {
            self.first = Some(candidate);
            return;
        };
        if candidate.ret_tick < first.ret_tick {
            if candidate.value != first.value {
                self.second = Some(first);
            }
            self.first = Some(candidate);
        } else if candidate.value != first.value
            && self
                .second
                .is_none_or(|second| candidate.ret_tick < second.ret_tick)
        {
            self.second = Some(candidate);
        }
    }

    /// The earliest-returning overwrite of a value other than `value`.
    fn not_writing(&self, value: Option<&str>) -> Option<Overwrite<'h>> {
        match self.first {
            Some(first) if Some(first.value) != value => Some(first),
            _ => self.second,
        }
    }
}

/// Overwrites sorted by call tick, with suffix answers: `suffix[i]` covers
/// `by_call[i..]`.
struct Overwrites<'h> {
    call_ticks: Vec<u64>,
    suffix: Vec<EarliestTwo<'h>>,
}

impl<'h> Overwrites<'h> {
    fn new(history: &'h [Operation], indices: &[usize]) -> Self {
        let mut by_call: Vec<(u64, Overwrite<'h>)> = indices
            .iter()
            .filter_map(|&index| {
                let operation = &history[index];
                let (ret_tick, output) = operation.ret.as_ref()?;
                let value = match (&operation.input, output) {
                    (KvInput::Put { value, .. }, _) => value,
                    (KvInput::Cas { new, .. }, KvOutput::Ok) => new,
                    _ => return None,
                };
                let overwrite = Overwrite {
                    index,
                    ret_tick: *ret_tick,
                    value,
                };
                Some((operation.call, overwrite))
            })
            .collect();
        by_call.sort_by_key(|&(call, overwrite)| (call, overwrite.index));
        let mut suffix = vec![EarliestTwo::default(); by_call.len() + 1];
        for position in (0..by_call.len()).rev() {
            let mut answer = suffix[position + 1];
            answer.add(by_call[position].1);
            suffix[position] = answer;
        }
        let call_ticks = by_call.iter().map(|&(call, _)| call).collect();
        Overwrites { call_ticks, suffix }
    }

    /// The earliest-returning overwrite called strictly after `tick` (`None`:
    /// from the start) that does not write `value`.
    fn earliest_after(&self, tick: Option<u64>, value: Option<&str>) -> Option<Overwrite<'h>> {
        let start = match tick {
            None => 0,
            Some(tick) => self.call_ticks.partition_point(|&call| call <= tick),
        };
        self.suffix[start].not_writing(value)
    }
}

/// The value a completed operation requires the key to hold when it runs, if
/// it observes one: a read's result, a failed cas's reported value, a
/// successful cas's expected value.
fn observation(operation: &Operation) -> Option<Option<&str>> {
    let (_, output) = operation.ret.as_ref()?;
    match (&operation.input, output) {
        (KvInput::Get { .. }, KvOutput::Value(seen)) => Some(seen.as_deref()),
        (KvInput::Cas { .. }, KvOutput::Mismatch(current)) => Some(current.as_deref()),
        (KvInput::Cas { expected, .. }, KvOutput::Ok) => Some(expected.as_deref()),
        _ => None,
    }
}

/// The first stale observation among `indices` (one key's operations), as a
/// report, or `None`.
pub(super) fn find_stale_observation(
    history: &[Operation],
    key: &str,
    indices: &[usize],
) -> Option<String> {
    let overwrites = Overwrites::new(history, indices);
    // Every operation that may write each value: puts, and cas operations not
    // seen to fail (unknown-outcome ones included).
    let mut writers: HashMap<&str, Vec<usize>> = HashMap::new();
    for &index in indices {
        let operation = &history[index];
        let written = match (&operation.input, &operation.ret) {
            (KvInput::Put { value, .. }, _) => value,
            (KvInput::Cas { new, .. }, None | Some((_, KvOutput::Ok))) => new,
            _ => continue,
        };
        writers.entry(written).or_default().push(index);
    }
    let mut by_call = indices.to_vec();
    by_call.sort_by_key(|&index| (history[index].call, index));
    for &g in &by_call {
        let observer = &history[g];
        let Some(observed) = observation(observer) else {
            continue;
        };
        // Formatted only for a report: formatting every observation would
        // cost more than the pass itself.
        let observer_text = || format!("#{g} {observer}");
        let Some(value) = observed else {
            let overwrite = overwrites.earliest_after(None, None)?;
            if overwrite.ret_tick < observer.call {
                return Some(format!(
                    "stale observation on key {key:?}: {} observes the key absent, \
                     but it was written before that call by #{} {}\n",
                    observer_text(),
                    overwrite.index,
                    history[overwrite.index]
                ));
            }
            continue;
        };
        let Some(value_writers) = writers.get(value) else {
            return Some(format!(
                "stale observation on key {key:?}: {} observes {value:?}, \
                 which no operation writes\n",
                observer_text()
            ));
        };
        let mut explanations = Vec::with_capacity(value_writers.len());
        for &p in value_writers {
            let Some((p_ret, _)) = &history[p].ret else {
                break;
            };
            match overwrites.earliest_after(Some(*p_ret), Some(value)) {
                Some(overwrite) if overwrite.ret_tick < observer.call => {
                    explanations.push((p, overwrite.index));
                }
                _ => break,
            }
        }
        if explanations.len() == value_writers.len() {
            let mut report = format!(
                "stale observation on key {key:?}: {} observes {value:?}, \
                 but every write of it was overwritten before that call:\n",
                observer_text()
            );
            for (p, w) in explanations {
                report.push_str(&format!(
                    "  #{p} {}\n    overwritten by #{w} {}\n",
                    history[p], history[w]
                ));
            }
            return Some(report);
        }
    }
    None
}
