//! The replay store under attack and under accident: a flood of made-up
//! codes stays within `REGISTER_REPLAY_MAX`; expired entries are zeroed
//! by plain CGI alone; a store directory that is not the store's own (a
//! symlink, not private, holding others' files) is refused and left as it
//! was; a relay killed mid-delivery never makes a second delivery (the
//! repeat, and a repeat that was waiting, get the "could not be confirmed"
//! page); a full disk costs only the duplicate protection.

use std::fs;
use std::ops::DerefMut;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, SystemTime};

use crate::support::*;

/// The layout README documents: a 4 KiB header, then 512-byte entries.
const HEADER: usize = 4096;
const ENTRY: usize = 512;

/// The unconfirmed page's headline and advice.
const UNCONFIRMED: &str = "Your sign-up could not be confirmed";
const CHECK_DISCORD: &str = "Check your Discord messages from the bot";

const STATE_Q: &str = "gAAAAABnStateOfPlayer7_abc%3D%3D";

fn query(code: &str) -> String {
    format!("code={code}&state={STATE_Q}")
}

fn relay_env<'a>(
    bot: &'a str,
    store: &'a str,
    extra: &[(&'a str, &'a str)],
) -> Vec<(&'a str, &'a str)> {
    let mut env = vec![("REGISTER_BOT_ADDR", bot), ("REGISTER_STATE_DIR", store)];
    env.extend_from_slice(extra);
    env
}

fn codes(bot: &Bot) -> Vec<String> {
    bot.received().into_iter().map(|r| r.code).collect()
}

/// The entries of the table that are not zeroed.
fn live_entries(store: &Path) -> usize {
    let table =
        fs::read(store.join("replay.table")).unwrap_or_else(|e| panic!("replay.table: {e}"));
    table[HEADER..]
        .chunks(ENTRY)
        .filter(|e| e.iter().any(|&b| b != 0))
        .count()
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn assert_unconfirmed(page: &HttpLike) {
    assert_eq!(page.status, 502, "status; body:\n{}", page.body);
    assert!(page.body.contains(UNCONFIRMED), "{}", page.body);
    assert!(page.body.contains(CHECK_DISCORD), "{}", page.body);
    assert!(
        page.body.contains("start the sign-up again from the bot"),
        "{}",
        page.body
    );
}

// ---------------------------------------------------------------------------
// A bound
// ---------------------------------------------------------------------------

/// 300 made-up codes through one `--listen` relay with room for 64: the
/// store is one file of its fixed size, every code reached the bot once,
/// and the latest codes still replay.
#[test]
fn a_flood_of_codes_keeps_the_store_at_its_size_and_the_latest_still_replay() {
    const N: usize = 300;
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let mut server = ListenServer::start_unix(&relay_env(
        bot.addr(),
        store.path_str(),
        &[("REGISTER_REPLAY_MAX", "64")],
    ));
    let sent: Vec<String> = (0..N).map(|_| unique("flood", 40)).collect();
    let mut conn = server.connect();
    for (i, code) in sent.iter().enumerate() {
        let reply = fcgi_get(&mut conn, (i % 60_000 + 1) as u16, &query(code), true);
        assert_eq!(reply.http().status, 200, "code {i}");
    }
    assert_eq!(codes(&bot), sent, "each code once, in order");

    // One file, 64 entries of 512 bytes behind a 4 KiB header, whatever the flood.
    assert_eq!(names(store.path()), ["replay.table"]);
    let meta = fs::metadata(store.join("replay.table")).unwrap();
    let bound = (HEADER + 64 * ENTRY) as u64;
    assert_eq!(meta.len(), bound);
    assert!(
        meta.blocks() * 512 <= bound + 4096,
        "{} bytes on disk",
        meta.blocks() * 512
    );

    // The last eight codes are within every bucket's newest eight.
    for code in &sent[N - 8..] {
        let page = server.get(&query(code)).http();
        assert_answer_page(&page, true, APPROVED);
    }
    assert_eq!(codes(&bot).len(), N, "a replay reached the bot");
    // An early one made room for the later ones and is delivered again.
    let page = server.get(&query(&sent[0])).http();
    assert_eq!(page.status, 200);
    assert_eq!(codes(&bot).len(), N + 1);
    assert!(server.stop().success());
}

/// Two relays set to different `REGISTER_REPLAY_MAX` on one directory
/// (one conf sets it, another leaves the default): the second uses the
/// first's table, so a code in flight in the first is waited for and
/// replayed, not delivered again; and the table keeps its size.
#[test]
fn relays_with_different_sizes_share_one_table_and_deliver_once() {
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "3"]);
    let first_env = relay_env(
        bot.addr(),
        store.path_str(),
        &[
            ("REGISTER_BOT_TIMEOUT", "20"),
            ("REGISTER_REPLAY_MAX", "64"),
        ],
    );
    let second_env = relay_env(
        bot.addr(),
        store.path_str(),
        &[("REGISTER_BOT_TIMEOUT", "20")],
    );
    let code = unique("sizes", 40);
    let q = query(&code);
    let InFlight::Cgi(first) = send_in(Mode::Cgi, &first_env, &q) else {
        unreachable!()
    };
    assert_eq!(bot.wait_received(1, Duration::from_secs(15)).len(), 1);
    let (page, stderr) = cgi_get(&second_env, &q);
    assert_answer_page(&page, true, APPROVED);
    assert!(stderr.contains("outcome=approved-replayed"), "{stderr}");
    assert!(stderr.contains("REGISTER_REPLAY_MAX"), "{stderr}");
    let out = first.wait_with_output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("aria-label=\"Success\""));
    // Later, with the default size again: still the one table.
    assert_answer_page(&cgi_get(&second_env, &q).0, true, APPROVED);
    assert_eq!(codes(&bot), [code]);
    assert_eq!(names(store.path()), ["replay.table"]);
    let len = fs::metadata(store.join("replay.table")).unwrap().len();
    assert_eq!(len, (HEADER + 64 * ENTRY) as u64);
}

