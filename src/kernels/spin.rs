//! A small fork-join pool whose idle workers spin for a short while before they sleep.
//!
//! Why not rayon here: a rayon worker that has gone to sleep is woken through a futex, and on
//! the virtual machines Finch is measured on that wake-up takes 60–150 µs (measured on a 2-core
//! Intel Xeon VM: median 93 µs from `rayon::join` to the second task starting). One decoded token
//! of SmolLM2-135M is ~210 matrix×vector products of 20–200 µs each, so a product split over
//! rayon mostly waited for its second thread: 2 threads decoded at 23.7 tokens/s where one
//! thread gave 20.5 and llama.cpp (whose threads spin between products) 36.8 on the same VM.
//! Here the workers spin on an atomic counter for [`SPIN`] after their last task (the gaps
//! between a token's products are microseconds), then block on a condition variable, so an idle
//! studio costs no CPU.
//!
//! Training's loops between the products (RMS norm, rotary, SwiGLU, attention's heads, the
//! loss's rows) run here too, through [`for_each_chunk_mut`] and its two- and three-slice forms.
//! On rayon they woke its sleeping workers for every op while this pool's worker yielded the
//! core in a loop beside them: 11k context switches a step at SmolLM2-135M shapes, f32,
//! b4×256, against ~100 with one pool (2-core AMD EPYC Zen 4, 2026-11-30); tokens/s alternating,
//! rayon / this pool: f32 289.6/279.6, 278.2/291.2, 290.4/298.8, 296.1/298.7.
//!
//! Work is claimed task by task from a shared counter, so a thread slowed by other work on the
//! machine is helped by the others. The caller runs tasks too. A call from inside a task (or
//! while another thread is using the pool) runs its tasks on the calling thread.

// The job's closure is handed to the workers as a lifetime-erased pointer; `run` does not return
// before every task that dereferences it has finished (see the SAFETY notes).
#![allow(unsafe_code)]

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an idle worker keeps spinning before it sleeps.
const SPIN: Duration = Duration::from_millis(2);

/// How long an idle worker spins without yielding the core.
const HOT: Duration = Duration::from_micros(50);

type Task = dyn Fn(usize) + Sync;

struct Job {
    /// The caller's closure with its lifetime erased; valid until `done == tasks`.
    f: *const Task,
    tasks: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    panicked: AtomicBool,
}

// SAFETY: `f` points to a `Sync` closure, and it is only called while the caller of `run` waits
// (so it is alive); the counters are atomics.
unsafe impl Send for Job {}
// SAFETY: as above.
unsafe impl Sync for Job {}

impl Job {
    /// Claims and runs tasks until none are left.
    fn work(&self) {
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.tasks {
                return;
            }
            // SAFETY: `i < tasks` was claimed by this thread, so `done < tasks` until this task
            // finishes, and `run` keeps the closure alive until `done == tasks`.
            let f = unsafe { &*self.f };
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(i))).is_ok();
            if !ok {
                self.panicked.store(true, Ordering::Relaxed);
            }
            self.done.fetch_add(1, Ordering::Release);
        }
    }
}

struct Shared {
    /// Bumped for every job; workers spin on it.
    epoch: AtomicUsize,
    job: Mutex<Option<Arc<Job>>>,
    sleepers: Mutex<usize>,
    wake: Condvar,
}

pub struct SpinPool {
    shared: Arc<Shared>,
    workers: usize,
    /// One job at a time; a second caller runs its tasks itself.
    busy: Mutex<()>,
}

thread_local! {
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
}

