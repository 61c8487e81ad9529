//! The graceful stop: SIGTERM (mod_fcgid's and systemd's stop), SIGINT
//! and SIGUSR1 stop the accepting; what happens to requests in flight is
//! the serving loop's business.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use log::warn;

use crate::net::{Listener, Stream};
use crate::sys;

/// Signals that ask for a graceful stop.
const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGTERM, libc::SIGINT, libc::SIGUSR1];

/// Which signals stop a server gracefully.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signals {
    /// SIGTERM, SIGINT, SIGUSR1: a web server's children (mod_fcgid's
    /// fd-0 processes). SIGHUP keeps its default there: Apache's hard
    /// restart sends it to its whole process group and has already cut
    /// the connections, so the process should end at once.
    Child,
    /// SIGHUP as well, for a service that runs on its own: its default
    /// would end the process on the spot with requests in flight (a
    /// closed terminal, an operator expecting a reload).
    Service,
}

impl Signals {
    fn list(self) -> &'static [libc::c_int] {
        const WITH_HUP: [libc::c_int; 4] = [
            STOP_SIGNALS[0],
            STOP_SIGNALS[1],
            STOP_SIGNALS[2],
            libc::SIGHUP,
        ];
        match self {
            Signals::Child => &STOP_SIGNALS,
            Signals::Service => &WITH_HUP,
        }
    }
}

/// The stop signals, watched from the moment it is installed.
pub struct StopSignal {
    flag: Arc<AtomicBool>,
    wake: UnixStream,
    signals: Signals,
}

impl StopSignal {
    /// Starts watching the stop signals.
    pub fn install(signals: Signals) -> io::Result<StopSignal> {
        let flag = Arc::new(AtomicBool::new(false));
        let (wake, notify) = UnixStream::pair()?;
        wake.set_nonblocking(true)?;
        for &sig in signals.list() {
            signal_hook::flag::register(sig, flag.clone())?;
            signal_hook::low_level::pipe::register(sig, notify.try_clone()?)?;
        }
        Ok(StopSignal {
            flag,
            wake,
            signals,
        })
    }

    /// A socket that becomes readable when a stop signal arrives, for a
    /// thread other than the accept loop.
    pub fn watcher(&self) -> io::Result<UnixStream> {
        let (watcher, notify) = UnixStream::pair()?;
        for &sig in self.signals.list() {
            signal_hook::low_level::pipe::register(sig, notify.try_clone()?)?;
        }
        if self.requested() {
            let _ = (&notify).write(&[1]);
        }
        Ok(watcher)
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The next connection, or `None` once a stop was asked for.
    pub fn next_connection(&self, listener: &Listener) -> io::Result<Option<Stream>> {
        let mut pause = Duration::from_millis(10);
        while self.wait_for_connection(listener)? {
            match listener.accept() {
                Ok(stream) => return Ok(Some(stream)),
                // Failures that pass (a client gone before accept, out of
                // file descriptors for a moment); the growing pause keeps a
                // lasting one from spinning a core or flooding the log.
                Err(e) => {
                    warn!(
                        "accept failed, trying again in {} ms: {e}",
                        pause.as_millis()
                    );
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
        Ok(None)
    }

    /// Blocks until the listener has a connection (true) or a stop was
    /// asked for (false).
    fn wait_for_connection(&self, listener: &Listener) -> io::Result<bool> {
        loop {
            if self.requested() {
                return Ok(false);
            }
            let mut fds = [
                sys::pollfd(listener, libc::POLLIN),
                sys::pollfd(&self.wake, libc::POLLIN),
            ];
            sys::poll(&mut fds, None)?;
            if fds[1].revents != 0 {
                let mut sink = [0u8; 64];
                let _ = (&self.wake).read(&mut sink);
                continue;
            }
            if fds[0].revents != 0 {
                return Ok(true);
            }
        }
    }
}

/// Blocks until `watcher` (from [`StopSignal::watcher`]) reports a stop.
pub fn wait_for_stop(mut watcher: UnixStream) -> io::Result<()> {
    let mut byte = [0u8; 1];
    loop {
        match watcher.read(&mut byte) {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}
