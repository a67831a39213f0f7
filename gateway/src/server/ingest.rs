//! Thread-per-core ingest (`--ingest-threads`, decision 39): N OS threads, each running its own
//! current-thread tokio runtime. The accept loop (on the shared runtime) places every accepted
//! connection on the thread with the fewest live connections; from then on the connection's
//! whole life — PROXY header, TLS, HTTP upgrade, WebSocket reads, decoding, producing — runs on
//! that thread, with no work stealing and no cross-thread wake-up between its tasks.
//!
//! Why one accept loop that hands sockets over rather than a `SO_REUSEPORT` listener per
//! thread: placement by live count instead of the kernel's address hash (a hash split 300
//! calls 59 % / 41 % in our floors), the access checks and handshake caps stay in one place,
//! a listener that is already bound (tests on port 0, an inherited socket) works unchanged,
//! and closing one thread's listener cannot reset connections queued on it. The cost is one
//! deregistration and registration per connection, not per message.
//!
//! With `--io-pace`, every ingest runtime sleeps that long before it waits for I/O (read
//! coalescing, decision 38), so each thread serves every socket that became readable during
//! the sleep after one wake-up.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus::IntGauge;
use tokio::runtime::Handle;
use tokio::sync::oneshot;

use crate::metrics::Metrics;

/// One ingest thread, as the accept loop sees it.
struct Lane {
    handle: Handle,
    /// `gateway_runtime_ingest_connections{thread}`: also the live count placement reads.
    gauge: IntGauge,
}

/// The ingest threads; see the module docs.
pub struct IngestPool {
    lanes: Vec<Lane>,
    /// Where the next tie-break search starts, so equal loads rotate.
    next: AtomicUsize,
    /// Each thread's stop signal and join handle, taken by [`IngestPool::stop`].
    threads: Mutex<Vec<(oneshot::Sender<()>, std::thread::JoinHandle<()>)>>,
}

/// Held by a connection's tasks for its whole life — the handshake task, then the upgraded
/// stream's task — so its thread's live count drops when the last clone does.
#[derive(Clone)]
pub struct Placement {
    // Held only for its `Drop`.
    _counted: Arc<Counted>,
}

struct Counted {
    gauge: IntGauge,
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// How long a stopping thread waits for its runtime's blocking tasks (none are expected:
/// connection tasks do not block).
const STOP_GRACE: Duration = Duration::from_secs(1);

impl IngestPool {
    /// Starts `threads` (≥ 1) ingest threads, each pacing its I/O waits by `pace` (zero = no
    /// pacing).
    pub fn start(threads: usize, pace: Duration, metrics: &Metrics) -> std::io::Result<IngestPool> {
        let mut lanes = Vec::with_capacity(threads);
        let mut joins = Vec::with_capacity(threads);
        for i in 0..threads {
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
            let (stop_tx, stop_rx) = oneshot::channel::<()>();
            // The runtime is built and dropped on its own thread: a runtime may not be dropped
            // on an async worker, which is where this runs.
            let join = std::thread::Builder::new()
                .name(format!("ingest-{i}"))
                .spawn(move || {
                    let mut builder = tokio::runtime::Builder::new_current_thread();
                    builder.enable_all();
                    if !pace.is_zero() {
                        // Runs only when the thread has no task left to poll (decision 38).
                        builder.on_thread_park(move || std::thread::sleep(pace));
                    }
                    let runtime = match builder.build() {
                        Ok(r) => r,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(runtime.handle().clone()));
                    // Drives every task placed on this thread until stopped (or the pool is
                    // gone); what is left then is dropped (the drain has awaited it).
                    runtime.block_on(async {
                        let _ = stop_rx.await;
                    });
                    runtime.shutdown_timeout(STOP_GRACE);
                })?;
            // A thread that failed to build its runtime says so at once; on error the threads
            // already started stop when their senders in `joins` drop.
            let handle = ready_rx
                .recv()
                .map_err(|_| std::io::Error::other("ingest thread ended during start-up"))??;
            lanes.push(Lane {
                handle,
                gauge: metrics
                    .runtime_ingest_connections
                    .with_label_values(&[&i.to_string()]),
            });
            joins.push((stop_tx, join));
        }
        metrics.runtime_ingest_threads.set(threads as i64);
        Ok(IngestPool {
            lanes,
            next: AtomicUsize::new(0),
            threads: Mutex::new(joins),
        })
    }

    /// Number of ingest threads.
    pub fn len(&self) -> usize {
        self.lanes.len()
    }

    /// Always false: a pool has at least one thread.
    pub fn is_empty(&self) -> bool {
        self.lanes.is_empty()
    }

    /// Live connections per thread, in thread order.
    pub fn loads(&self) -> Vec<usize> {
        self.lanes
            .iter()
            .map(|l| l.gauge.get().max(0) as usize)
            .collect()
    }

