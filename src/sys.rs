//! Every system call the program makes outside std, behind safe
//! functions. This is the one module allowed `unsafe`; each block says
//! why it is sound.

#![allow(unsafe_code)]

use std::ffi::{CStr, CString};
use std::io;
use std::net::{SocketAddr, TcpStream};
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

fn sockaddr_of(addr: &SocketAddr) -> (libc::c_int, libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is large and aligned enough for any
            // sockaddr; a plain-data write.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in>(), sin) };
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            (libc::AF_INET, storage, len)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: as above.
            unsafe { std::ptr::write((&raw mut storage).cast::<libc::sockaddr_in6>(), sin6) };
            let len = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
            (libc::AF_INET6, storage, len)
        }
    }
}

/// Reads what is there without waiting: `None` when nothing is (the
/// caller then waits with a bound); `Some(Ok(0))` is end of stream.
pub fn recv_now(socket: &impl AsRawFd, buf: &mut [u8]) -> Option<io::Result<usize>> {
    // SAFETY: buf is a valid, exclusively borrowed buffer of buf.len() bytes.
    let rc = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    now_result(rc)
}

/// Writes what fits without waiting (no SIGPIPE): `None` when nothing
/// fits.
pub fn send_now(socket: &impl AsRawFd, buf: &[u8]) -> Option<io::Result<usize>> {
    // SAFETY: buf is a valid buffer of buf.len() bytes that send only reads.
    let rc = unsafe {
        libc::send(
            socket.as_raw_fd(),
            buf.as_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    now_result(rc)
}

fn now_result(rc: isize) -> Option<io::Result<usize>> {
    if rc >= 0 {
        return Some(Ok(rc as usize));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EINTR) => None,
        _ => Some(Err(err)),
    }
}

/// Ends the receiving side of the socket `fd`: a blocked read returns
/// end of stream. The caller makes sure `fd` is still the open socket it
/// means (a stale number could name another file: shutdown(2) only
/// fails on what is not a socket, but would end another socket's reads).
pub fn shutdown_read(fd: RawFd) {
    // SAFETY: shutdown(2) touches no memory of this process; a bad fd only errors.
    unsafe { libc::shutdown(fd, libc::SHUT_RD) };
}

/// Takes `file`'s exclusive `flock` if it is free: `Ok(false)` when
/// another open file description holds it.
pub fn try_lock_exclusive(file: &impl AsFd) -> io::Result<bool> {
    // SAFETY: a valid, open fd borrowed from `file`.
    let rc = unsafe { libc::flock(file.as_fd().as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
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

/// Releases the `flock` taken by [`try_lock_exclusive`].
pub fn unlock_exclusive(file: &impl AsFd) -> io::Result<()> {
    // SAFETY: a valid, open fd borrowed from `file`.
    check(unsafe { libc::flock(file.as_fd().as_raw_fd(), libc::LOCK_UN) })
}

fn ofd_lock(file: &impl AsFd, byte: u64, kind: libc::c_short) -> io::Result<bool> {
    // SAFETY: flock is plain data; zeroed is a valid value.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = libc::off_t::try_from(byte).map_err(io::Error::other)?;
    lock.l_len = 1;
    // SAFETY: a valid descriptor and a valid flock struct that fcntl only reads.
    let rc = unsafe { libc::fcntl(file.as_fd().as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    if rc == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN) | Some(libc::EACCES) => Ok(false),
        _ => Err(e),
    }
}

/// Takes a one-byte write lock at offset `byte` of `file`, owned by its
/// open file description (so it goes with the process, however it dies),
/// without waiting: `Ok(false)` if another description holds it. Threads
/// sharing the description are not told apart.
pub fn try_lock_byte(file: &impl AsFd, byte: u64) -> io::Result<bool> {
    ofd_lock(file, byte, libc::F_WRLCK as libc::c_short)
}

/// Releases a lock taken by [`try_lock_byte`].
pub fn unlock_byte(file: &impl AsFd, byte: u64) -> io::Result<bool> {
    ofd_lock(file, byte, libc::F_UNLCK as libc::c_short)
}

/// The effective user id.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The owner and mode of an open file, in one `fstat`.
pub fn owner_and_mode(file: &impl AsFd) -> io::Result<(u32, u32)> {
    // SAFETY: stat is plain data; all zeroes is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a valid descriptor and a stat buffer of the right size.
    check(unsafe { libc::fstat(file.as_fd().as_raw_fd(), &mut st) })?;
    Ok((st.st_uid, st.st_mode))
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::other("a name holds a NUL byte"))
}

fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor just returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens a directory, never through a symlink in its last component.
pub fn open_dir(path: &Path) -> io::Result<OwnedFd> {
    let c = cstring(path.as_os_str().as_bytes())?;
    // SAFETY: a valid C string; open only reads it.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    };
    owned(fd)
}

/// Opens a file in `dir` for reading and writing, never through a
/// symlink; `create` makes it (0600), emptied.
pub fn open_at(dir: &impl AsFd, name: &[u8], create: bool) -> io::Result<OwnedFd> {
    let c = cstring(name)?;
    let mut flags = libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    if create {
        flags |= libc::O_CREAT | libc::O_TRUNC;
    }
    // SAFETY: a valid directory descriptor and C string.
    let fd = unsafe {
        libc::openat(
            dir.as_fd().as_raw_fd(),
            c.as_ptr(),
            flags,
            0o600 as libc::c_uint,
        )
    };
    owned(fd)
}

/// Gives the first `len` bytes of `file` their blocks on disk now, so
/// that later writes there cannot fail for want of space. The file
/// system does it in one call or says it cannot (`EOPNOTSUPP`): no
/// fallback writes zeros, which would race with others writing the file.
pub fn allocate(file: &impl AsFd, len: u64) -> io::Result<()> {
    let len = libc::off_t::try_from(len)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file too large"))?;
    // SAFETY: a valid descriptor; the call reads and writes no memory of ours.
    check(unsafe { libc::fallocate(file.as_fd().as_raw_fd(), 0, 0, len) })
}

/// Renames `from` to `to`, both in `dir`.
pub fn rename_at(dir: &impl AsFd, from: &[u8], to: &[u8]) -> io::Result<()> {
    let (from, to) = (cstring(from)?, cstring(to)?);
    let fd = dir.as_fd().as_raw_fd();
    // SAFETY: a valid directory descriptor and C strings.
    check(unsafe { libc::renameat(fd, from.as_ptr(), fd, to.as_ptr()) })
}

/// Removes one name from `dir` (a file or a symlink itself; never a
/// directory, never what a symlink points to).
pub fn unlink_at(dir: &impl AsFd, name: &[u8]) -> io::Result<()> {
    let c = cstring(name)?;
    // SAFETY: a valid directory descriptor and C string.
    check(unsafe { libc::unlinkat(dir.as_fd().as_raw_fd(), c.as_ptr(), 0) })
}

/// The names in `dir` but `.` and `..`.
pub fn list_dir(dir: &impl AsFd) -> io::Result<Vec<Vec<u8>>> {
    // fdopendir takes the descriptor over: give it a copy.
    let copy = dir.as_fd().try_clone_to_owned()?;
    // SAFETY: a valid directory descriptor, owned from here by the DIR.
    let stream = unsafe { libc::fdopendir(copy.as_raw_fd()) };
    if stream.is_null() {
        return Err(io::Error::last_os_error());
    }
    std::mem::forget(copy);
    // Reading from the start even if the descriptor was read before.
    // SAFETY: a valid DIR stream.
    unsafe { libc::rewinddir(stream) };
    let mut names = Vec::new();
    let ended = loop {
        // readdir returns NULL both at the end and on an error; only errno
        // tells them apart, so it is cleared first.
        // SAFETY: errno is this thread's own.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: a valid DIR stream, used by this thread only.
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            let e = io::Error::last_os_error();
            break if e.raw_os_error() == Some(0) {
                Ok(())
            } else {
                Err(e)
            };
        }
        // SAFETY: readdir returned a valid entry whose d_name is a
        // NUL-terminated string, valid until the next readdir.
        let name = unsafe { CStr::from_ptr((*entry).d_name.as_ptr()) }.to_bytes();
        if name != b"." && name != b".." {
            names.push(name.to_vec());
        }
    };
    // SAFETY: a valid DIR stream, closed once.
    unsafe { libc::closedir(stream) };
    // A listing cut short is not taken for the whole directory.
    ended.map(|()| names)
}

/// Makes the calling thread yield to the others (nice 10): for work that
/// must never slow a request down.
pub fn lower_thread_priority() {
    // Linux keeps a nice value per thread, and `who` 0 names the calling
    // thread. Not through gettid(): std declares that symbol weak, and in
    // the statically linked release build (fat LTO) the call then went to
    // address 0.
    // SAFETY: setpriority on the calling thread only changes its nice value.
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 10) };
}

