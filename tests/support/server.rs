//! The binary as a FastCGI server: with a listening socket as fd 0
//! ([`Fd0Server`], as mod_fcgid and spawn-fcgi start it) or `--listen ADDR`
//! ([`ListenServer`]); both deref to [`Server`].

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::fcgi::{FCGI_REQUEST_COMPLETE, FcgiReply, fcgi_get};
use super::files::{raise_files_limit, with_soft_files_limit};
use super::ports::free_port;
use super::process::{
    POLL, STOP_TIMEOUT, TempDir, bin, bin_command, kill_and_reap, read_text, send_signal,
    wait_bounded, wait_until,
};

/// Read/write timeout on every connection a server helper hands out.
pub const IO_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a `--listen` server may take to start listening.
pub const SERVER_START_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

impl Endpoint {
    /// The `--listen` / `REGISTER_BOT_ADDR` spelling: `unix:/path` or `IP:PORT`.
    pub fn spec(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Tcp(a) => a.to_string(),
        }
    }

    /// Connects, with [`IO_TIMEOUT`] read/write timeouts.
    pub fn connect(&self) -> io::Result<Conn> {
        let conn = match self {
            Endpoint::Unix(p) => Conn::Unix(UnixStream::connect(p)?),
            Endpoint::Tcp(a) => Conn::Tcp(TcpStream::connect_timeout(a, IO_TIMEOUT)?),
        };
        conn.set_timeouts(Some(IO_TIMEOUT))?;
        Ok(conn)
    }

    /// Whether the kernel shows a listening socket here (Linux `/proc/net`);
    /// `None` if that cannot be told.
    fn kernel_says_listening(&self) -> Option<bool> {
        match self {
            Endpoint::Unix(path) => {
                let table = fs::read_to_string("/proc/net/unix").ok()?;
                let want = path.to_str()?;
                Some(table.lines().skip(1).any(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = listening.
                    cols.len() >= 8
                        && cols[7] == want
                        && u32::from_str_radix(cols[3], 16).is_ok_and(|f| f & 0x1_0000 != 0)
                }))
            }
            Endpoint::Tcp(addr) => {
                let file = if addr.is_ipv4() {
                    "/proc/net/tcp"
                } else {
                    "/proc/net/tcp6"
                };
                let table = fs::read_to_string(file).ok()?;
                let port = format!(":{:04X}", addr.port());
                Some(table.lines().skip(1).any(|line| {
                    let cols: Vec<&str> = line.split_whitespace().collect();
                    // sl local_address rem_address st ...; st 0A = LISTEN.
                    cols.len() >= 4 && cols[1].ends_with(&port) && cols[3] == "0A"
                }))
            }
        }
    }
}

/// A client connection to a server helper.
#[derive(Debug)]
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    pub fn set_timeouts(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
            Conn::Tcp(s) => {
                s.set_read_timeout(timeout)?;
                s.set_write_timeout(timeout)
            }
        }
    }

    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(timeout),
            Conn::Tcp(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.shutdown(how),
            Conn::Tcp(s) => s.shutdown(how),
        }
    }

    pub fn try_clone(&self) -> io::Result<Conn> {
        Ok(match self {
            Conn::Unix(s) => Conn::Unix(s.try_clone()?),
            Conn::Tcp(s) => Conn::Tcp(s.try_clone()?),
        })
    }

    /// True if the peer has closed: a read returns EOF (or a reset) within `wait`.
    /// Any data read is discarded.
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        let mut buf = [0u8; 4096];
        let deadline = Instant::now() + wait;
        let closed = loop {
            // Each read gets what is left: see `read_by`.
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || self.set_read_timeout(Some(left)).is_err() {
                break false;
            }
            match self.read(&mut buf) {
                Ok(0) => break true,
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
        };
        let _ = self.set_read_timeout(Some(IO_TIMEOUT));
        closed
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.flush(),
            Conn::Tcp(s) => s.flush(),
        }
    }
}

/// A running FastCGI server process (the common part of [`Fd0Server`] and
/// [`ListenServer`]); killed on drop.
pub struct Server {
    child: Child,
    endpoint: Endpoint,
    stderr: PathBuf,
    stdout: PathBuf,
    dir: TempDir,
}

impl Server {
    fn spawn(
        dir: TempDir,
        endpoint: Endpoint,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Stdio,
    ) -> Server {
        Server::spawn_command(bin_command(), dir, endpoint, args, env, stdin)
    }