// ---------------------------------------------------------------------------
// Housekeeping off the request path
// ---------------------------------------------------------------------------

/// Plain CGI alone, `REGISTER_REPLAY_TTL=1`: the entries are there at
/// first, then zeroed by the housekeeping that runs after later responses
/// (here requests without a code, which touch no entry themselves), within
/// the TTL plus one lap (the TTL, at least 1 s).
#[test]
fn cgi_alone_zeroes_expired_entries_within_the_bound() {
    let store = private_dir("st");
    let bot = Bot::start("json", "approve");
    let env = relay_env(
        bot.addr(),
        store.path_str(),
        &[("REGISTER_REPLAY_TTL", "1"), ("REGISTER_REPLAY_MAX", "64")],
    );
    for _ in 0..10 {
        let (page, _) = cgi_get(&env, &query(&unique("sweep", 32)));
        assert_eq!(page.status, 200);
    }
    let answered = std::time::Instant::now();
    assert_eq!(live_entries(store.path()), 10);
    assert_eq!(codes(&bot).len(), 10);

    let mut pokes = 0;
    let gone = wait_until(Duration::from_secs(20), || {
        pokes += 1;
        let (page, _) = cgi_get(&env, "state=no-code-here");
        assert_eq!(page.status, 400);
        if live_entries(store.path()) == 0 {
            return true;
        }
        thread::sleep(Duration::from_millis(200));
        false
    });
    assert!(
        gone,
        "{} entries left after {pokes} requests",
        live_entries(store.path())
    );
    assert!(
        answered.elapsed() >= Duration::from_secs(1),
        "zeroed before the TTL"
    );
    assert_eq!(names(store.path()), ["replay.table"]);
}

/// fd 0 (mod_fcgid) and `--listen`: with no request at all after the
/// answers, the background housekeeping zeroes them within the bound.
#[test]
fn long_running_relays_zero_expired_entries_without_further_requests() {
    let bot = Bot::start("json", "approve");
    for listen in [false, true] {
        let store = private_dir("st");
        let env = relay_env(
            bot.addr(),
            store.path_str(),
            &[("REGISTER_REPLAY_TTL", "1"), ("REGISTER_REPLAY_MAX", "64")],
        );
        let mut server: Box<dyn DerefMut<Target = Server>> = if listen {
            Box::new(ListenServer::start_unix(&env))
        } else {
            Box::new(Fd0Server::start(&env))
        };
        for _ in 0..5 {
            assert_eq!(server.get(&query(&unique("bg", 32))).http().status, 200);
        }
        assert_eq!(live_entries(store.path()), 5, "listen={listen}");
        assert!(
            wait_until(Duration::from_secs(20), || live_entries(store.path()) == 0),
            "listen={listen}: {} entries left",
            live_entries(store.path())
        );
        assert!(server.stop().success());
    }
}

