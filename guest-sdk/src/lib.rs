//! The Paxwasm guest SDK: write a replicated application in Rust by implementing
//! [`App`] (and [`Migrate`] if the app hands its state to a successor during an
//! upgrade), then call [`export_app!`] once. The macro generates every export of
//! the guest ABI (`guest-sdk/ABI.md`); the guest's own code needs no `unsafe`.
//!
//! ```
//! use paxwasm_guest::{export_app, App};
//!
//! #[derive(Default)]
//! pub struct Counter {
//!     value: i64,
//! }
//!
//! impl App for Counter {
//!     fn apply(&mut self, cmd: &[u8]) -> Vec<u8> {
//!         self.value += cmd.len() as i64;
//!         let mut out = Vec::new();
//!         paxwasm_guest::text::push_i64(&mut out, self.value);
//!         out
//!     }
//!
//!     fn query(&self, _query: &[u8]) -> Vec<u8> {
//!         let mut out = Vec::new();
//!         paxwasm_guest::text::push_i64(&mut out, self.value);
//!         out
//!     }
//! }
//!
//! export_app!(Counter);
//! ```
//!
//! The exports exist only when compiling for `target_arch = "wasm32"`, so the
//! same crate also builds natively (as an `rlib`) for unit tests and for the
//! host's wasm-versus-native benchmark. On native targets the host functions
//! ([`log`], [`entry_time_ms`], [`entry_seed`]) fall back to per-thread values
//! that tests set through [`native`].
//!
//! What this crate must never do: keep state outside linear memory, read a clock
//! or a random source of its own, or allocate on the apply path beyond what the
//! app itself returns.

#[doc(hidden)]
pub mod glue;
pub mod hash;
mod host;
pub mod key;
pub mod mem;
pub mod text;

#[cfg(not(target_arch = "wasm32"))]
pub use host::native;
pub use host::{entry_seed, entry_time_ms, log};

/// Compiles the Rust examples in ABI.md as doctests, so the contract's sample
/// guest keeps building against this SDK.
#[doc = include_str!("../ABI.md")]
#[cfg(doctest)]
pub struct AbiDoc;

/// A replicated application: a deterministic state machine over byte commands.
///
/// The state starts as `Self::default()`, built on the first call into the
/// module. Every replica applies the same committed commands in the same order,
/// so `apply` must depend only on `self`, `cmd` and the entry values given by
/// [`entry_time_ms`] and [`entry_seed`]. Keep collections ordered (`BTreeMap`,
/// not a `HashMap` with a random seed). A panic traps: the host then returns a
/// canonical error for that command and rolls the state back to before it.
pub trait App: Default + 'static {
    /// Runs once, when the module is installed with empty state (not after a
    /// restore and not when the state comes from a predecessor through
    /// [`Migrate::import_state`]).
    fn init(&mut self) {}

    /// Applies one committed command and returns its result, which every
    /// replica computes identically.
    fn apply(&mut self, cmd: &[u8]) -> Vec<u8>;

    /// Answers a read-only query. The host discards anything a query writes to
    /// memory, so caching inside `query` is useless, not harmful.
    fn query(&self, query: &[u8]) -> Vec<u8>;

    /// What the exports call: `apply`, with the result written into `out`
    /// (empty on entry). The default calls [`App::apply`]. Override it (and
    /// write `apply` on top of it) to reuse the SDK's result buffer instead of
    /// allocating one per command: on a trivial app the allocator is most of
    /// the guest's cost.
    fn apply_into(&mut self, cmd: &[u8], out: &mut Vec<u8>) {
        *out = self.apply(cmd);
    }

    /// [`App::query`] into a reused buffer, as [`App::apply_into`].
    fn query_into(&self, query: &[u8], out: &mut Vec<u8>) {
        *out = self.query(query);
    }
}

/// State handover during an upgrade: the old module's `export_state` output
/// becomes the new module's `import_state` input.
///
/// An app that does not implement this trait (and is exported with
/// `export_app!(T)` rather than `export_app!(T, migrate)`) has no migration
/// exports, so the host refuses an upgrade that asks to migrate its state
/// instead of silently dropping it.
pub trait Migrate: App {
    /// Serializes the whole state in a format that successors can read. Make
    /// the format self-describing (a version tag) so a successor can refuse a
    /// state it does not understand.
    fn export_state(&self) -> Vec<u8>;

    /// Replaces the empty state with the predecessor's. Returning `Err` traps
    /// with the reason written to the debug log, so the host aborts the upgrade
    /// and keeps the old module and its state.
    fn import_state(&mut self, bytes: &[u8]) -> Result<(), String>;
}

/// Generates the guest ABI exports for an [`App`] type.
///
/// - `export_app!(MyApp)`: `paxwasm_alloc`, `paxwasm_apply`, `paxwasm_query`
///   and `paxwasm_init`.
/// - `export_app!(MyApp, migrate)`: the same plus `paxwasm_export_state` and
///   `paxwasm_import_state`; `MyApp` must implement [`Migrate`].
///
/// Call it once per module crate (a `cdylib`). The exports, and the single
/// static that holds the app, only exist on `target_arch = "wasm32"`; on other
/// targets the macro only checks the trait bounds.
#[macro_export]
macro_rules! export_app {
    ($app:ty) => {
        const _: fn() = $crate::glue::assert_app::<$app>;

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static GUEST: $crate::glue::GuestCell<$app> = $crate::glue::GuestCell::new();
            #[unsafe(export_name = "paxwasm_input_buffer")]
            static INPUT: $crate::glue::InputBuffer = $crate::glue::InputBuffer::new();
            $crate::__export_core!(GUEST, INPUT);
        };
    };
    ($app:ty, migrate) => {
        const _: fn() = $crate::glue::assert_migrate::<$app>;

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            static GUEST: $crate::glue::GuestCell<$app> = $crate::glue::GuestCell::new();
            #[unsafe(export_name = "paxwasm_input_buffer")]
            static INPUT: $crate::glue::InputBuffer = $crate::glue::InputBuffer::new();
            $crate::__export_core!(GUEST, INPUT);
            $crate::__export_migrate!(GUEST, INPUT);
        };
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_core {
    ($guest:ident, $input:ident) => {
        #[unsafe(no_mangle)]
        extern "C" fn paxwasm_alloc(len: i32) -> i32 {
            $crate::glue::alloc(&$guest, &$input, len)
        }

        #[unsafe(no_mangle)]
        extern "C" fn paxwasm_apply(ptr: i32, len: i32) -> i64 {
            $crate::glue::apply(&$guest, &$input, ptr, len)
        }

        #[unsafe(no_mangle)]
        extern "C" fn paxwasm_apply_batch(ptr: i32, len: i32) {
            $crate::glue::apply_batch(&$guest, &$input, ptr, len)
        }

        #[unsafe(no_mangle)]
        extern "C" fn paxwasm_query(ptr: i32, len: i32) -> i64 {
            $crate::glue::query(&$guest, &$input, ptr, len)
        }

        #[unsafe(no_mangle)]
        extern "C" fn paxwasm_init() {
            $crate::glue::init(&$guest)
        }
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __export_migrate {
    ($guest:ident, $input:ident) => {
        #[unsafe(no_mangle)]
        extern "C" fn paxwasm_export_state() -> i64 {
            $crate::glue::export_state(&$guest)
        }

        #[unsafe(no_mangle)]
        extern "C" fn paxwasm_import_state(ptr: i32, len: i32) {
            $crate::glue::import_state(&$guest, &$input, ptr, len)
        }
    };
}
