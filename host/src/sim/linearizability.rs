//! Linearizability checker for the simulator's key-value client histories.
//!
//! Owns the decision "could these client-observed operations have happened one at
//! a time, each at some instant between its call and its return, on a single
//! key-value map?" It knows nothing about Paxos, replicas or the network: it sees
//! only what clients saw (input, output, call tick, return tick).
//!
//! The search is Wing & Gong's, with Lowe's just-in-time linearization and
//! memoization of (set of linearized operations, model value), as in Porcupine:
//!
//! - Every operation touches one key, and a history is linearizable iff each
//!   per-key sub-history is (linearizability is local), so each key is searched on
//!   its own and the bitsets stay small.
//! - Calls and returns are ordered by tick. Ties put calls before returns: an
//!   operation whose return tick equals another's call tick overlaps it. Only a
//!   strictly smaller return tick orders two operations. Treating a tie as overlap
//!   allows more orders, so it can hide a real violation that fell inside one tick
//!   but can never report a false one.
//! - An operation whose outcome the client never learned (`ret: None`, a timeout)
//!   may take effect at any point after its call, or never. It gets a return at
//!   infinity and accepts any output; "never" is the same as "after every other
//!   operation", where nobody can observe it, so the search succeeds as soon as
//!   every completed operation is linearized. Unknown-outcome reads change nothing
//!   and constrain nothing, so they are dropped up front.
//! - Before searching a key, a linear pass looks for a stale observation (a
//!   value read after every write of it was definitely overwritten: a lost
//!   write or a stale read), which needs no search (see the `stale` submodule). Proving a
//!   violation is the search's expensive case, and this is the common one.
//! - The search shrinks its space in ways that never change the verdict:
//!   unknown-outcome writes of values nobody observes are dropped
//!   (`operations_that_matter`), values nobody observes are one model value
//!   (`UNOBSERVED`), and a read that fits is linearized at once without a
//!   backtrack point (`KeyHistory::fitting_read_only`).
//! - The search is bounded by a step budget per key. When it runs out, windows
//!   of the key's history around where it got stuck are searched (see the
//!   `window` submodule): a window without a linearization proves a violation.
//!   Otherwise the result is [`CheckResult::TooComplex`], never a hang.
//!
//! A malformed history (a return before its own call, an output that does not
//! belong to its input kind) is a bug in whoever recorded it and panics.
//!
//! See docs/notes/lincheck.md for the algorithm, its invariants and its limits.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};

/// Default search budget: loop iterations of the search for one key before the
/// checker gives up with [`CheckResult::TooComplex`]. Simulator histories with a
/// handful of clients need a tiny fraction of this.
pub const SEARCH_STEPS_PER_KEY_MAX: u64 = 2_000_000;

/// How many operations of the longest linearizable prefix a violation report
/// lists (the last ones; the earlier ones are summarized by count).
const DETAIL_PREFIX_OPS_MAX: usize = 40;

/// How many candidate operations a violation report lists after the prefix.
const DETAIL_CANDIDATE_OPS_MAX: usize = 20;

/// A client request on the key-value state machine.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvInput {
    Get {
        key: String,
    },
    Put {
        key: String,
        value: String,
    },
    /// Sets `key` to `new` iff its current value is `expected`; `expected: None`
    /// means "the key is absent".
    Cas {
        key: String,
        expected: Option<String>,
        new: String,
    },
}

impl KvInput {
    pub fn key(&self) -> &str {
        match self {
            KvInput::Get { key } | KvInput::Put { key, .. } | KvInput::Cas { key, .. } => key,
        }
    }
}

/// What the client saw: `Get -> Value(current)`, `Put -> Ok`,
/// `Cas -> Ok | Mismatch(current)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum KvOutput {
    Value(Option<String>),
    Ok,
    Mismatch(Option<String>),
}

/// One client operation as the client observed it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Operation {
    pub client: u64,
    pub input: KvInput,
    /// Simulator tick at which the client sent the request.
    pub call: u64,
    /// Simulator tick at which the client received the reply, and the reply.
    /// `None`: the client never learned the outcome (timeout, gave up); the
    /// operation may or may not have taken effect.
    pub ret: Option<(u64, KvOutput)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckResult {
    Linearizable,
    /// The operations on `key` have no linearization. `detail` is a multi-line
    /// report, either of a stale observation (the operation, each write of the
    /// value it saw, and the write that overwrote it before its call) or from
    /// the search over the key or a window of it (the longest linearizable
    /// prefix found, the operation that returned without fitting after it, and
    /// the operations that could have come next). Operations are named
    /// `#index` in the checked history.
    Violation {
        key: String,
        detail: String,
    },
    /// The search for `key` ran out of budget; nothing is known about it.
    TooComplex {
        key: String,
    },
}