/// Where the table's lock bytes begin (one per bucket, then one per
/// entry, 16 per bucket), past any offset the table uses.
const LOCKS: u64 = 1 << 50;

#[test]
fn a_cgi_answer_is_complete_while_its_housekeeping_still_runs() {
    let bot = Bot::start("json", "approve");
    let store = private_dir("hk");
    let env = relay_env(
        bot.addr(),
        store.path_str(),
        &[("REGISTER_REPLAY_TTL", "1"), ("REGISTER_REPLAY_MAX", "800")],
    );
    for _ in 0..60 {
        assert_eq!(cgi_get(&env, &query(&unique("hk", 32))).0.status, 200);
    }
    // Past the TTL (and one housekeeping lap): every entry is due.
    thread::sleep(Duration::from_millis(2100));
    // Another process holds every bucket's lock byte, so housekeeping
    // waits on each bucket with an expired entry before giving it up.
    let table = store.join("replay.table");
    let mut holder = Command::new("python3")
        .args(["-c", "import fcntl, sys, time\n\
                      f = open(sys.argv[1], 'r+b')\n\
                      fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB, int(sys.argv[3]), int(sys.argv[2]))\n\
                      print('locked', flush=True)\n\
                      time.sleep(60)"])
        .arg(&table)
        .arg(LOCKS.to_string())
        .arg((100 * 16).to_string())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().expect("piped")),
        &mut line,
    )
    .expect("the holder's line");
    assert_eq!(line.trim(), "locked");

    // As mod_cgid starts a script: one socket as stdin and stdout; stderr
    // a pipe, which mod_cgi also waits for.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    ours.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let mut cmd = Command::new(bin());
    cmd.env_clear()
        .envs(env.iter().copied())
        .env("REQUEST_METHOD", "GET")
        .env("QUERY_STRING", "state=no-code-here")
        .stdin(Stdio::from(std::os::fd::OwnedFd::from(
            theirs.try_clone().expect("clone"),
        )))
        .stdout(Stdio::from(std::os::fd::OwnedFd::from(theirs)))
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("the relay");
    let mut answer = Vec::new();
    std::io::Read::read_to_end(&mut (&ours), &mut answer).expect("the answer to its end");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr)
        .expect("stderr to its end");
    // Both streams ended while the process is still sweeping.
    let running = child.try_wait().expect("try_wait").is_none();
    let _ = holder.kill();
    let _ = holder.wait();
    let exit = wait_bounded(&mut child, Duration::from_secs(60));
    assert!(
        running,
        "the streams ended only when the process exited; stderr:\n{stderr}"
    );
    assert!(exit.is_some_and(|s| s.success()), "{exit:?}");
    let page = parse_cgi(&answer);
    assert_eq!(page.status, 400, "{stderr}");
    assert!(stderr.contains("outcome=missing-param"), "{stderr}");
}

#[test]
fn a_long_running_relay_says_when_its_table_was_replaced() {
    let bot = Bot::start("json", "approve");
    let store = private_dir("gone");
    let env = relay_env(
        bot.addr(),
        store.path_str(),
        &[("REGISTER_REPLAY_MAX", "64")],
    );
    let server = ListenServer::start_unix(&env);
    assert_eq!(server.get(&query(&unique("t", 32))).http().status, 200);
    // An operator's mistake: the table cut short under a running relay.
    fs::OpenOptions::new()
        .write(true)
        .open(store.join("replay.table"))
        .and_then(|f| f.set_len(100))
        .expect("truncating the table");
    assert!(
        server.wait_stderr_contains(
            "replay.table was removed, cut short or replaced",
            Duration::from_secs(20)
        ),
        "{}",
        server.stderr_text()
    );
}

// ---------------------------------------------------------------------------
// Only its own files
// ---------------------------------------------------------------------------

