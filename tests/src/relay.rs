//! A TCP relay between two host processes that a test can freeze: the network between them
//! partitioned, with both connections left open (nothing is closed, nothing gets through), as a
//! cut cable or a dead switch looks to both ends.

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
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Relay {
    /// Listens on loopback for one connection to forward to `to` (`IP:PORT`).
    pub fn start(to: &str) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port for the relay");
        let addr = listener.local_addr().unwrap().to_string();
        let (frozen, done) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let to = to.to_string();
        let thread = {
            let (frozen, done) = (frozen.clone(), done.clone());
            std::thread::spawn(move || relay(listener, &to, &frozen, &done))
        };
        Relay {
            addr,
            frozen,
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

fn relay(listener: TcpListener, to: &str, frozen: &Arc<AtomicBool>, done: &Arc<AtomicBool>) {
    let Ok((a, _)) = listener.accept() else {
        return;
    };
    if done.load(Ordering::SeqCst) {
        return;
    }
    let Ok(b) = TcpStream::connect(to) else {
        return;
    };
    let one_way = |from: &TcpStream, to: &TcpStream| {
        let (mut from, mut to) = (from.try_clone().unwrap(), to.try_clone().unwrap());
        let (frozen, done) = (frozen.clone(), done.clone());
        // Short reads, so that a freeze or the end is seen within 50 ms.
        from.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 << 10];
            while !done.load(Ordering::SeqCst) {
                if frozen.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                }
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if frozen.load(Ordering::SeqCst) {
                            // Caught in the cut: never delivered.
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
    let there = one_way(&a, &b);
    let back = one_way(&b, &a);
    let _ = there.join();
    let _ = back.join();
}