/// Checks `history` with the default budget [`SEARCH_STEPS_PER_KEY_MAX`].
pub fn check(history: &[Operation]) -> CheckResult {
    check_with_budget(history, SEARCH_STEPS_PER_KEY_MAX)
}

/// Checks `history`, giving the search for each key at most
/// `search_steps_per_key_max` steps. Keys are searched in sorted order; a
/// violation on any key wins over a budget exhausted on another, because a
/// violation is a definite answer.
pub fn check_with_budget(history: &[Operation], search_steps_per_key_max: u64) -> CheckResult {
    check_with_stats(history, search_steps_per_key_max).0
}

/// What a check cost, for reports and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckStats {
    /// Keys checked (checking stops at the first key with a violation).
    pub keys: usize,
    /// Operations checked, after dropping those that cannot matter (see
    /// `operations_that_matter`).
    pub ops_checked: usize,
    pub steps_total: u64,
    /// The most steps one key needed: compare with the budget.
    pub steps_key_max: u64,
}

/// [`check_with_budget`], also reporting what the search cost.
pub fn check_with_stats(
    history: &[Operation],
    search_steps_per_key_max: u64,
) -> (CheckResult, CheckStats) {
    let options = CheckOptions {
        search_steps_per_key_max,
        ..CheckOptions::default()
    };
    check_with_options(history, &options)
}

/// How a check runs. [`check`] and friends use the stale pass; turning it off
/// leaves every verdict to the search, for cross-checking the shortcut and for
/// measuring the search.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    pub search_steps_per_key_max: u64,
    /// Look for stale observations (a value seen after every write of it was
    /// definitely overwritten) before searching a key.
    pub stale_pass: bool,
    /// When the search over a key runs out of budget, search windows of its
    /// history around where it got stuck, which can prove a violation.
    pub window_pass: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            search_steps_per_key_max: SEARCH_STEPS_PER_KEY_MAX,
            stale_pass: true,
            window_pass: true,
        }
    }
}

/// The general form of [`check`], with its costs.
pub fn check_with_options(
    history: &[Operation],
    options: &CheckOptions,
) -> (CheckResult, CheckStats) {
    for (index, operation) in history.iter().enumerate() {
        validate(index, operation);
    }
    let mut indices_by_key: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (index, operation) in history.iter().enumerate() {
        indices_by_key
            .entry(operation.input.key())
            .or_default()
            .push(index);
    }
    let mut stats = CheckStats::default();
    let mut too_complex = None;
    for (key, indices) in indices_by_key {
        let observed = observed_values(history, &indices);
        let indices = operations_that_matter(history, indices, &observed);
        stats.keys += 1;
        stats.ops_checked += indices.len();
        if options.stale_pass {
            if let Some(detail) = stale::find_stale_observation(history, key, &indices) {
                let key = key.to_string();
                return (CheckResult::Violation { key, detail }, stats);
            }
        }
        let mut key_history = KeyHistory::new(history, indices, &observed, None);
        let (outcome, steps) = key_history.search(options.search_steps_per_key_max);
        stats.steps_total += steps;
        stats.steps_key_max = stats.steps_key_max.max(steps);
        match outcome {
            SearchOutcome::Linearizable => {}
            SearchOutcome::Violation(dead_end) => {
                let detail = key_history.describe(key, &dead_end);
                return (
                    CheckResult::Violation {
                        key: key.to_string(),
                        detail,
                    },
                    stats,
                );
            }
            SearchOutcome::TooComplex(dead_end) if options.window_pass => {
                let blocking = key_history.indices[key_history.blocking_op(&dead_end)];
                let (found, steps) =
                    window::find_violating_window(history, key, &key_history.indices, blocking);
                stats.steps_total += steps;
                if let Some(detail) = found {
                    let key = key.to_string();
                    return (CheckResult::Violation { key, detail }, stats);
                }
                too_complex.get_or_insert_with(|| key.to_string());
            }
            SearchOutcome::TooComplex(_) => {
                too_complex.get_or_insert_with(|| key.to_string());
            }
        }
    }
    let result = match too_complex {
        Some(key) => CheckResult::TooComplex { key },
        None => CheckResult::Linearizable,
    };
    (result, stats)
}

