//! What [`export_app!`](crate::export_app) expands to call: the buffers that
//! cross the ABI and the one static that holds the app. Not a public API; the
//! macro is.
//!
//! Buffer discipline (ABI.md, "Buffers"): `paxwasm_alloc` hands out one reusable
//! input buffer, grown to the largest input seen (up to
//! [`INPUT_RETAINED_BYTES_MAX`]), and one result buffer, which the app writes
//! into through `App::apply_into` / `App::query_into`, so an app that
//! overrides those allocates nothing per command. A call's result stays in
//! [`Guest::output`] until the next call that produces one, which is what
//! lets the host copy it out after the call returns.

use crate::{App, Migrate};

/// Inputs larger than this are freed after the call that used them instead of
/// being kept for the next one, so one huge command or imported state does not
/// pin its buffer in linear memory, and so in every snapshot, forever.
pub const INPUT_RETAINED_BYTES_MAX: usize = 64 * 1024;

/// The result buffer is reused across calls (see `App::apply_into`) unless a
/// result made it larger than this; then it is freed before the next call.
pub const OUTPUT_RETAINED_BYTES_MAX: usize = 64 * 1024;

/// Compile-time check used by `export_app!(T)`.
pub fn assert_app<A: App>() {}

/// Compile-time check used by `export_app!(T, migrate)`.
pub fn assert_migrate<A: Migrate>() {}

/// Packs a result buffer as the ABI returns it: `(ptr << 32) | len`.
#[inline]
pub fn pack(ptr: u32, len: u32) -> i64 {
    ((u64::from(ptr) << 32) | u64::from(len)) as i64
}

/// The guest side of the ABI for one app, independent of the pointer width so
/// that it is tested natively. Addresses are compared, never dereferenced: the
/// input is always read through `input`, which the host wrote into in place.
pub struct Guest<A> {
    /// Built on the first call into the module (there is no constructor
    /// export), then lives in linear memory like the rest of the state.
    app: Option<A>,
    /// The buffer last returned by `alloc`; its length is the high-water mark.
    input: Vec<u8>,
    /// The result of the last call, kept until the next one replaces it.
    output: Vec<u8>,
}

impl<A> Guest<A> {
    pub const fn new() -> Self {
        Self {
            app: None,
            input: Vec::new(),
            output: Vec::new(),
        }
    }
}

impl<A> Default for Guest<A> {
    fn default() -> Self {
        Self::new()
    }
}

impl<A: App> Guest<A> {
    /// `paxwasm_alloc`: a buffer of exactly `len` bytes for the host to fill.
    /// Valid until the next call into the guest.
    pub fn alloc(&mut self, len: usize) -> &mut [u8] {
        if self.input.len() < len {
            self.input.resize(len, 0);
        }
        &mut self.input[..len]
    }

    /// `paxwasm_init`.
    pub fn init(&mut self) {
        self.app.get_or_insert_with(new_app).init();
    }

    /// `paxwasm_apply`: `addr` and `len` must name the buffer from the last
    /// `alloc` (or `len` is 0).
    pub fn apply(&mut self, addr: usize, len: usize) -> &[u8] {
        // The app first: building it installs the panic hook that reports
        // an ABI violation.
        let app = self.app.get_or_insert_with(new_app);
        let input = checked_input(&self.input, addr, len);
        reuse(&mut self.output);
        app.apply_into(input, &mut self.output);
        self.release_large_input();
        &self.output
    }

    /// `paxwasm_apply_batch`: the input holds commands framed as
    /// `[u32 LE length][bytes]`, applied in order; after each, `done` gets its
    /// result (the host copies it out and resets the fuel) and answers whether
    /// to stop there. A malformed frame is a host bug, so it traps.
    pub fn apply_batch(&mut self, addr: usize, len: usize, mut done: impl FnMut(&[u8]) -> bool) {
        let app = self.app.get_or_insert_with(new_app);
        let mut rest = checked_input(&self.input, addr, len);
        while let Some((command, after)) = next_frame(rest) {
            reuse(&mut self.output);
            app.apply_into(command, &mut self.output);
            if done(&self.output) {
                break;
            }
            rest = after;
        }
        self.release_large_input();
    }

