//! Loopback ports: a free one, and one that is sure to refuse.

use std::io;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::fd::{FromRawFd, OwnedFd};

/// A TCP port on 127.0.0.1 that refuses connections for as long as this
/// value lives: a socket bound to it but never listening. Unlike a port
/// that was bound and released, nobody else can start listening there
/// while a test counts on it being closed. (Binding without listening
/// needs libc: std's `TcpListener::bind` listens at once.)
pub struct RefusingPort {
    _fd: OwnedFd,
    port: u16,
    addr: String,
}

impl RefusingPort {
    /// Binds a fresh socket to `127.0.0.1:0`; panics if a connection to the
    /// port it got is not refused.
    pub fn new() -> RefusingPort {
        // SAFETY: plain socket(2); the fd is owned right away.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: fd is a fresh socket nothing else owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_in is plain data; zeroed is valid.
        let mut sa: libc::sockaddr_in = unsafe { std::mem::zeroed() };
        sa.sin_family = libc::AF_INET as libc::sa_family_t;
        sa.sin_addr.s_addr = u32::from(Ipv4Addr::LOCALHOST).to_be();
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: valid sockaddr_in of length len.
        let rc = unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) };
        assert_eq!(rc, 0, "bind: {}", io::Error::last_os_error());
        // SAFETY: valid out-pointers of the right size.
        let rc =
            unsafe { libc::getsockname(fd, &mut sa as *mut _ as *mut libc::sockaddr, &mut len) };
        assert_eq!(rc, 0, "getsockname: {}", io::Error::last_os_error());
        let port = u16::from_be(sa.sin_port);
        let addr = format!("127.0.0.1:{port}");
        assert!(
            TcpStream::connect(&addr).is_err(),
            "{addr} accepted a connection"
        );
        RefusingPort {
            _fd: owned,
            port,
            addr,
        }
    }

    /// `127.0.0.1:PORT`: usable as `REGISTER_BOT_ADDR`.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// The port. It stays closed only while `self` lives: drop `self` just
    /// before something of the test's own is to listen there.
    pub fn port(&self) -> u16 {
        self.port
    }
}

/// A free `127.0.0.1` port (bound to 0, then dropped).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
    listener.local_addr().expect("local_addr").port()
}
