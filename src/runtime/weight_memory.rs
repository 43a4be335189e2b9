//! Memory for weights laid out at load, moved into transparent huge pages after the first
//! caption where Linux offers them (issue #15).
//!
//! A decoder step reads ~137 MB of int8 weights once each, a memory stream whose speed on one
//! core is set as much by address translation as by DRAM: in 4 KiB pages the stream crosses
//! ~34,000 pages per token. Measured on an AMD EPYC (Zen 3) VM, a plain AVX2 read of 136 MB took
//! 10.3–11.7 ms in 4 KiB pages and 8.0–8.6 ms after `madvise(MADV_COLLAPSE)` (best of 10, three
//! runs). Huge pages from the start (`MADV_HUGEPAGE` before the weights are written) gave the
//! same speed but made the load 130–600 ms slower and its peak memory 20–40 MiB higher here
//! (a fresh huge page is slow to fault in under this VM's free-page reporting), so the weights
//! are written in ordinary pages and collapsed afterwards, by [`collapse_in_background`] on a
//! low-priority thread once a caption is out, or [`collapse`] (the bench, before it times).
//! Collapsing keeps every address: captions running meanwhile read the same bytes.
//!
//! Only whole aligned huge pages can be collapsed, and a 0.6 MB matrix on its own holds none, so
//! matrices are carved from pooled mappings ("chunks") of 64 MiB aligned to the huge-page size,
//! 64-byte aligned inside; a chunk is unmapped when the last matrix carved from it is dropped.
//! Only the whole huge pages a chunk has handed out are collapsed, so no memory is added (a chunk
//! is never reused: a dropped model's part of a chunk another model still uses stays resident
//! until that one is dropped too; the node loads one model for its lifetime). Only the weights
//! laid out here move: x86-64 AVX2's (`int8_gemv`); rten-gemm's packed ones (aarch64, VNNI's
//! encoder) stay where rten-gemm put them. Where THP is off (`enabled` = `never`) nothing is
//! collapsed: `MADV_COLLAPSE` would ignore that setting, and it is the administrator's.
//! Elsewhere (other systems, `VITGPT2_HUGE_PAGES=0`, a mapping refused, Linux before 6.1) the
//! same bytes stay in ordinary pages: the same results, the old speed.

use std::ops::{Deref, DerefMut};
#[cfg(target_os = "linux")]
use std::sync::atomic::{AtomicUsize, Ordering};
#[cfg(target_os = "linux")]
use std::sync::{Arc, Mutex, Weak};
use std::sync::OnceLock;
use std::time::Instant;

/// Bytes per pooled mapping; larger buffers (a 50,000-word LM head) get a mapping of their own.
#[cfg(target_os = "linux")]
const CHUNK: usize = 64 << 20;
/// Alignment of each buffer inside a chunk (a cache line; the kernels load unaligned anyway).
#[cfg(target_os = "linux")]
const ALIGN: usize = 64;
/// `madvise` advice: collapse the range into huge pages now, synchronously (Linux 6.1,
/// include/uapi/asm-generic/mman-common.h; the libc crate names it only for glibc targets).
#[cfg(target_os = "linux")]
const MADV_COLLAPSE: libc::c_int = 25;

/// A zero-initialized byte buffer for weights, carved from a pooled mapping where possible.
pub struct WeightBuf {
    inner: Inner,
}

enum Inner {
    Heap(Vec<i8>),
    #[cfg(target_os = "linux")]
    Mapped { chunk: Arc<Chunk>, offset: usize, len: usize },
}

impl WeightBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        #[cfg(target_os = "linux")]
        if len > 0 && enabled() {
            if let Some((chunk, offset)) = carve(len) {
                return WeightBuf { inner: Inner::Mapped { chunk, offset, len } };
            }
        }
        WeightBuf { inner: Inner::Heap(vec![0; len]) }
    }

    /// Whether the buffer lies in a pooled mapping (so [`collapse`] can move it to huge pages).
    pub fn in_chunk(&self) -> bool {
        !matches!(self.inner, Inner::Heap(_))
    }
}