/// What a start with `store` as the state directory does in every mode:
/// CGI answers 500 without contacting the bot, fd 0 and `--listen` exit
/// 2; each says why in one line naming the path and `expect`.
fn assert_refused(store: &Path, expect: &str) {
    let bot = Bot::start("json", "approve");
    let dir = store.to_str().unwrap();
    let env = relay_env(bot.addr(), dir, &[]);
    let (page, stderr) = cgi_get(&env, &query(&unique("refused", 32)));
    assert_eq!(page.status, 500, "{stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("REGISTER_STATE_DIR"))
        .unwrap_or_else(|| panic!("no line about REGISTER_STATE_DIR:\n{stderr}"));
    assert!(line.contains(dir) && line.contains(expect), "{line}");

    let mut fd0 = Fd0Server::start(&env);
    let status = fd0
        .wait_within(Duration::from_secs(20))
        .expect("fd 0 relay still running");
    assert_eq!(status.code(), Some(2), "{}", fd0.stderr_text());
    assert!(fd0.stderr_text().contains(expect), "{}", fd0.stderr_text());

    let sock = TempDir::new("sock");
    let addr = format!("unix:{}", sock.join("s").display());
    let (out, killed) = run_bin(&["--listen", &addr], &env, Duration::from_secs(20));
    assert!(!killed, "--listen relay did not stop");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains(expect));
    assert_eq!(codes(&bot), Vec::<String>::new());
}

#[test]
fn a_store_directory_holding_others_files_is_refused_and_left_intact() {
    let store = private_dir("st");
    let backup = store.join("backup.sql");
    fs::write(&backup, b"-- the bot's data").unwrap();
    let two_hours_ago = SystemTime::now() - Duration::from_secs(7200);
    fs::File::options()
        .write(true)
        .open(&backup)
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    assert_refused(store.path(), "backup.sql");
    assert_eq!(names(store.path()), ["backup.sql"]);
    assert_eq!(fs::read(&backup).unwrap(), b"-- the bot's data");
    assert_eq!(
        fs::metadata(&backup).unwrap().modified().unwrap(),
        two_hours_ago
    );
}

#[test]
fn a_symlinked_or_shared_store_directory_is_refused_and_left_intact() {
    let base = TempDir::new("st");
    let real = base.join("real");
    fs::create_dir(&real).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
    // A file of the older layout, which the store removes in a directory
    // it accepts: here it must stay.
    let old = format!("{}.entry", "ab".repeat(32));
    fs::write(real.join(&old), b"{}").unwrap();
    let link = base.join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    assert_refused(&link, "symbolic link");
    assert_eq!(names(&real), [old.as_str()]);

    fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
    assert_refused(&real, "private");
    assert_eq!(names(&real), [old]);
}

// ---------------------------------------------------------------------------
// Exactly-once across crashes
// ---------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Mode {
    Cgi,
    Fd0,
    Listen,
}

/// A relay process with one request in flight, killable with -9.
enum InFlight {
    Cgi(std::process::Child),
    Fd0(Fd0Server, Conn),
    Listen(ListenServer, Conn),
}

fn send_in(mode: Mode, env: &[(&str, &str)], query: &str) -> InFlight {
    match mode {
        Mode::Cgi => {
            let child = Command::new(bin())
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .envs(env.iter().copied())
                .env("REQUEST_METHOD", "GET")
                .env("QUERY_STRING", query)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawning the CGI relay");
            InFlight::Cgi(child)
        }
        Mode::Fd0 => {
            let server = Fd0Server::start(env);
            let conn = send_only(&server, query);
            InFlight::Fd0(server, conn)
        }
        Mode::Listen => {
            let server = ListenServer::start_unix(env);
            let conn = send_only(&server, query);
            InFlight::Listen(server, conn)
        }
    }
}

/// Sends a request and leaves its answer unread.
fn send_only(server: &Server, query: &str) -> Conn {
    let mut conn = server.connect();
    let params = get_params(query);
    send_request(&mut conn, 1, &as_pairs(&params), &[], false).unwrap();
    conn
}

