//! The graceful stop: SIGTERM (mod_fcgid's and systemd's stop), SIGINT
//! and SIGUSR1 (and SIGHUP for a service) stop the accepting; what happens
//! to requests in flight is the serving loop's business.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

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
    signals: Signals,
}

impl StopSignal {
    /// Starts watching the stop signals.
    pub fn install(signals: Signals) -> io::Result<StopSignal> {
        let flag = Arc::new(AtomicBool::new(false));
        for &sig in signals.list() {
            signal_hook::flag::register(sig, flag.clone())?;
        }
        Ok(StopSignal { flag, signals })
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