impl Deref for WeightBuf {
    type Target = [i8];
    fn deref(&self) -> &[i8] {
        match &self.inner {
            Inner::Heap(v) => v,
            // Safety: `offset..offset + len` lies inside the chunk's live mapping (checked when
            // carved), is owned by this buffer alone, and the Arc keeps the mapping alive.
            #[cfg(target_os = "linux")]
            Inner::Mapped { chunk, offset, len } => unsafe { std::slice::from_raw_parts(chunk.ptr.add(*offset).cast(), *len) },
        }
    }
}

impl DerefMut for WeightBuf {
    fn deref_mut(&mut self) -> &mut [i8] {
        match &mut self.inner {
            Inner::Heap(v) => v,
            // Safety: as in `deref`; no other buffer's range overlaps this one, and `&mut self`
            // makes this the only access to it.
            #[cfg(target_os = "linux")]
            Inner::Mapped { chunk, offset, len } => unsafe { std::slice::from_raw_parts_mut(chunk.ptr.add(*offset).cast(), *len) },
        }
    }
}

impl std::fmt::Debug for WeightBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "WeightBuf({} bytes{})", self.len(), if self.in_chunk() { ", pooled mapping" } else { "" })
    }
}

// Safety: a `Heap` buffer is a Vec; a `Mapped` one is plain memory that no other buffer's range
// overlaps, reached only through this buffer.
unsafe impl Send for WeightBuf {}
unsafe impl Sync for WeightBuf {}

/// Whether buffers go to pooled mappings (`VITGPT2_HUGE_PAGES=0` keeps them on the heap, to
/// compare).
#[cfg(target_os = "linux")]
fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("VITGPT2_HUGE_PAGES").as_deref() != Ok("0"))
}

/// What [`collapse`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Collapsed {
    /// Bytes of weights in huge pages now (this call's and earlier ones', live chunks only).
    pub bytes: usize,
    /// Milliseconds this call took.
    pub ms: f64,
}

/// Moves the weights carved so far into huge pages (`madvise(MADV_COLLAPSE)`, whole huge pages
/// only), on the calling thread; pages collapsed before are left alone. Best effort: where the
/// kernel refuses (Linux before 6.1, THP unavailable, no free huge page) the weights stay where
/// they are and the refusal is logged once.
pub fn collapse() -> Collapsed {
    let t0 = Instant::now();
    #[cfg(target_os = "linux")]
    let bytes = collapse_chunks();
    #[cfg(not(target_os = "linux"))]
    let bytes = 0;
    Collapsed { bytes, ms: t0.elapsed().as_secs_f64() * 1e3 }
}

/// [`collapse`] on a thread of its own at the lowest priority (nice 19), so that it takes a
/// core only when nothing else wants it (each huge page briefly takes the process's memory-map
/// lock, as any `mmap` does); does nothing when there is nothing new to collapse.
/// The node calls it after its first caption: a cold start's first caption never waits for it.
pub fn collapse_in_background() {
    #[cfg(target_os = "linux")]
    {
        if !pending() {
            return;
        }
        let spawned = std::thread::Builder::new().name("vitgpt2-hugepages".into()).spawn(|| {
            // Safety: setpriority only sets a number; on Linux `who = 0` is the calling thread.
            unsafe {
                libc::setpriority(libc::PRIO_PROCESS, 0, 19);
            }
            let done = collapse();
            tracing::debug!(mib = done.bytes >> 20, ms = done.ms, "weights collapsed into huge pages");
        });
        if let Err(e) = spawned {
            tracing::debug!("huge pages: cannot start the collapsing thread: {e}");
        }
    }
}

/// An anonymous private mapping aligned to the huge-page size.
#[cfg(target_os = "linux")]
struct Chunk {
    ptr: *mut u8,
    len: usize,
    /// Bytes handed out from the start.
    used: AtomicUsize,
    /// Bytes from the start already tried (whole huge pages).
    collapsed: AtomicUsize,
    /// Bytes of those the kernel did move into huge pages.
    in_huge_pages: AtomicUsize,
}

