//! A TCP relay between two host processes that a test can freeze: the network between them
//! partitioned, with both connections left open (nothing is closed, nothing gets through), as a
//! cut cable or a dead switch looks to both ends. It can also hold back what comes back from
//! the far end and deliver it later, as a congested or stalled link does.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Forwards the first connection to its address on to `to`, both ways, until frozen or dropped.
pub struct Relay {
    addr: String,
    frozen: Arc<AtomicBool>,
    held: Arc<AtomicBool>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on loopback for one connection to forward to `to` (`IP:PORT`).
    pub fn start(to: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port for the relay");
        let addr = listener.local_addr().unwrap().to_string();
        let (frozen, held, done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let to = to.to_string();
        let thread = {
            let (frozen, held, done) = (frozen.clone(), held.clone(), done.clone());
            std::thread::spawn(move || relay(listener, &to, &frozen, &held, &done))
        };
        Relay {
            addr,
            frozen,
            held,
            done,
            thread: Some(thread),
        }
    }

    /// Where to connect instead of `to`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// From now on nothing is forwarded either way; both connections stay open.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    /// While `hold` is true, what `to` sends back is left unread (it waits in the sockets,
    /// nothing is lost); `false` delivers it and forwards again.
    pub fn hold_back(&self, hold: bool) {
        self.held.store(hold, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        // Unblocks an accept that never got its connection.
        let _ = TcpStream::connect(&self.addr);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn relay(
    listener: TcpListener,
    to: &str,
    frozen: &Arc<AtomicBool>,
    held: &Arc<AtomicBool>,
    done: &Arc<AtomicBool>,
) {
    let Ok((a, _)) = listener.accept() else {
        return;
    };
    if done.load(Ordering::SeqCst) {
        return;
    }
    let Ok(b) = TcpStream::connect(to) else {
        return;
    };
    let one_way = |from: &TcpStream, to: &TcpStream, held: Arc<AtomicBool>| {
        let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
        let (frozen, done) = (frozen.clone(), done.clone());
        // Short reads, so that a freeze or the end is seen within 50 ms.
        from.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            // Read while a hold began: delivered when it ends.
            let mut pending = Vec::new();
            while !done.load(Ordering::SeqCst) {
                if frozen.load(Ordering::SeqCst) || held.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(1));
                    continue;
                }
                if !pending.is_empty() {
                    if to.write_all(&pending).is_err() {
                        break;
                    }
                    pending.clear();
                }
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if frozen.load(Ordering::SeqCst) {
                            // Caught in the cut: never delivered.
                            continue;
                        }
                        if held.load(Ordering::SeqCst) {
                            pending.extend_from_slice(&buf[..n]);
                            continue;
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            let _ = to.shutdown(Shutdown::Both);
        })
    };
    let there = one_way(&a, &b, Arc::new(AtomicBool::new(false)));
    let back = one_way(&b, &a, held.clone());
    let _ = there.join();
    let _ = back.join();
}
