//! Proving a violation from a window of one key's history, for when the search
//! over the whole key runs out of budget.
//!
//! Proving a violation is the search's expensive case: it must try every order
//! of everything before the violation, and with many operations in flight that
//! is more than any budget. But a violation is usually local, and a window
//! around it is enough to prove it:
//!
//! For ticks `start..=end`, the window history keeps the operations called at
//! or before `end` that had not returned before `start`. An operation running
//! across an edge (called before `start`, or not returned by `end`) becomes an
//! unknown-outcome one called at `start` at the earliest; an unknown-outcome
//! read is dropped as usual. The value at `start` is left free (`FREE`).
//!
//! If the whole history has a linearization, so does the window: keep, in the
//! same order, the operations that take effect at or after `start` and not
//! after `end`, starting from the value the key has at `start`. Every kept
//! operation sees the value it saw (nothing that takes effect in between was
//! dropped: dropped operations take effect before `start` or after `end`),
//! operations that took effect before `start` or after `end` and were kept are
//! unknown-outcome ones that "never happened", and the window's real-time
//! order is the original's or weaker. So a window without a linearization
//! proves the whole history has none.
//!
//! Where to look: the whole-key search's deepest dead end, where the first
//! operation it could not get past returns (`end`), and windows reaching
//! further and further back from there.

use super::{
    observed_values, operations_that_matter, KeyHistory, Operation, SearchOutcome, Window,
};

/// Windows tried, as how many operations (in call order) before the blocking
/// one they reach back, smallest first: small windows are cheap to exhaust.
const WINDOW_OPS_BACK: [usize; 6] = [4, 8, 16, 32, 64, 128];

/// Search budget for one window.
pub(super) const WINDOW_SEARCH_STEPS_MAX: u64 = 200_000;

/// The window history for ticks `start_tick..=end_tick` of the operations
/// `indices` of `history`, with each operation's index in `history`.
pub(super) fn window_history(
    history: &[Operation],
    indices: &[usize],
    start_tick: u64,
    end_tick: u64,
) -> (Vec<Operation>, Vec<usize>) {
    let mut operations = Vec::new();
    let mut original_index = Vec::new();
    for &index in indices {
        let operation = &history[index];
        let ret_tick = operation.ret.as_ref().map(|(ret_tick, _)| *ret_tick);
        let returned_before = matches!(ret_tick, Some(ret_tick) if ret_tick < start_tick);
        if returned_before || operation.call > end_tick {
            continue;
        }
        let mut operation = operation.clone();
        let across_an_edge =
            operation.call < start_tick || ret_tick.is_none_or(|ret_tick| ret_tick > end_tick);
        if across_an_edge {
            if matches!(operation.input, super::KvInput::Get { .. }) {
                continue;
            }
            operation.call = operation.call.max(start_tick);
            operation.ret = None;
        }
        operations.push(operation);
        original_index.push(index);
    }
    (operations, original_index)
}

/// Searches the window `start_tick..=end_tick`: a violation there (with its
/// report, naming operations by their index in `history`) is a violation of
/// the whole history. Also returns the steps taken.
pub(super) fn search_window(
    history: &[Operation],
    key: &str,
    indices: &[usize],
    start_tick: u64,
    end_tick: u64,
    steps_max: u64,
) -> (Option<String>, u64) {
    let (operations, original_index) = window_history(history, indices, start_tick, end_tick);
    // What the window's own operations observe: writes that ran across the
    // start and whose value nobody in the window reads can go, exactly as in
    // a whole history (see `operations_that_matter`).
    let all: Vec<usize> = (0..operations.len()).collect();
    let observed = observed_values(&operations, &all);
    let local = operations_that_matter(&operations, all, &observed);
    let window = Window {
        start_tick,
        end_tick,
        full_history: history,
        original_index: &original_index,
    };
    let mut key_history = KeyHistory::new(&operations, local, &observed, Some(window));
    match key_history.search(steps_max) {
        (SearchOutcome::Violation(dead_end), steps) => {
            (Some(key_history.describe(key, &dead_end)), steps)
        }
        (SearchOutcome::Linearizable | SearchOutcome::TooComplex(_), steps) => (None, steps),
    }
}

/// After the search over a whole key ran out of budget, tries windows ending
/// where `blocking_index` returns (the first operation the search's deepest
/// prefix could not get past) and reaching further and further back. Returns
/// the first violation found, and the steps taken in all.
pub(super) fn find_violating_window(
    history: &[Operation],
    key: &str,
    indices: &[usize],
    blocking_index: usize,
) -> (Option<String>, u64) {
    let end_tick = history[blocking_index]
        .ret
        .as_ref()
        .expect("the blocking operation completed")
        .0;
    let mut by_call = indices.to_vec();
    by_call.sort_by_key(|&index| (history[index].call, index));
    let position = by_call
        .iter()
        .position(|&index| index == blocking_index)
        .expect("the blocking operation is one of the key's");
    let mut steps_total = 0;
    let mut last_start_tick = None;
    for ops_back in WINDOW_OPS_BACK {
        let start_tick = history[by_call[position.saturating_sub(ops_back)]].call;
        if last_start_tick == Some(start_tick) {
            continue;
        }
        last_start_tick = Some(start_tick);
        let (found, steps) = search_window(
            history,
            key,
            indices,
            start_tick,
            end_tick,
            WINDOW_SEARCH_STEPS_MAX,
        );
        steps_total += steps;
        if found.is_some() {
            return (found, steps_total);
        }
    }
    (None, steps_total)
}
