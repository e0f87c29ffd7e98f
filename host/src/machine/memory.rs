//! Host-owned linear memory: the committed state lives in a `memfd` (the
//! *base*), and every instance maps it `MAP_PRIVATE`, so the guest's writes
//! land in private copy-on-write pages and never reach the base by themselves.
//!
//! That one mapping choice gives the machine all of its memory mechanisms:
//! - rollback: `madvise(MADV_DONTNEED)` on the instance's range drops its
//!   private pages, and the memory reads the base again;
//! - dirty tracking: with userfaultfd write-protection (below), the pages
//!   written since the last scan; without, a page that is present and not a
//!   file page (pagemap bit 61 clear) is a private copy, i.e. written since it
//!   was last dropped;
//! - checkpoint: those pages are written into the memfd; with userfaultfd
//!   tracking (below) the private copies stay, write-protected again, and
//!   only the next write to one marks it; without, they are dropped again;
//! - query isolation: a second instance maps the same memfd privately, runs
//!   the query, and before the next one overwrites whatever the query wrote
//!   with the memfd's bytes.
//!
//! This module knows nothing about Wasm beyond the `LinearMemory` interface.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};

use wasmtime::{LinearMemory, MemoryCreator, MemoryType};

/// The committed linear memory of one machine, sized to the memory cap
/// (sparse: only written pages use RAM).
#[derive(Debug)]
pub struct Memfd {
    file: File,
    bytes_max: usize,
}

