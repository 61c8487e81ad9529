//! Sockets over TCP and Unix alike: [`Listener`] for the web server's
//! side, [`Stream`] for both sides of the relay (the web server's FastCGI
//! connections and the connection to the bot).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use crate::fastcgi::TimedStream;
use crate::sys::{self, Inherited};

/// A connected socket.
pub enum Stream {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl Stream {
    /// Bounds each following read.
    pub fn set_read_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(Some(t)),
            Stream::Unix(s) => s.set_read_timeout(Some(t)),
        }
    }

    /// Bounds each following write.
    pub fn set_write_timeout(&self, t: Duration) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(Some(t)),
            Stream::Unix(s) => s.set_write_timeout(Some(t)),
        }
    }

    /// Bounds each following read and write.
    pub fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        self.set_read_timeout(t)?;
        self.set_write_timeout(t)
    }

    /// Ends the sending side: the peer reads end of stream.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Write),
            Stream::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl TimedStream for Stream {
    fn set_read_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        Stream::set_read_timeout(self, timeout)
    }

    fn set_write_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        Stream::set_write_timeout(self, timeout)
    }

    fn read_now(&mut self, buf: &mut [u8]) -> Option<io::Result<usize>> {
        sys::recv_now(self, buf)
    }

    fn write_now(&mut self, buf: &[u8]) -> Option<io::Result<usize>> {
        sys::send_now(self, buf)
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A listening socket: bound here, or handed over by whoever started the
/// process.
pub enum Listener {
    /// Over TCP.
    Tcp(TcpListener),
    /// Over a Unix socket; with the path when this process bound it (and
    /// so removes it when done).
    Unix(UnixListener, Option<PathBuf>),
}

impl Listener {
    /// The listening socket a web server handed over as fd 0
    /// (mod_fcgid, spawn-fcgi), if any.
    pub fn from_stdin() -> Option<Listener> {
        Listener::inherited(0)
    }

    /// The listening socket at `fd`, if it is one (fd 0 from a web
    /// server, fd 3 from socket activation). It is taken over: the caller
    /// must not use `fd` otherwise.
    pub fn inherited(fd: RawFd) -> Option<Listener> {
        Some(match sys::take_listening_socket(fd)? {
            Inherited::Unix(fd) => Listener::Unix(UnixListener::from(fd), None),
            Inherited::Tcp(fd) => Listener::Tcp(TcpListener::from(fd)),
        })
    }

    /// Binds `HOST:PORT` or `unix:/path`. A stale socket file left by a
    /// crash is replaced; a live one (something answers) is not, nor is
    /// anything that is not a socket (a mistyped path must not cost a file).
    pub fn bind(spec: &str) -> io::Result<Listener> {
        if let Some(path) = spec.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if UnixStream::connect(&path).is_ok() {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    "another process is listening there",
                ));
            }
            match std::fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_socket() => {
                    let _ = std::fs::remove_file(&path);
                }
                Ok(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "the path exists and is not a socket; not removing it",
                    ));
                }
                Err(_) => {}
            }
            let listener = UnixListener::bind(&path)?;
            return Ok(Listener::Unix(listener, Some(path)));
        }
        Ok(Listener::Tcp(TcpListener::bind(spec)?))
    }

    /// Where it listens, for the log.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp".into(), |a| a.to_string()),
            Listener::Unix(_, Some(p)) => format!("unix:{}", p.display()),
            Listener::Unix(l, None) => l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| format!("unix:{}", p.display())))
                .unwrap_or_else(|| format!("inherited fd {}", l.as_raw_fd())),
        }
    }

    /// The next connection, blocking; a signal ends the wait with
    /// `Interrupted` (see [`sys::interrupt`]).
    pub fn accept_interruptible(&self) -> io::Result<Stream> {
        let fd = sys::accept_interruptible(self)?;
        Ok(match self {
            Listener::Tcp(_) => {
                let s = TcpStream::from(fd);
                let _ = s.set_nodelay(true);
                Stream::Tcp(s)
            }
            Listener::Unix(..) => Stream::Unix(UnixStream::from(fd)),
        })
    }
}

impl AsRawFd for Listener {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        // Only a socket: whatever else someone put there since is theirs.
        if let Listener::Unix(_, Some(path)) = self
            && std::fs::symlink_metadata(&*path).is_ok_and(|m| m.file_type().is_socket())
        {
            let _ = std::fs::remove_file(path);
        }
    }
}