/// Drops the operations of one key that cannot change the verdict, because
/// they are unknown-outcome operations that may always be placed after every
/// other one (where any output is accepted and nobody observes their effect):
///
/// - unknown-outcome reads: they change nothing;
/// - unknown-outcome writes (put, or cas by its new value) of a value no
///   operation observes (no read returns it, no cas expects it or reports it as
///   current). Wherever such a write runs, the operations after it until the
///   next put can only be unknown-outcome cas operations that fail (anything
///   else would observe the value), and those may move to the end too; the put
///   overwrites the value either way. So a linearization with the write becomes
///   one without it.
///
/// Simulator clients write unique values and most lost writes are never read,
/// so this removes most unknown-outcome operations, which are the ones that
/// blow up the search (each may sit anywhere after its call).
fn operations_that_matter(
    history: &[Operation],
    indices: Vec<usize>,
    observed: &HashSet<&str>,
) -> Vec<usize> {
    indices
        .into_iter()
        .filter(|&index| {
            let operation = &history[index];
            if operation.ret.is_some() {
                return true;
            }
            match &operation.input {
                KvInput::Get { .. } => false,
                KvInput::Put { value: written, .. } | KvInput::Cas { new: written, .. } => {
                    observed.contains(written.as_str())
                }
            }
        })
        .collect()
}

/// The values some operation of `indices` observes: a read returns it, a cas
/// expects it or reports it as current.
fn observed_values<'h>(history: &'h [Operation], indices: &[usize]) -> HashSet<&'h str> {
    let mut observed: HashSet<&str> = HashSet::new();
    for &index in indices {
        let operation = &history[index];
        if let KvInput::Cas {
            expected: Some(expected),
            ..
        } = &operation.input
        {
            observed.insert(expected);
        }
        match &operation.ret {
            Some((_, KvOutput::Value(Some(seen)) | KvOutput::Mismatch(Some(seen)))) => {
                observed.insert(seen);
            }
            Some((_, KvOutput::Value(None) | KvOutput::Mismatch(None) | KvOutput::Ok)) | None => {}
        }
    }
    observed
}

fn validate(index: usize, operation: &Operation) {
    let Some((ret_tick, output)) = &operation.ret else {
        return;
    };
    assert!(
        *ret_tick >= operation.call,
        "history operation #{index} returns at tick {ret_tick} before its call at tick {}: {operation}",
        operation.call
    );
    let output_fits_input = matches!(
        (&operation.input, output),
        (KvInput::Get { .. }, KvOutput::Value(_))
            | (KvInput::Put { .. }, KvOutput::Ok)
            | (KvInput::Cas { .. }, KvOutput::Ok | KvOutput::Mismatch(_))
    );
    assert!(
        output_fits_input,
        "history operation #{index} has an output of the wrong kind: {operation}"
    );
}

impl fmt::Display for KvInput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KvInput::Get { key } => write!(f, "get({key:?})"),
            KvInput::Put { key, value } => write!(f, "put({key:?}, {value:?})"),
            KvInput::Cas { key, expected, new } => {
                write!(f, "cas({key:?}, expected {expected:?}, new {new:?})")
            }
        }
    }
}

impl fmt::Display for CheckResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckResult::Linearizable => write!(f, "linearizable"),
            CheckResult::Violation { key, detail } => {
                write!(f, "not linearizable on key {key:?}:\n{detail}")
            }
            CheckResult::TooComplex { key } => write!(
                f,
                "undecided on key {key:?}: the linearizability search ran out of budget"
            ),
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {}: {} ", self.client, self.input)?;
        match &self.ret {
            Some((ret_tick, output)) => {
                write!(f, "-> {output:?} [call {}, ret {ret_tick}]", self.call)
            }
            None => write!(f, "-> unknown [call {}, ret never]", self.call),
        }
    }
}

/// An interned value of the key: [`ABSENT`], [`UNOBSERVED`], [`FREE`], or one
/// id from [`FIRST_OBSERVED`] on per observed string.
/// Interning keeps the memo table's entries small and their hashing cheap.
type ValueId = u32;
const ABSENT: ValueId = 0;
/// Every value that no operation observes (see [`observed_values`]). No
/// operation can tell two such values apart (a read of either fails, a cas
/// fails or mismatches on both alike), so they are one model value, and search
/// states that differ only in which of them the key holds are one memo entry.
const UNOBSERVED: ValueId = 1;
/// Any value at all: where a window of the history starts (see `window`). The
/// first operation that observes the value pins it; an unknown-outcome cas
/// leaves it free (it may or may not have written, and "any value" covers both).
const FREE: ValueId = 2;
const FIRST_OBSERVED: ValueId = 3;

/// An operation on one key, in the model's terms, with the output the client saw.
#[derive(Debug, Clone, Copy)]
enum ModelOp {
    /// Completed reads only: unknown-outcome reads are dropped before the search.
    Get { seen: ValueId },
    /// A put's output carries no information, whether known or not.
    Put { value: ValueId },
    Cas {
        expected: ValueId,
        new: ValueId,
        seen: CasSeen,
    },
}