impl Memfd {
    pub fn new(bytes_max: usize) -> io::Result<Arc<Memfd>> {
        // SAFETY: the name is a valid NUL-terminated string; the returned fd is
        // checked and then owned by `OwnedFd`.
        let fd = unsafe { libc::memfd_create(c"paxwasm-memory".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(bytes_max as u64)?;
        Ok(Arc::new(Memfd { file, bytes_max }))
    }

    pub fn write_at(&self, offset: usize, bytes: &[u8]) -> io::Result<()> {
        assert!(offset + bytes.len() <= self.bytes_max);
        self.file.write_all_at(bytes, offset as u64)
    }

    pub fn read_at(&self, offset: usize, bytes: &mut [u8]) -> io::Result<()> {
        assert!(offset + bytes.len() <= self.bytes_max);
        self.file.read_exact_at(bytes, offset as u64)
    }

    /// Copies `[start, end)` of this memfd into the same range of `to`, in
    /// the kernel (`copy_file_range`: one copy, no buffer, no page table).
    /// `Ok(false)` where the kernel refuses it for these files; nothing
    /// may have been copied then, or part of the range: the caller copies
    /// the whole range another way.
    pub fn copy_range_to(&self, to: &Memfd, start: usize, end: usize) -> io::Result<bool> {
        assert!(end <= self.bytes_max && end <= to.bytes_max);
        let mut offset = start;
        while offset < end {
            let (mut from_off, mut to_off) = (offset as libc::loff_t, offset as libc::loff_t);
            // SAFETY: both descriptors are ours; the kernel reads and writes
            // the files at the given offsets only, and updates the offsets.
            let copied = unsafe {
                libc::copy_file_range(
                    self.file.as_raw_fd(),
                    &mut from_off,
                    to.file.as_raw_fd(),
                    &mut to_off,
                    end - offset,
                    0,
                )
            };
            if copied < 0 {
                let error = io::Error::last_os_error();
                return match error.raw_os_error() {
                    Some(libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
                    _ => Err(error),
                };
            }
            if copied == 0 {
                return Err(io::Error::other("copy_file_range: memfd ended early"));
            }
            offset += copied as usize;
        }
        Ok(true)
    }

    /// The byte ranges of `[0, len)` that hold pages (`SEEK_DATA` /
    /// `SEEK_HOLE`); the holes between them read as zero. Where the kernel
    /// does not answer, the whole range counts as data (correct, slower).
    pub fn data_runs(&self, len: usize) -> Vec<(usize, usize)> {
        let whole = if len == 0 { vec![] } else { vec![(0, len)] };
        let fd = self.file.as_raw_fd();
        let mut runs = Vec::new();
        let mut offset = 0usize;
        while offset < len {
            // SAFETY: lseek on a descriptor we own; it only moves the file
            // offset, which nothing else uses (all other I/O is positional).
            let start = unsafe { libc::lseek(fd, offset as libc::off_t, libc::SEEK_DATA) };
            if start < 0 {
                if io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                    break; // no data after `offset`
                }
                return whole;
            }
            let start = start as usize;
            if start >= len {
                break;
            }
            // SAFETY: as above.
            let end = unsafe { libc::lseek(fd, start as libc::off_t, libc::SEEK_HOLE) };
            if end < 0 {
                return whole;
            }
            let end = (end as usize).min(len);
            assert!(end > start, "SEEK_HOLE went backwards");
            runs.push((start, end));
            offset = end;
        }
        runs
    }
}

/// Hands the memfd to map to the next memory wasmtime creates. The machine
/// sets it right before each instantiation; the engine belongs to one machine.
/// With `tracker`, the memory is registered with that userfaultfd and
/// write-protected, so its written pages can be found by [`DirtyScanner`]
/// from page-table bits alone (the primary instance); without, it is not
/// (the reader).
#[derive(Default)]
pub struct MemfdCreator {
    next: Mutex<Option<NextMemory>>,
}

/// The memfd to map and the tracker to register the view with, if any.
type NextMemory = (Arc<Memfd>, Option<Arc<Uffd>>);

impl MemfdCreator {
    pub fn set_next(&self, memfd: Arc<Memfd>, tracker: Option<Arc<Uffd>>) {
        *self.next.lock().unwrap() = Some((memfd, tracker));
    }
}

// SAFETY: every memory returned maps `reserved + guard` bytes (readable and
// writable only up to `byte_size`, PROT_NONE after), never moves, and is
// unmapped only when wasmtime drops it.
unsafe impl MemoryCreator for MemfdCreator {
    fn new_memory(
        &self,
        _ty: MemoryType,
        minimum: usize,
        _maximum: Option<usize>,
        reserved_size_in_bytes: Option<usize>,
        guard_size_in_bytes: usize,
    ) -> Result<Box<dyn LinearMemory>, String> {
        let (memfd, tracker) = self
            .next
            .lock()
            .unwrap()
            .clone()
            .ok_or("no memfd prepared for this memory")?;
        MemfdMemory::new(
            memfd,
            tracker,
            minimum,
            reserved_size_in_bytes,
            guard_size_in_bytes,
        )
        .map(|m| Box::new(m) as Box<dyn LinearMemory>)
        .map_err(|e| format!("mapping linear memory: {e}"))
    }
}

struct MemfdMemory {
    _memfd: Arc<Memfd>,
    /// The userfaultfd the view is registered with (write-protect, async),
    /// if registering worked; newly accessible pages are write-protected on
    /// growth. Kept as long as the mapping: closing it would unregister.
    tracker: Option<Arc<Uffd>>,
    base: *mut u8,
    mapped_bytes: usize,
    /// Bytes readable and writable (the Wasm memory size).
    size_bytes: usize,
    /// Bytes the memory may grow to without moving: the memfd size.
    capacity_bytes: usize,
}

// SAFETY: the mapping is owned by this value; wasmtime serializes access.
unsafe impl Send for MemfdMemory {}
// SAFETY: as above; no interior mutability is exposed through `&self`.
unsafe impl Sync for MemfdMemory {}

impl MemfdMemory {
    fn new(
        memfd: Arc<Memfd>,
        tracker: Option<Arc<Uffd>>,
        minimum: usize,
        reserved: Option<usize>,
        guard: usize,
    ) -> io::Result<MemfdMemory> {
        let capacity_bytes = reserved.map_or(memfd.bytes_max, |r| r.min(memfd.bytes_max));
        if minimum > capacity_bytes {
            return Err(io::Error::other("initial memory exceeds memory_bytes_max"));
        }
        let mapped_bytes = reserved.unwrap_or(memfd.bytes_max).max(capacity_bytes) + guard;
        // SAFETY: a fresh anonymous PROT_NONE reservation at a kernel-chosen
        // address; nothing else refers to it.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_bytes,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: replaces the first `capacity_bytes` of our own reservation
        // with a private view of the memfd, still PROT_NONE.
        let view = unsafe {
            libc::mmap(
                base,
                capacity_bytes,
                libc::PROT_NONE,
                libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                memfd.file.as_raw_fd(),
                0,
            )
        };
        let mut memory = MemfdMemory {
            _memfd: memfd,
            tracker: None,
            base: base.cast(),
            mapped_bytes,
            size_bytes: 0,
            capacity_bytes,
        };
        if view == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        // A view the kernel will not track is scanned the slower way
        // (`DirtyScanner` falls back per call), so a refusal is no error.
        memory.tracker = tracker.filter(|uffd| uffd.register(memory.base, capacity_bytes).is_ok());
        memory.make_accessible(minimum)?;
        Ok(memory)
    }

    fn make_accessible(&mut self, new_size: usize) -> io::Result<()> {
        if new_size > self.capacity_bytes {
            return Err(io::Error::other("memory cannot grow past memory_bytes_max"));
        }
        if new_size > self.size_bytes {
            // SAFETY: the range lies inside our memfd view (checked above).
            let rc = unsafe {
                libc::mprotect(
                    self.base.add(self.size_bytes).cast(),
                    new_size - self.size_bytes,
                    libc::PROT_READ | libc::PROT_WRITE,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            if let Some(uffd) = &self.tracker {
                // Never accessible before (memory does not shrink), so no
                // page here is written: protecting it hides no write. Marks
                // the pages so that reading them does not count as writing.
                // SAFETY: inside our registered view.
                let grown = unsafe { self.base.add(self.size_bytes) };
                // A refusal must not fail the growth: that would be local to
                // this replica, and `memory.grow` must answer the same on every
                // one. Unprotected pages that are only read are reported as
                // written, which costs a needless write of equal bytes.
                let _ = uffd.write_protect(grown, new_size - self.size_bytes);
            }
        }
        self.size_bytes = new_size;
        Ok(())
    }
}

impl Drop for MemfdMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the reservation made in `new`; wasmtime has
        // dropped every reference into it.
        unsafe { libc::munmap(self.base.cast(), self.mapped_bytes) };
    }
}

// SAFETY: the base is page aligned, never moves, and `size_bytes` bytes are
// readable and writable, followed by at least the requested guard.
unsafe impl LinearMemory for MemfdMemory {
    fn byte_size(&self) -> usize {
        self.size_bytes
    }

    fn byte_capacity(&self) -> usize {
        self.capacity_bytes
    }

    fn grow_to(&mut self, new_size: usize) -> wasmtime::Result<()> {
        self.make_accessible(new_size)?;
        Ok(())
    }

    fn as_ptr(&self) -> *mut u8 {
        self.base
    }
}

/// Drops the private pages of `[ptr, ptr + len)`, so it reads the memfd again.
///
/// # Safety
/// The range must be (part of) a `MemfdMemory` mapping and no Wasm code or
/// host reference may be using it during the call.
pub unsafe fn discard_private_pages(ptr: *mut u8, len: usize) {
    if len == 0 {
        return;
    }
    // SAFETY: per the function contract the range is our private file mapping;
    // MADV_DONTNEED on it reverts pages to the file's contents.
    let rc = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTNEED) };
    assert_eq!(
        rc,
        0,
        "madvise(MADV_DONTNEED): {}",
        io::Error::last_os_error()
    );
}

