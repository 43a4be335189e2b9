//! One helper thread that stays awake between the small jobs of a decoder step, so that a
//! memory-bound product can read its weights with two cores. rayon's workers fall asleep
//! between a token's ~100 products, and waking one for each cost more than the second core's
//! bandwidth brought (README "Performance": a token 19 → 27 ms split through rayon). This
//! thread spins for [`SPIN`] after each job (a step's products are tens of microseconds
//! apart), then parks until the next.

use std::any::Any;
use std::ops::Range;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, TryLockError};
use std::time::{Duration, Instant};

/// How long the helper spins for the next job before it parks: longer than the gaps inside a
/// caption (between a step's products, between steps), shorter than the gap between captions.
const SPIN: Duration = Duration::from_millis(2);

type Job<'a> = dyn Fn() + Sync + 'a;

struct Shared {
    /// The job: a `*const &Job`, valid until `done` reaches the `posted` it came with.
    job: AtomicPtr<()>,
    posted: AtomicUsize,
    done: AtomicUsize,
    /// Set while the helper waits on `wake` rather than spinning.
    parked: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
    /// A panic of the last job, handed back to the caller.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

struct Helper {
    shared: &'static Shared,
    /// One caller at a time (tests run graphs on several threads at once).
    caller: Mutex<()>,
}

fn helper() -> Option<&'static Helper> {
    static HELPER: OnceLock<Option<Helper>> = OnceLock::new();
    HELPER
        .get_or_init(|| {
            // On one core a spinning helper would only take turns with the caller.
            if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
                return None;
            }
            let shared: &'static Shared = Box::leak(Box::new(Shared {
                job: AtomicPtr::new(std::ptr::null_mut()),
                posted: AtomicUsize::new(0),
                done: AtomicUsize::new(0),
                parked: AtomicBool::new(false),
                lock: Mutex::new(()),
                wake: Condvar::new(),
                panic: Mutex::new(None),
            }));
            // No helper (the caller runs both halves) if the thread cannot start.
            std::thread::Builder::new().name("vitgpt2-helper".into()).spawn(move || serve(shared)).ok()?;
            Some(Helper { shared, caller: Mutex::new(()) })
        })
        .as_ref()
}

fn serve(s: &'static Shared) {
    let mut seen = 0;
    loop {
        let since = Instant::now();
        let mut n = 0u32;
        while s.posted.load(Ordering::Acquire) == seen {
            n = n.wrapping_add(1);
            if n % 1024 == 0 && since.elapsed() > SPIN {
                let mut guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
                s.parked.store(true, Ordering::SeqCst);
                while s.posted.load(Ordering::SeqCst) == seen {
                    guard = s.wake.wait(guard).unwrap_or_else(|e| e.into_inner());
                }
                s.parked.store(false, Ordering::SeqCst);
            } else {
                std::hint::spin_loop();
            }
        }
        seen = s.posted.load(Ordering::Acquire);
        // Safety: the caller keeps the job alive until `done` reaches `seen` (see `join`).
        let job = unsafe { &**(s.job.load(Ordering::Acquire) as *const &Job) };
        if let Err(p) = catch_unwind(AssertUnwindSafe(job)) {
            *s.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(p);
        }
        s.done.store(seen, Ordering::Release);
    }
}

/// Runs `a` on the calling thread and `b` on the helper at the same time, and returns when
/// both are done (a panic in either is resumed here). Where the helper is busy with another
/// caller, could not start or would share a single core, runs both here, one after the other.
pub fn join(a: impl FnOnce(), b: impl Fn() + Sync) {
    let Some(h) = helper() else {
        a();
        b();
        return;
    };
    // A panic resumed below poisons `caller` as it unwinds; the helper is fine (it caught it).
    let _only = match h.caller.try_lock() {
        Ok(g) => g,
        Err(TryLockError::Poisoned(p)) => p.into_inner(),
        Err(TryLockError::WouldBlock) => {
            a();
            b();
            return;
        }
    };
    let s = h.shared;
    let job: &Job = &b;
    s.job.store(&job as *const &Job as *mut (), Ordering::Release);
    let ticket = s.posted.fetch_add(1, Ordering::SeqCst) + 1;
    if s.parked.load(Ordering::SeqCst) {
        let _guard = s.lock.lock().unwrap_or_else(|e| e.into_inner());
        s.wake.notify_one();
    }
    // Wait for the helper even if `a` panics: it reads `b` until it is done.
    let mine = catch_unwind(AssertUnwindSafe(a));
    let mut n = 0u32;
    while s.done.load(Ordering::Acquire) != ticket {
        n = n.wrapping_add(1);
        // Now and then give the core away, in case the helper shares it.
        if n % 1024 == 0 {
            std::thread::yield_now();
        } else {
            std::hint::spin_loop();
        }
    }
    // Taken either way, so that it cannot surface in a later call.
    let theirs = s.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Err(p) = mine {
        resume_unwind(p);
    }
    if let Some(p) = theirs {
        resume_unwind(p);
    }
}

