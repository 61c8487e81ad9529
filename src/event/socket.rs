//! The event loop's sockets: the web server's connections, accepted
//! without blocking, and connections to the bot opened without blocking —
//! thin adapters over mio's, registered with the loop's poll as they are
//! made.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsRawFd, OwnedFd};

use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

use super::exchange::{BotSocket, Dialer};
use crate::config::BotAddr;
use crate::net::Listener;
use crate::sys;

/// Both directions, edge-triggered: a socket is read or written until it
/// would block, and the loop hears when that changes.
pub const BOTH: Interest = Interest::READABLE.add(Interest::WRITABLE);

/// A connected socket, over TCP or a Unix socket.
pub enum Sock {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl Sock {
    /// Registers it with `registry` under `token`, for `interest`.
    pub fn register(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => registry.register(s, token, interest),
            Sock::Unix(s) => registry.register(s, token, interest),
        }
    }

    /// Changes what it is watched for.
    pub fn reregister(
        &mut self,
        registry: &Registry,
        token: Token,
        interest: Interest,
    ) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => registry.reregister(s, token, interest),
            Sock::Unix(s) => registry.reregister(s, token, interest),
        }
    }

    /// Ends the sending side.
    pub fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(Shutdown::Write),
            Sock::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl BotSocket for Sock {
    fn shutdown_write(&mut self) -> io::Result<()> {
        Sock::shutdown_write(self)
    }
}

/// The next connection on `listener`, non-blocking from the start;
/// `WouldBlock` when none is queued.
pub fn accept(listener: &Listener) -> io::Result<Sock> {
    let fd: OwnedFd = sys::accept_nonblocking(listener)?;
    Ok(match listener {
        Listener::Tcp(_) => {
            let stream = std::net::TcpStream::from(fd);
            // Each answer is one write: send it now, not after an ack.
            let _ = stream.set_nodelay(true);
            Sock::Tcp(TcpStream::from_std(stream))
        }
        Listener::Unix(..) => Sock::Unix(UnixStream::from_std(
            std::os::unix::net::UnixStream::from(fd),
        )),
    })
}

/// Opens connections to the bot for one exchange, each registered under
/// the exchange's token as it is made.
pub struct BotDialer<'a> {
    /// Where the bot listens.
    pub addr: &'a BotAddr,
    /// The loop's registry.
    pub registry: &'a Registry,
    /// The token of the exchange's socket.
    pub token: Token,
}

impl Dialer for BotDialer<'_> {
    type Socket = Sock;

    fn targets(&self) -> usize {
        match self.addr {
            BotAddr::Tcp(addrs) => addrs.len().max(1),
            BotAddr::Unix(_) => 1,
        }
    }

    fn dial(&mut self, target: usize) -> io::Result<Sock> {
        let mut sock = match self.addr {
            BotAddr::Tcp(addrs) => {
                let addr = addrs.get(target).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidInput, "no address for the bot")
                })?;
                Sock::Tcp(TcpStream::connect(*addr)?)
            }
            // EAGAIN here is a full backlog: the exchange waits and tries again.
            BotAddr::Unix(path) => Sock::Unix(UnixStream::connect(path)?),
        };
        sock.register(self.registry, self.token, Interest::READABLE)?;
        Ok(sock)
    }

    fn watch_writable(&mut self, socket: &mut Sock) -> io::Result<()> {
        socket.reregister(self.registry, self.token, BOTH)
    }
}

impl AsRawFd for Sock {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Sock::Tcp(s) => s.as_raw_fd(),
            Sock::Unix(s) => s.as_raw_fd(),
        }
    }
}
