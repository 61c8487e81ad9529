//! A private nginx (Debian's binary) in front of a relay: its own prefix,
//! configuration, temp paths and pid file in a [`TempDir`], the shipped
//! snippet `apache/nginx-tourney-register.conf` included with only its
//! `fastcgi_pass` pointed at the relay under test. Nothing of the
//! machine's own nginx is read or touched. Killed on drop.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::apache::{repo, signal};
use super::ports::free_port;
use super::process::{TempDir, read_text, wait_until};

/// How long nginx may take to start listening.
const NGINX_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long nginx may take to stop on SIGTERM.
const NGINX_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The socket the shipped snippet passes to, replaced by the relay's.
const SHIPPED_PASS: &str = "fastcgi_pass unix:/run/tourney-register/fcgi.sock;";

/// The nginx binary: Debian's, or `NGINX` from the environment.
pub fn nginx() -> PathBuf {
    std::env::var_os("NGINX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/sbin/nginx"))
}

/// A running private nginx.
pub struct Nginx {
    child: Child,
    port: u16,
    /// Its prefix: configuration, pid file, temp paths; removed on drop.
    _dir: TempDir,
    stderr: PathBuf,
}

impl Nginx {
    /// Starts nginx on 127.0.0.1 with one worker that holds up to
    /// `connections` clients (each with its connection to the relay), with
    /// the shipped snippet passing to `relay` (`unix:/path` or `IP:PORT`).
    pub fn start(relay: &str, connections: usize) -> Nginx {
        // A free port can be taken by someone else before nginx binds it;
        // nginx then gives up ("Address already in use") and exits: try
        // again with another, as ListenServer does.
        let mut last_err = String::new();
        for _ in 0..3 {
            match Nginx::launch(relay, connections) {
                Ok(nginx) => return nginx,
                Err((why, in_use)) => {
                    last_err = why;
                    if !in_use {
                        break;
                    }
                }
            }
        }
        panic!("{last_err}");
    }

    /// One try on a fresh free port: the running nginx, or why not and
    /// whether its port was taken.
    fn launch(relay: &str, connections: usize) -> Result<Nginx, (String, bool)> {
        let dir = TempDir::new("ngx");
        let snippet = fs::read_to_string(repo().join("apache/nginx-tourney-register.conf"))
            .expect("reading apache/nginx-tourney-register.conf");
        assert!(
            snippet.contains(SHIPPED_PASS),
            "the shipped nginx snippet no longer passes to the packaged socket"
        );
        let snippet = snippet.replace(SHIPPED_PASS, &format!("fastcgi_pass {relay};"));
        fs::write(dir.join("tourney-register.conf"), snippet).expect("writing the snippet");
        let tmp = dir.join("tmp");
        fs::create_dir(&tmp).expect("nginx temp dir");
        // As root, nginx's workers would otherwise run as nobody, who may
        // not open the relay's socket in a private temp dir.
        let root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
        let port = free_port();
        let pid_file = dir.join("nginx.pid");
        let conf = format!(
            "{user}worker_processes 1;\n\
             worker_rlimit_nofile {files};\n\
             pid {pid};\n\
             events {{ worker_connections {conns}; }}\n\
             http {{\n\
               access_log off;\n\
               client_body_temp_path {tmp}/body;\n\
               fastcgi_temp_path {tmp}/fastcgi;\n\
               proxy_temp_path {tmp}/proxy;\n\
               uwsgi_temp_path {tmp}/uwsgi;\n\
               scgi_temp_path {tmp}/scgi;\n\
               server {{\n\
                 listen 127.0.0.1:{port} backlog=4096;\n\
                 server_name localhost;\n\
                 include {dir}/tourney-register.conf;\n\
               }}\n\
             }}\n",
            user = if root { "user root root;\n" } else { "" },
            // Each client holds one connection and one to the relay; with
            // fewer than about 2.1 per client nginx closes some of them
            // unanswered ("worker_connections are not enough, reusing").
            files = 4 * connections + 512,
            conns = 3 * connections + 256,
            pid = pid_file.display(),
            dir = dir.path().display(),
            tmp = tmp.display(),
        );
        let conf_path = dir.join("nginx.conf");
        fs::write(&conf_path, conf).expect("writing nginx.conf");
        let stderr = dir.join("stderr.log");
        let child = Command::new(nginx())
            .arg("-p")
            .arg(dir.path())
            .arg("-e")
            .arg("stderr")
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off; error_log stderr;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr).expect("nginx stderr file"))
            // Its own group, so that its worker goes with it.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", nginx().display()));
        let mut nginx = Nginx {
            child,
            port,
            _dir: dir,
            stderr,
        };
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        // nginx writes its pid file only once it has bound its port: a
        // connection then reaches this nginx, not whoever else listens there.
        let mut exited = false;
        let up = wait_until(NGINX_START_TIMEOUT, || {
            exited = matches!(nginx.child.try_wait(), Ok(Some(_)));
            exited
                || (pid_file.exists()
                    && TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
        });
        if up && !exited {
            return Ok(nginx);
        }
        nginx.stop();
        let log = read_text(&nginx.stderr);
        Err((
            format!(
                "nginx did not listen on {addr} within {NGINX_START_TIMEOUT:?}{}:\n{log}",
                if exited { " (it exited)" } else { "" }
            ),
            exited && log.contains("in use"),
        ))
    }

    /// The port it listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its error log (stderr).
    pub fn error_log(&self) -> String {
        read_text(&self.stderr)
    }
}

impl Nginx {
    /// SIGTERM (nginx's fast stop: the master ends its worker, then
    /// itself), at most [`NGINX_STOP_TIMEOUT`], then SIGKILL to the whole
    /// group: a master killed outright would leave its worker running.
    fn stop(&mut self) {
        let pid = self.child.id();
        signal(&pid.to_string(), "TERM");
        let _ = wait_until(NGINX_STOP_TIMEOUT, || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        signal(&format!("-{pid}"), "KILL");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("[support] nginx stderr:\n{}", read_text(&self.stderr));
        }
    }
}
