//! Password checks on threads of their own. An argon2 check takes tens of milliseconds and
//! 19 MiB: run on the threads that serve requests, or on the blocking pool that runs CIM
//! methods, a flood of bad logins would starve authenticated work. Here they queue for a few
//! dedicated threads, and an attempt that finds the queue full is refused at once, unchecked.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

type Job = Box<dyn FnOnce() + Send>;

/// The threads and their bounded queue.
pub struct LoginPool {
    queue: SyncSender<Job>,
}

impl LoginPool {
    /// Starts `threads` threads (named `cim-login`) fed by a queue of `queue` waiting checks.
    /// They end once the pool is dropped and its queue drained.
    pub fn new(threads: usize, queue: usize) -> std::io::Result<LoginPool> {
        let (tx, rx) = mpsc::sync_channel::<Job>(queue.max(1));
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..threads.max(1) {
            let rx = Arc::clone(&rx);
            std::thread::Builder::new()
                .name("cim-login".into())
                .spawn(move || {
                    lockstep_seccomp::install(lockstep_seccomp::ThreadKind::Cim);
                    work(&rx)
                })?;
        }
        Ok(LoginPool { queue: tx })
    }

    /// Runs `check` on a pool thread and gives its answer; `None` at once when the queue is
    /// full. A check whose caller has gone away by its turn (the client hung up) is skipped.
    pub async fn run<T, F>(&self, check: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move || {
            if !tx.is_closed() {
                let _ = tx.send(check());
            }
        });
        match self.queue.try_send(job) {
            Ok(()) => rx.await.ok(),
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => None,
        }
    }
}

fn work(rx: &Mutex<Receiver<Job>>) {
    loop {
        // One thread waits on the queue while holding the lock; the others wait for the lock.
        let job = rx.lock().unwrap_or_else(|p| p.into_inner()).recv();
        match job {
            Ok(job) => job(),
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Barrier;

    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn a_full_queue_refuses_at_once() {
        let pool = LoginPool::new(1, 2).unwrap();
        let gate = Arc::new(Barrier::new(2));
        let (started_tx, started) = mpsc::channel();
        let g = Arc::clone(&gate);
        // The one thread is busy until the gate opens; two more checks fit in the queue.
        let mut busy = Box::pin(pool.run(move || {
            let _ = started_tx.send(());
            g.wait();
            1
        }));
        assert!(poll_once(&mut busy).await.is_none());
        started.recv().unwrap();
        let mut queued: Vec<_> = (0..2).map(|i| Box::pin(pool.run(move || i + 2))).collect();
        for q in &mut queued {
            assert!(poll_once(q).await.is_none());
        }
        assert_eq!(pool.run(|| 9).await, None, "refused without running");
        gate.wait();
        assert_eq!(busy.await, Some(1));
        for (i, q) in queued.into_iter().enumerate() {
            assert_eq!(q.await, Some(i + 2));
        }
    }

    /// Polls a future once; `Some` if it finished.
    async fn poll_once<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            std::task::Poll::Ready(match std::pin::Pin::new(&mut *f).poll(cx) {
                std::task::Poll::Ready(v) => Some(v),
                std::task::Poll::Pending => None,
            })
        })
        .await
    }
}
