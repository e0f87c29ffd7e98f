//! Point-in-time snapshot images that cost the machine a short pause.
//!
//! The machine keeps *shadows*: memfds that each hold the memory of an
//! earlier image, plus the set of pages the base has been changed in since
//! (every checkpoint marks the runs it writes). Taking an image checkpoints,
//! copies only the stale pages base → shadow, and hands out the shadow
//! (shared, read-only from then on) with the header. The image is written out
//! later, on any thread, while the machine keeps applying: the machine never
//! writes a shadow that an image still holds.
//!
//! When every shadow is still held (images taken faster than they are
//! written), the machine makes a new shadow with a full copy rather than
//! waiting: a wait would stall the apply loop until another thread finishes
//! its disk write, a full copy only costs memory bandwidth. Up to
//! [`SHADOWS_MAX`] shadows are kept; beyond that, the full copy is a one-off
//! that is dropped with its image.
//!
//! Invariant of a kept shadow: its bytes equal the base's at every page not in
//! `stale`, and are zero beyond the base's memory size (as the base's are).

use std::io::{self, Read, Write};
use std::sync::Arc;

use super::memory::{os_page_bytes, Memfd};
use super::snapshot::{encode_header, kind_of_tag, GlobalValue, SnapshotDecodeError};
use super::{EntryContext, ModuleId};

/// Shadows kept between images. One serves a caller that writes each image
/// before taking the next; the second lets one image still be written while
/// the next is taken, without a full copy. Each costs up to the memory size
/// in RAM, only once it was needed.
pub const SHADOWS_MAX: usize = 2;

/// Bytes read from the shadow per write into the sink, and read from the
/// source per step of a streaming restore.
pub const IMAGE_CHUNK_BYTES: usize = 1 << 20;

/// A point-in-time image of a machine's state, in the encoding of
/// [`super::Snapshot::to_bytes`]. Taking it paused the machine only to copy
/// the pages changed since the previous image; writing it out reads memory
/// that the machine no longer changes.
pub struct SnapshotImage {
    module_id: ModuleId,
    /// The encoding up to and including the memory length.
    header: Vec<u8>,
    memory: Arc<Memfd>,
    memory_bytes: usize,
}

impl std::fmt::Debug for SnapshotImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotImage")
            .field("module_id", &self.module_id)
            .field("memory_bytes", &self.memory_bytes)
            .finish_non_exhaustive()
    }
}

impl SnapshotImage {
    pub(super) fn new(
        module_id: ModuleId,
        last_entry: EntryContext,
        globals: &[GlobalValue],
        memory: Arc<Memfd>,
        memory_bytes: usize,
    ) -> SnapshotImage {
        SnapshotImage {
            module_id,
            header: encode_header(module_id, last_entry, globals, memory_bytes as u64),
            memory,
            memory_bytes,
        }
    }

    pub fn module_id(&self) -> ModuleId {
        self.module_id
    }

    /// Bytes [`SnapshotImage::write_to`] writes.
    pub fn encoded_len(&self) -> u64 {
        (self.header.len() + self.memory_bytes) as u64
    }

    /// Writes exactly the bytes `Snapshot::to_bytes()` gives for the state at
    /// the time the image was taken.
    pub fn write_to(&self, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(&self.header)?;
        let mut buffer = vec![0u8; IMAGE_CHUNK_BYTES.min(self.memory_bytes)];
        let mut offset = 0;
        while offset < self.memory_bytes {
            let len = (self.memory_bytes - offset).min(buffer.len());
            self.memory.read_at(offset, &mut buffer[..len])?;
            out.write_all(&buffer[..len])?;
            offset += len;
        }
        Ok(())
    }
}

/// Copies the byte ranges `runs` of `from` into `to`: in the kernel
/// (`copy_file_range`) where it can, else through `buffer` (`pread` +
/// `pwrite`, at most [`IMAGE_CHUNK_BYTES`] at a time). Reading the memfd
/// rather than an instance's mapping of it takes no page fault per page (a
/// tracked mapping faults in one page at a time: userfaultfd turns off
/// fault-around).
pub(super) fn copy_runs(
    from: &Memfd,
    to: &Memfd,
    runs: &[(usize, usize)],
    buffer: &mut Vec<u8>,
) -> io::Result<()> {
    for &(start, end) in runs {
        if from.copy_range_to(to, start, end)? {
            continue;
        }
        let mut offset = start;
        while offset < end {
            let len = (end - offset).min(IMAGE_CHUNK_BYTES);
            if buffer.len() < len {
                buffer.resize(len, 0);
            }
            from.read_at(offset, &mut buffer[..len])?;
            to.write_at(offset, &buffer[..len])?;
            offset += len;
        }
    }
    Ok(())
}

/// A memfd holding the memory of an earlier image.
pub(super) struct Shadow {
    pub memfd: Arc<Memfd>,
    /// Pages of the base changed since this shadow was last brought up to date.
    pub stale: PageSet,
}