    /// `paxwasm_query`.
    pub fn query(&mut self, addr: usize, len: usize) -> &[u8] {
        // The app first: building it installs the panic hook that reports
        // an ABI violation.
        let app = self.app.get_or_insert_with(new_app);
        let input = checked_input(&self.input, addr, len);
        reuse(&mut self.output);
        app.query_into(input, &mut self.output);
        self.release_large_input();
        &self.output
    }

    fn release_large_input(&mut self) {
        if self.input.capacity() > INPUT_RETAINED_BYTES_MAX {
            self.input = Vec::new();
        }
    }

    /// The app, for tests.
    pub fn app(&self) -> Option<&A> {
        self.app.as_ref()
    }

    /// Address and length of the input buffer: what the input descriptor
    /// publishes (ABI.md, "Input buffer"). Any input of at most that length
    /// written there is accepted by `apply`/`query` without an `alloc`.
    pub fn input_buffer(&self) -> (usize, usize) {
        (self.input.as_ptr() as usize, self.input.len())
    }
}

impl<A: Migrate> Guest<A> {
    /// `paxwasm_export_state`.
    pub fn export_state(&mut self) -> &[u8] {
        let app = self.app.get_or_insert_with(new_app);
        self.output = app.export_state();
        &self.output
    }

    /// `paxwasm_import_state`: the state is imported into a fresh
    /// `A::default()`, whatever ran before. A refused state panics, which traps
    /// on wasm32, so the host aborts the upgrade.
    pub fn import_state(&mut self, addr: usize, len: usize) {
        let mut app: A = new_app();
        let input = checked_input(&self.input, addr, len);
        if let Err(reason) = app.import_state(input) {
            panic!("import_state refused the state: {reason}");
        }
        self.app = Some(app);
        // A whole state is rarely followed by an input of the same size.
        self.input = Vec::new();
    }
}

/// Empties the result buffer for the next call, keeping its allocation
/// unless a large result grew it.
#[inline(always)]
fn reuse(output: &mut Vec<u8>) {
    if output.capacity() > OUTPUT_RETAINED_BYTES_MAX {
        *output = Vec::new();
    } else {
        output.clear();
    }
}

/// The input named by the host. Anything but the last `alloc` buffer is a host
/// bug (a programmer error on the other side of the ABI), so it traps.
#[inline(always)]
fn checked_input(input: &[u8], addr: usize, len: usize) -> &[u8] {
    if len == 0 {
        return &[];
    }
    if addr != input.as_ptr() as usize || len > input.len() {
        abi_violation(addr, len);
    }
    &input[..len]
}

/// The first command of a batch input and the input after it; `None` at the
/// end. A frame that does not fit is a host bug, so it traps.
#[inline(always)]
fn next_frame(rest: &[u8]) -> Option<(&[u8], &[u8])> {
    if rest.is_empty() {
        return None;
    }
    let Some((header, rest)) = rest.split_first_chunk::<4>() else {
        bad_frame(rest.len());
    };
    let len = u32::from_le_bytes(*header) as usize;
    if len > rest.len() {
        bad_frame(rest.len());
    }
    Some(rest.split_at(len))
}

#[cold]
#[inline(never)]
fn bad_frame(left: usize) -> ! {
    panic!("paxwasm ABI violation: a batch frame overruns the input ({left} bytes left)")
}

/// Out of line, so that the check on every call stays a compare and a branch.
#[cold]
#[inline(never)]
fn abi_violation(addr: usize, len: usize) -> ! {
    panic!(
        "paxwasm ABI violation: input ({addr:#x}, {len}) is not within the buffer from the last paxwasm_alloc"
    )
}

fn new_app<A: App>() -> A {
    crate::host::install_panic_hook();
    A::default()
}

#[cfg(target_arch = "wasm32")]
pub use wasm::*;

#[cfg(target_arch = "wasm32")]
mod wasm {
    use super::{pack, Guest};
    use crate::{App, Migrate};
    use core::cell::UnsafeCell;

