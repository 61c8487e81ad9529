//! Every system call the program makes outside std, behind safe
//! functions. This is the one module allowed `unsafe`; each block says
//! why it is sound.

#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// A listening socket handed over by whoever started the process.
pub enum Inherited {
    /// An `AF_UNIX` listening socket.
    Unix(OwnedFd),
    /// An `AF_INET`/`AF_INET6` listening socket.
    Tcp(OwnedFd),
}

/// Takes ownership of `fd` if it is a listening socket (mod_fcgid's fd 0,
/// a socket-activated fd 3); anything else is left alone.
///
/// The caller promises that nothing else in the process uses `fd`: it
/// moves into the returned value and is closed with it.
pub fn take_listening_socket(fd: RawFd) -> Option<Inherited> {
    if socket_option(fd, libc::SO_ACCEPTCONN)? == 0 {
        return None;
    }
    let domain = socket_option(fd, libc::SO_DOMAIN)?;
    // SAFETY: fd is an open listening socket (getsockopt just said so) that,
    // by this function's contract, nothing else in the process owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    Some(if domain == libc::AF_UNIX {
        Inherited::Unix(owned)
    } else {
        Inherited::Tcp(owned)
    })
}

/// `getsockopt(SOL_SOCKET, opt)` as an int; `None` when `fd` is not an
/// open socket.
pub fn socket_option(fd: RawFd, opt: libc::c_int) -> Option<libc::c_int> {
    let mut value: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: valid out-pointers of the right size; a bad fd only errors.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            opt,
            (&raw mut value).cast::<libc::c_void>(),
            &mut len,
        )
    };
    (rc == 0).then_some(value)
}

/// Marks `fd` close-on-exec, so that nothing this process might start
/// inherits it.
pub fn set_cloexec(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on an integer fd has no memory effects; a bad fd only
    // errors.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Unsets the environment variables `names`, but only while this process
/// has one thread: another could be reading the environment at the same
/// moment. Returns whether they were unset.
pub fn unset_env_if_single_threaded(names: &[&str]) -> bool {
    if thread_count() != Some(1) {
        return false;
    }
    for name in names {
        // SAFETY: this is the process's only thread (just checked), so
        // nothing reads or writes the environment concurrently.
        unsafe { std::env::remove_var(name) };
    }
    true
}

fn thread_count() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
}

/// Waits until one of `fds` is ready or `timeout` passes (`None`: no
/// bound), restarting after a signal with the time that is left. Returns
/// how many are ready (0 on time-out).
pub fn poll(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<usize> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        let ms = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                // Round up, so a wait is never cut short into a busy loop.
                left.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
            }
        };
        // SAFETY: the pointer and length describe a valid, exclusively
        // borrowed slice of pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A `pollfd` asking for `events` on `fd`.
pub fn pollfd(fd: &impl AsRawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events,
        revents: 0,
    }
}

/// Connects to a Unix socket within `timeout`. A Unix connect blocks
/// while the peer's accept backlog is full and std offers no timeout for
/// it, so it is made non-blocking and bounded by `poll`.
pub fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut sa: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= sa.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    sa.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (dst, src) in sa.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: sa is a valid sockaddr_un of length len; fd is open.
    let rc = unsafe { libc::connect(fd, (&raw const sa).cast::<libc::sockaddr>(), len) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EAGAIN) && err.raw_os_error() != Some(libc::EINPROGRESS)
        {
            return Err(err);
        }
        let mut fds = [pollfd(&owned, libc::POLLOUT)];
        if poll(&mut fds, Some(timeout))? == 0 {
            return Err(io::ErrorKind::TimedOut.into());
        }
        match socket_option(fd, libc::SO_ERROR) {
            None => return Err(io::Error::last_os_error()),
            Some(0) => {}
            Some(e) => return Err(io::Error::from_raw_os_error(e)),
        }
    }
    let stream = UnixStream::from(owned);
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// Takes `file`'s exclusive `flock` if it is free: `Ok(false)` when
/// another open file description holds it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: a valid, open fd borrowed from `file`.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// The effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Whether this process may create files in `dir` (asked of the kernel
/// with the effective ids, without creating one: a read-only file system
/// says no here).
pub fn can_create_in(dir: &Path) -> io::Result<()> {
    let c_dir = CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("path contains a NUL byte"))?;
    // SAFETY: a valid C string that faccessat only reads.
    let rc = unsafe {
        libc::faccessat(
            libc::AT_FDCWD,
            c_dir.as_ptr(),
            libc::W_OK | libc::X_OK,
            libc::AT_EACCESS,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Caps glibc's malloc arenas. glibc gives each new thread its own arena
/// (up to 8 per core), each holding on to freed memory: with a few hundred
/// connection threads that is most of the process's memory. Call before
/// starting threads.
pub fn limit_malloc_arenas(arenas: i32) {
    // SAFETY: mallopt only tunes the allocator and has no memory-safety
    // preconditions.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, arenas) };
}

/// CPU time the calling thread has used so far (user and kernel).
pub fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; the clock id is supported on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Calls `listen(2)` again on a listening socket, which resizes its
/// accept queue.
pub fn relisten(socket: &impl AsFd, backlog: i32) -> io::Result<()> {
    // SAFETY: a valid, open fd borrowed for the call.
    let rc = unsafe { libc::listen(socket.as_fd().as_raw_fd(), backlog) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_listening_socket_is_taken() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        assert!(take_listening_socket(stream.as_raw_fd()).is_none());
        let file = File::open("/dev/null").unwrap();
        assert!(take_listening_socket(file.as_raw_fd()).is_none());
        let fd = listener.as_raw_fd();
        // Ownership moves to the taken value: forget the original.
        std::mem::forget(listener);
        assert!(matches!(take_listening_socket(fd), Some(Inherited::Tcp(_))));
    }

    #[test]
    fn poll_times_out_and_sees_readiness() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut fds = [pollfd(&a, libc::POLLIN)];
        assert_eq!(poll(&mut fds, Some(Duration::from_millis(10))).unwrap(), 0);
        std::io::Write::write_all(&mut b, b"x").unwrap();
        assert_eq!(poll(&mut fds, Some(Duration::from_secs(5))).unwrap(), 1);
    }

    #[test]
    fn a_lock_is_exclusive_between_open_files() {
        let path = std::env::temp_dir().join(format!("tr-sys-lock-{}", std::process::id()));
        let a = File::create(&path).unwrap();
        let b = File::open(&path).unwrap();
        assert!(try_lock_exclusive(&a).unwrap());
        assert!(!try_lock_exclusive(&b).unwrap());
        drop(a);
        assert!(try_lock_exclusive(&b).unwrap());
        let _ = std::fs::remove_file(&path);
    }
}