    /// As [`Server::spawn`], the binary started by `cmd` (from
    /// [`bin_command`]) with `args`.
    fn spawn_command(
        mut cmd: Command,
        dir: TempDir,
        endpoint: Endpoint,
        args: &[&str],
        env: &[(&str, &str)],
        stdin: Stdio,
    ) -> Server {
        // The tests open their many sockets once a relay is up.
        raise_files_limit();
        let stderr = dir.join("stderr.log");
        let stdout = dir.join("stdout.log");
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(stdin)
            .stdout(File::create(&stdout).expect("server stdout file"))
            .stderr(File::create(&stderr).expect("server stderr file"));
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin().display()));
        Server {
            child,
            endpoint,
            stderr,
            stdout,
            dir,
        }
    }

    /// One `GET ?query` on a fresh connection, as mod_fcgid sends it;
    /// panics unless the request completed.
    pub fn get(&self, query: &str) -> FcgiReply {
        let mut conn = self.connect();
        let reply = fcgi_get(&mut conn, 1, query, false);
        assert_eq!(reply.protocol_status, FCGI_REQUEST_COMPLETE, "{reply:?}");
        reply
    }

    /// Connects (read/write timeouts [`IO_TIMEOUT`]); panics on failure.
    pub fn connect(&self) -> Conn {
        self.endpoint.connect().unwrap_or_else(|e| {
            panic!(
                "connecting to {}: {e}\nstderr:\n{}",
                self.endpoint.spec(),
                self.stderr_text()
            )
        })
    }

    pub fn try_connect(&self) -> io::Result<Conn> {
        self.endpoint.connect()
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// `unix:/path` or `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        self.endpoint.spec()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The server's own temp dir (stderr.log, stdout.log, the socket).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends a signal by name (`"TERM"`, `"HUP"`, ...).
    pub fn signal(&self, sig: &str) {
        send_signal(self.child.id(), sig);
    }

    /// SIGTERM, then wait at most `timeout`; `None` if it is still running.
    pub fn stop_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.try_wait() {
            return Some(status);
        }
        self.signal("TERM");
        wait_bounded(&mut self.child, timeout)
    }

    /// Waits at most `timeout` for the process to exit by itself.
    pub fn wait_within(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_bounded(&mut self.child, timeout)
    }

    /// SIGTERM and wait [`STOP_TIMEOUT`]; panics (after SIGKILL) if it hangs.
    pub fn stop(&mut self) -> ExitStatus {
        match self.stop_within(STOP_TIMEOUT) {
            Some(status) => status,
            None => {
                kill_and_reap(&mut self.child);
                panic!(
                    "server did not exit within {STOP_TIMEOUT:?} of SIGTERM; stderr:\n{}",
                    self.stderr_text()
                );
            }
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        kill_and_reap(&mut self.child);
    }

    pub fn stderr_text(&self) -> String {
        read_text(&self.stderr)
    }

    /// Anything the server wrote to its stdout (should stay empty in FastCGI modes).
    pub fn stdout_text(&self) -> String {
        read_text(&self.stdout)
    }

    /// Waits (bounded) for `needle` to appear in stderr.
    pub fn wait_stderr_contains(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.stderr_text().contains(needle))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
        if thread::panicking() {
            eprintln!(
                "[support] server {} stderr:\n{}",
                self.endpoint.spec(),
                self.stderr_text()
            );
        }
    }
}

/// The binary with a listening socket as fd 0, as mod_fcgid and spawn-fcgi
/// start it. Derefs to [`Server`] (`connect`, `stop`, `stderr_text`, ...).
pub struct Fd0Server(Server);

impl Fd0Server {
    /// A unix socket in a fresh temp dir; `env_clear()` + PATH + `env`.
    pub fn start(env: &[(&str, &str)]) -> Fd0Server {
        Fd0Server::start_unix(env, false)
    }

    /// As [`Fd0Server::start`], with the listening socket made non-blocking
    /// first, as a launcher may hand it over (systemd's `NonBlocking=yes`).
    pub fn start_nonblocking(env: &[(&str, &str)]) -> Fd0Server {
        Fd0Server::start_unix(env, true)
    }

    fn start_unix(env: &[(&str, &str)], nonblocking: bool) -> Fd0Server {
        let dir = TempDir::new("fd0");
        let path = dir.join("fcgi.sock");
        let listener =
            UnixListener::bind(&path).unwrap_or_else(|e| panic!("binding {}: {e}", path.display()));
        listener
            .set_nonblocking(nonblocking)
            .expect("O_NONBLOCK on the listener");
        let stdin = Stdio::from(OwnedFd::from(listener));
        Fd0Server(Server::spawn(dir, Endpoint::Unix(path), &[], env, stdin))
    }

