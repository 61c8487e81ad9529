//! Exactly-once delivery of each code.
//!
//! About 3 in 44 players hit the redirect twice (a double tap, a reload,
//! Discord's in-app browser opening the link again). Under the old relay
//! the second hit sent an already-used code to the bot, and the player saw
//! a cross although they were registered. Here the first request with a
//! code delivers it; a repeat within the TTL gets the first request's
//! answer, and a repeat that arrives while the first is still talking to
//! the bot waits for it.
//!
//! The store is a directory so that every relay process shares it
//! (mod_fcgid runs several): one file per code, named by the SHA-256 of
//! the code so no code is ever written in clear. `flock` on that file
//! gives single flight across threads and processes, and the file holds
//! the answer (or the note of a failed delivery), written while the lock
//! is held, so a reader, who takes the lock first, sees all of it or none.
//! One file rather than a lock file plus an answer written to a temporary
//! file and renamed: creating inodes is most of the store's cost, and the
//! store is on the path of every sign-up.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::warn;
use serde::{Deserialize, Serialize};

use crate::bot::{BotError, BotReply};
use crate::{fingerprint, sys};

/// How often one process sweeps expired entries out of the directory.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Whether the answer came from the bot just now or from the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The bot answered this request.
    First,
    /// The answer to an earlier request with the same code.
    Replayed,
}

/// The shared directory of answers, one file per code.
pub struct Store {
    dir: PathBuf,
    ttl: Duration,
    last_sweep: AtomicU64,
}

#[derive(Serialize, Deserialize)]
struct Entry {
    /// Seconds since the Unix epoch when the bot answered.
    at: u64,
    success: bool,
    message: String,
}

impl Store {
    /// Opens (creating it if needed) a private directory. One that others
    /// can write to is refused: they could plant answers.
    pub fn open(dir: &Path, ttl: Duration) -> io::Result<Store> {
        match fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)
        {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let meta = fs::metadata(dir)?;
        let uid = sys::effective_uid();
        if !meta.is_dir() {
            return Err(io::Error::other("not a directory"));
        }
        if meta.uid() != uid || meta.mode() & 0o022 != 0 {
            return Err(io::Error::other(
                "not private: it must belong to the relay's user and not be group- or world-writable",
            ));
        }
        // Whether files can be made there (a read-only file system says no
        // here), asked without making one: in CGI mode this runs for every
        // request, and creating and deleting a file is the slow part of
        // the store.
        sys::can_create_in(dir)?;
        Ok(Store {
            dir: dir.to_path_buf(),
            ttl,
            last_sweep: AtomicU64::new(now_secs()),
        })
    }

    /// Delivers `code` through `deliver` unless this code was answered
    /// within the TTL, or is being answered right now, in which case the
    /// first answer is returned. `wait` bounds how long a repeat waits for
    /// the one in flight.
    ///
    /// A store that fails (full disk, permissions) costs the duplicate
    /// protection, never the registration: the code is delivered anyway.
    pub fn deliver_once<F>(
        &self,
        code: &str,
        wait: Duration,
        deliver: F,
    ) -> Result<(BotReply, Delivery), BotError>
    where
        F: FnOnce() -> Result<BotReply, BotError>,
    {
        self.maybe_sweep();
        let key = key(code);
        let asked = now_nanos();
        let (file, len) = match self.lock(&key, wait) {
            Ok(Some(locked)) => locked,
            // Still held by a request in flight past the bound: sending the
            // code again would only make the bot refuse it.
            Ok(None) => return Err(BotError::Timeout),
            Err(e) => {
                warn!(
                    "replay store: cannot lock an entry, delivering without duplicate protection: {e}"
                );
                return deliver().map(|r| (r, Delivery::First));
            }
        };
        // A new file is empty: the usual case costs no read.
        match self.read(&file, len) {
            Some(Saved::Answer(entry)) => {
                drop(file);
                return Ok((
                    BotReply {
                        success: entry.success,
                        message: entry.message,
                    },
                    Delivery::Replayed,
                ));
            }
            // A delivery of this code ended without an answer while this
            // request waited for the lock. The bot may have the code, so
            // sending it again would only get it refused: answer as that
            // delivery did. A reload after the failure tries again.
            Some(Saved::Failed { at, status }) if at >= asked => {
                return Err(match status {
                    504 => BotError::Timeout,
                    _ => BotError::Closed,
                });
            }
            _ => {}
        }
        let reply = match deliver() {
            Ok(reply) => reply,
            Err(e) => {
                // A refused connection never carried the code: nothing to remember.
                if !matches!(e, BotError::Unavailable(_))
                    && let Err(w) = save(
                        &file,
                        len,
                        format!(
                            "{} {}",
                            now_nanos(),
                            crate::outcome::Outcome::BotFailed(e.kind()).status()
                        )
                        .as_bytes(),
                    )
                {
                    warn!("replay store: cannot note a failed delivery: {w}");
                }
                return Err(e);
            }
        };
        if let Err(e) = self.write(&file, len, &reply) {
            warn!(
                "replay store: cannot save an answer, a repeat of this code will reach the bot again: {e}"
            );
        }
        drop(file);
        Ok((reply, Delivery::First))
    }