/// Ranges per `process_madvise` call (the kernel's `UIO_MAXIOV`).
const DISCARD_RANGES_PER_CALL: usize = 1024;

/// Drops the private pages of many ranges in few system calls:
/// `process_madvise` on this process (any advice allowed since Linux 6.13,
/// one TLB flush per call), else one `madvise` per range.
pub struct Discarder {
    /// A pidfd of this process; `None` where pidfds or `process_madvise`
    /// are missing, or after a call failed.
    own_pid: Option<OwnedFd>,
    iovecs: Vec<libc::iovec>,
}

// SAFETY: the iovecs are scratch space, filled and used within one call.
unsafe impl Send for Discarder {}

impl Discarder {
    pub fn new() -> Discarder {
        // SAFETY: pidfd_open takes a pid and flags; a returned fd is checked
        // and then owned by `OwnedFd`.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        Discarder {
            // SAFETY: a fresh descriptor nobody else owns.
            own_pid: (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) }),
            iovecs: Vec::new(),
        }
    }

    /// Drops the private pages of each `[ptr + start, ptr + end)` of `runs`.
    ///
    /// # Safety
    /// As [`discard_private_pages`], for every run.
    pub unsafe fn discard(&mut self, ptr: *mut u8, runs: &[(usize, usize)]) {
        if let Some(pid) = &self.own_pid {
            let mut batched = true;
            for chunk in runs.chunks(DISCARD_RANGES_PER_CALL) {
                self.iovecs.clear();
                self.iovecs
                    .extend(chunk.iter().map(|&(start, end)| libc::iovec {
                        // SAFETY: inside the range per the function contract.
                        iov_base: unsafe { ptr.add(start) }.cast(),
                        iov_len: end - start,
                    }));
                let total: usize = chunk.iter().map(|&(start, end)| end - start).sum();
                // SAFETY: `iovecs` holds `chunk.len()` valid iovecs of our
                // own private file mapping, for which MADV_DONTNEED reverts
                // pages to the file's contents (the function contract).
                let advised = unsafe {
                    libc::syscall(
                        libc::SYS_process_madvise,
                        pid.as_raw_fd(),
                        self.iovecs.as_ptr(),
                        self.iovecs.len(),
                        libc::MADV_DONTNEED,
                        0,
                    )
                };
                if advised != total as libc::c_long {
                    batched = false;
                    break;
                }
            }
            if batched {
                return;
            }
            // Dropping a run twice is harmless: the retry below covers them all.
            self.own_pid = None;
        }
        for &(start, end) in runs {
            // SAFETY: per the function contract.
            unsafe { discard_private_pages(ptr.add(start), end - start) };
        }
    }
}

