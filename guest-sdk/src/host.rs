//! Safe wrappers over the host imports (module `paxwasm`, ABI.md "Imports").
//!
//! On wasm32 they call the host. Elsewhere (native unit tests, the host's
//! native baseline benchmark) they read and write per-thread values set
//! through [`native`], so tests of one app run in parallel without sharing
//! entry values or logs.

/// Writes a debug line to the host's log. It is never part of the replicated
/// state or of any result, and a replica may drop it.
pub fn log(message: &str) {
    imp::log(message)
}

/// The timestamp (milliseconds since the Unix epoch) that the leader stored in
/// the log entry being applied; during a query, that of the last applied entry;
/// 0 before any. The same on every replica, unlike a clock.
pub fn entry_time_ms() -> i64 {
    imp::entry_time_ms()
}

/// The 64-bit random seed that the leader stored in the log entry being
/// applied (same rules as [`entry_time_ms`]). Seed a PRNG with it; never use a
/// random source of the guest's own.
pub fn entry_seed() -> u64 {
    imp::entry_seed()
}

/// Hands the result of one command of a batch to the host (ABI.md, "Batches"),
/// which copies it out and gives the next command a fresh fuel budget. True
/// when the host asks the batch to stop after this command. (Natively, tests
/// drive `glue::Guest::apply_batch` with a callback of their own.)
#[cfg(target_arch = "wasm32")]
#[inline(always)]
pub(crate) fn command_done(result: &[u8]) -> bool {
    imp::command_done(result)
}

/// Sends panic messages to [`log`] so a trapping guest says why; the trap
/// itself (and so the command's canonical error) is unchanged.
pub(crate) fn install_panic_hook() {
    imp::install_panic_hook()
}

#[cfg(target_arch = "wasm32")]
mod imp {
    #[link(wasm_import_module = "paxwasm")]
    unsafe extern "C" {
        #[link_name = "log"]
        fn paxwasm_log(ptr: *const u8, len: usize);
        #[link_name = "entry_time_ms"]
        fn paxwasm_entry_time_ms() -> i64;
        #[link_name = "entry_seed"]
        fn paxwasm_entry_seed() -> i64;
        #[link_name = "command_done"]
        fn paxwasm_command_done(ptr: *const u8, len: usize) -> i32;
    }

    #[inline(always)]
    pub fn command_done(result: &[u8]) -> bool {
        // SAFETY: the host only reads `len` bytes at `ptr`, the live bytes of
        // `result`; on wasm32 `usize` is the ABI's i32.
        unsafe { paxwasm_command_done(result.as_ptr(), result.len()) != 0 }
    }

    pub fn log(message: &str) {
        // SAFETY: `log` only reads `len` bytes at `ptr`, which are the live
        // bytes of `message`; on wasm32 `usize` is the ABI's i32.
        unsafe { paxwasm_log(message.as_ptr(), message.len()) }
    }

    pub fn entry_time_ms() -> i64 {
        // SAFETY: takes no arguments and touches no guest memory.
        unsafe { paxwasm_entry_time_ms() }
    }

    pub fn entry_seed() -> u64 {
        // SAFETY: takes no arguments and touches no guest memory.
        unsafe { paxwasm_entry_seed() as u64 }
    }

    pub fn install_panic_hook() {
        std::panic::set_hook(Box::new(|info| log(&info.to_string())));
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    use std::cell::{Cell, RefCell};

    thread_local! {
        pub(super) static TIME_MS: Cell<i64> = const { Cell::new(0) };
        pub(super) static SEED: Cell<u64> = const { Cell::new(0) };
        pub(super) static LOG: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    }

    pub fn log(message: &str) {
        LOG.with_borrow_mut(|lines| lines.push(message.to_owned()));
    }

    pub fn entry_time_ms() -> i64 {
        TIME_MS.get()
    }

    pub fn entry_seed() -> u64 {
        SEED.get()
    }

    /// Natively a panic already reports itself (and fails the test).
    pub fn install_panic_hook() {}
}

/// Native stand-ins for the host, for tests: set the current entry's values
/// and read what the app logged. Per thread.
#[cfg(not(target_arch = "wasm32"))]
pub mod native {
    use super::imp::{LOG, SEED, TIME_MS};

    /// Sets what [`entry_time_ms`](crate::entry_time_ms) and
    /// [`entry_seed`](crate::entry_seed) return on this thread, as the host
    /// does before applying each entry.
    pub fn set_entry(time_ms: i64, seed: u64) {
        TIME_MS.set(time_ms);
        SEED.set(seed);
    }

    /// Returns and clears the lines logged on this thread.
    pub fn take_log() -> Vec<String> {
        LOG.take()
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use super::*;

    #[test]
    fn entry_values_start_at_zero_and_follow_set_entry() {
        assert_eq!((entry_time_ms(), entry_seed()), (0, 0));
        native::set_entry(1_764_000_000_000, u64::MAX);
        assert_eq!(
            (entry_time_ms(), entry_seed()),
            (1_764_000_000_000, u64::MAX)
        );
    }

    #[test]
    fn log_lines_are_kept_in_order_until_taken() {
        log("first");
        log("second");
        assert_eq!(native::take_log(), ["first", "second"]);
        assert!(native::take_log().is_empty());
    }
}
