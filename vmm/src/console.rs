//! The host side of the serial console: where guest output goes, the terminal's raw mode while
//! a VM owns it, the escape sequence (Ctrl-A x) that ends the VM from the keyboard, and the
//! interactive console on a Unix socket.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use lockstep_devices::legacy::{InputPump, Overflow, SerialDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitReason, ExitSignal};
use crate::private_fs;

/// Ctrl-A, the escape character.
const ESCAPE: u8 = 0x01;

/// Opens where the guest's serial output goes: the given file (appended to, created if needed)
/// or this process's stdout.
pub fn open_output(path: Option<&Path>) -> io::Result<Box<dyn Write + Send>> {
    match path {
        // A new file is 0600 whatever the umask; a user's existing file keeps its mode.
        Some(p) => Ok(Box::new(private_fs::open_append(p)?)),
        None => {
            // A private, unbuffered handle on fd 1: each guest byte is written as it comes.
            let fd = io::stdout().as_fd().try_clone_to_owned()?;
            Ok(Box::new(File::from(fd)))
        }
    }
}

/// True when stdin is a terminal.
pub fn stdin_is_terminal() -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(libc::STDIN_FILENO) == 1 }
}

/// Puts a terminal in raw input mode and restores it exactly when dropped.
pub struct RawTerminal {
    fd: RawFd,
    saved: libc::termios,
}