    /// The input descriptor the module exports as `paxwasm_input_buffer`
    /// (ABI.md, "Input buffer"): the address (u32 LE) and capacity (u32 LE)
    /// of a buffer the host may write the next input into without calling
    /// `paxwasm_alloc`. Republished after every call that may move or free
    /// the input buffer, so it is always current between calls.
    #[repr(C)]
    pub struct InputBuffer(UnsafeCell<[u32; 2]>);

    // SAFETY: as for `GuestCell`: one thread per module, so the cell is never
    // reached from two threads.
    #[cfg(not(target_feature = "atomics"))]
    unsafe impl Sync for InputBuffer {}

    impl Default for InputBuffer {
        fn default() -> Self {
            Self::new()
        }
    }

    impl InputBuffer {
        pub const fn new() -> Self {
            Self(UnsafeCell::new([0, 0]))
        }

        #[inline(always)]
        fn publish<A: App>(&self, guest: &Guest<A>) {
            let (ptr, len) = guest.input_buffer();
            // SAFETY: the only access from the guest; exports do not overlap
            // (see `GuestCell::with`), and the host reads it between calls.
            // On wasm32 `usize` is `u32`.
            unsafe { *self.0.get() = [ptr as u32, len as u32] }
        }
    }

    /// The static behind the exports: one `Guest` per module.
    pub struct GuestCell<A>(UnsafeCell<Guest<A>>);

    // SAFETY: this impl exists only on wasm32 without the `atomics` feature,
    // where a module has exactly one thread, so the cell is never reached from
    // two threads. (With `atomics` the static does not compile, on purpose.)
    #[cfg(not(target_feature = "atomics"))]
    unsafe impl<A> Sync for GuestCell<A> {}

    impl<A: App> Default for GuestCell<A> {
        fn default() -> Self {
            Self::new()
        }
    }

    impl<A: App> GuestCell<A> {
        pub const fn new() -> Self {
            Self(UnsafeCell::new(Guest::new()))
        }

        #[inline(always)]
        fn with<R>(&'static self, f: impl FnOnce(&mut Guest<A>) -> R) -> R {
            // SAFETY: the only `&mut` to the cell's content is this one, alive
            // for the duration of `f`. `with` is called only by the exported
            // functions, once each, at entry. No second entry can overlap:
            // the module is single-threaded (see the Sync impl), the host never
            // calls into the guest from an import (ABI.md), and the app code
            // running inside `f` cannot name the static (it lives in an
            // anonymous `const _` block) nor call an export without `unsafe`.
            f(unsafe { &mut *self.0.get() })
        }
    }

    /// On wasm32 `usize` is `u32`, so these casts are lossless.
    #[inline(always)]
    fn packed(out: &[u8]) -> i64 {
        pack(out.as_ptr() as usize as u32, out.len() as u32)
    }

    #[inline]
    pub fn alloc<A: App>(cell: &'static GuestCell<A>, input: &InputBuffer, len: i32) -> i32 {
        cell.with(|guest| {
            let ptr = guest.alloc(len as u32 as usize).as_mut_ptr() as usize as u32 as i32;
            input.publish(guest);
            ptr
        })
    }

    #[inline]
    pub fn apply<A: App>(
        cell: &'static GuestCell<A>,
        input: &InputBuffer,
        ptr: i32,
        len: i32,
    ) -> i64 {
        cell.with(|guest| {
            let out = packed(guest.apply(ptr as u32 as usize, len as u32 as usize));
            input.publish(guest);
            out
        })
    }

    #[inline]
    pub fn apply_batch<A: App>(
        cell: &'static GuestCell<A>,
        input: &InputBuffer,
        ptr: i32,
        len: i32,
    ) {
        cell.with(|guest| {
            guest.apply_batch(ptr as u32 as usize, len as u32 as usize, |out| {
                crate::host::command_done(out)
            });
            input.publish(guest);
        })
    }

    #[inline]
    pub fn query<A: App>(
        cell: &'static GuestCell<A>,
        input: &InputBuffer,
        ptr: i32,
        len: i32,
    ) -> i64 {
        cell.with(|guest| {
            let out = packed(guest.query(ptr as u32 as usize, len as u32 as usize));
            input.publish(guest);
            out
        })
    }

    #[inline]
    pub fn init<A: App>(cell: &'static GuestCell<A>) {
        cell.with(|guest| guest.init())
    }