pub fn os_page_bytes() -> usize {
    // SAFETY: sysconf has no preconditions.
    let bytes = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    assert!(bytes > 0);
    bytes as usize
}

/// `struct uffdio_api` of `<linux/userfaultfd.h>`.
#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `_IOWR(0xAA, nr, T)`.
const fn uffd_ioctl<T>(nr: libc::c_ulong) -> libc::c_ulong {
    (3 << 30) | ((std::mem::size_of::<T>() as libc::c_ulong) << 16) | (0xAA << 8) | nr
}
const UFFD_API: u64 = 0xAA;
const UFFDIO_API: libc::c_ulong = uffd_ioctl::<UffdioApi>(0x3F);
const UFFDIO_REGISTER: libc::c_ulong = uffd_ioctl::<UffdioRegister>(0x00);
const UFFDIO_WRITEPROTECT: libc::c_ulong = uffd_ioctl::<UffdioWriteprotect>(0x06);
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// Only faults from user mode; allowed without privilege even where
/// `vm.unprivileged_userfaultfd` is 0. No fault is ever delivered here
/// anyway: write-protect faults are resolved by the kernel (`WP_ASYNC`).
const UFFD_USER_MODE_ONLY: libc::c_int = 1;
/// Linux 6.4+: reading a write-protected never-populated page keeps it
/// protected (markers), so only writes clear the protection.
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Linux 6.7+: a write to a protected page just clears its protection,
/// in the kernel, with no handler: the page-table bit records "written".
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