#[derive(Debug, Clone, Copy)]
enum CasSeen {
    Unknown,
    Ok,
    Mismatch(ValueId),
}

impl ModelOp {
    /// True for operations that never change the value: completed reads, and
    /// cas operations that reported a mismatch. (An unknown-outcome cas may or
    /// may not write, depending on where it runs.)
    fn is_read_only(self) -> bool {
        matches!(
            self,
            ModelOp::Get { .. }
                | ModelOp::Cas {
                    seen: CasSeen::Mismatch(_),
                    ..
                }
        )
    }

    /// The key's value after this operation runs on `value`, or `None` if the
    /// output the client saw is impossible from `value`.
    fn apply(self, value: ValueId) -> Option<ValueId> {
        if value == FREE {
            return self.apply_to_free();
        }
        match self {
            ModelOp::Get { seen } => (seen == value).then_some(value),
            ModelOp::Put { value: new } => Some(new),
            ModelOp::Cas {
                expected,
                new,
                seen,
            } => match seen {
                CasSeen::Unknown => Some(if value == expected { new } else { value }),
                CasSeen::Ok => (value == expected).then_some(new),
                CasSeen::Mismatch(current) => {
                    (value != expected && value == current).then_some(value)
                }
            },
        }
    }
}

impl ModelOp {
    /// [`ModelOp::apply`] on [`FREE`]: the value becomes whatever the output
    /// requires, if anything can produce that output.
    fn apply_to_free(self) -> Option<ValueId> {
        match self {
            ModelOp::Get { seen } => Some(seen),
            ModelOp::Put { value: new } => Some(new),
            ModelOp::Cas {
                expected,
                new,
                seen,
            } => match seen {
                CasSeen::Unknown => Some(FREE),
                CasSeen::Ok => Some(new),
                CasSeen::Mismatch(current) => (current != expected).then_some(current),
            },
        }
    }
}

/// Index of an entry in the event list; entry 0 is the head sentinel.
type EntryId = usize;
const HEAD: EntryId = 0;
/// "No entry": the successor of the last entry, and the partner of a call whose
/// operation never returned.
const NONE: EntryId = usize::MAX;

/// A call or return event in the doubly linked event list. Entries are unlinked
/// when their operation is linearized and relinked on backtrack; an unlinked
/// entry keeps its `prev`/`next`, so relinking in reverse order restores the list
/// exactly (dancing links).
#[derive(Debug, Clone, Copy)]
struct Entry {
    /// Local operation index (position in `KeyHistory::indices`).
    op: usize,
    is_call: bool,
    /// For a call, its return entry (`NONE` if the outcome is unknown).
    ret: EntryId,
    prev: EntryId,
    next: EntryId,
}

/// The operations of one key, prepared for the search.
struct KeyHistory<'h> {
    history: &'h [Operation],
    /// Indices into `history`; an operation's position here is its local index.
    indices: Vec<usize>,
    model_ops: Vec<ModelOp>,
    entries: Vec<Entry>,
    /// Entry position of each operation's call and return in event order, for
    /// the violation report (`usize::MAX` for an unknown return).
    call_position: Vec<usize>,
    ret_position: Vec<usize>,
    /// Set when this is a window of a key's history: the search starts from
    /// [`FREE`] and reports name operations by their index in the full history.
    window: Option<Window<'h>>,
}

/// What a window history needs to know about itself (see `window`).
#[derive(Debug, Clone, Copy)]
struct Window<'h> {
    start_tick: u64,
    end_tick: u64,
    /// The full history, and the index there of each operation of the window.
    full_history: &'h [Operation],
    original_index: &'h [usize],
}

/// One linearized operation on the search stack.
#[derive(Debug, Clone, Copy)]
struct Frame {
    call: EntryId,
    value_before: ValueId,
    /// Linearized by [`KeyHistory::fitting_read_only`]: there is no alternative
    /// to try in its place, so backtracking goes past it.
    forced: bool,
}

/// Where the search got furthest before failing: the linearized operations (local
/// indices, in order) and the key's value after them.
#[derive(Debug, Clone, Default)]
struct DeadEnd {
    prefix: Vec<usize>,
    value: ValueId,
}

enum SearchOutcome {
    Linearizable,
    Violation(DeadEnd),
    /// Out of budget; the dead end says how far it got.
    TooComplex(DeadEnd),
}