    /// Runs the future made by `make` on the thread with the fewest live connections (ties
    /// rotate). `make` runs on that thread, so it may register sockets with its runtime; it
    /// gets the connection's [`Placement`], which every task of the connection holds a clone
    /// of until it ends.
    pub fn spawn<F, Fut>(&self, make: F)
    where
        F: FnOnce(Placement) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let n = self.lanes.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let lane = (0..n)
            .map(|k| &self.lanes[(start + k) % n])
            .min_by_key(|l| l.gauge.get())
            .expect("a pool has at least one thread");
        lane.gauge.inc();
        let placement = Placement {
            _counted: Arc::new(Counted {
                gauge: lane.gauge.clone(),
            }),
        };
        lane.handle.spawn(async move { make(placement).await });
    }

    /// Stops every thread and waits for it (blocking: call from a blocking context). Tasks
    /// still on a thread are dropped.
    pub fn stop(&self) {
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|p| p.into_inner()));
        for (stop, join) in threads {
            let _ = stop.send(());
            let _ = join.join();
        }
    }
}

impl Drop for IngestPool {
    fn drop(&mut self) {
        // Threads are told to stop; not joined here (a drop may happen on an async thread).
        let threads = std::mem::take(self.threads.get_mut().unwrap_or_else(|p| p.into_inner()));
        for (stop, _join) in threads {
            let _ = stop.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As the handshake task hands the placement to the upgraded stream's task: the count
    /// lasts until the last clone is gone.
    #[test]
    fn a_connection_counts_until_its_last_task_ends() {
        let metrics = Metrics::new("ingest-clone-test");
        let pool = IngestPool::start(1, Duration::ZERO, &metrics).unwrap();
        let (end_tx, end_rx) = oneshot::channel::<()>();
        let (handed_tx, handed_rx) = std::sync::mpsc::channel();
        pool.spawn(move |placement| async move {
            let stream = placement.clone();
            tokio::spawn(async move {
                let _stream = stream;
                let _ = end_rx.await;
            });
            drop(placement); // the handshake task ends here
            handed_tx.send(()).unwrap();
        });
        handed_rx.recv().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(pool.loads(), [1]);
        drop(end_tx);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.loads() != [0] {
            assert!(std::time::Instant::now() < deadline, "{:?}", pool.loads());
            std::thread::sleep(Duration::from_millis(5));
        }
        pool.stop();
    }

    #[test]
    fn places_on_the_least_loaded_thread_and_runs_there() {
        let metrics = Metrics::new("ingest-test");
        let pool = IngestPool::start(2, Duration::ZERO, &metrics).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let mut holds = Vec::new();
        for i in 0..4 {
            let (hold_tx, hold_rx) = oneshot::channel::<()>();
            holds.push(Some(hold_tx));
            let tx = tx.clone();
            pool.spawn(move |placement| async move {
                let name = std::thread::current().name().map(str::to_owned);
                tx.send((i, name.unwrap())).unwrap();
                let _ = hold_rx.await;
                drop(placement);
            });
        }
        let mut on = vec![String::new(); 4];
        for _ in 0..4 {
            let (i, name) = rx.recv().unwrap();
            on[i] = name;
        }
        let mut names = on.clone();
        names.sort();
        assert_eq!(names, ["ingest-0", "ingest-0", "ingest-1", "ingest-1"]);
        assert_eq!(pool.loads(), [2, 2]);
        let text = String::from_utf8(metrics.render()).unwrap();
        assert!(text.contains("gateway_runtime_ingest_threads 2"), "{text}");
        assert!(
            text.contains("gateway_runtime_ingest_connections{thread=\"1\"} 2"),
            "{text}"
        );
        // Both connections of thread 1 end: the next one goes there, though the rotation
        // (four placements so far) would start at thread 0.
        for (i, name) in on.iter().enumerate() {
            if name == "ingest-1" {
                holds[i] = None;
            }
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while pool.loads() != [2, 0] {
            assert!(std::time::Instant::now() < deadline, "{:?}", pool.loads());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(String::from_utf8(metrics.render())
            .unwrap()
            .contains("gateway_runtime_ingest_connections{thread=\"1\"} 0"));
        let (hold_tx, hold_rx) = oneshot::channel::<()>();
        pool.spawn(move |p| async move {
            tx.send((4, std::thread::current().name().unwrap().to_owned()))
                .unwrap();
            let _ = hold_rx.await;
            drop(p);
        });
        assert_eq!(rx.recv().unwrap(), (4, "ingest-1".to_owned()));
        assert_eq!(pool.loads(), [2, 1]);
        drop(hold_tx);
        drop(holds);
        pool.stop();
    }
}
