//! Limits on open files: this test process's own, raised once for every
//! suite, and a child's, set lower the way a service manager starts it.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;
use std::sync::OnceLock;

/// This process's soft and hard limits on open files.
pub fn files_limit() -> io::Result<(libc::rlim_t, libc::rlim_t)> {
    // SAFETY: rlimit is plain data; zeroed is valid.
    let mut lim: libc::rlimit = unsafe { std::mem::zeroed() };
    // SAFETY: a valid out-pointer of the right type.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Raises this process's soft limit on open files to its hard limit, once
/// for the whole run, and returns the soft limit then in force. The suites
/// run in parallel in one process, and some open sockets by the thousand
/// (nginx's burst, graceful_stop's floods); Rust raises the limit itself
/// only on Apple platforms, and Debian's default soft limit is 1024.
/// Children started afterwards inherit the raised limit.
pub fn raise_files_limit() -> u64 {
    static RAISED: OnceLock<u64> = OnceLock::new();
    *RAISED.get_or_init(|| {
        let (soft, hard) = files_limit().unwrap_or_else(|e| panic!("getrlimit: {e}"));
        if soft < hard {
            let lim = libc::rlimit {
                rlim_cur: hard,
                rlim_max: hard,
            };
            // SAFETY: a valid rlimit, the soft value within the hard one.
            if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
                return hard;
            }
        }
        soft
    })
}

/// Raises the limit as [`raise_files_limit`] does and panics, saying what to
/// do, if this process still may not hold `needed` open files at once.
pub fn require_open_files(needed: u64) {
    let limit = raise_files_limit();
    assert!(
        limit >= needed,
        "this test needs {needed} open files at once, and the hard limit on open files \
         lets this process have {limit}: raise it (`ulimit -Hn {needed}` as root, \
         or `nofile` in /etc/security/limits.conf) and run the tests again"
    );
}

/// Starts `cmd` with a soft limit of `soft` open files, the hard limit
/// left as it is: as systemd starts a service.
pub fn with_soft_files_limit(cmd: &mut Command, soft: u64) {
    let (_, hard) = files_limit().unwrap_or_else(|e| panic!("getrlimit: {e}"));
    let lim = libc::rlimit {
        rlim_cur: soft.min(hard),
        rlim_max: hard,
    };
    // SAFETY: setrlimit(2) is async-signal-safe, and the closure touches
    // only its own copy of `lim`.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
}