impl<'h> KeyHistory<'h> {
    fn new(
        history: &'h [Operation],
        mut indices: Vec<usize>,
        observed: &HashSet<&str>,
        window: Option<Window<'h>>,
    ) -> Self {
        // Local indices in call order: the operations linearized at any point are
        // then mostly a run of low indices, which `Bitset::memo_key` compresses.
        indices.sort_by_key(|&index| (history[index].call, index));
        let mut ids: HashMap<&'h str, ValueId> = HashMap::new();
        let mut intern = |value: Option<&'h String>| -> ValueId {
            let Some(value) = value else {
                return ABSENT;
            };
            if !observed.contains(value.as_str()) {
                return UNOBSERVED;
            }
            let next_id = ids.len() + FIRST_OBSERVED as usize;
            *ids.entry(value.as_str()).or_insert_with(|| {
                ValueId::try_from(next_id).expect("fewer than 2^32 distinct values per key")
            })
        };
        let model_ops: Vec<ModelOp> = indices
            .iter()
            .map(|&index| {
                let operation = &history[index];
                let output = operation.ret.as_ref().map(|(_, output)| output);
                match (&operation.input, output) {
                    (KvInput::Get { .. }, Some(KvOutput::Value(seen))) => ModelOp::Get {
                        seen: intern(seen.as_ref()),
                    },
                    (KvInput::Put { value, .. }, _) => ModelOp::Put {
                        value: intern(Some(value)),
                    },
                    (KvInput::Cas { expected, new, .. }, output) => {
                        let expected = intern(expected.as_ref());
                        let new = intern(Some(new));
                        let seen = match output {
                            None => CasSeen::Unknown,
                            Some(KvOutput::Ok) => CasSeen::Ok,
                            Some(KvOutput::Mismatch(current)) => {
                                CasSeen::Mismatch(intern(current.as_ref()))
                            }
                            Some(KvOutput::Value(_)) => {
                                unreachable!("validated: a cas returns Ok or Mismatch")
                            }
                        };
                        ModelOp::Cas {
                            expected,
                            new,
                            seen,
                        }
                    }
                    (KvInput::Get { .. }, _) => {
                        unreachable!("validated, and unknown reads are dropped")
                    }
                }
            })
            .collect();

        // Events sorted by (tick, returns after calls, operation order): the tie
        // rule of the module doc. Unknown-outcome operations get no return event,
        // which stands for a return at infinity.
        let mut events: Vec<(u64, bool, usize)> = Vec::with_capacity(2 * indices.len());
        for (op, &index) in indices.iter().enumerate() {
            let operation = &history[index];
            events.push((operation.call, false, op));
            if let Some((ret_tick, _)) = operation.ret {
                events.push((ret_tick, true, op));
            }
        }
        events.sort_unstable();