impl SpinPool {
    /// A pool of `threads` threads in all: the caller and `threads - 1` workers.
    pub fn new(threads: usize) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            sleepers: Mutex::new(0),
            wake: Condvar::new(),
        });
        let workers = threads.saturating_sub(1);
        for i in 0..workers {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("finch-spin-{i}"))
                .spawn(move || worker(&shared))?;
        }
        Ok(SpinPool {
            shared,
            workers,
            busy: Mutex::new(()),
        })
    }

    /// Threads that run tasks, the caller included.
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Runs `f(i)` for every `i < tasks`, spread over the pool and the calling thread; returns
    /// when all have run. A panic in a task is raised again here.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let inline = tasks <= 1 || self.workers == 0 || IN_TASK.with(Cell::get);
        let guard = match self.busy.try_lock() {
            _ if inline => None,
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        };
        let Some(guard) = guard else {
            (0..tasks).for_each(f);
            return;
        };
        // SAFETY: only the lifetime is erased. The closure outlives every use: this function
        // waits below until `done == tasks`, and a task is only started after claiming an index
        // `< tasks`; late workers holding the `Arc` find no index left and never call it.
        let f: *const Task = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), &'static Task>(f) };
        let job = Arc::new(Job {
            f,
            tasks,
            next: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
        });
        *lock(&self.shared.job) = Some(Arc::clone(&job));
        self.shared.epoch.fetch_add(1, Ordering::Release);
        if *lock(&self.shared.sleepers) > 0 {
            self.shared.wake.notify_all();
        }
        IN_TASK.with(|t| t.set(true));
        job.work();
        IN_TASK.with(|t| t.set(false));
        let mut spins = 0u32;
        while job.done.load(Ordering::Acquire) < tasks {
            spins += 1;
            if spins < 1 << 16 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        *lock(&self.shared.job) = None;
        drop(guard);
        if job.panicked.load(Ordering::Relaxed) {
            panic!("a task of the spin pool panicked");
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn worker(shared: &Shared) {
    IN_TASK.with(|t| t.set(true));
    let mut seen = shared.epoch.load(Ordering::Acquire);
    loop {
        let idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            let epoch = shared.epoch.load(Ordering::Acquire);
            if epoch != seen {
                seen = epoch;
                break;
            }
            spins = spins.wrapping_add(1);
            if spins % 256 != 0 {
                std::hint::spin_loop();
                continue;
            }
            let idle = idle_since.elapsed();
            if idle < SPIN {
                // After a short pure spin, give the core to any other runnable thread (rayon
                // workers of the ops between products) while still polling.
                if idle > HOT {
                    std::thread::yield_now();
                }
                continue;
            }
            // Sleep until the next job. The epoch is re-read under the lock `run` takes before
            // notifying, so a job posted in between is not missed.
            let mut sleepers = lock(&shared.sleepers);
            *sleepers += 1;
            while shared.epoch.load(Ordering::Acquire) == seen {
                sleepers = shared.wake.wait(sleepers).unwrap_or_else(|e| e.into_inner());
            }
            *sleepers -= 1;
        }
        let job = lock(&shared.job).clone();
        if let Some(job) = job {
            job.work();
        }
    }
}

/// The process's pool: [`crate::kernels::cpu::threads`] threads, the caller included; `None`
/// when its threads could not be started (callers then run their tasks themselves).
pub fn pool() -> Option<&'static SpinPool> {
    static POOL: OnceLock<Option<SpinPool>> = OnceLock::new();
    POOL.get_or_init(|| SpinPool::new(crate::kernels::cpu::threads()).ok())
        .as_ref()
}

/// Runs `f` inside a one-thread rayon pool, so that rayon calls in it run on that thread: for
/// work whose parallel parts go through this spin pool (one decoded token), where woken rayon
/// threads would only compete with the spinning workers for the cores.
pub fn without_rayon<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static ONE: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    let one = ONE.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "finch-decode".to_string())
            .build()
            .ok()
    });
    match one {
        Some(p) => p.install(f),
        None => f(),
    }
}

/// Threads the process's pool runs tasks on, the caller included (1 when it has none).
pub fn threads() -> usize {
    pool().map_or(1, SpinPool::threads)
}

/// Whether the calling thread is running a task of the pool (a nested call runs inline).
pub fn in_task() -> bool {
    IN_TASK.with(Cell::get)
}