/// A userfaultfd used only to track writes: memory registered with it in
/// write-protect mode and protected loses the protection page by page as it
/// is written (`WP_ASYNC`, no fault handler), and `PAGEMAP_SCAN` lists
/// exactly those pages and protects them again. Available on Linux 6.7+
/// with userfaultfd enabled; [`Uffd::new`] is `None` elsewhere.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

impl Uffd {
    pub fn new() -> Option<Arc<Uffd>> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;
        // SAFETY: the syscall takes flags only; a returned fd is checked and
        // then owned by `OwnedFd`.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd < 0 {
            return None;
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) };
        let wanted = UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED;
        let mut api = UffdioApi {
            api: UFFD_API,
            features: wanted,
            ioctls: 0,
        };
        // SAFETY: `api` is a valid uffdio_api the kernel reads and writes.
        let rc = unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api) };
        if rc != 0 || api.features & wanted != wanted {
            return None;
        }
        Some(Arc::new(Uffd { fd }))
    }

    /// Registers `[ptr, ptr + len)` for write-protect tracking.
    fn register(&self, ptr: *mut u8, len: usize) -> io::Result<()> {
        let mut arg = UffdioRegister {
            range: UffdioRange {
                start: ptr as u64,
                len: len as u64,
            },
            mode: UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        // SAFETY: `arg` is a valid uffdio_register; the kernel only changes
        // the flags of our own mapping.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut arg) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Write-protects `[ptr, ptr + len)` of a registered range, populated or
    /// not. A private page protected here is no longer reported as written:
    /// call it only on ranges that hold none (just discarded or never
    /// accessible).
    pub fn write_protect(&self, ptr: *mut u8, len: usize) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let mut arg = UffdioWriteprotect {
            range: UffdioRange {
                start: ptr as u64,
                len: len as u64,
            },
            mode: UFFDIO_WRITEPROTECT_MODE_WP,
        };
        // SAFETY: `arg` is a valid uffdio_writeprotect; the kernel only
        // changes page-table bits of our own mapping, never its contents.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut arg) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Finds the pages of a `MemfdMemory` range written since they were last
/// discarded, from `/proc/self/pagemap`. Without pagemap, every page counts as
/// written (correct, only slower).
pub struct DirtyScanner {
    pagemap: Option<File>,
    /// Whether the `PAGEMAP_SCAN` ioctl works here (Linux 6.7+); it is tried
    /// once and the plain pagemap read is used when it fails.
    scan_ioctl: bool,
    page_bytes: usize,
    entries: Vec<u8>,
    regions: Vec<PageRegion>,
}

/// `struct page_region` of `<linux/fs.h>` (Linux 6.7+).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg` of `<linux/fs.h>` (Linux 6.7+); Debian 12's headers
/// and the libc crate do not declare it yet.
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// What a `PAGEMAP_SCAN` call asks for (fields of `pm_scan_arg`).
struct ScanQuery {
    flags: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16)
    | ((b'f' as libc::c_ulong) << 8)
    | 16;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
/// Write-protect the pages reported (and only those).
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
/// Fail (`EPERM`) on memory not registered for async write-protect, rather
/// than report its pages as unwritten.
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
/// Regions returned per `PAGEMAP_SCAN` call; the scan resumes where it
/// stopped when they run out.
const SCAN_REGIONS_PER_CALL: usize = 512;

const PAGEMAP_PRESENT: u64 = 1 << 63;
const PAGEMAP_SWAPPED: u64 = 1 << 62;
const PAGEMAP_FILE_OR_SHARED: u64 = 1 << 61;
const PAGEMAP_ENTRIES_PER_READ: usize = 8192;

/// What [`DirtyScanner::written_runs`] reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scanned {
    /// The pages written since the previous write-protect scan, all of them
    /// protected again: a page not reported has not been written since, even
    /// if it is a private copy.
    WrittenSinceLastScan,
    /// Every private copy (or, failing that, every page): a superset of the
    /// written pages, and nothing was protected again, so private copies must
    /// be dropped before the next scan can tell written pages apart.
    PrivateCopies,
}

impl DirtyScanner {
    pub fn new() -> DirtyScanner {
        DirtyScanner {
            pagemap: File::open("/proc/self/pagemap").ok(),
            scan_ioctl: true,
            page_bytes: os_page_bytes(),
            entries: vec![0; PAGEMAP_ENTRIES_PER_READ * 8],
            regions: vec![PageRegion::default(); SCAN_REGIONS_PER_CALL],
        }
    }

    /// The same as the pagemap read below, with the `PAGEMAP_SCAN` ioctl:
    /// the kernel returns only the matching runs (present or swapped, and not
    /// a file page), so the output follows the written pages; but deciding
    /// "file page" reads each present page's `struct page`, so the time
    /// still grows with the populated memory. `None` when the ioctl is not
    /// available.
    fn scan_runs(
        &mut self,
        pagemap: &File,
        ptr: *const u8,
        len: usize,
        runs: &mut Vec<(usize, usize)>,
    ) -> Option<()> {
        let private_copies = ScanQuery {
            flags: 0,
            category_inverted: PAGE_IS_FILE,
            category_mask: PAGE_IS_FILE,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        };
        self.scan(pagemap, ptr, len, &private_copies, runs)
    }

    /// On memory registered with a [`Uffd`]: the pages (present or swapped)
    /// whose write protection a write cleared, write-protected again by the
    /// same call. Only page-table bits are read, so the time follows the
    /// page tables (≈ 0.3 ms for 256 MiB), not the pages. `None` when the
    /// memory is not registered or the kernel lacks the ioctl.
    ///
    /// Every page whose bytes differ from the memfd is among them: only a
    /// write makes a page differ, a write clears the bit, and only this scan
    /// sets it again on a written page (after reporting it, and the caller
    /// then writes the page to the memfd, after which it equals the memfd
    /// again, whether the private copy is kept or dropped). Pages may be
    /// reported that do not differ (a page discarded while unprotected, then
    /// read: its bytes are the memfd's), which costs a needless write of equal
    /// bytes, never a wrong state.
    fn scan_tracked_runs(
        &mut self,
        pagemap: &File,
        ptr: *const u8,
        len: usize,
        runs: &mut Vec<(usize, usize)>,
    ) -> Option<()> {
        let written = ScanQuery {
            flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
            category_inverted: 0,
            category_mask: PAGE_IS_WRITTEN,
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_WRITTEN,
        };
        self.scan(pagemap, ptr, len, &written, runs)
    }

    fn scan(
        &mut self,
        pagemap: &File,
        ptr: *const u8,
        len: usize,
        query: &ScanQuery,
        runs: &mut Vec<(usize, usize)>,
    ) -> Option<()> {
        let base = ptr as u64;
        let end = base + len.next_multiple_of(self.page_bytes) as u64;
        let mut start = base;
        while start < end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: query.flags,
                start,
                end,
                walk_end: 0,
                vec: self.regions.as_mut_ptr() as u64,
                vec_len: self.regions.len() as u64,
                max_pages: 0,
                category_inverted: query.category_inverted,
                category_mask: query.category_mask,
                category_anyof_mask: query.category_anyof_mask,
                return_mask: query.return_mask,
            };
            // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to
            // `vec_len` writable page_region entries owned by `self`; the
            // kernel only reads (and with WP_MATCHING write-protects) our
            // page tables for `[start, end)`, never page contents.
            let found = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if found < 0 {
                return None;
            }
            for region in &self.regions[..found as usize] {
                let start = (region.start - base) as usize;
                let end = ((region.end - base) as usize).min(len);
                match runs.last_mut() {
                    Some((_, run_end)) if *run_end == start => *run_end = end,
                    _ => runs.push((start, end)),
                }
            }
            assert!(
                arg.walk_end > start || start >= end,
                "PAGEMAP_SCAN made no progress"
            );
            start = arg.walk_end;
        }
        Some(())
    }

    /// Appends to `runs` the written byte ranges of `[ptr, ptr + len)`, as
    /// offsets from `ptr`, merged into maximal runs. With `tracked` (the
    /// memory was made with a [`Uffd`]), the write-protect scan is tried
    /// first; it also protects the pages again, so the caller must write
    /// them where they belong before guest code runs. Whatever fails falls
    /// back to the next way (private copies, then every page).
    ///
    /// Returns [`Scanned::WrittenSinceLastScan`] only when the write-protect
    /// scan answered: then the runs are exactly the pages written since the
    /// previous such scan, and every page is protected again, so a later
    /// write to any of them is reported by the next scan.
    pub fn written_runs(
        &mut self,
        ptr: *const u8,
        len: usize,
        tracked: bool,
        runs: &mut Vec<(usize, usize)>,
    ) -> Scanned {
        runs.clear();
        if len == 0 {
            return Scanned::PrivateCopies;
        }
        let Some(pagemap) = self.pagemap.take() else {
            runs.push((0, len));
            return Scanned::PrivateCopies;
        };
        if tracked && self.scan_ioctl {
            if self.scan_tracked_runs(&pagemap, ptr, len, runs).is_some() {
                self.pagemap = Some(pagemap);
                return Scanned::WrittenSinceLastScan;
            }
            // Pages a partial scan protected are still private copies, so
            // the scan below reports them.
            runs.clear();
        }
        if self.scan_ioctl {
            let scanned = self.scan_runs(&pagemap, ptr, len, runs);
            if scanned.is_some() {
                self.pagemap = Some(pagemap);
                return Scanned::PrivateCopies;
            }
            self.scan_ioctl = false;
            runs.clear();
        }
        self.read_runs(&pagemap, ptr, len, runs);
        self.pagemap = Some(pagemap);
        Scanned::PrivateCopies
    }

    /// Finds the runs by reading one pagemap entry per page.
    fn read_runs(
        &mut self,
        pagemap: &File,
        ptr: *const u8,
        len: usize,
        runs: &mut Vec<(usize, usize)>,
    ) {
        let pages = len.div_ceil(self.page_bytes);
        let first_page = ptr as usize / self.page_bytes;
        let mut page = 0;
        while page < pages {
            let count = (pages - page).min(PAGEMAP_ENTRIES_PER_READ);
            let buf = &mut self.entries[..count * 8];
            if pagemap
                .read_exact_at(buf, ((first_page + page) * 8) as u64)
                .is_err()
            {
                runs.clear();
                runs.push((0, len));
                return;
            }
            for (i, entry) in buf.chunks_exact(8).enumerate() {
                let bits = u64::from_le_bytes(entry.try_into().unwrap());
                let private_copy =
                    bits & PAGEMAP_PRESENT != 0 && bits & PAGEMAP_FILE_OR_SHARED == 0;
                if private_copy || bits & PAGEMAP_SWAPPED != 0 {
                    let start = (page + i) * self.page_bytes;
                    let end = (start + self.page_bytes).min(len);
                    match runs.last_mut() {
                        Some((_, run_end)) if *run_end == start => *run_end = end,
                        _ => runs.push((start, end)),
                    }
                }
            }
            page += count;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both scanners find exactly the pages written through a private view,
    /// not the ones only read, in merged runs.
    #[test]
    fn scanners_find_exactly_the_written_pages() {
        let page = os_page_bytes();
        let memfd = Memfd::new(64 * page).unwrap();
        memfd.write_at(5 * page, &[9; 8]).unwrap();
        let memory = MemfdMemory::new(memfd, None, 64 * page, None, 0).unwrap();
        let ptr = memory.as_ptr();
        // SAFETY: offsets inside the 64 accessible pages of our own mapping.
        unsafe {
            for written in [1, 2, 3, 7, 40] {
                *ptr.add(written * page + 17) = 1;
            }
            for read in [0, 5, 6, 41] {
                assert_eq!(*ptr.add(read * page), if read == 5 { 9 } else { 0 });
            }
        }
        let expected = vec![
            (page, 4 * page),
            (7 * page, 8 * page),
            (40 * page, 41 * page),
        ];
        let mut scanner = DirtyScanner::new();
        let pagemap = scanner
            .pagemap
            .take()
            .expect("/proc/self/pagemap is readable");
        let mut runs = Vec::new();
        scanner.read_runs(&pagemap, ptr, 64 * page, &mut runs);
        assert_eq!(runs, expected);
        runs.clear();
        if scanner
            .scan_runs(&pagemap, ptr, 64 * page, &mut runs)
            .is_some()
        {
            assert_eq!(runs, expected);
        } else {
            eprintln!(
                "PAGEMAP_SCAN is not available on this kernel; only the pagemap read was checked"
            );
        }
        scanner.pagemap = Some(pagemap);
        scanner.written_runs(ptr, 64 * page, false, &mut runs);
        assert_eq!(runs, expected);
    }

    /// On memory tracked with a `Uffd`, the scan reports exactly the pages
    /// written since the previous scan (not those only read, before or after
    /// a discard), including pages of grown memory.
    #[test]
    fn tracked_scan_finds_exactly_the_pages_written_since_the_last_scan() {
        let Some(uffd) = Uffd::new() else {
            eprintln!("userfaultfd WP_ASYNC is not available here; nothing to check");
            return;
        };
        let page = os_page_bytes();
        let memfd = Memfd::new(64 * page).unwrap();
        memfd.write_at(5 * page, &[9; 8]).unwrap();
        let mut memory = MemfdMemory::new(memfd.clone(), Some(uffd), 32 * page, None, 0).unwrap();
        assert!(
            memory.tracker.is_some(),
            "a MAP_PRIVATE memfd view registers"
        );
        let ptr = memory.as_ptr();
        let mut scanner = DirtyScanner::new();
        let mut runs = Vec::new();
        let scan = |scanner: &mut DirtyScanner, len: usize| {
            let pagemap = scanner.pagemap.take().unwrap();
            let mut runs = Vec::new();
            scanner
                .scan_tracked_runs(&pagemap, ptr, len, &mut runs)
                .expect("PAGEMAP_SCAN on tracked memory");
            scanner.pagemap = Some(pagemap);
            runs
        };
        // SAFETY: offsets inside the accessible pages of our own mapping; no
        // reference into it outlives a statement.
        unsafe {
            assert_eq!(*ptr.add(5 * page), 9);
            assert_eq!(*ptr.add(6 * page), 0);
            *ptr.add(page) = 1;
            *ptr.add(2 * page + 9) = 1;
            *ptr.add(5 * page) = 10;
        }
        assert_eq!(
            scan(&mut scanner, 32 * page),
            vec![(page, 3 * page), (5 * page, 6 * page)]
        );
        assert_eq!(scan(&mut scanner, 32 * page), vec![], "protected again");
        // A checkpoint: into the memfd, then discarded.
        // SAFETY: as above.
        unsafe {
            memfd
                .write_at(page, std::slice::from_raw_parts(ptr.add(page), 5 * page))
                .unwrap();
            discard_private_pages(ptr.add(page), 5 * page);
            assert_eq!(*ptr.add(5 * page), 10, "reads the memfd again");
            assert_eq!(*ptr.add(2 * page + 9), 1);
        }
        assert_eq!(scan(&mut scanner, 32 * page), vec![], "reads are no writes");
        memory.grow_to(64 * page).unwrap();
        // SAFETY: as above, in the grown part too.
        unsafe {
            assert_eq!(*ptr.add(40 * page), 0);
            *ptr.add(2 * page) = 3;
            *ptr.add(50 * page) = 3;
        }
        assert_eq!(
            scan(&mut scanner, 64 * page),
            vec![(2 * page, 3 * page), (50 * page, 51 * page)]
        );
        scanner.written_runs(ptr, 64 * page, true, &mut runs);
        assert_eq!(runs, vec![]);
        // SAFETY: as above.
        unsafe { *ptr.add(63 * page) = 1 };
        scanner.written_runs(ptr, 64 * page, true, &mut runs);
        assert_eq!(runs, vec![(63 * page, 64 * page)]);
    }
}