        let mut entries = Vec::with_capacity(events.len() + 1);
        entries.push(Entry {
            op: usize::MAX,
            is_call: false,
            ret: NONE,
            prev: NONE,
            next: NONE,
        });
        let mut call_position = vec![usize::MAX; indices.len()];
        let mut ret_position = vec![usize::MAX; indices.len()];
        for (position, &(_, is_ret, op)) in events.iter().enumerate() {
            let id = position + 1;
            entries.push(Entry {
                op,
                is_call: !is_ret,
                ret: NONE,
                prev: id - 1,
                next: NONE,
            });
            entries[id - 1].next = id;
            if is_ret {
                ret_position[op] = position;
                let call = call_position[op];
                assert!(call < position, "a call sorts before its own return");
                entries[call + 1].ret = id;
            } else {
                call_position[op] = position;
            }
        }
        KeyHistory {
            history,
            indices,
            model_ops,
            entries,
            call_position,
            ret_position,
            window,
        }
    }

    /// Removes a call entry and its return entry from the list.
    fn lift(&mut self, call: EntryId) {
        self.unlink(call);
        let ret = self.entries[call].ret;
        if ret != NONE {
            self.unlink(ret);
        }
    }

    /// Undoes `lift(call)`; must be applied in reverse order of the lifts.
    fn unlift(&mut self, call: EntryId) {
        let ret = self.entries[call].ret;
        if ret != NONE {
            self.relink(ret);
        }
        self.relink(call);
    }

    fn unlink(&mut self, id: EntryId) {
        let Entry { prev, next, .. } = self.entries[id];
        self.entries[prev].next = next;
        if next != NONE {
            self.entries[next].prev = prev;
        }
    }

    fn relink(&mut self, id: EntryId) {
        let Entry { prev, next, .. } = self.entries[id];
        self.entries[prev].next = id;
        if next != NONE {
            self.entries[next].prev = id;
        }
    }

    /// Wing–Gong search with Lowe's just-in-time linearization: walk the event
    /// list from the head; at a call, try to linearize that operation now (its
    /// output must fit the current value, and the resulting (linearized set,
    /// value) must be new); at a return of an operation not yet linearized, the
    /// current prefix cannot be extended, so undo the last linearization and try
    /// the next call after it. Each time the prefix grows, a read-only operation
    /// that fits is linearized first, without an alternative to backtrack to
    /// (see [`KeyHistory::fitting_read_only`]).
    ///
    /// Returns the outcome and the steps taken (one step per loop iteration: one
    /// operation tried, or one backtrack).
    fn search(&mut self, steps_max: u64) -> (SearchOutcome, u64) {
        let ops_total = self.indices.len();
        let completed_total = self
            .indices
            .iter()
            .filter(|&&index| self.history[index].ret.is_some())
            .count();
        let mut linearized = Bitset::new(ops_total);
        let mut value = if self.window.is_some() { FREE } else { ABSENT };
        let mut completed_linearized = 0;
        let mut stack: Vec<Frame> = Vec::with_capacity(ops_total);
        // Every (linearized set, value) ever reached. A state is entered once; if
        // the search comes back to it by another order, it failed the first time
        // (or the search would have returned).
        let mut memo = Memo::default();
        let mut dead_end = DeadEnd::default();
        // `dead_end.prefix[..dead_end_shared]` is the operations of
        // `stack[..dead_end_shared]`, so recording a longer prefix copies only
        // the part that changed.
        let mut dead_end_shared = 0;
        let mut entry = self.entries[HEAD].next;
        let mut extended = true;
        let mut steps: u64 = 0;
        loop {
            // Unknown-outcome operations not yet linearized can all go after
            // everything else (any output is accepted there) or never happen.
            if completed_linearized == completed_total {
                return (SearchOutcome::Linearizable, steps);
            }
            if steps == steps_max {
                return (SearchOutcome::TooComplex(dead_end), steps);
            }
            steps += 1;
            // A free value is not one value: a read would pin it, which is a
            // choice, so reads are not forced then.
            let read_only = if extended && value != FREE {
                self.fitting_read_only(value)
            } else {
                None
            };
            extended = false;
            // A completed operation is still unlinearized, so its return entry is
            // still in the list and the walk stops there before the end.
            assert!(
                entry != NONE,
                "walked past every return with operations left"
            );
            let attempt = match read_only {
                Some(call) => Some((call, true)),
                None if self.entries[entry].is_call => Some((entry, false)),
                None => None,
            };
            if let Some((call, forced)) = attempt {
                let op = self.entries[call].op;
                if let Some(value_after) = self.model_ops[op].apply(value) {
                    linearized.set(op);
                    if memo.insert(linearized.memo_key(value_after)) {
                        stack.push(Frame {
                            call,
                            value_before: value,
                            forced,
                        });
                        value = value_after;
                        if self.entries[call].ret != NONE {
                            completed_linearized += 1;
                        }
                        self.lift(call);
                        if stack.len() > dead_end.prefix.len() {
                            dead_end.prefix.truncate(dead_end_shared);
                            let entries = &self.entries;
                            let added = stack[dead_end_shared..]
                                .iter()
                                .map(|frame| entries[frame.call].op);
                            dead_end.prefix.extend(added);
                            dead_end_shared = stack.len();
                            dead_end.value = value;
                        }
                        entry = self.entries[HEAD].next;
                        extended = true;
                        continue;
                    }
                    linearized.clear(op);
                }
                if !forced {
                    entry = self.entries[call].next;
                    continue;
                }
                // A read that fits now but leads to an explored state: every
                // extension of the prefix fails, so fall through and backtrack.
            }
            // Undo linearizations back to the last one that had alternatives.
            loop {
                let Some(frame) = stack.pop() else {
                    return (SearchOutcome::Violation(dead_end), steps);
                };
                linearized.clear(self.entries[frame.call].op);
                value = frame.value_before;
                if self.entries[frame.call].ret != NONE {
                    completed_linearized -= 1;
                }
                self.unlift(frame.call);
                dead_end_shared = dead_end_shared.min(stack.len());
                if !frame.forced {
                    entry = self.entries[frame.call].next;
                    break;
                }
            }
        }
    }

    /// The call entry of a completed read-only operation (a read, or a cas that
    /// reported a mismatch) that may be linearized next and fits `value`.
    ///
    /// Linearizing it right away loses nothing: take any way to finish the
    /// current prefix and move the operation to the front of the rest. It still
    /// sees `value` (it is first), every operation that returned before its call
    /// is already in the prefix (its call comes before the first return left in
    /// the list), and the others see the same values as before, because the
    /// operation changes nothing. So if no linearization starts with prefix + it,
    /// none starts with the prefix, and the search backtracks past both.
    fn fitting_read_only(&self, value: ValueId) -> Option<EntryId> {
        let mut entry = self.entries[HEAD].next;
        while entry != NONE && self.entries[entry].is_call {
            let model_op = self.model_ops[self.entries[entry].op];
            if model_op.is_read_only() && model_op.apply(value).is_some() {
                return Some(entry);
            }
            entry = self.entries[entry].next;
        }
        None
    }

    /// The key's value after `op` runs on `value`, in the history's own
    /// strings: the search works on interned values, where every unobserved
    /// value is one, so the report replays the prefix to name the real ones.
    fn concrete_value_after(&self, op: usize, value: Concrete<'h>) -> Concrete<'h> {
        let operation = &self.history[self.indices[op]];
        let output = operation.ret.as_ref().map(|(_, output)| output);
        let Concrete::Known(value) = value else {
            // As `ModelOp::apply_to_free`.
            return match (&operation.input, output) {
                (KvInput::Get { .. }, Some(KvOutput::Value(seen))) => {
                    Concrete::Known(seen.as_deref())
                }
                (KvInput::Put { value: new, .. }, _)
                | (KvInput::Cas { new, .. }, Some(KvOutput::Ok)) => Concrete::Known(Some(new)),
                (KvInput::Cas { .. }, Some(KvOutput::Mismatch(current))) => {
                    Concrete::Known(current.as_deref())
                }
                _ => Concrete::Free,
            };
        };
        Concrete::Known(match &operation.input {
            KvInput::Get { .. } => value,
            KvInput::Put { value: new, .. } => Some(new),
            KvInput::Cas { expected, new, .. } if expected.as_deref() == value => Some(new),
            KvInput::Cas { .. } => value,
        })
    }

    /// The index the caller knows an operation by: in the full history.
    fn original_index(&self, op: usize) -> usize {
        let index = self.indices[op];
        match self.window {
            Some(window) => window.original_index[index],
            None => index,
        }
    }

    /// The operation as recorded, and how a window changed it.
    fn operation_text(&self, op: usize) -> String {
        let index = self.original_index(op);
        let Some(window) = self.window else {
            return format!("#{index} {}", self.history[index]);
        };
        let original = &window.full_history[index];
        let changed = *original != self.history[self.indices[op]];
        let note = if changed {
            " (across the window's edge: outcome unknown)"
        } else {
            ""
        };
        format!("#{index} {original}{note}")
    }

    /// The first operation the dead end's prefix could not get past: the
    /// earliest-returning completed operation not in it.
    fn blocking_op(&self, dead_end: &DeadEnd) -> usize {
        let mut in_prefix = vec![false; self.indices.len()];
        for &op in &dead_end.prefix {
            in_prefix[op] = true;
        }
        (0..self.indices.len())
            .filter(|&op| !in_prefix[op] && self.ret_position[op] != usize::MAX)
            .min_by_key(|&op| self.ret_position[op])
            .expect("a dead end leaves a completed operation unlinearized")
    }

    /// The violation report: the longest linearizable prefix, the operation that
    /// returned without fitting after it, and the operations that could have been
    /// linearized next (those called before that return).
    fn describe(&self, key: &str, dead_end: &DeadEnd) -> String {
        use fmt::Write;
        let ops_total = self.indices.len();
        let unknown_total = self
            .indices
            .iter()
            .filter(|&&index| self.history[index].ret.is_none())
            .count();
        let mut text = String::new();
        match self.window {
            None => {
                let _ = writeln!(
                    text,
                    "no linearization of the {ops_total} operations on key {key:?} \
                     ({unknown_total} with unknown outcome; unknown-outcome operations that \
                     cannot matter are left out)"
                );
            }
            Some(Window {
                start_tick,
                end_tick,
                ..
            }) => {
                let _ = writeln!(
                    text,
                    "no linearization of the {ops_total} operations on key {key:?} in the window \
                     of ticks {start_tick}..={end_tick}, so none of the whole history \
                     ({unknown_total} with unknown outcome here: operations running across the \
                     window's edges count as unknown; the value at its start is left free)"
                );
            }
        }
        let prefix = &dead_end.prefix;
        let start = if self.window.is_some() {
            Concrete::Free
        } else {
            Concrete::Known(None)
        };
        let value = prefix
            .iter()
            .fold(start, |value, &op| self.concrete_value_after(op, value));
        let _ = writeln!(
            text,
            "longest linearizable prefix: {} operations, value after it: {}",
            prefix.len(),
            value_text(value)
        );
        let omitted = prefix.len().saturating_sub(DETAIL_PREFIX_OPS_MAX);
        if omitted > 0 {
            let _ = writeln!(text, "  ... {omitted} earlier operations");
        }
        for &op in &prefix[omitted..] {
            let _ = writeln!(text, "  {}", self.operation_text(op));
        }

        let mut in_prefix = vec![false; ops_total];
        for &op in prefix {
            in_prefix[op] = true;
        }
        let blocking = self.blocking_op(dead_end);
        let _ = writeln!(
            text,
            "next to return, and not linearizable after that prefix: {}",
            self.operation_text(blocking)
        );
        let mut candidates: Vec<usize> = (0..ops_total)
            .filter(|&op| !in_prefix[op] && self.call_position[op] < self.ret_position[blocking])
            .collect();
        candidates.sort_by_key(|&op| self.call_position[op]);
        let _ = writeln!(
            text,
            "operations that could come next (called before that return):"
        );
        for &op in candidates.iter().take(DETAIL_CANDIDATE_OPS_MAX) {
            let reason = match self.model_ops[op].apply(dead_end.value) {
                None => "output impossible from that value".to_string(),
                Some(_) => format!(
                    "fits, value after: {}, but no continuation does",
                    value_text(self.concrete_value_after(op, value))
                ),
            };
            let _ = writeln!(text, "  {} ({reason})", self.operation_text(op));
        }
        if candidates.len() > DETAIL_CANDIDATE_OPS_MAX {
            let _ = writeln!(
                text,
                "  ... {} more",
                candidates.len() - DETAIL_CANDIDATE_OPS_MAX
            );
        }
        text
    }
}

