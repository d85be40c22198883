//! The log writer: lines are appended to a shared buffer; a background thread, woken by the
//! first line, lets lines gather for [`FLUSH_EVERY`] (less when they pass [`WAKE_AT`]
//! bytes) and writes them out in one go. Idle, it sleeps.
//!
//! A per-line queue (what tracing-appender does) wakes the writer thread for every line when
//! lines come one at a time — at a few thousand statements a second, one decision event
//! each, those wake-ups and context switches cost as much as the statements' own relaying.
//! Batching costs at most one wake-up per interval whatever the rate.
//!
//! Bounded: past [`Limits::queue_bytes`] pending, what happens is the operator's choice
//! ([`WhenFull`]). By default new lines are dropped and counted ([`dropped_lines`]), and
//! once the writer catches up a warning says how many were lost: a stalled reader of
//! stderr (journald hung on a slow disk, a paused pipe) costs log lines, never the
//! connections whose threads log. With [`WhenFull::Wait`] logging threads wait for the
//! writer instead: nothing is lost, and everything that logs stalls with the reader.
//! Lines are delayed by at most one interval; the guard writes what is left when the
//! daemon exits.

use std::{
    io::{self, Write},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

pub use crate::config::LogWhenFull as WhenFull;

/// Longest a line waits before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Pending bytes that wake the writer before its interval (less for a smaller queue).
pub const WAKE_AT: usize = 256 * 1024;
/// Default pending bytes past which lines are dropped or loggers wait.
pub const MAX_PENDING: usize = 8 * 1024 * 1024;

/// How much may wait for the writer, and what happens past that.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub queue_bytes: usize,
    pub when_full: WhenFull,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            queue_bytes: MAX_PENDING,
            when_full: WhenFull::Drop,
        }
    }
}

/// Lines dropped because the queue was full, since the process started.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped so far (`portcullis_log_lines_dropped_total`).
pub fn dropped_lines() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    stop: bool,
    /// Logging threads waiting on `drained` (the buffer was full): only then is it
    /// signalled, each signal being a system call.
    blocked: usize,
    /// Lines dropped since the writer last took the buffer.
    dropped: u64,
}

struct Shared {
    limits: Limits,
    /// Pending bytes that wake the writer early: [`WAKE_AT`], or half a smaller queue.
    wake_at: usize,
    pending: Mutex<Pending>,
    /// Signalled when the buffer passes `wake_at` or on stop.
    wake: Condvar,
    /// Signalled when the writer took the buffer.
    drained: Condvar,
}

/// Where the subscriber writes: cheap to clone, one `write` per formatted event.
#[derive(Clone)]
pub struct BatchWriter(Arc<Shared>);

/// Stops the writer thread and writes what is pending when dropped.
pub struct Guard {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Starts the writer thread over `out`.
pub fn start<W: Write + Send + 'static>(
    out: W,
    thread_name: &str,
    limits: Limits,
) -> (BatchWriter, Guard) {
    let shared = Arc::new(Shared {
        limits,
        wake_at: WAKE_AT.min(limits.queue_bytes / 2),
        pending: Mutex::new(Pending::default()),
        wake: Condvar::new(),
        drained: Condvar::new(),
    });
    let s = shared.clone();
    let thread = std::thread::Builder::new()
        .name(thread_name.to_owned())
        .spawn(move || writer(&s, out))
        .map_err(|e| eprintln!("warning: no log writer thread ({e}); logs go out directly"))
        .ok();
    if thread.is_none() {
        // Without a writer thread, every line is written by the caller (see `write`).
        shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop = true;
    }
    (BatchWriter(shared.clone()), Guard { shared, thread })
}