    /// Takes the entry's lock, or `None` if it stays held past `wait`;
    /// with the file, the length of what it holds.
    fn lock(&self, key: &str, wait: Duration) -> io::Result<Option<(File, u64)>> {
        let path = self.dir.join(format!("{key}.entry"));
        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(2);
        loop {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&path)?;
            while !sys::try_lock_exclusive(&file)? {
                if Instant::now() + pause > deadline {
                    return Ok(None);
                }
                thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(20));
            }
            // The sweeper may have unlinked the file between our open and
            // our lock (it unlinks only while holding the lock, and nothing
            // else renames or unlinks entries); a lock on a removed file
            // guards nothing.
            let meta = file.metadata()?;
            if meta.nlink() > 0 {
                return Ok(Some((file, meta.len())));
            }
        }
    }

    /// What the locked file holds: an answer still within the TTL, or the
    /// note of a failed delivery.
    fn read(&self, file: &File, len: u64) -> Option<Saved> {
        if len == 0 || len > MAX_ENTRY {
            return None;
        }
        let mut bytes = vec![0; usize::try_from(len).ok()?];
        file.read_exact_at(&mut bytes, 0).ok()?;
        if bytes.first() == Some(&b'{') {
            let entry: Entry = serde_json::from_slice(&bytes).ok()?;
            return (entry.at + self.ttl.as_secs() >= now_secs()).then_some(Saved::Answer(entry));
        }
        let text = std::str::from_utf8(&bytes).ok()?;
        let (at, status) = text.trim().split_once(' ')?;
        Some(Saved::Failed {
            at: at.parse().ok()?,
            status: status.parse().ok()?,
        })
    }

    fn write(&self, file: &File, len: u64, reply: &BotReply) -> io::Result<()> {
        let entry = Entry {
            at: now_secs(),
            success: reply.success,
            message: reply.message.clone(),
        };
        let bytes = serde_json::to_vec(&entry).map_err(io::Error::other)?;
        save(file, len, &bytes)
    }

    /// Removes expired entries, at most once a minute per process, so the
    /// directory stays small without a separate cleaner.
    fn maybe_sweep(&self) {
        let now = now_secs();
        let last = self.last_sweep.load(Ordering::Relaxed);
        if now < last + SWEEP_EVERY.as_secs()
            || self
                .last_sweep
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Err(e) = self.sweep() {
            warn!("replay store: sweep failed: {e}");
        }
    }

    /// Removes every entry older than the TTL.
    pub fn sweep(&self) -> io::Result<()> {
        let cutoff = SystemTime::now() - self.ttl;
        for item in fs::read_dir(&self.dir)? {
            let item = item?;
            let path = item.path();
            let Ok(meta) = item.metadata() else { continue };
            if meta.modified().map_or(true, |m| m > cutoff) {
                continue;
            }
            // Only unlink an entry nobody holds, and unlink it while
            // holding it, so a waiter never ends up on a dead file. (Files
            // of an older layout, .lock/.json/.tmp/.failed, go the same way.)
            let Ok(file) = File::open(&path) else {
                continue;
            };
            if sys::try_lock_exclusive(&file).unwrap_or(false) {
                let _ = fs::remove_file(&path);
            }
        }
        Ok(())
    }
}

/// What an entry file holds.
enum Saved {
    Answer(Entry),
    /// A delivery that ended without an answer, at `at` (ns since the
    /// epoch), as the status it got: a time-out (504) or a bad answer (502).
    Failed {
        at: u128,
        status: u16,
    },
}

/// Far more than an answer (the bot's reply is at most 64 KiB): a longer
/// file is not one of ours and is delivered over.
const MAX_ENTRY: u64 = 256 * 1024;

/// Replaces the locked file's content (`len` bytes) with `bytes`, in one
/// write, shortening the file only when it held more.
fn save(file: &File, len: u64, bytes: &[u8]) -> io::Result<()> {
    file.write_all_at(bytes, 0)?;
    let new_len = bytes.len() as u64;
    if len > new_len {
        file.set_len(new_len)?;
    }
    Ok(())
}