/// A value as the report names it.
#[derive(Debug, Clone, Copy)]
enum Concrete<'h> {
    /// Not known: a window's start, before anything pinned it.
    Free,
    Known(Option<&'h str>),
}

fn value_text(value: Concrete<'_>) -> String {
    match value {
        Concrete::Free => "not known (any value at the window's start)".to_string(),
        Concrete::Known(None) => "absent".to_string(),
        Concrete::Known(Some(value)) => format!("{value:?}"),
    }
}

/// A fixed-size set of local operation indices: the memo key's "which
/// operations are linearized".
#[derive(Debug, Clone, PartialEq, Eq)]
struct Bitset(Box<[u64]>);

impl Bitset {
    fn new(bits: usize) -> Self {
        Bitset(vec![0; bits.div_ceil(64)].into_boxed_slice())
    }

    fn set(&mut self, bit: usize) {
        self.0[bit / 64] |= 1 << (bit % 64);
    }

    fn clear(&mut self, bit: usize) {
        self.0[bit / 64] &= !(1 << (bit % 64));
    }

    fn memo_key(&self, value: ValueId) -> MemoKey {
        let full_words = self.0.iter().take_while(|&&word| word == u64::MAX).count();
        let used_words = self.0.len() - self.0.iter().rev().take_while(|&&word| word == 0).count();
        let rest = self.0[full_words..used_words.max(full_words)].into();
        let full_words = u32::try_from(full_words).expect("fewer than 2^38 operations per key");
        MemoKey {
            full_words,
            rest,
            value,
        }
    }
}