// Safety: the mapping is plain memory; buffers carved from it never overlap, and each is reached
// only through its own `WeightBuf`.
#[cfg(target_os = "linux")]
unsafe impl Send for Chunk {}
#[cfg(target_os = "linux")]
unsafe impl Sync for Chunk {}

#[cfg(target_os = "linux")]
impl Drop for Chunk {
    fn drop(&mut self) {
        // Safety: `ptr..ptr + len` is the mapping `Chunk::map` made, unmapped once, here.
        unsafe {
            libc::munmap(self.ptr.cast(), self.len);
        }
    }
}

/// Every chunk mapped so far (held weakly: dropping every model frees them).
#[cfg(target_os = "linux")]
static CHUNKS: Mutex<Vec<Weak<Chunk>>> = Mutex::new(Vec::new());

#[cfg(target_os = "linux")]
impl Chunk {
    /// A fresh mapping of `len` bytes (rounded up to whole huge pages), or `None` where the
    /// kernel refuses it.
    fn map(len: usize) -> Option<Arc<Chunk>> {
        let huge = huge_page_size();
        let len = len.div_ceil(huge) * huge;
        // Map one huge page more than asked, then unmap the unaligned head and the tail.
        let span = len + huge;
        // Safety: an anonymous mapping at an address of the kernel's choosing; checked below.
        let raw = unsafe { libc::mmap(std::ptr::null_mut(), span, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if raw == libc::MAP_FAILED {
            return None;
        }
        let start = raw as usize;
        let aligned = start.div_ceil(huge) * huge;
        // Safety: both ranges lie inside the mapping just made and are never used.
        unsafe {
            if aligned > start {
                libc::munmap(raw, aligned - start);
            }
            let end = aligned + len;
            if start + span > end {
                libc::munmap(end as *mut libc::c_void, start + span - end);
            }
        }
        let chunk = Arc::new(Chunk { ptr: aligned as *mut u8, len, used: AtomicUsize::new(0), collapsed: AtomicUsize::new(0), in_huge_pages: AtomicUsize::new(0) });
        let mut all = CHUNKS.lock().unwrap_or_else(|p| p.into_inner());
        all.retain(|c| c.strong_count() > 0);
        all.push(Arc::downgrade(&chunk));
        Some(chunk)
    }

    /// The whole huge pages handed out and not yet tried.
    fn uncollapsed(&self) -> std::ops::Range<usize> {
        let huge = huge_page_size();
        self.collapsed.load(Ordering::Acquire)..self.used.load(Ordering::Acquire) / huge * huge
    }
}

/// The huge-page size THP uses here (2 MiB on x86-64; 32 MiB on arm64 kernels with 16 KiB
/// pages), from `/sys/kernel/mm/transparent_hugepage/hpage_pmd_size`.
#[cfg(target_os = "linux")]
fn huge_page_size() -> usize {
    static SIZE: OnceLock<usize> = OnceLock::new();
    *SIZE.get_or_init(|| {
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .filter(|s| s.is_power_of_two() && *s >= 4096)
            .unwrap_or(2 << 20)
    })
}

/// The chunk being filled.
#[cfg(target_os = "linux")]
static CURRENT: Mutex<Weak<Chunk>> = Mutex::new(Weak::new());

/// `len` bytes from the current chunk, a new one, or (large) a mapping of their own.
#[cfg(target_os = "linux")]
fn carve(len: usize) -> Option<(Arc<Chunk>, usize)> {
    let chunk_len = CHUNK.max(huge_page_size());
    if len > chunk_len / 2 {
        let chunk = Chunk::map(len)?;
        chunk.used.store(len, Ordering::Release);
        return Some((chunk, 0));
    }
    let mut current = CURRENT.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(chunk) = current.upgrade() {
        let offset = chunk.used.load(Ordering::Acquire).div_ceil(ALIGN) * ALIGN;
        if offset + len <= chunk.len {
            chunk.used.store(offset + len, Ordering::Release);
            return Some((chunk, offset));
        }
    }
    let chunk = Chunk::map(chunk_len)?;
    chunk.used.store(len, Ordering::Release);
    *current = Arc::downgrade(&chunk);
    Some((chunk, 0))
}

/// The live chunks.
#[cfg(target_os = "linux")]
fn live_chunks() -> Vec<Arc<Chunk>> {
    CHUNKS.lock().unwrap_or_else(|p| p.into_inner()).iter().filter_map(Weak::upgrade).collect()
}

/// Whether some chunk has whole huge pages not yet tried, and THP is not turned off.
#[cfg(target_os = "linux")]
fn pending() -> bool {
    thp_allowed() && live_chunks().iter().any(|c| !c.uncollapsed().is_empty())
}

/// Whether THP is not `never` (`/sys/kernel/mm/transparent_hugepage/enabled`; absent: a kernel
/// without THP, where `madvise` refuses anyway).
#[cfg(target_os = "linux")]
fn thp_allowed() -> bool {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").map_or(true, |s| !s.contains("[never]"))
}

/// Collapses what [`pending`] finds, a huge page at a time (a refusal for one, e.g. no free huge
/// page, leaves the others moved); returns the bytes in huge pages afterwards.
#[cfg(target_os = "linux")]
fn collapse_chunks() -> usize {
    // One collapse at a time (the bench's and a background one would only compete).
    static ONE: Mutex<()> = Mutex::new(());
    static REFUSED: std::sync::Once = std::sync::Once::new();
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let huge = huge_page_size();
    let allowed = thp_allowed();
    let mut bytes = 0;
    for chunk in live_chunks() {
        let range = chunk.uncollapsed();
        if allowed && !range.is_empty() {
            for start in range.clone().step_by(huge) {
                // Safety: the page lies inside the chunk's live mapping (the Arc holds it);
                // collapsing keeps every address and byte, so buffers in use stay valid.
                let rc = unsafe { libc::madvise(chunk.ptr.add(start).cast(), huge, MADV_COLLAPSE) };
                if rc == 0 {
                    chunk.in_huge_pages.fetch_add(huge, Ordering::AcqRel);
                } else {
                    let err = std::io::Error::last_os_error();
                    REFUSED.call_once(|| tracing::info!("huge pages: the kernel refused to collapse some weights ({err}); those stay in 4 KiB pages"));
                }
            }
            chunk.collapsed.store(range.end, Ordering::Release);
        }
        bytes += chunk.in_huge_pages.load(Ordering::Acquire);
    }
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_disjoint_and_survive_collapse() {
        let mut bufs: Vec<WeightBuf> = [1, 600_000, 3, 40 << 20, 2_359_296, 0, 5 << 20].iter().map(|&n| WeightBuf::zeroed(n)).collect();
        for (i, b) in bufs.iter_mut().enumerate() {
            assert!(b.iter().all(|&x| x == 0));
            b.iter_mut().enumerate().for_each(|(j, x)| *x = (i * 7 + j % 251) as i8);
        }
        let done = collapse();
        for (i, b) in bufs.iter().enumerate() {
            assert!(b.iter().enumerate().all(|(j, &x)| x == (i * 7 + j % 251) as i8), "buffer {i} changed");
            if b.in_chunk() {
                assert_eq!(b.as_ptr() as usize % ALIGN, 0);
            }
        }
        #[cfg(target_os = "linux")]
        if enabled() {
            assert!(bufs[1].in_chunk() && bufs[3].in_chunk());
            // 40 MiB of its own: its whole huge pages at least (19 of 2 MiB; one of 32 MiB on
            // arm64 with 16 KiB pages), unless the kernel refused or THP is off.
            let whole = (40 << 20) / huge_page_size() * huge_page_size();
            assert!(done.bytes == 0 || done.bytes >= whole, "{done:?}");
        }
        drop(bufs);
    }
}