/// The first error of a job's tasks: each task hands its result to [`FirstError::keep`], and
/// the job returns [`FirstError::result`] once every task is done.
pub struct FirstError<E>(std::sync::Mutex<Option<E>>);

impl<E> FirstError<E> {
    pub fn new() -> Self {
        FirstError(std::sync::Mutex::new(None))
    }

    /// Keeps `r`'s error unless an earlier task's is kept already.
    pub fn keep(&self, r: Result<(), E>) {
        if let Err(e) = r {
            self.0.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
        }
    }

    pub fn result(self) -> Result<(), E> {
        match self.0.into_inner().unwrap_or_else(|p| p.into_inner()) {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl<E> Default for FirstError<E> {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs `f(i)` for every `i < tasks` on the process's pool (inline when there is none).
pub fn run(tasks: usize, f: &(dyn Fn(usize) + Sync)) {
    match pool() {
        Some(p) => p.run(tasks, f),
        None => (0..tasks).for_each(f),
    }
}

/// Runs `f(i, chunk)` for the `i`-th run of `chunk` values of `data` (the last one shorter), on
/// the process's pool.
pub fn for_each_chunk_mut<T: Send>(data: &mut [T], chunk: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let data = Runs::new(data, chunk);
    run(data.tasks, &|i| {
        // SAFETY: `run` calls every task index exactly once, so each run is handed out once.
        let run = unsafe { data.get(i) };
        f(i, run)
    });
}

/// [`for_each_chunk_mut`] over two slices at once: task `i` gets the `i`-th run of `ca` values
/// of `a` and of `cb` values of `b` (empty past a slice's end), e.g. a row block of two outputs.
pub fn for_each_chunk_mut2<A: Send, B: Send>(
    (a, ca): (&mut [A], usize),
    (b, cb): (&mut [B], usize),
    f: impl Fn(usize, &mut [A], &mut [B]) + Sync,
) {
    let (a, b) = (Runs::new(a, ca), Runs::new(b, cb));
    run(a.tasks.max(b.tasks), &|i| {
        // SAFETY: `run` calls every task index exactly once, so each run is handed out once.
        let runs = unsafe { (a.get(i), b.get(i)) };
        f(i, runs.0, runs.1)
    });
}

/// [`for_each_chunk_mut2`] over three slices.
pub fn for_each_chunk_mut3<A: Send, B: Send, C: Send>(
    (a, ca): (&mut [A], usize),
    (b, cb): (&mut [B], usize),
    (c, cc): (&mut [C], usize),
    f: impl Fn(usize, &mut [A], &mut [B], &mut [C]) + Sync,
) {
    let (a, b, c) = (Runs::new(a, ca), Runs::new(b, cb), Runs::new(c, cc));
    let tasks = a.tasks.max(b.tasks).max(c.tasks);
    run(tasks, &|i| {
        // SAFETY: `run` calls every task index exactly once, so each run is handed out once.
        let runs = unsafe { (a.get(i), b.get(i), c.get(i)) };
        f(i, runs.0, runs.1, runs.2)
    });
}

/// Rows per task for `rows` rows of elementwise work: about four tasks a thread, so that a
/// thread slowed by other work is helped by the others, and at least `min` rows each.
pub fn rows_per_task(rows: usize, min: usize) -> usize {
    rows.div_ceil(4 * threads()).max(min).max(1)
}

/// A mutable slice cut into runs of `chunk` values that pool tasks take one each.
struct Runs<'a, T> {
    base: *mut T,
    len: usize,
    chunk: usize,
    tasks: usize,
    _data: std::marker::PhantomData<&'a mut [T]>,
}

// SAFETY: the runs handed out are disjoint sub-slices of a `&mut [T]` borrowed for `'a`, with
// `T: Send`; see `Runs::get`.
unsafe impl<T: Send> Sync for Runs<'_, T> {}

impl<'a, T> Runs<'a, T> {
    fn new(data: &'a mut [T], chunk: usize) -> Self {
        let chunk = chunk.max(1);
        Runs {
            base: data.as_mut_ptr(),
            len: data.len(),
            chunk,
            tasks: data.len().div_ceil(chunk),
            _data: std::marker::PhantomData,
        }
    }

    /// Run `i`: values `i·chunk..` (at most `chunk` of them; empty past the end).
    ///
    /// Safety: each `i` is passed at most once while the runs are alive.
    #[allow(clippy::mut_from_ref)]
    unsafe fn get(&self, i: usize) -> &'a mut [T] {
        let start = (i.saturating_mul(self.chunk)).min(self.len);
        let n = self.chunk.min(self.len - start);
        // SAFETY: `start + n <= len`, inside the borrowed slice; runs of distinct `i` are
        // disjoint, and the caller hands out each `i` once.
        unsafe { std::slice::from_raw_parts_mut(self.base.add(start), n) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_task_runs_once_nested_calls_run_inline_and_panics_reach_the_caller() {
        let pool = SpinPool::new(3).unwrap();
        for tasks in [0, 1, 2, 7, 100] {
            let hits: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            pool.run(tasks, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
                // A nested call runs on this thread and still covers its tasks.
                let inner = AtomicUsize::new(0);
                pool.run(3, &|_| {
                    inner.fetch_add(1, Ordering::Relaxed);
                });
                assert_eq!(inner.load(Ordering::Relaxed), 3);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1));
        }
        // Workers asleep after the spin period still take the next job.
        std::thread::sleep(SPIN * 3);
        let sum = AtomicUsize::new(0);
        pool.run(64, &|i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.load(Ordering::Relaxed), 64 * 63 / 2);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(8, &|i| assert!(i != 5, "task 5 fails"));
        }));
        assert!(caught.is_err());
        // The pool still works after a panic.
        let n = AtomicUsize::new(0);
        pool.run(10, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 10);
    }

