//! The log writer: lines are appended to a shared buffer; a background thread, woken by the
//! first line, lets lines gather for [`FLUSH_EVERY`] (less when they pass [`WAKE_AT`]
//! bytes) and writes them out in one go. Idle, it sleeps.
//!
//! A per-line queue (what tracing-appender does) wakes the writer thread for every line when
//! lines come one at a time — at a few thousand statements a second, one decision event
//! each, those wake-ups and context switches cost as much as the statements' own relaying.
//! Batching costs at most one wake-up per interval whatever the rate.
//!
//! Bounded and lossless: past [`MAX_PENDING`] bytes, logging threads wait for the writer
//! (a stalled reader of stderr delays logging, never loses lines). Lines are delayed by at
//! most one interval; the guard writes what is left when the daemon exits.

use std::{
    io::{self, Write},
    sync::{Arc, Condvar, Mutex},
    thread::JoinHandle,
    time::Duration,
};

/// Longest a line waits before it is written.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);
/// Pending bytes that wake the writer before its interval.
pub const WAKE_AT: usize = 256 * 1024;
/// Pending bytes past which logging threads wait.
pub const MAX_PENDING: usize = 8 * 1024 * 1024;

#[derive(Default)]
struct Pending {
    buf: Vec<u8>,
    stop: bool,
    /// Logging threads waiting on `drained` (the buffer was full): only then is it
    /// signalled, each signal being a system call.
    blocked: usize,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when the buffer passes [`WAKE_AT`] or on stop.
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
pub fn start<W: Write + Send + 'static>(out: W, thread_name: &str) -> (BatchWriter, Guard) {
    let shared = Arc::new(Shared {
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
        let stop = {
            let mut p = s.pending.lock().unwrap_or_else(|e| e.into_inner());
            // Idle: sleep until the first line (its writer wakes us).
            while p.buf.is_empty() && !p.stop {
                p = s.wake.wait(p).unwrap_or_else(|e| e.into_inner());
            }
            // Let the lines that follow gather, unless there are already plenty.
            if p.buf.len() < WAKE_AT && !p.stop {
                p = s
                    .wake
                    .wait_timeout(p, FLUSH_EVERY)
                    .map_or_else(|e| e.into_inner().0, |(g, _)| g);
            }
            std::mem::swap(&mut p.buf, &mut taken);
            if p.blocked > 0 {
                s.drained.notify_all();
            }
            p.stop
        };
        if !taken.is_empty() {
            // A failing stderr cannot be reported anywhere better: the lines are dropped.
            let _ = out.write_all(&taken).and_then(|()| out.flush());
            taken.clear();
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
        while p.buf.len() >= MAX_PENDING && !p.stop {
            s.wake.notify_one();
            p.blocked += 1;
            p = s.drained.wait(p).unwrap_or_else(|e| e.into_inner());
            p.blocked -= 1;
        }
        let first = p.buf.is_empty();
        p.buf.extend_from_slice(line);
        // The writer sleeps until a first line comes, then gathers for an interval.
        let wake = first || p.buf.len() >= WAKE_AT;
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
        let (w, guard) = start(sink.clone(), "test-log");
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

    #[test]
    fn a_stalled_writer_makes_loggers_wait_not_drop() {
        /// Blocks its first write until released.
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
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let sink = Sink::default();
        let (w, guard) = start(Slow(gate.clone(), sink.clone()), "test-log");
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
        *gate.0.lock().expect("gate") = true;
        gate.1.notify_all();
        logger.join().expect("logger");
        drop(guard);
        let total: usize = sink.0.lock().expect("sink").iter().map(Vec::len).sum();
        assert_eq!(total, 3 * MAX_PENDING, "every byte was written");
    }
}