impl RawTerminal {
    /// Raw input on stdin: keys go to the guest unprocessed (Ctrl-C included); output
    /// processing stays on so the host terminal still turns "\n" into a new line.
    pub fn stdin() -> io::Result<Self> {
        let fd = libc::STDIN_FILENO;
        // SAFETY: termios is plain data; tcgetattr fills it or fails.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: fd is stdin and `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let mut raw = saved;
        raw.c_lflag &= !(libc::ICANON | libc::ECHO | libc::ISIG | libc::IEXTEN);
        raw.c_iflag &= !(libc::IXON | libc::ICRNL | libc::INLCR | libc::IGNCR);
        raw.c_cc[libc::VMIN] = 1;
        raw.c_cc[libc::VTIME] = 0;
        // SAFETY: fd is stdin and `raw` is a valid termios.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal {
    fn drop(&mut self) {
        // SAFETY: restores the settings read from the same descriptor.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Keyboard input with the console escape taken out: Ctrl-A x ends the VM, Ctrl-A Ctrl-A
/// sends one Ctrl-A, and Ctrl-A followed by anything else sends both.
pub struct EscapedInput<R> {
    inner: R,
    exit: Arc<ExitSignal>,
    after_escape: bool,
    /// A byte owed to the reader that did not fit in the last read's buffer.
    held: Option<u8>,
    ended: bool,
}

impl<R: Read> EscapedInput<R> {
    /// Filters `inner`; the escape signals `exit`.
    pub fn new(inner: R, exit: Arc<ExitSignal>) -> Self {
        EscapedInput {
            inner,
            exit,
            after_escape: false,
            held: None,
            ended: false,
        }
    }
}

impl<R: Read> Read for EscapedInput<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.ended || buf.is_empty() {
            return Ok(0);
        }
        let mut out = 0;
        if let Some(b) = self.held.take() {
            buf[0] = b;
            out = 1;
        }
        // Each byte read gives at most one byte out, but an escape held over from the last read
        // gives two: at most one byte more than was read, kept in `held` if it does not fit.
        let mut raw = [0u8; 4096];
        let want = (buf.len() - out).min(raw.len());
        if want == 0 {
            return Ok(out);
        }
        let n = match self.inner.read(&mut raw[..want]) {
            Ok(n) => n,
            Err(e) if out > 0 && e.kind() == io::ErrorKind::WouldBlock => return Ok(out),
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(out);
        }
        let mut emit = |b: u8, out: &mut usize| {
            if *out < buf.len() {
                buf[*out] = b;
                *out += 1;
            } else {
                self.held = Some(b);
            }
        };
        for &b in &raw[..n] {
            if self.after_escape {
                self.after_escape = false;
                match b {
                    b'x' | b'X' => {
                        self.ended = true;
                        self.exit.signal(ExitReason::Requested { signal: None });
                        return Ok(out);
                    }
                    ESCAPE => {}
                    _ => emit(ESCAPE, &mut out),
                }
            } else if b == ESCAPE {
                self.after_escape = true;
                continue;
            }
            emit(b, &mut out);
        }
        if out == 0 {
            // Only an escape arrived; report "try again" rather than EOF.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(out)
    }
}

impl<R: Read + AsRawFd + Send> crate::ConsoleInput for EscapedInput<R> {
    fn is_terminal(&self) -> bool {
        true
    }
}

impl<R: AsRawFd> AsRawFd for EscapedInput<R> {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

/// The connected interactive console client, if any, shared by the serial output and the socket
/// that accepts clients.
pub type ConsoleClient = Arc<Mutex<ClientSlot>>;

/// What [`ConsoleClient`] holds.
#[derive(Debug, Default)]
pub struct ClientSlot {
    /// The connected client.
    pub stream: Option<UnixStream>,
    /// Keystrokes a same-host source had read from the client but not given the guest yet; they
    /// go to the guest first.
    pub handed_input: Vec<u8>,
}

/// Serial output that goes to its sink (file or stdout) and, as well, to the interactive console
/// client when one is connected. A client too slow to take the output misses some of it; the
/// sink never does, and the guest is never held up by a client.
pub struct ConsoleTee {
    sink: Box<dyn Write + Send>,
    client: ConsoleClient,
}

impl ConsoleTee {
    /// Output to `sink`, and to whoever connects to the console socket.
    pub fn new(sink: Box<dyn Write + Send>) -> (ConsoleTee, ConsoleClient) {
        let client: ConsoleClient = Arc::default();
        (
            ConsoleTee {
                sink,
                client: client.clone(),
            },
            client,
        )
    }
}

impl Write for ConsoleTee {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.sink.write(buf)?;
        let mut client = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(stream) = client.stream.as_mut() {
            match stream.write(&buf[..n]) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => client.stream = None,
            }
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.sink.flush()
    }
}

/// The interactive console's Unix socket: accepts a client (a new one replaces the old), feeds
/// its keystrokes to COM1 and lets [`ConsoleTee`] send it the output. A client already in
/// `client` when it starts (handed over by a same-host migration) is served from the start.
pub struct ConsoleSocket {
    listener: UnixListener,
    /// Removed when the console goes, if it is still this socket's.
    file: private_fs::SocketFile,
    serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the guest empties the receive FIFO.
    room: EventFd,
    client: ConsoleClient,
    input: Option<InputPump<UnixStream>>,
}

impl ConsoleSocket {
    /// Listens on `path` with mode 0600 (replacing a stale socket file, never a live socket or
    /// another kind of file) for clients of `serial`; `client` comes from [`ConsoleTee::new`].
    pub fn bind(
        path: &Path,
        serial: Arc<Mutex<SerialDevice>>,
        client: ConsoleClient,
    ) -> io::Result<Self> {
        let room = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .room_signal()?;
        let listener = private_fs::bind_private_socket(path)?;
        Ok(ConsoleSocket {
            listener,
            file: private_fs::SocketFile::track(path)?,
            serial,
            room,
            client,
            input: None,
        })
    }

    fn accept(&mut self, ops: &mut EventOps) {
        let Ok((stream, _)) = self.listener.accept() else {
            return;
        };
        self.connect(stream, &[], ops);
        log::info!("console client connected on {}", self.file.path().display());
    }

    /// What the client typed that has not reached the guest yet (for a same-host migration
    /// to hand over with the client).
    pub fn pending_input(&self) -> Vec<u8> {
        self.input
            .as_ref()
            .map(InputPump::pending)
            .unwrap_or_default()
    }

    /// Makes `stream` the client: its keystrokes (after `typed`, read from it before) go to
    /// COM1, the output to it.
    fn connect(&mut self, stream: UnixStream, typed: &[u8], ops: &mut EventOps) {
        if let Some(mut old) = self.input.take() {
            old.stop(ops);
        }
        let Ok(reader) = stream.try_clone() else {
            return;
        };
        if stream.set_nonblocking(true).is_err() {
            return;
        }
        self.client.lock().unwrap_or_else(|p| p.into_inner()).stream = Some(stream);
        let mut pump = InputPump::new(reader, self.serial.clone(), Overflow::Wait);
        pump.preload(typed);
        pump.start(ops);
        if !typed.is_empty() {
            pump.on_room(ops);
        }
        self.input = Some(pump);
    }
}

impl MutEventSubscriber for ConsoleSocket {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            log::warn!("console socket {}: {e}", self.file.path().display());
        }
        if let Err(e) = ops.add(Events::new(&self.room, EventSet::IN)) {
            log::warn!("console socket: cannot watch the receive FIFO: {e}");
        }
        // A client a same-host migration handed over keeps its session.
        let (handed, typed) = {
            let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
            (slot.stream.take(), std::mem::take(&mut slot.handed_input))
        };
        if let Some(stream) = handed {
            self.connect(stream, &typed, ops);
            log::info!(
                "console client handed over on {}",
                self.file.path().display()
            );
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.listener.as_raw_fd() {
            self.accept(ops);
        } else if events.fd() == self.room.as_raw_fd() {
            let _ = self.room.read();
            if let Some(pump) = self.input.as_mut() {
                pump.on_room(ops);
                // A client that sent its input and left: gone once the guest has it all.
                if pump.is_finished() {
                    self.input = None;
                }
            }
        } else if let Some(pump) = self.input.as_mut().filter(|p| p.fd() == events.fd()) {
            pump.on_input(&events, ops);
            if pump.is_closed() {
                self.client.lock().unwrap_or_else(|p| p.into_inner()).stream = None;
                log::info!("console client left {}", self.file.path().display());
                // What it sent still goes to the guest; the pump goes once that is done.
                if pump.is_finished() {
                    self.input = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(input: &[u8]) -> (Vec<u8>, Option<ExitReason>) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut f = EscapedInput::new(input, exit.clone());
        let mut out = Vec::new();
        let mut buf = [0u8; 4];
        loop {
            match f.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        (out, exit.reason())
    }

    #[test]
    fn plain_bytes_pass() {
        assert_eq!(filter(b"ls -l\r"), (b"ls -l\r".to_vec(), None));
    }

    #[test]
    fn escape_x_ends_and_drops_the_rest() {
        let (out, reason) = filter(b"ab\x01xcd");
        assert_eq!(out, b"ab");
        assert_eq!(reason, Some(ExitReason::Requested { signal: None }));
    }

    #[test]
    fn doubled_escape_sends_one_and_other_keys_pass() {
        assert_eq!(filter(b"\x01\x01\x01q").0, b"\x01\x01q");
    }

    /// Reads through buffers of every size from one byte up: nothing is lost, duplicated or
    /// taken for the end of input.
    #[test]
    fn any_buffer_size_passes_everything() {
        let input: Vec<u8> = b"a\x01b\x01\x01c\x01".repeat(40);
        // The escape ending each piece goes out with the next piece's "a"; the last is dropped.
        let mut expect: Vec<u8> = b"a\x01b\x01c\x01".repeat(40);
        expect.pop();
        for size in 1..12 {
            let exit = Arc::new(ExitSignal::new().unwrap());
            let mut f = EscapedInput::new(&input[..], exit);
            let mut out = Vec::new();
            let mut buf = vec![0u8; size];
            for _ in 0..10_000 {
                match f.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            assert_eq!(out, expect, "buffer of {size}");
        }
    }

    /// The terminal path as `lockstep run` wires it: keys through the escape filter into the
    /// UART, read by an interrupt-driven driver. A paste longer than the FIFO arrives whole, and
    /// Ctrl-A x still ends the VM after it.
    #[test]
    fn a_paste_at_the_terminal_arrives_whole_and_the_escape_still_works() {
        use event_manager::{EventManager, SubscriberOps};
        use lockstep_devices::bus::BusDevice;
        use lockstep_devices::legacy::SerialInput;
        use lockstep_devices::EventFdTrigger;

        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let serial = Arc::new(Mutex::new(SerialDevice::new(
            EventFdTrigger::new(irq.try_clone().unwrap()),
            Box::new(io::sink()),
        )));
        serial.lock().unwrap().write(1, &[0x01]); // IER: received-data interrupt.
        let (mut keyboard, terminal) = UnixStream::pair().unwrap();
        terminal.set_nonblocking(true).unwrap();
        let exit = Arc::new(ExitSignal::new().unwrap());
        let input = SerialInput::new(
            EscapedInput::new(terminal, exit.clone()),
            serial.clone(),
            Overflow::Drop,
        )
        .unwrap();
        let mut mgr = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        mgr.add_subscriber(Arc::new(Mutex::new(input)));

        let line: Vec<u8> = (0..4000).map(|i| b'a' + (i % 26) as u8).collect();
        let mut received = Vec::new();
        let guest_reads = |received: &mut Vec<u8>| {
            if irq.read().is_err() {
                return;
            }
            let mut s = serial.lock().unwrap();
            let mut b = [0u8];
            s.read(2, &mut b); // IIR
            loop {
                s.read(5, &mut b);
                if b[0] & 1 == 0 {
                    break;
                }
                s.read(0, &mut b);
                received.push(b[0]);
            }
        };
        // 63 bytes first: the FIFO is left with exactly one byte of room.
        keyboard.write_all(&line[..63]).unwrap();
        mgr.run_with_timeout(10).unwrap();
        keyboard.write_all(&line[63..]).unwrap();
        for _ in 0..20_000 {
            if received.len() == line.len() {
                break;
            }
            mgr.run_with_timeout(1).unwrap();
            guest_reads(&mut received);
        }
        assert_eq!(received.len(), line.len(), "console input stalled");
        assert_eq!(received, line);

        keyboard.write_all(b"\x01x").unwrap();
        for _ in 0..100 {
            mgr.run_with_timeout(1).unwrap();
        }
        assert_eq!(exit.reason(), Some(ExitReason::Requested { signal: None }));
    }

    /// A console client handed over to another console (a same-host migration) keeps its
    /// session: what the old console had read but the guest had not taken comes first, then
    /// what the client types next.
    #[test]
    fn a_handed_over_client_keeps_its_unread_keystrokes() {
        use event_manager::{EventManager, SubscriberOps};
        use lockstep_devices::bus::BusDevice;
        use lockstep_devices::EventFdTrigger;

        let serial = |irq: &EventFd| {
            let s = Arc::new(Mutex::new(SerialDevice::new(
                EventFdTrigger::new(irq.try_clone().unwrap()),
                Box::new(io::sink()),
            )));
            s.lock().unwrap().write(1, &[0x01]); // IER: received-data interrupt.
            s
        };
        let dir = tempfile::tempdir().unwrap();
        let (irq_a, irq_b) = (
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        );
        let client_a: ConsoleClient = Arc::default();
        let socket_a = Arc::new(Mutex::new(
            ConsoleSocket::bind(&dir.path().join("a.sock"), serial(&irq_a), client_a.clone())
                .unwrap(),
        ));
        let mut mgr_a = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        mgr_a.add_subscriber(socket_a.clone());
        let mut person = UnixStream::connect(dir.path().join("a.sock")).unwrap();
        // The guest on A reads nothing: 64 bytes fill its FIFO, the rest waits in the console.
        let typed: Vec<u8> = (0..200).map(|i| b'a' + (i % 26) as u8).collect();
        person.write_all(&typed).unwrap();
        for _ in 0..200 {
            if socket_a.lock().unwrap().pending_input().len() == 136 {
                break;
            }
            mgr_a.run_with_timeout(10).unwrap();
        }
        let pending = socket_a.lock().unwrap().pending_input();
        assert_eq!(pending, typed[64..]);

        // B takes the client (a same-host destination); A stops.
        let serial_b = serial(&irq_b);
        let client_b: ConsoleClient = Arc::default();
        {
            let mut slot = client_b.lock().unwrap();
            let a = client_a.lock().unwrap();
            slot.stream = Some(a.stream.as_ref().unwrap().try_clone().unwrap());
            slot.handed_input = pending.clone();
        }
        let socket_b =
            ConsoleSocket::bind(&dir.path().join("b.sock"), serial_b.clone(), client_b).unwrap();
        let mut mgr_b = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        mgr_b.add_subscriber(Arc::new(Mutex::new(socket_b)));
        person.write_all(b"more").unwrap();
        let mut expect = pending;
        expect.extend_from_slice(b"more");
        let mut received = Vec::new();
        for _ in 0..2000 {
            if received.len() >= expect.len() {
                break;
            }
            mgr_b.run_with_timeout(1).unwrap();
            let mut s = serial_b.lock().unwrap();
            let mut b = [0u8];
            loop {
                s.read(5, &mut b);
                if b[0] & 1 == 0 {
                    break;
                }
                s.read(0, &mut b);
                received.push(b[0]);
            }
        }
        assert_eq!(received, expect);
    }
}