    #[test]
    fn chunked_loops_hand_each_task_its_own_runs_of_every_slice() {
        for (len, chunk) in [(0, 4), (1, 4), (10, 3), (64, 16), (1000, 7)] {
            let mut a = vec![usize::MAX; len];
            for_each_chunk_mut(&mut a, chunk, |i, run| run.iter_mut().for_each(|x| *x = i));
            assert!(a.iter().enumerate().all(|(j, &x)| x == j / chunk), "{len} {chunk}");
            // Two and three slices of different run lengths (rows of outputs of different
            // widths), the shorter ones empty past their end.
            let (mut b, mut c) = (vec![usize::MAX; 2 * len], vec![usize::MAX; len.div_ceil(chunk)]);
            for_each_chunk_mut2((&mut b, 2 * chunk), (&mut c, 1), |i, rb, rc| {
                rb.iter_mut().for_each(|x| *x = i);
                rc.iter_mut().for_each(|x| *x = i);
            });
            assert!(b.iter().enumerate().all(|(j, &x)| x == j / (2 * chunk)));
            assert!(c.iter().enumerate().all(|(j, &x)| x == j));
            let mut d = vec![usize::MAX; 3];
            let tasks = std::sync::atomic::AtomicUsize::new(0);
            for_each_chunk_mut3((&mut a, chunk), (&mut b, 2 * chunk), (&mut d, 1), |i, ra, rb, rd| {
                tasks.fetch_add(1, Ordering::Relaxed);
                ra.iter_mut()
                    .chain(rb.iter_mut())
                    .chain(rd.iter_mut())
                    .for_each(|x| *x = i + 1);
            });
            assert_eq!(tasks.load(Ordering::Relaxed), len.div_ceil(chunk).max(3));
            assert!(a.iter().enumerate().all(|(j, &x)| x == j / chunk + 1));
            assert!(d.iter().enumerate().all(|(j, &x)| x == j + 1));
        }
    }
}