fn writer<W: Write>(s: &Shared, mut out: W) {
    let mut taken = Vec::with_capacity(64 * 1024);
    loop {
        let (stop, dropped) = {
            let mut p = s.pending.lock().unwrap_or_else(|e| e.into_inner());
            // Idle: sleep until the first line (its writer wakes us).
            while p.buf.is_empty() && !p.stop {
                p = s.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            // Let the lines that follow gather, unless there are already plenty.
            if p.buf.len() < s.wake_at && !p.stop {
                p = s
                    .wake
                    .wait_timeout(p, FLUSH_EVERY)
                    .map_or_else(|e| e.into_inner().0, |(g, _)| g);
            }
            std::mem::swap(&mut p.buf, &mut taken);
            if p.blocked > 0 {
                s.drained.notify_all();
            }
            (p.stop, std::mem::take(&mut p.dropped))
        };
        if !taken.is_empty() {
            // A failing stderr cannot be reported anywhere better: the lines are dropped.
            let _ = out.write_all(&taken).and_then(|()| out.flush());
            taken.clear();
        }
        if dropped > 0 {
            // Through the subscriber, so in the daemon's format; it queues like any line.
            tracing::warn!(
                dropped,
                queue_bytes = s.limits.queue_bytes,
                "log lines were dropped: whatever reads the daemon's stderr (journald) did \
                 not keep up; the audit store still holds every decision"
            );
        }
        if stop {
            return;
        }
    }
}

impl Write for &BatchWriter {
    fn write(&mut self, line: &[u8]) -> io::Result<usize> {
        let s = &self.0;
        let mut p = s.pending.lock().unwrap_or_else(|e| e.into_inner());
        if p.stop {
            // After the guard (or without a writer thread): straight out.
            drop(p);
            return io::stderr().write(line);
        }
        if p.buf.len() >= s.limits.queue_bytes && s.limits.when_full == WhenFull::Drop {
            p.dropped += 1;
            DROPPED.fetch_add(1, Ordering::Relaxed);
            drop(p);
            s.wake.notify_one();
            return Ok(line.len());
        }
        while p.buf.len() >= s.limits.queue_bytes && !p.stop {
            s.wake.notify_one();
            p.blocked += 1;
            p = s.drained.wait(p).unwrap_or_else(|e| e.into_inner());
            p.blocked -= 1;
        }
        let first = p.buf.is_empty();
        p.buf.extend_from_slice(line);
        // The writer sleeps until a first line comes, then gathers for an interval.
        let wake = first || p.buf.len() >= s.wake_at;
        drop(p);
        // Signalled after unlocking, so that it does not wake only to wait for our lock.
        if wake {
            s.wake.notify_one();
        }
        Ok(line.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for BatchWriter {
    type Writer = &'a BatchWriter;
    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.shared
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that records each `write_all` it gets.
    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<Vec<u8>>>>);

    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().expect("sink").push(b.to_vec());
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_arrive_whole_in_order_and_batched() {
        let sink = Sink::default();
        let (w, guard) = start(sink.clone(), "test-log", Limits::default());
        for i in 0..1000 {
            (&w).write_all(format!("line {i}\n").as_bytes())
                .expect("write");
        }
        // Within a couple of intervals everything is out, in far fewer writes than lines.
        std::thread::sleep(FLUSH_EVERY * 5);
        let writes = sink.0.lock().expect("sink").len();
        assert!((1..100).contains(&writes), "{writes} writes for 1000 lines");
        (&w).write_all(b"last\n").expect("write");
        drop(guard);
        let all: Vec<u8> = sink.0.lock().expect("sink").concat();
        let text = String::from_utf8(all).expect("utf8");
        let expected: String = (0..1000)
            .map(|i| format!("line {i}\n"))
            .chain(["last\n".to_owned()])
            .collect();
        assert_eq!(text, expected, "the guard writes what was pending");
    }

    /// Blocks every write until released.
    struct Slow(Arc<(Mutex<bool>, Condvar)>, Sink);

    impl Write for Slow {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            let (m, c) = &*self.0;
            let mut open = m.lock().expect("gate");
            while !*open {
                open = c.wait(open).expect("gate");
            }
            self.1.write(b)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn open(gate: &(Mutex<bool>, Condvar)) {
        *gate.0.lock().expect("gate") = true;
        gate.1.notify_all();
    }

    #[test]
    fn a_stalled_writer_costs_lines_not_the_loggers_time() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let limits = Limits {
            queue_bytes: 1 << 20,
            when_full: WhenFull::Drop,
        };
        let (w, guard) = start(Slow(gate.clone(), sink.clone()), "test-log", limits);
        let line = vec![b'x'; 1024];
        let before = dropped_lines();
        // Ten times what the queue holds, while the writer is stuck in its first write.
        let began = std::time::Instant::now();
        for _ in 0..(10 * limits.queue_bytes / line.len()) {
            (&w).write_all(&line).expect("write");
        }
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "logging went on while the writer was stalled"
        );
        let dropped = dropped_lines() - before;
        assert!(
            dropped >= (8 * limits.queue_bytes / line.len()) as u64,
            "{dropped} lines dropped"
        );
        open(&gate);
        drop(guard);
        let total: usize = sink.0.lock().expect("sink").iter().map(Vec::len).sum();
        assert!(
            // The batch the writer was stuck on, and a full queue behind it.
            total <= 2 * limits.queue_bytes + 2 * line.len() && total >= line.len(),
            "what was queued was written: {total} bytes"
        );
        assert_eq!(
            total as u64 + dropped * line.len() as u64,
            (10 * limits.queue_bytes) as u64,
            "every line was written or counted as dropped"
        );
    }

    #[test]
    fn a_stalled_writer_makes_loggers_wait_when_configured() {
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let limits = Limits {
            queue_bytes: MAX_PENDING,
            when_full: WhenFull::Wait,
        };
        let (w, guard) = start(Slow(gate.clone(), sink.clone()), "test-log", limits);
        let line = vec![b'x'; 64 * 1024];
        let logger = {
            let w = w.clone();
            let line = line.clone();
            std::thread::spawn(move || {
                for _ in 0..(3 * MAX_PENDING / line.len()) {
                    (&w).write_all(&line).expect("write");
                }
            })
        };
        std::thread::sleep(Duration::from_millis(200));
        assert!(
            !logger.is_finished(),
            "the logger waits while the writer is stalled"
        );
        open(&gate);
        logger.join().expect("logger");
        drop(guard);
        let total: usize = sink.0.lock().expect("sink").iter().map(Vec::len).sum();
        assert_eq!(total, 3 * MAX_PENDING, "every byte was written");
    }
}