    /// A TCP socket on 127.0.0.1 (spawn-fcgi style).
    pub fn start_tcp(env: &[(&str, &str)]) -> Fd0Server {
        let dir = TempDir::new("fd0");
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let stdin = Stdio::from(OwnedFd::from(listener));
        Fd0Server(Server::spawn(dir, Endpoint::Tcp(addr), &[], env, stdin))
    }
}

impl Deref for Fd0Server {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl DerefMut for Fd0Server {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.0
    }
}

/// `tourney-register --listen ADDR`, waited on (bounded) until it listens.
/// Derefs to [`Server`].
pub struct ListenServer(Server);

impl ListenServer {
    /// `kind`: `"unix"` (socket in a fresh temp dir) or `"tcp"` (127.0.0.1, free port).
    pub fn start(kind: &str, env: &[(&str, &str)]) -> ListenServer {
        ListenServer::start_with(kind, env, &[])
    }

    pub fn start_unix(env: &[(&str, &str)]) -> ListenServer {
        ListenServer::start("unix", env)
    }

    pub fn start_tcp(env: &[(&str, &str)]) -> ListenServer {
        ListenServer::start("tcp", env)
    }

    /// As [`ListenServer::start`], started the way a service manager
    /// starts a service: with a soft limit of `soft` open files (the hard
    /// limit left as it is).
    pub fn start_with_files_limit(kind: &str, env: &[(&str, &str)], soft: u64) -> ListenServer {
        ListenServer::launch(kind, env, &[], Some(soft))
    }

    /// As [`ListenServer::start`] with extra arguments after `--listen ADDR`.
    pub fn start_with(kind: &str, env: &[(&str, &str)], extra: &[&str]) -> ListenServer {
        ListenServer::launch(kind, env, extra, None)
    }

    fn launch(
        kind: &str,
        env: &[(&str, &str)],
        extra: &[&str],
        soft_files_limit: Option<u64>,
    ) -> ListenServer {
        // A free TCP port can be taken by someone else before the server
        // binds it; retry a couple of times in that case only.
        let attempts = if kind == "tcp" { 3 } else { 1 };
        let mut last_err = String::new();
        for _ in 0..attempts {
            let dir = TempDir::new("lsn");
            let endpoint = match kind {
                "unix" => Endpoint::Unix(dir.join("fcgi.sock")),
                "tcp" => Endpoint::Tcp(SocketAddr::from(([127, 0, 0, 1], free_port()))),
                other => panic!("ListenServer kind {other:?}: use \"unix\" or \"tcp\""),
            };
            let spec = endpoint.spec();
            let mut args = vec!["--listen", spec.as_str()];
            args.extend_from_slice(extra);
            let mut cmd = bin_command();
            if let Some(soft) = soft_files_limit {
                with_soft_files_limit(&mut cmd, soft);
            }
            let mut server = Server::spawn_command(cmd, dir, endpoint, &args, env, Stdio::null());
            match wait_listening(&mut server) {
                Ok(()) => return ListenServer(server),
                Err(e) => {
                    let in_use = server.stderr_text().to_lowercase().contains("in use");
                    last_err = e;
                    if !in_use {
                        break;
                    }
                }
            }
        }
        panic!("{last_err}");
    }
}

/// Bounded wait until the server listens: its `listening on` log line, or
/// the kernel's socket table, or (without /proc) a probe connection.
fn wait_listening(server: &mut Server) -> Result<(), String> {
    let deadline = Instant::now() + SERVER_START_TIMEOUT;
    loop {
        if server.stderr_text().contains("listening on") {
            return Ok(());
        }
        match server.endpoint.kernel_says_listening() {
            Some(true) => return Ok(()),
            Some(false) => {}
            None => {
                if server.endpoint.connect().is_ok() {
                    return Ok(());
                }
            }
        }
        if let Some(status) = server.try_wait() {
            return Err(format!(
                "server --listen {} exited ({status}) before listening; stderr:\n{}",
                server.endpoint.spec(),
                server.stderr_text()
            ));
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "server --listen {} not listening after {SERVER_START_TIMEOUT:?}; stderr:\n{}",
                server.endpoint.spec(),
                server.stderr_text()
            ));
        }
        thread::sleep(POLL);
    }
}

impl Deref for ListenServer {
    type Target = Server;
    fn deref(&self) -> &Server {
        &self.0
    }
}

impl DerefMut for ListenServer {
    fn deref_mut(&mut self) -> &mut Server {
        &mut self.0
    }
}