    #[inline]
    pub fn export_state<A: Migrate>(cell: &'static GuestCell<A>) -> i64 {
        cell.with(|guest| packed(guest.export_state()))
    }

    #[inline]
    pub fn import_state<A: Migrate>(
        cell: &'static GuestCell<A>,
        input: &InputBuffer,
        ptr: i32,
        len: i32,
    ) {
        cell.with(|guest| {
            guest.import_state(ptr as u32 as usize, len as u32 as usize);
            input.publish(guest);
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what reached it, so the tests see exactly what the glue passed.
    #[derive(Default)]
    struct Echo {
        applied: Vec<Vec<u8>>,
        inits: u32,
    }

    impl App for Echo {
        fn init(&mut self) {
            self.inits += 1;
        }

        fn apply(&mut self, cmd: &[u8]) -> Vec<u8> {
            self.applied.push(cmd.to_vec());
            [b"applied ", cmd].concat()
        }

        fn query(&self, query: &[u8]) -> Vec<u8> {
            [b"queried ", query].concat()
        }
    }

    impl Migrate for Echo {
        fn export_state(&self) -> Vec<u8> {
            self.applied.join(&b'|')
        }

        fn import_state(&mut self, bytes: &[u8]) -> Result<(), String> {
            if bytes.starts_with(b"bad") {
                return Err("starts with bad".to_string());
            }
            self.applied = bytes.split(|&b| b == b'|').map(<[u8]>::to_vec).collect();
            Ok(())
        }
    }

    /// Writes its result into the SDK's buffer: `n` bytes for a command `n`.
    #[derive(Default)]
    struct Filler;

    impl App for Filler {
        fn apply(&mut self, cmd: &[u8]) -> Vec<u8> {
            let mut out = Vec::new();
            self.apply_into(cmd, &mut out);
            out
        }

        fn apply_into(&mut self, cmd: &[u8], out: &mut Vec<u8>) {
            assert!(out.is_empty(), "the SDK hands over an empty buffer");
            let n: usize = std::str::from_utf8(cmd).unwrap().parse().unwrap();
            out.resize(n, b'x');
        }

        fn query(&self, _query: &[u8]) -> Vec<u8> {
            Vec::new()
        }
    }

    fn apply_filler(guest: &mut Guest<Filler>, n: usize) -> (usize, usize, usize) {
        let cmd = n.to_string();
        let buf = guest.alloc(cmd.len());
        buf.copy_from_slice(cmd.as_bytes());
        let addr = buf.as_ptr() as usize;
        let out = guest.apply(addr, cmd.len());
        (out.as_ptr() as usize, out.len(), guest.output.capacity())
    }

    #[test]
    fn apply_into_reuses_the_result_buffer_until_a_large_result() {
        let mut guest = Guest::<Filler>::new();
        let (first, len, _) = apply_filler(&mut guest, 100);
        assert_eq!(len, 100);
        let (second, len, _) = apply_filler(&mut guest, 50);
        assert_eq!((second, len), (first, 50));
        // A large result is returned whole, then not kept for the next call.
        let (_, len, capacity) = apply_filler(&mut guest, OUTPUT_RETAINED_BYTES_MAX + 1);
        assert_eq!(len, OUTPUT_RETAINED_BYTES_MAX + 1);
        assert!(capacity > OUTPUT_RETAINED_BYTES_MAX);
        let (_, len, capacity) = apply_filler(&mut guest, 3);
        assert_eq!(len, 3);
        assert!(capacity <= OUTPUT_RETAINED_BYTES_MAX, "{capacity}");
    }

    /// What the host does: alloc, write, then call with the returned address.
    fn write_input(guest: &mut Guest<Echo>, bytes: &[u8]) -> usize {
        let buf = guest.alloc(bytes.len());
        buf.copy_from_slice(bytes);
        buf.as_ptr() as usize
    }

    #[test]
    fn pack_puts_pointer_high_and_length_low() {
        assert_eq!(pack(0, 0), 0);
        assert_eq!(pack(0x10, 3), 0x0000_0010_0000_0003);
        assert_eq!(pack(u32::MAX, u32::MAX), -1);
        assert_eq!(pack(0x8000_0000, 1) as u64 >> 32, 0x8000_0000);
    }

    #[test]
    fn apply_sees_exactly_the_written_input_and_returns_the_app_result() {
        let mut guest = Guest::<Echo>::new();
        let addr = write_input(&mut guest, b"add 1");
        assert_eq!(guest.apply(addr, 5), b"applied add 1");
        // A shorter input reuses the same buffer: no allocation per command.
        let addr_again = write_input(&mut guest, b"x");
        assert_eq!(addr_again, addr);
        assert_eq!(guest.apply(addr_again, 1), b"applied x");
        assert_eq!(
            guest.app().unwrap().applied,
            vec![b"add 1".to_vec(), b"x".to_vec()]
        );
    }

    #[test]
    fn output_stays_put_until_the_next_call_that_produces_one() {
        let mut guest = Guest::<Echo>::new();
        let addr = write_input(&mut guest, b"a");
        let (out_addr, out_len) = {
            let out = guest.apply(addr, 1);
            (out.as_ptr() as usize, out.len())
        };
        // The host's next call is an alloc; it must not disturb the output.
        write_input(&mut guest, b"bbbb");
        assert_eq!(guest.output.as_ptr() as usize, out_addr);
        assert_eq!(&guest.output[..out_len], b"applied a");
    }

    #[test]
    fn empty_input_needs_no_alloc() {
        let mut guest = Guest::<Echo>::new();
        assert_eq!(guest.query(0, 0), b"queried ");
        assert_eq!(guest.apply(12345, 0), b"applied ");
    }

    #[test]
    #[should_panic(expected = "paxwasm ABI violation")]
    fn input_not_from_alloc_traps() {
        let mut guest = Guest::<Echo>::new();
        let addr = write_input(&mut guest, b"abc");
        guest.apply(addr + 1, 2);
    }

    #[test]
    #[should_panic(expected = "paxwasm ABI violation")]
    fn input_longer_than_alloc_traps() {
        let mut guest = Guest::<Echo>::new();
        let addr = write_input(&mut guest, b"abc");
        guest.apply(addr, 4);
    }

    #[test]
    fn large_inputs_are_released_after_use() {
        let mut guest = Guest::<Echo>::new();
        let big = vec![b'x'; INPUT_RETAINED_BYTES_MAX + 1];
        let addr = write_input(&mut guest, &big);
        assert_eq!(
            guest.apply(addr, big.len()).len(),
            b"applied ".len() + big.len()
        );
        assert_eq!(guest.input.capacity(), 0);
        // Inputs up to the limit stay for reuse.
        let small = vec![b'y'; INPUT_RETAINED_BYTES_MAX / 2];
        let addr = write_input(&mut guest, &small);
        guest.apply(addr, small.len());
        assert!(guest.input.capacity() >= small.len());
    }

    #[test]
    fn init_runs_on_the_lazily_built_app() {
        let mut guest = Guest::<Echo>::new();
        assert!(guest.app().is_none());
        guest.init();
        assert_eq!(guest.app().unwrap().inits, 1);
    }

    #[test]
    fn export_then_import_hands_the_state_to_a_fresh_app() {
        let mut old = Guest::<Echo>::new();
        for cmd in [&b"one"[..], b"two"] {
            let addr = write_input(&mut old, cmd);
            old.apply(addr, cmd.len());
        }
        let exported = old.export_state().to_vec();
        assert_eq!(exported, b"one|two");

        let mut new = Guest::<Echo>::new();
        new.init(); // whatever ran before is replaced, not merged
        let addr = write_input(&mut new, &exported);
        new.import_state(addr, exported.len());
        let app = new.app().unwrap();
        assert_eq!(app.applied, vec![b"one".to_vec(), b"two".to_vec()]);
        assert_eq!(app.inits, 0);
    }

    #[test]
    #[should_panic(expected = "import_state refused the state: starts with bad")]
    fn refused_import_traps_with_the_reason() {
        let mut guest = Guest::<Echo>::new();
        let addr = write_input(&mut guest, b"bad state");
        guest.import_state(addr, 9);
    }
}