/// Lets go of everything the web server waits on, so that a CGI response
/// is complete while the process goes on with its housekeeping: mod_cgi
/// waits for stdout and stderr to close, mod_cgid hands over one socket as
/// both stdin and stdout. Stdin, stdout and stderr all become /dev/null
/// (nothing is logged after this).
pub fn release_standard_streams() -> io::Result<()> {
    // SAFETY: shutdown on a descriptor that is not a socket only fails
    // (ENOTSOCK), which is ignored; the end of stream goes out at once even
    // if another descriptor shares the socket.
    unsafe { libc::shutdown(libc::STDOUT_FILENO, libc::SHUT_WR) };
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    for fd in [libc::STDIN_FILENO, libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: both descriptors are valid; dup2 replaces `fd` atomically.
        check(unsafe { libc::dup2(null.as_raw_fd(), fd) })?;
    }
    Ok(())
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

// ---- The synchronous path (fd 0 and CGI). The bot exchange (bot.rs): a
// non-blocking socket whose every wait is a `poll` bounded by the
// exchange's deadline, so no per-socket timeout needs setting. The fd-0
// loop (server/mod.rs): a blocking accept that a signal can end. ----

/// Starts a TCP connection on a fresh non-blocking socket: when this
/// returns the connection is made or under way (over loopback the
/// handshake is done within the call). A refusal shows at the first send.
pub fn start_connect_tcp(addr: &SocketAddr) -> io::Result<TcpStream> {
    let (family, storage, len) = sockaddr_of(addr);
    let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(family, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: storage holds a valid sockaddr of length len; fd is open.
    let rc = unsafe { libc::connect(fd, (&raw const storage).cast::<libc::sockaddr>(), len) };
    if rc != 0 {
        let err = io::Error::last_os_error();
        if !matches!(
            err.raw_os_error(),
            Some(libc::EINPROGRESS) | Some(libc::EINTR)
        ) {
            return Err(err);
        }
    }
    Ok(TcpStream::from(owned))
}

/// Connects to a Unix socket on a fresh non-blocking socket. A Unix
/// connect is made at once or not at all: while the peer's accept backlog
/// is full it fails with `WouldBlock`, and the caller tries again.
pub fn start_connect_unix(path: &Path) -> io::Result<UnixStream> {
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
    let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
    // SAFETY: plain socket(2) call; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket that nothing else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    loop {
        // SAFETY: sa is a valid sockaddr_un of length len; fd is open.
        let rc = unsafe { libc::connect(fd, (&raw const sa).cast::<libc::sockaddr>(), len) };
        if rc == 0 {
            return Ok(UnixStream::from(owned));
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
}

/// Waits until `socket` is ready for `events` (`POLLIN`, `POLLOUT`), an
/// error or hang-up included, or until `deadline`: the events that came
/// (`revents`), or `None` if the deadline passed.
pub fn wait_ready(
    socket: &impl AsRawFd,
    events: libc::c_short,
    deadline: Instant,
) -> io::Result<Option<libc::c_short>> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Ok(None);
    }
    let mut fds = [pollfd(socket, events)];
    Ok((poll(&mut fds, Some(left))? > 0).then_some(fds[0].revents))
}

/// The signal that interrupts the fd-0 loop's blocking `accept` when a
/// stop is asked for: handled by a no-op and without `SA_RESTART`, so the
/// call it lands in fails with `EINTR`.
pub fn interrupt_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

/// Installs the handler of [`interrupt_signal`] and unblocks it in the
/// calling thread (a mask inherited from the web server could block it).
pub fn install_interrupt_signal() -> io::Result<()> {
    extern "C" fn ignore(_: libc::c_int) {}
    // SAFETY: sigaction is plain data; all zeroes is a valid value.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = ignore as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&raw mut action.sa_mask) };
    // SAFETY: a valid sigaction; the handler does nothing, so it is
    // async-signal-safe.
    if unsafe { libc::sigaction(interrupt_signal(), &raw const action, std::ptr::null_mut()) } != 0
    {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a valid sigset_t owned by this frame, filled below.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe {
        libc::sigemptyset(&raw mut set);
        libc::sigaddset(&raw mut set, interrupt_signal());
    }
    // SAFETY: a valid set; the old mask is not asked for.
    let rc =
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &raw const set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// A thread that [`interrupt`] can reach: its kernel id, which stays a
/// plain number after the thread ends (unlike a `pthread_t`).
#[derive(Clone, Copy, Debug)]
pub struct ThreadId(libc::pid_t);

/// The calling thread.
pub fn this_thread() -> ThreadId {
    // The system call itself, not glibc's gettid(): std declares that
    // symbol weak, and the statically linked build that ships resolved it
    // to address 0 (as `lower_thread_priority` says).
    // SAFETY: gettid takes no arguments, has no preconditions and cannot
    // fail; its result is a pid_t.
    ThreadId(unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t)
}

/// Sends [`interrupt_signal`] to `thread`. A thread that has ended makes
/// it fail with ESRCH, which is ignored: nothing is left to interrupt.
pub fn interrupt(thread: ThreadId) {
    // SAFETY: tgkill takes plain numbers and touches no memory of ours;
    // limiting it to this process keeps a reused id elsewhere out of reach.
    unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            libc::getpid(),
            thread.0,
            interrupt_signal(),
        )
    };
}

/// Accepts a connection on `listener`, blocking; unlike std's accept it
/// gives up on a signal (`Interrupted`) instead of trying again, so that
/// [`interrupt`] can end the wait.
pub fn accept_interruptible(listener: &impl AsRawFd) -> io::Result<OwnedFd> {
    // SAFETY: a listening fd borrowed for the call; no address is asked for.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh connection that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Waits until `listener` has a connection to accept, for a listener a
/// launcher made non-blocking. Unlike [`poll`] it is not resumed after a
/// signal: [`interrupt_signal`] ends it with `Interrupted`, as it ends
/// [`accept_interruptible`].
pub fn wait_acceptable(listener: &impl AsRawFd) -> io::Result<()> {
    let mut fds = [pollfd(listener, libc::POLLIN)];
    // SAFETY: the pointer and length describe a valid, exclusively
    // borrowed slice of one pollfd.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), 1, -1) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// ---- end of the synchronous path's calls ----

// Process start without std's runtime: the entry point in main.rs skips it
// (it costs a CGI request a reading of /proc/self/maps and a dozen system
// calls for a stack-overflow handler), and calls this instead.

/// Does what std's runtime does at start that this program relies on:
/// SIGPIPE ignored, so that writing to a peer that went away is an error
/// (EPIPE) and not the end of the process; and descriptors 0, 1 and 2
/// open, on /dev/null for any that was closed, so that no file or socket
/// the program opens becomes its stdout or stderr.
pub fn prepare_process() {
    let mut fds = [0, 1, 2].map(|fd| libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    });
    // SAFETY: a valid array of three pollfd; a zero timeout never blocks.
    let polled = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 0) };
    for pfd in fds {
        let closed = if polled < 0 {
            // SAFETY: F_GETFD only reads the descriptor's flags.
            let flags = unsafe { libc::fcntl(pfd.fd, libc::F_GETFD) };
            flags < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EBADF)
        } else {
            pfd.revents & libc::POLLNVAL != 0
        };
        // The lowest free descriptor is the one found closed: the lower
        // ones are open by now.
        // SAFETY: a NUL-terminated path; the descriptor is kept open for
        // the life of the process, as std's start does.
        if closed && unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR) } != pfd.fd {
            // As std's start: without a safe stdout or stderr, stop.
            std::process::abort();
        }
    }
    // SAFETY: setting a signal's disposition to SIG_IGN has no preconditions.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