/// A set of OS pages of linear memory, as a bitmap (8 KiB per 256 MiB).
pub(super) struct PageSet {
    page_bytes: usize,
    words: Vec<u64>,
    /// Pages in the set.
    pages: usize,
}

impl PageSet {
    pub fn new(bytes_max: usize) -> PageSet {
        let page_bytes = os_page_bytes();
        PageSet {
            page_bytes,
            words: vec![0; bytes_max.div_ceil(page_bytes).div_ceil(64)],
            pages: 0,
        }
    }

    /// Adds every page overlapping `[start, end)`.
    pub fn mark(&mut self, start: usize, end: usize) {
        for page in start / self.page_bytes..end.div_ceil(self.page_bytes) {
            let (word, bit) = (&mut self.words[page / 64], 1 << (page % 64));
            self.pages += usize::from(*word & bit == 0);
            *word |= bit;
        }
    }

    /// Bytes of the pages in the set.
    pub fn bytes(&self) -> usize {
        self.pages * self.page_bytes
    }

    /// Empties the set.
    pub fn clear(&mut self) {
        if self.pages > 0 {
            self.words.fill(0);
            self.pages = 0;
        }
    }

    /// Moves the set into `runs` as merged byte ranges clipped to
    /// `[0, len)`, and empties it.
    pub fn drain_runs(&mut self, len: usize, runs: &mut Vec<(usize, usize)>) {
        runs.clear();
        self.pages = 0;
        for (index, word) in self.words.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                let page = index * 64 + bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let start = page * self.page_bytes;
                let end = (start + self.page_bytes).min(len);
                if start >= end {
                    continue;
                }
                match runs.last_mut() {
                    Some((_, run_end)) if *run_end == start => *run_end = end,
                    _ => runs.push((start, end)),
                }
            }
        }
    }
}

/// Why a snapshot stream could not be read.
pub(super) enum StreamError {
    Decode(SnapshotDecodeError),
    Io(io::Error),
}

/// Fills `buf` from `r`; a stream that ends first is a truncated snapshot.
pub(super) fn read_exact(r: &mut dyn Read, buf: &mut [u8]) -> Result<(), StreamError> {
    r.read_exact(buf).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            StreamError::Decode(SnapshotDecodeError("truncated"))
        } else {
            StreamError::Io(e)
        }
    })
}

/// Reads one encoded global.
pub(super) fn read_global(r: &mut dyn Read) -> Result<GlobalValue, StreamError> {
    let mut bytes = [0u8; 17];
    read_exact(r, &mut bytes)?;
    let kind = kind_of_tag(bytes[0]).map_err(StreamError::Decode)?;
    let bits = u128::from_le_bytes(bytes[1..].try_into().unwrap());
    Ok(GlobalValue { kind, bits })
}

/// Succeeds when `r` has no byte left.
pub(super) fn expect_end(r: &mut dyn Read) -> Result<(), StreamError> {
    let mut byte = [0u8; 1];
    loop {
        match r.read(&mut byte) {
            Ok(0) => return Ok(()),
            Ok(_) => return Err(StreamError::Decode(SnapshotDecodeError("trailing bytes"))),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(StreamError::Io(e)),
        }
    }
}

/// The byte ranges of `chunk` that are not all zero, at page granularity,
/// merged; a fresh memfd reads zero elsewhere, so only these need writing.
pub(super) fn nonzero_runs(chunk: &[u8], page_bytes: usize, runs: &mut Vec<(usize, usize)>) {
    runs.clear();
    for (i, page) in chunk.chunks(page_bytes).enumerate() {
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        let start = i * page_bytes;
        let end = start + page.len();
        match runs.last_mut() {
            Some((_, run_end)) if *run_end == start => *run_end = end,
            _ => runs.push((start, end)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_set_drains_merged_runs_clipped_to_the_length() {
        let page = os_page_bytes();
        let mut set = PageSet::new(200 * page);
        set.mark(3 * page + 5, 3 * page + 6);
        set.mark(4 * page, 6 * page);
        set.mark(63 * page, 65 * page + 1);
        set.mark(150 * page, 151 * page);
        let mut runs = Vec::new();
        set.drain_runs(100 * page, &mut runs);
        assert_eq!(runs, vec![(3 * page, 6 * page), (63 * page, 66 * page)]);
        set.drain_runs(200 * page, &mut runs);
        assert_eq!(runs, vec![], "draining empties the set");
    }

    #[test]
    fn nonzero_runs_skip_zero_pages() {
        let mut chunk = vec![0u8; 10 * 4096 + 100];
        chunk[4096 + 7] = 1;
        chunk[2 * 4096] = 1;
        chunk[10 * 4096 + 99] = 1;
        let mut runs = Vec::new();
        nonzero_runs(&chunk, 4096, &mut runs);
        assert_eq!(runs, vec![(4096, 3 * 4096), (10 * 4096, 10 * 4096 + 100)]);
    }

    #[test]
    fn image_is_send_and_static() {
        fn assert_send_static<T: Send + 'static>() {}
        assert_send_static::<SnapshotImage>();
    }
}