fn kill9(flight: InFlight) {
    match flight {
        InFlight::Cgi(mut child) => {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        InFlight::Fd0(mut server, _conn) => server.kill(),
        InFlight::Listen(mut server, _conn) => server.kill(),
    }
}

fn repeat_in(mode: Mode, env: &[(&str, &str)], query: &str) -> HttpLike {
    match mode {
        Mode::Cgi => cgi_get(env, query).0,
        Mode::Fd0 => {
            let mut server = Fd0Server::start(env);
            let page = server.get(query).http();
            assert!(server.stop().success());
            page
        }
        Mode::Listen => {
            let mut server = ListenServer::start_unix(env);
            let page = server.get(query).http();
            assert!(server.stop().success());
            page
        }
    }
}

/// The bot holds the code for 3 s; the relay is killed with -9 while it
/// waits; the same code again, in a new process of the same mode, is not
/// sent to the bot and shows the unconfirmed page.
fn killed_mid_delivery(mode: Mode) {
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "3"]);
    let env = relay_env(
        bot.addr(),
        store.path_str(),
        &[("REGISTER_BOT_TIMEOUT", "20")],
    );
    let code = unique("killed", 40);
    let q = query(&code);
    let flight = send_in(mode, &env, &q);
    assert_eq!(
        bot.wait_received(1, Duration::from_secs(15)).len(),
        1,
        "{mode:?}: the first request never reached the bot"
    );
    kill9(flight);
    let page = repeat_in(mode, &env, &q);
    assert_unconfirmed(&page);
    assert_eq!(codes(&bot), [code.as_str()], "{mode:?}: delivered twice");
    // Again, later: still not sent.
    assert_unconfirmed(&repeat_in(mode, &env, &q));
    assert_eq!(codes(&bot), [code]);
    // Other codes are unaffected.
    let bot_fast = Bot::start("json", "approve");
    let env = relay_env(bot_fast.addr(), store.path_str(), &[]);
    let other = unique("other", 40);
    assert_answer_page(&repeat_in(mode, &env, &query(&other)), true, APPROVED);
    assert_eq!(codes(&bot_fast), [other]);
}

#[test]
fn a_cgi_relay_killed_mid_delivery_is_not_followed_by_a_second_delivery() {
    killed_mid_delivery(Mode::Cgi);
}

#[test]
fn an_fd0_relay_killed_mid_delivery_is_not_followed_by_a_second_delivery() {
    killed_mid_delivery(Mode::Fd0);
}

#[test]
fn a_listen_relay_killed_mid_delivery_is_not_followed_by_a_second_delivery() {
    killed_mid_delivery(Mode::Listen);
}

/// A repeat in a second process is already waiting for the first when the
/// first is killed with -9: it gets the unconfirmed page, and the bot
/// still has the code once. (Should the repeat reach its wait only after
/// the kill, the expected page is the same.)
#[test]
fn a_repeat_waiting_on_a_relay_that_is_killed_gets_the_unconfirmed_page() {
    let store = private_dir("st");
    let bot = Bot::start_with("json", "slow", &["--delay", "6"]);
    let env = relay_env(
        bot.addr(),
        store.path_str(),
        &[("REGISTER_BOT_TIMEOUT", "20")],
    );
    let code = unique("waiter", 40);
    let q = query(&code);
    let flight = send_in(Mode::Listen, &env, &q);
    assert_eq!(bot.wait_received(1, Duration::from_secs(15)).len(), 1);
    let mut waiter = Fd0Server::start(&env);
    let page = thread::scope(|s| {
        let pending = s.spawn(|| waiter.get(&q).http());
        thread::sleep(Duration::from_secs(1));
        kill9(flight);
        pending.join().unwrap()
    });
    assert_unconfirmed(&page);
    assert_eq!(codes(&bot), [code]);
    assert!(waiter.stop().success());
    let log = waiter.stderr_text();
    assert!(log.contains("outcome=unconfirmed status=502"), "{log}");
}

// ---------------------------------------------------------------------------
// A full disk
// ---------------------------------------------------------------------------

/// A tmpfs of one page, mounted for the test (root only), unmounted on drop.
struct TinyFs(TempDir);

impl TinyFs {
    fn mount() -> Option<TinyFs> {
        let dir = TempDir::new("full");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=4k,mode=0700", "tmpfs"])
            .arg(dir.path())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(TinyFs(dir))
    }
}

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// The store on a file system with no room: sign-ups still go through,
/// with a warning; only the duplicate protection is lost.
#[test]
fn a_full_disk_costs_only_the_duplicate_protection() {
    let Some(fs) = TinyFs::mount() else {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    };
    let store = fs.0.join("store");
    let bot = Bot::start("json", "approve");
    let env = relay_env(
        bot.addr(),
        store.to_str().unwrap(),
        &[("REGISTER_REPLAY_MAX", "64")],
    );
    let code = unique("full", 40);
    for round in 1..=2 {
        let (page, stderr) = cgi_get(&env, &query(&code));
        assert_answer_page(&page, true, APPROVED);
        assert!(
            stderr
                .lines()
                .any(|l| l.contains("WARN") && l.contains("replay store")),
            "round {round}: no warning:\n{stderr}"
        );
        assert!(!stderr.contains(&code), "the log shows the code");
        assert_eq!(codes(&bot).len(), round);
    }
}