// ---------------------------------------------------------------------------
// The event loop's system calls: accepting without blocking, and the
// descriptor limit.
// ---------------------------------------------------------------------------

/// Accepts one connection on a listening socket without waiting: the new
/// socket is non-blocking and close-on-exec from the start (one call, no
/// fcntl after it). `WouldBlock` when none is queued.
pub fn accept_nonblocking(listener: &impl AsRawFd) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: null address pointers are allowed (the peer's address is
        // not wanted); the flags are valid for accept4.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd >= 0 {
            // SAFETY: accept4 returned a new descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// The soft and hard limits on open descriptors (`RLIMIT_NOFILE`).
pub fn open_files_limit() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid out-pointer for getrlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Sets the soft limit on open descriptors to `soft` (at most the hard
/// limit, which is left as it is).
pub fn set_open_files_limit(soft: u64) -> io::Result<()> {
    let (_, hard) = open_files_limit()?;
    let lim = libc::rlimit {
        rlim_cur: soft.min(hard),
        rlim_max: hard,
    };
    // SAFETY: a valid pointer to an initialised rlimit.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::File;

    /// A thread that has ended can still be named: the interrupt is then
    /// a refused system call, never a look at freed thread memory.
    #[test]
    fn interrupting_a_thread_that_has_ended_does_nothing() {
        install_interrupt_signal().unwrap();
        let gone = std::thread::spawn(this_thread).join().unwrap();
        interrupt(gone);
        // A live one gets it, and its handler does nothing.
        interrupt(this_thread());
    }

    #[test]
    fn a_lowered_priority_is_the_calling_threads_alone() {
        // SAFETY: getpriority only reads the calling thread's nice value.
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let before = nice();
        let lowered = std::thread::spawn(move || {
            lower_thread_priority();
            nice()
        })
        .join()
        .unwrap();
        // Nice 10, or more if the test run was started nicer than that.
        assert_eq!(lowered, before.max(10));
        assert_eq!(nice(), before, "the other threads keep theirs");
    }

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