/// Runs `f(rows, part)` on the two halves of `out` (`rows` of `row_len` elements each, split at
/// row `⌈rows/2⌉`), the first here and the second on the helper ([`join`]), and returns both
/// results in row order. The encoder's parallel ops run this way on 2 threads: the helper
/// stays awake through the ~100 µs between them, where rayon's workers fell asleep and were
/// woken for each (~6,000 context switches per image; README "Performance").
///
/// Panics if `row_len` is 0 or does not divide `out.len()` (a caller's bug, not input).
pub fn join_rows<T: Send, R: Send>(out: &mut [T], row_len: usize, f: impl Fn(Range<usize>, &mut [T]) -> R + Sync) -> [R; 2] {
    assert!(row_len > 0 && out.len() % row_len == 0, "join_rows: {} elements in rows of {row_len}", out.len());
    let rows = out.len() / row_len;
    let mid = rows.div_ceil(2);
    let (lo, hi) = out.split_at_mut(mid * row_len);
    let hi = Mutex::new((Some(hi), None));
    let mut first = None;
    join(
        || first = Some(f(0..mid, lo)),
        || {
            let mut slot = hi.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(part) = slot.0.take() {
                slot.1 = Some(f(mid..rows, part));
            }
        },
    );
    let second = hi.into_inner().unwrap_or_else(|e| e.into_inner()).1;
    // `join` returns only after both halves ran (a panic in either is resumed inside it).
    match (first, second) {
        (Some(a), Some(b)) => [a, b],
        _ => unreachable!("join returned before both halves ran"),
    }
}

/// A slice that parts running at once (on the helper, on rayon's pool) write through, each
/// only its own elements: columns of a matrix, an attention head's scattered outputs.
#[derive(Debug)]
pub struct Disjoint<'a, T> {
    ptr: *mut T,
    len: usize,
    _data: std::marker::PhantomData<&'a mut [T]>,
}

impl<T> Clone for Disjoint<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for Disjoint<'_, T> {}

// Safety: the parts touch disjoint elements (`slice`'s contract) of data that outlives them.
unsafe impl<T: Send> Send for Disjoint<'_, T> {}
unsafe impl<T: Send> Sync for Disjoint<'_, T> {}

impl<'a, T> Disjoint<'a, T> {
    pub fn new(data: &'a mut [T]) -> Self {
        Disjoint { ptr: data.as_mut_ptr(), len: data.len(), _data: std::marker::PhantomData }
    }

    /// The first element's address, for writers that take a pointer (each part still only its
    /// own elements).
    pub fn as_mut_ptr(&self) -> *mut T {
        self.ptr
    }

    /// Writes element `i`.
    ///
    /// # Safety
    /// No one else reads or writes it meanwhile.
    pub unsafe fn write(&self, i: usize, v: T) {
        assert!(i < self.len, "Disjoint::write: {i} of {}", self.len);
        // Safety: in bounds (checked); exclusive (the caller's promise).
        unsafe { self.ptr.add(i).write(v) }
    }

    /// The elements `r`.
    ///
    /// # Safety
    /// No one else reads or writes any of them while the returned slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, r: Range<usize>) -> &'a mut [T] {
        assert!(r.start <= r.end && r.end <= self.len, "Disjoint::slice: {r:?} of {}", self.len);
        // Safety: in bounds (checked); exclusive (the caller's promise).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(r.start), r.len()) }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn both_halves_run_every_time() {
        let (a, b) = (AtomicUsize::new(0), AtomicUsize::new(0));
        for i in 0..2000 {
            // Now and then a pause, so the helper parks and must be woken.
            if i % 500 == 0 {
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            super::join(|| _ = a.fetch_add(1, Ordering::Relaxed), || _ = b.fetch_add(1, Ordering::Relaxed));
        }
        assert_eq!((a.into_inner(), b.into_inner()), (2000, 2000));
    }

    #[test]
    fn a_panic_on_the_helper_reaches_the_caller() {
        for _ in 0..2 {
            let r = std::panic::catch_unwind(|| super::join(|| {}, || panic!("helper job")));
            assert!(r.is_err());
        }
        // Both halves panicking: one panic reaches the caller, none is left for a later call.
        let r = std::panic::catch_unwind(|| super::join(|| panic!("caller half"), || panic!("helper half")));
        assert!(r.is_err());
        super::join(|| {}, || {});
        // And the helper still serves: `b` runs on another thread (retried, since the other test
        // may hold the helper; with one core there is no helper).
        if std::thread::available_parallelism().map_or(1, |n| n.get()) >= 2 {
            let me = std::thread::current().id();
            let on_helper = (0..1000).any(|_| {
                let id = std::sync::Mutex::new(me);
                super::join(|| {}, || *id.lock().unwrap() = std::thread::current().id());
                let other = *id.lock().unwrap() != me;
                if !other {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                other
            });
            assert!(on_helper, "after a panic, jobs no longer reach the helper thread");
        }
        let n = AtomicUsize::new(0);
        super::join(|| {}, || _ = n.fetch_add(1, Ordering::Relaxed));
        assert_eq!(n.into_inner(), 1);
    }

    #[test]
    fn join_rows_hands_each_half_its_rows() {
        for rows in [1usize, 2, 3, 197] {
            let mut out = vec![0usize; rows * 3];
            let [a, b] = super::join_rows(&mut out, 3, |r, part| {
                assert_eq!(part.len(), r.len() * 3);
                for (i, row) in r.clone().zip(part.chunks_exact_mut(3)) {
                    row.fill(i);
                }
                r
            });
            assert_eq!((a.start, a.end, b.start, b.end), (0, rows.div_ceil(2), rows.div_ceil(2), rows));
            assert!(out.chunks_exact(3).enumerate().all(|(i, row)| row == [i, i, i]), "rows {rows}: {out:?}");
        }
    }
}