/// The file name for a code: its SHA-256 in hex.
fn key(code: &str) -> String {
    fingerprint::sha256_hex(code.as_bytes())
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::AtomicUsize;

    fn temp_store(name: &str, ttl: Duration) -> (Store, PathBuf) {
        let dir = std::env::temp_dir().join(format!("tr-replay-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        (Store::open(&dir, ttl).unwrap(), dir)
    }

    fn ok(msg: &str) -> Result<BotReply, BotError> {
        Ok(BotReply {
            success: true,
            message: msg.into(),
        })
    }

    #[test]
    fn second_delivery_is_replayed() {
        let (store, dir) = temp_store("seq", Duration::from_secs(600));
        let wait = Duration::from_secs(1);
        let (r, d) = store
            .deliver_once("code-1", wait, || ok("welcome"))
            .unwrap();
        assert_eq!((r.message.as_str(), d), ("welcome", Delivery::First));
        let (r, d) = store
            .deliver_once("code-1", wait, || panic!("bot contacted twice"))
            .unwrap();
        assert_eq!((r.message.as_str(), d), ("welcome", Delivery::Replayed));
        let (_, d) = store.deliver_once("code-2", wait, || ok("other")).unwrap();
        assert_eq!(d, Delivery::First);
        // Nothing in the directory names a code.
        for item in fs::read_dir(&dir).unwrap() {
            let name = item.unwrap().file_name().into_string().unwrap();
            assert!(!name.contains("code"), "{name}");
            let body = fs::read_to_string(dir.join(&name)).unwrap();
            assert!(!body.contains("code-"), "{body}");
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn failed_delivery_is_not_stored() {
        let (store, dir) = temp_store("fail", Duration::from_secs(600));
        let wait = Duration::from_secs(1);
        let err = store
            .deliver_once("c", wait, || Err(BotError::Timeout))
            .unwrap_err();
        assert!(matches!(err, BotError::Timeout));
        let (_, d) = store.deliver_once("c", wait, || ok("now")).unwrap();
        assert_eq!(d, Delivery::First);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn expired_answers_are_delivered_again_and_swept() {
        let (store, dir) = temp_store("ttl", Duration::ZERO);
        let wait = Duration::from_secs(1);
        store.deliver_once("c", wait, || ok("one")).unwrap();
        thread::sleep(Duration::from_millis(1100));
        let (r, d) = store.deliver_once("c", wait, || ok("two")).unwrap();
        assert_eq!((r.message.as_str(), d), ("two", Delivery::First));
        thread::sleep(Duration::from_millis(50));
        store.sweep().unwrap();
        assert_eq!(fs::read_dir(&dir).unwrap().count(), 0);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn concurrent_repeats_wait_for_the_one_in_flight() {
        let (store, dir) = temp_store("conc", Duration::from_secs(600));
        let store = Arc::new(store);
        let calls = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let (store, calls) = (store.clone(), calls.clone());
                thread::spawn(move || {
                    store
                        .deliver_once("same", Duration::from_secs(5), || {
                            calls.fetch_add(1, Ordering::SeqCst);
                            thread::sleep(Duration::from_millis(200));
                            ok("first")
                        })
                        .unwrap()
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|(r, _)| r.message == "first"));
        assert_eq!(
            results
                .iter()
                .filter(|(_, d)| *d == Delivery::First)
                .count(),
            1
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_repeat_gives_up_after_the_bound_without_delivering() {
        let (store, dir) = temp_store("bound", Duration::from_secs(600));
        let store = Arc::new(store);
        let s = store.clone();
        let slow = thread::spawn(move || {
            s.deliver_once("c", Duration::from_secs(5), || {
                thread::sleep(Duration::from_millis(800));
                ok("late")
            })
        });
        thread::sleep(Duration::from_millis(100));
        let err = store
            .deliver_once("c", Duration::from_millis(200), || {
                panic!("delivered twice")
            })
            .unwrap_err();
        assert!(matches!(err, BotError::Timeout));
        assert!(slow.join().unwrap().is_ok());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_repeat_waiting_on_a_failed_delivery_does_not_deliver_again() {
        let (store, dir) = temp_store("waitfail", Duration::from_secs(600));
        let store = Arc::new(store);
        let s = store.clone();
        let first = thread::spawn(move || {
            s.deliver_once("c", Duration::from_secs(5), || {
                thread::sleep(Duration::from_millis(300));
                Err(BotError::Timeout)
            })
        });
        thread::sleep(Duration::from_millis(100));
        let repeat = store.deliver_once("c", Duration::from_secs(5), || panic!("delivered twice"));
        assert!(matches!(repeat, Err(BotError::Timeout)));
        assert!(matches!(first.join().unwrap(), Err(BotError::Timeout)));
        // A reload after the failure tries again.
        let (_, d) = store
            .deliver_once("c", Duration::from_secs(1), || ok("now"))
            .unwrap();
        assert_eq!(d, Delivery::First);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_entry_rewritten_shorter_reads_back_whole() {
        let (store, dir) = temp_store("shorter", Duration::from_secs(600));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join("x.entry"))
            .unwrap();
        let reply = BotReply {
            success: true,
            message: "a message much longer than a failure note".into(),
        };
        store.write(&file, 0, &reply).unwrap();
        let len = file.metadata().unwrap().len();
        match store.read(&file, len) {
            Some(Saved::Answer(entry)) => assert_eq!(entry.message, reply.message),
            _ => panic!("the answer does not read back"),
        }
        save(&file, len, b"7 504").unwrap();
        let len = file.metadata().unwrap().len();
        assert_eq!(len, 5);
        assert!(matches!(
            store.read(&file, len),
            Some(Saved::Failed { at: 7, status: 504 })
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_a_shared_directory() {
        let dir = std::env::temp_dir().join(format!("tr-replay-open-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        assert!(Store::open(&dir, Duration::from_secs(1)).is_err());
        let file = dir.join("file");
        fs::write(&file, b"").unwrap();
        assert!(Store::open(&file, Duration::from_secs(1)).is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