pub mod generated;
mod stale;
mod window;

type Memo = HashSet<MemoKey, BuildHasherDefault<MemoHasher>>;

/// A search state in canonical compressed form: the linearized set is
/// `full_words` words of ones, then `rest` (which never starts with a word of
/// ones nor ends with a word of zeros), then zeros; and the key's value. With
/// operations numbered in call order, `rest` spans only the operations in
/// flight, so entries stay small however long the history is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct MemoKey {
    full_words: u32,
    rest: Box<[u64]>,
    value: ValueId,
}

/// A multiply-rotate hasher (as in FxHash) with a final mix, for memo keys.
/// The keys are bitsets and value ids this module builds, not input an
/// adversary chooses, so SipHash's defence against collision floods buys
/// nothing here and costs most of the search time.
#[derive(Default)]
struct MemoHasher(u64);

impl MemoHasher {
    fn add(&mut self, word: u64) {
        const MULTIPLIER: u64 = 0x517c_c1b7_2722_0a95;
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(MULTIPLIER);
    }
}

impl Hasher for MemoHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut words = bytes.chunks_exact(8);
        for word in &mut words {
            self.add(u64::from_le_bytes(
                word.try_into().expect("chunks of 8 bytes"),
            ));
        }
        let rest = words.remainder();
        if !rest.is_empty() {
            let mut word = [0; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word));
        }
    }

    fn write_u32(&mut self, n: u32) {
        self.add(u64::from(n));
    }

    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }

    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }

    /// The multiply only carries upwards, so a bit set high in a word would
    /// never reach the low bits the table indexes by: fold them down
    /// (splitmix64's finalizer).
    fn finish(&self) -> u64 {
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests;
