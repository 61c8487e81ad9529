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
//! The store is one file of fixed size, `replay.table`, in a private
//! directory that every relay process shares (mod_fcgid runs several). It
//! is a hash table: a 4 KiB header, then buckets of [`PER_BUCKET`] slots of
//! [`SLOT`] bytes, one bucket per 4 KiB page. A code's slot is found by
//! the SHA-256 of a per-table random salt and the code, so no code is
//! written in clear and nobody outside can aim codes at one bucket. A full
//! bucket gives up its oldest entry: a flood costs the oldest replays,
//! never the disk. The file is opened once per process and read and
//! written with pread/pwrite.
//!
//! Single flight uses open-file-description byte-range locks, one byte per
//! bucket (held while a slot is looked up or claimed, microseconds) and one
//! per slot (held for the whole delivery), in a range past the end of the
//! file. Those locks do not exclude users of the same descriptor (the
//! event loop's connections, housekeeping), so the same ranges are also
//! claimed in an in-process set. No lock wait can outlast the caller's
//! deadline. An answer
//! is final, so a replay is read under its bucket's lock alone; a seal (a
//! checksum) in each slot tells a whole slot from one read mid-write.
//!
//! Before the first byte goes to the bot the slot records the intent (the
//! hash, "delivering", the time, the holder's pid), in the page cache,
//! which outlives the process. A request that later finds an intent, no
//! answer and a free slot lock knows the delivering process died mid-way:
//! the bot may have the code, so it is not sent again; the player is told
//! the outcome could not be confirmed ([`Undelivered::Unconfirmed`]).

use std::collections::HashSet;
use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::bot::{BotError, BotReply, FailureKind};
use crate::fingerprint::sha256;
use crate::sys;
use log::{info, warn};

/// Bytes per entry.
pub const SLOT: usize = 512;
/// Entries per bucket: a bucket is one 4 KiB page, read in one pread.
pub const PER_BUCKET: usize = 8;
const BUCKET: usize = SLOT * PER_BUCKET;
const HEADER: usize = 4096;
/// Where a slot's seal lies (8 bytes, after its fixed fields): a checksum
/// of what the slot says. A replay is answered from the bucket's read,
/// which takes no slot lock and so may meet a write half done; a slot
/// whose seal does not match is read again under its lock.
const SEAL_AT: usize = 48;
/// Where a slot's fixed fields end and the bot's message begins.
const MESSAGE_AT: usize = 64;
/// The longest message kept whole; a longer one is kept cut, with "…".
pub const MESSAGE_MAX: usize = SLOT - MESSAGE_AT;

const TABLE: &str = "replay.table";
/// A table being made, renamed over [`TABLE`] once its header is written.
const TABLE_NEW: &str = "replay.table.new";
const MAGIC: &[u8; 8] = b"TRREPLAY";
const VERSION: u32 = 1;

/// Lock bytes lie past any file offset the table uses.
const LOCKS: u64 = 1 << 50;
const HEADER_LOCK: u64 = LOCKS - 1;

/// How long a claim that found its code busy first waits before looking
/// again; the wait doubles up to [`BUSY_PAUSE_MAX`].
pub const BUSY_PAUSE: Duration = Duration::from_millis(1);
/// See [`BUSY_PAUSE`].
pub const BUSY_PAUSE_MAX: Duration = Duration::from_millis(20);

/// One lap of housekeeping over the whole table takes the TTL, within
/// these bounds: an expired entry is zeroed at most one lap after it
/// expired, once steps run (every [`STEP_EVERY`] in the long-running
/// modes; after each response in CGI).
pub const SWEEP_LAP_MIN: Duration = Duration::from_secs(1);
/// See [`SWEEP_LAP_MIN`].
pub const SWEEP_LAP_MAX: Duration = Duration::from_secs(60);
/// How often the long-running modes take a housekeeping step.
pub const STEP_EVERY: Duration = Duration::from_secs(1);

/// Whether the answer came from the bot just now or from the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// The bot answered this request.
    First,
    /// The answer to an earlier request with the same code.
    Replayed,
}

/// Why a request got no answer of the bot's.
#[derive(Debug)]
pub enum Undelivered {
    /// This delivery failed, or the one this request waited for did.
    Bot(BotError),
    /// An earlier delivery of this code began and its process died before
    /// the answer was kept: the bot may have the code, so it is not sent
    /// again.
    Unconfirmed,
}

/// Why the store cannot be used.
#[derive(Debug)]
pub enum OpenError {
    /// The directory is not one the store may use (a symlink, not
    /// private, holding files of others): a configuration error, the
    /// relay refuses to start.
    Refused(String),
    /// The directory is fine but the table cannot be made or opened
    /// (a disk too full for the whole table, a read-only file system):
    /// the relay runs without duplicate protection, as it would if the
    /// store broke at run time, rather than refuse every sign-up.
    Broken(io::Error),
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Refused(why) => f.write_str(why),
            OpenError::Broken(e) => write!(f, "{e}"),
        }
    }
}

/// The replay store: one open table per process, shared by its requests
/// and its housekeeping.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    file: File,
    /// The store's directory, for the removal of old-layout files.
    dir: OwnedFd,
    /// Whether files of the older layout may still be in the directory.
    old_layout_left: AtomicBool,
    buckets: u64,
    salt: [u8; 16],
    ttl: Duration,
    /// Lock bytes this process holds. OFD locks do not tell apart the
    /// users of one descriptor: the event loop's connections, each with
    /// its own delivery, and the housekeeping thread.
    held: Mutex<HashSet<u64>>,
    /// This process's id, written into intents (`getpid` is not cached).
    pid: u32,
    /// Set once this process has said that `replay.table` is no longer the
    /// file it has open.
    replaced: AtomicBool,
}

/// What a slot holds.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Entry {
    Empty,
    /// A delivery began at `at` and has no outcome yet.
    Delivering,
    Answered(BotReply),
    /// A delivery ended without an answer (never `Unavailable`: a refused
    /// connection carried no code and leaves no entry).
    Failed(FailureKind),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    hash: [u8; 32],
    /// Nanoseconds since the epoch: when the delivery began, or ended.
    at: u64,
    /// The pid of the process that wrote the entry; for the log.
    holder: u32,
    entry: Entry,
}

const EMPTY: Slot = Slot {
    hash: [0; 32],
    at: 0,
    holder: 0,
    entry: Entry::Empty,
};

impl Slot {
    fn encode(&self) -> [u8; SLOT] {
        let mut b = [0u8; SLOT];
        let (state, flag, message): (u8, u8, &[u8]) = match &self.entry {
            Entry::Empty => return b,
            Entry::Delivering => (1, 0, b""),
            Entry::Answered(r) => (2, u8::from(r.success), r.message.as_bytes()),
            Entry::Failed(kind) => (3, kind.to_byte(), b""),
        };
        let message = cut(message);
        b[0] = state;
        b[1] = flag;
        b[2..4].copy_from_slice(&(message.len() as u16).to_le_bytes());
        b[4..8].copy_from_slice(&self.holder.to_le_bytes());
        b[8..16].copy_from_slice(&self.at.to_le_bytes());
        b[16..48].copy_from_slice(&self.hash);
        b[MESSAGE_AT..MESSAGE_AT + message.len()].copy_from_slice(&message);
        let seal = seal(&b);
        b[SEAL_AT..SEAL_AT + 8].copy_from_slice(&seal.to_le_bytes());
        b
    }

    /// Reads a slot; anything unreadable is an empty one.
    fn decode(b: &[u8]) -> Slot {
        if b.len() < SLOT {
            return EMPTY;
        }
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        let mut hash = [0u8; 32];
        hash.copy_from_slice(&b[16..48]);
        let mut at = [0u8; 8];
        at.copy_from_slice(&b[8..16]);
        let mut holder = [0u8; 4];
        holder.copy_from_slice(&b[4..8]);
        let len = usize::from(u16_at(2)).min(MESSAGE_MAX);
        let entry = match (b[0], b[1]) {
            (1, _) => Entry::Delivering,
            (2, flag @ (0 | 1)) => Entry::Answered(BotReply {
                success: flag == 1,
                message: String::from_utf8_lossy(&b[MESSAGE_AT..MESSAGE_AT + len]).into_owned(),
            }),
            (3, kind) => match FailureKind::from_byte(kind) {
                Some(kind) => Entry::Failed(kind),
                None => return EMPTY,
            },
            _ => return EMPTY,
        };
        Slot {
            hash,
            at: u64::from_le_bytes(at),
            holder: u32::from_le_bytes(holder),
            entry,
        }
    }

    fn expired(&self, now: u64, ttl: Duration) -> bool {
        self.entry == Entry::Empty || self.at.saturating_add(nanos(ttl)) < now
    }
}

/// FNV-1a over everything [`Slot::decode`] reads: the fixed fields and the
/// message. Not a defence against a forger (the table is private), only a
/// test that a read did not cross a write.
fn seal(b: &[u8]) -> u64 {
    let len = usize::from(u16::from_le_bytes([b[2], b[3]])).min(MESSAGE_MAX);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in b[..SEAL_AT].iter().chain(&b[MESSAGE_AT..MESSAGE_AT + len]) {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Whether a slot read without its lock is whole: its seal matches (a
/// table written before seals has none: such slots are read under the lock).
fn sealed(b: &[u8]) -> bool {
    b.len() >= SLOT && b[SEAL_AT..SEAL_AT + 8] == seal(b).to_le_bytes()
}

/// A message that fits a slot, cut at a character boundary with "…" when
/// it does not.
fn cut(message: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if message.len() <= MESSAGE_MAX {
        return message.into();
    }
    const ELLIPSIS: &str = "…";
    let mut end = MESSAGE_MAX - ELLIPSIS.len();
    // Back up to the start of a UTF-8 character (not a continuation byte).
    while end > 0 && message[end] & 0xC0 == 0x80 {
        end -= 1;
    }
    let mut out = message[..end].to_vec();
    out.extend_from_slice(ELLIPSIS.as_bytes());
    out.into()
}

/// The entry for `hash` in a bucket that still counts, if any: one within
/// the TTL, one written since the request began (it waited for it), or a
/// delivery that may still be going on (whatever the TTL: its lock says).
fn find(slots: &[Slot], hash: &[u8; 32], now: u64, ttl: Duration, asked: u64) -> Option<usize> {
    slots.iter().position(|s| {
        &s.hash == hash
            && s.entry != Entry::Empty
            && (s.entry == Entry::Delivering || s.at >= asked || !s.expired(now, ttl))
    })
}

/// The slots a new entry may take, best first: empty or expired ones, then
/// the oldest live ones ("oldest first" within a bucket).
fn victims(slots: &[Slot], now: u64, ttl: Duration) -> Vec<usize> {
    let mut order: Vec<usize> = (0..slots.len()).collect();
    order.sort_by_key(|&i| (!slots[i].expired(now, ttl), slots[i].at));
    order
}

/// How long a failed delivery answers the repeats of its code that come
/// after it, before one tries again.
pub const FAILURE_HOLD: Duration = Duration::from_secs(2);

/// What a request does with the entry it found for its code, holding the
/// entry's lock. `asked` is when the request began.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Replay(BotReply),
    /// The delivery this request waited for failed: answer the same.
    Fail(FailureKind),
    Unconfirmed,
    Deliver,
}

fn verdict(slot: &Slot, now: u64, ttl: Duration, asked: u64) -> Verdict {
    // Whatever happened while this request waited counts, even past the TTL.
    let fresh = slot.at >= asked || !slot.expired(now, ttl);
    match &slot.entry {
        Entry::Answered(reply) if fresh => Verdict::Replay(reply.clone()),
        // The lock is free, so whoever began this delivery is gone.
        Entry::Delivering if fresh => Verdict::Unconfirmed,
        // A failure that ended while this request waited: the bot may hold
        // the code, so answer as that delivery did. So does one that ended
        // just before: a process that serves one connection at a time reads
        // each queued repeat only after the previous one failed. A reload
        // after a 504 page (seconds later) tries again.
        Entry::Failed(kind)
            if slot.at >= asked || now.saturating_sub(slot.at) < nanos(FAILURE_HOLD) =>
        {
            Verdict::Fail(*kind)
        }
        _ => Verdict::Deliver,
    }
}

/// The answer that a slot read under its bucket's lock alone gives at once:
/// an answer, or a failure this request waited for, read whole (sealed).
/// An answer is final: only an intent needs the slot's lock, to tell a live
/// delivery from a dead one; and an entry to deliver again is claimed
/// under it.
fn final_answer(
    raw: &[u8],
    slot: &Slot,
    now: u64,
    ttl: Duration,
    asked: u64,
) -> Option<Result<(BotReply, Delivery), Undelivered>> {
    if !sealed(raw) {
        return None;
    }
    match verdict(slot, now, ttl, asked) {
        Verdict::Replay(reply) => Some(Ok((reply, Delivery::Replayed))),
        Verdict::Fail(kind) => Some(Err(Undelivered::Bot(kind.error()))),
        Verdict::Unconfirmed | Verdict::Deliver => None,
    }
}

/// What [`Store::begin`] found for a code.
#[derive(Debug)]
pub enum Begin {
    /// Answered from the store: a replay, the failure of a delivery this
    /// request waited for, or an intent whose process died
    /// ([`Undelivered::Unconfirmed`]).
    Done(Result<(BotReply, Delivery), Undelivered>),
    /// This request delivers the code: the ticket holds its entry, with
    /// the intent written, until [`Ticket::finish`] keeps the outcome.
    Deliver(Ticket),
    /// The code's entry, or its bucket, is held by someone else right now
    /// (a delivery in flight, in this process or another): try again in a
    /// few milliseconds, and at the request's deadline answer
    /// [`Busy::given_up`].
    Busy(Busy),
}

/// What a claim is waiting for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Busy {
    kind: BusyKind,
    /// The entry went away as it was looked at (a refused delivery left
    /// nothing): look again without a pause.
    again: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BusyKind {
    /// The bucket's lock (held for microseconds at a time).
    Bucket,
    /// A delivery of this very code.
    InFlight,
    /// Every slot of the bucket is in a delivery of some code.
    NoRoom,
}

impl Busy {
    /// The answer to a request still busy at its deadline. A delivery of
    /// the code that is still in flight: 504 (sending the code again
    /// would only make the bot refuse it). No entry to be had: the code
    /// was not sent, the player may try again (503).
    pub fn given_up(self) -> Undelivered {
        match self.kind {
            BusyKind::InFlight => Undelivered::Bot(BotError::Timeout),
            BusyKind::Bucket | BusyKind::NoRoom => {
                warn!(
                    "replay store: no entry for this code came free within the wait \
                     (its bucket busy with deliveries); the code was not sent"
                );
                Undelivered::Bot(BotError::Unavailable(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    match self.kind {
                        BusyKind::Bucket => "the code's bucket stayed busy",
                        _ => "every replay slot of this code's bucket was in a delivery",
                    },
                )))
            }
        }
    }
}

/// The right to deliver one code: its entry's lock, with the intent to
/// deliver written. [`Ticket::finish`] keeps the outcome; a ticket dropped
/// without it (a connection gone mid-delivery) lets the lock go and leaves
/// the intent, so a repeat of the code is told it is unconfirmed, exactly
/// as after a crash.
pub struct Ticket {
    inner: Arc<Inner>,
    /// The lock byte and the slot's offset; `None` when the store failed
    /// and the delivery goes without duplicate protection.
    held: Option<(u64, u64)>,
    hash: [u8; 32],
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ticket(protected={})", self.held.is_some())
    }
}

impl Ticket {
    /// Keeps the delivery's outcome for repeats of the code: the answer,
    /// a failure's kind, or nothing for a refused connection (the code
    /// never left); then lets the entry go.
    pub fn finish(self, result: &Result<BotReply, BotError>) {
        let Some((_, offset)) = self.held else {
            return;
        };
        let entry = match result {
            Ok(reply) => Some(Entry::Answered(reply.clone())),
            // A refused connection never carried the code: nothing to keep.
            Err(BotError::Unavailable(_)) => None,
            Err(e) => Some(Entry::Failed(e.kind())),
        };
        let slot = match entry {
            Some(entry) => Slot {
                hash: self.hash,
                at: now_nanos(),
                holder: self.inner.pid,
                entry,
            },
            None => EMPTY,
        };
        if let Err(e) = self.inner.write_slot(offset, &slot) {
            warn!(
                "replay store: cannot keep the outcome, a repeat of this code may be told it is unconfirmed: {e}"
            );
        }
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        if let Some((byte, _)) = self.held {
            let _ = sys::unlock_byte(&self.inner.file, byte);
            self.inner.release(byte);
        }
    }
}

/// One look at a code's bucket, waiting for nothing.
enum Attempt<'a> {
    Done(Result<(BotReply, Delivery), Undelivered>),
    /// This request delivers; the guard holds the slot with its intent.
    Deliver(Locked<'a>, u64),
    Busy(Busy),
}

/// A lock byte held by this process for one user: released on drop.
struct Locked<'a> {
    inner: &'a Inner,
    byte: u64,
}

impl Locked<'_> {
    /// The byte, whose release is now the caller's (a [`Ticket`]'s).
    fn into_byte(self) -> u64 {
        let byte = self.byte;
        std::mem::forget(self);
        byte
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        // Unlocking cannot fail on a valid descriptor; and the lock goes
        // with the process anyway.
        let _ = sys::unlock_byte(&self.inner.file, self.byte);
        self.inner.release(self.byte);
    }
}

impl Store {
    /// Opens the store in `dir`, creating the directory (0700) if it is
    /// missing and the table if it is missing or was made for another
    /// size. The directory must be the store's own: not a symlink, mode
    /// 0700 (no group or other bits), owned by this user, and holding no
    /// names but the store's.
    pub fn open(dir: &Path, ttl: Duration, max_entries: usize) -> Result<Store, OpenError> {
        let dir_fd = open_dir(dir)?;
        let refuse = |why: String| {
            OpenError::Refused(format!(
                "REGISTER_STATE_DIR={:?} cannot be used: {why}",
                dir.display().to_string()
            ))
        };
        let (owner, mode) = sys::owner_and_mode(&dir_fd).map_err(|e| refuse(e.to_string()))?;
        let uid = sys::effective_uid();
        if owner != uid || mode & 0o077 != 0 {
            return Err(refuse(format!(
                "it must be private to the relay's user (uid {uid}, mode 0700), \
                 and is owned by uid {owner} with mode {:04o}",
                mode & 0o7777
            )));
        }
        // A directory with a table in it was checked when the table was
        // made: one look at the table spares each CGI request a listing of
        // the directory (long with files of the older layout); the table's
        // header says whether any of those are left for housekeeping.
        let table_made =
            std::fs::symlink_metadata(dir.join(TABLE)).is_ok_and(|m| m.file_type().is_file());
        let listed_old = if table_made {
            None
        } else {
            let names = sys::list_dir(&dir_fd).map_err(|e| refuse(e.to_string()))?;
            let foreign: Vec<String> = names
                .iter()
                .filter(|n| !ours(n) && !old_layout(n))
                .map(|n| String::from_utf8_lossy(n).into_owned())
                .collect();
            if !foreign.is_empty() {
                let shown: Vec<&str> = foreign.iter().take(3).map(String::as_str).collect();
                return Err(refuse(format!(
                    "it holds {} file(s) that are not the replay store's ({}{}); \
                     give the store a directory of its own",
                    foreign.len(),
                    shown.join(", "),
                    if foreign.len() > 3 { ", …" } else { "" }
                )));
            }
            // The store's own names must be files it made: a symlink or a
            // directory there was put by someone else, and would otherwise
            // switch the protection off on every request.
            for name in names.iter().filter(|n| ours(n)) {
                let path = dir.join(std::ffi::OsStr::from_bytes(name));
                match std::fs::symlink_metadata(&path) {
                    Ok(m) if m.file_type().is_file() => {}
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    _ => {
                        return Err(refuse(format!(
                            "{} in it is not a file the replay store made; remove it",
                            String::from_utf8_lossy(name)
                        )));
                    }
                }
            }
            // Files of the one-file-per-code layout of earlier versions are the
            // store's own, and of no use to the table: housekeeping removes
            // them, a batch at a time, off the request path.
            Some(names.iter().any(|n| old_layout(n)))
        };
        let wanted = max_entries.div_ceil(PER_BUCKET).max(1) as u64;
        let (file, salt, buckets, old_gone) =
            open_table(&dir_fd, wanted).map_err(OpenError::Broken)?;
        let old_layout_left = match listed_old {
            Some(true) => true,
            Some(false) => {
                mark_old_layout_gone(&file);
                false
            }
            // Read with the header, when the table was opened.
            None => !old_gone,
        };
        if buckets != wanted {
            warn!(
                "replay store: REGISTER_REPLAY_MAX is {max_entries} but replay.table holds {} \
                 entries, and relays may be using it: it keeps its size until it is removed \
                 with every relay stopped",
                buckets * PER_BUCKET as u64
            );
        }
        Ok(Store {
            inner: Arc::new(Inner {
                file,
                dir: dir_fd,
                old_layout_left: AtomicBool::new(old_layout_left),
                replaced: AtomicBool::new(false),
                buckets,
                salt,
                ttl,
                held: Mutex::new(HashSet::new()),
                pid: std::process::id(),
            }),
        })
    }

    /// Delivers `code` through `deliver` unless this code was answered
    /// within the TTL, or is being answered right now, in which case the
    /// first answer is returned. `wait` bounds how long a repeat waits for
    /// the one in flight. The blocking modes' way; [`Store::begin`] is the
    /// same without the waiting.
    ///
    /// A store that fails (full disk, I/O error) costs the duplicate
    /// protection, never the registration: the code is delivered anyway.
    pub fn deliver_once<F>(
        &self,
        code: &str,
        wait: Duration,
        deliver: F,
    ) -> Result<(BotReply, Delivery), Undelivered>
    where
        F: FnOnce() -> Result<BotReply, BotError>,
    {
        let deadline = Instant::now() + wait;
        let asked = SystemTime::now();
        let mut pause = BUSY_PAUSE;
        let ticket = loop {
            match self.begin(code, asked) {
                Begin::Done(result) => return result,
                Begin::Deliver(ticket) => break ticket,
                Begin::Busy(busy) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(busy.given_up());
                    }
                    self.inner.wait_for(busy, (now + pause).min(deadline));
                    pause = (pause * 2).min(BUSY_PAUSE_MAX);
                }
            }
        };
        let result = deliver();
        ticket.finish(&result);
        result
            .map(|r| (r, Delivery::First))
            .map_err(Undelivered::Bot)
    }

    /// Looks `code` up without waiting for anything: its answer, the
    /// right to deliver it, or busy (try again shortly). `asked` is when
    /// the request began: an outcome written since then is this request's
    /// to share, even past the TTL.
    ///
    /// A store that fails (full disk, I/O error) costs the duplicate
    /// protection, never the registration: the ticket then guards nothing.
    pub fn begin(&self, code: &str, asked: SystemTime) -> Begin {
        let inner = &*self.inner;
        let hash = inner.hash(code);
        let asked = asked.duration_since(UNIX_EPOCH).map_or(0, nanos);
        let held = match inner.attempt(&hash, asked) {
            Ok(Attempt::Done(result)) => return Begin::Done(result),
            Ok(Attempt::Busy(busy)) => return Begin::Busy(busy),
            Ok(Attempt::Deliver(guard, offset)) => Some((guard.into_byte(), offset)),
            Err(e) => {
                warn!(
                    "replay store: cannot claim an entry, delivering without duplicate protection: {e}"
                );
                None
            }
        };
        Begin::Deliver(Ticket {
            inner: self.inner.clone(),
            held,
            hash,
        })
    }

    /// One housekeeping step: zeroes the expired entries of the buckets
    /// whose turn has come since the last step of any process (the whole
    /// table once per lap, at most one lap per step). Never on a request's
    /// path: CGI runs it after its response is out, the long-running modes
    /// on a background thread.
    pub fn housekeep(&self) -> io::Result<()> {
        self.inner.housekeep()
    }

    /// Starts a low-priority thread that takes a housekeeping step every
    /// [`STEP_EVERY`] for as long as the store lives.
    pub fn start_housekeeping(&self) {
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let spawned = thread::Builder::new()
            .name("replay-housekeeping".into())
            .stack_size(128 * 1024)
            .spawn(move || {
                sys::lower_thread_priority();
                let mut warned = false;
                loop {
                    thread::sleep(STEP_EVERY);
                    let Some(inner) = weak.upgrade() else { return };
                    inner.check_still_the_table();
                    match inner.housekeep() {
                        Ok(()) => warned = false,
                        Err(e) if !warned => {
                            warn!("replay store: housekeeping failed: {e}");
                            warned = true;
                        }
                        Err(_) => {}
                    }
                }
            });
        if let Err(e) = spawned {
            warn!("replay store: no housekeeping thread, expired entries stay until evicted: {e}");
        }
    }
}

impl Inner {
    fn hash(&self, code: &str) -> [u8; 32] {
        sha256(&[&self.salt, code.as_bytes()])
    }

    fn bucket_of(&self, hash: &[u8; 32]) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&hash[..8]);
        u64::from_le_bytes(first) % self.buckets
    }

    fn held_set(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives up this process's claim on `byte`.
    fn release(&self, byte: u64) {
        self.held_set().remove(&byte);
    }

    /// Takes lock byte `byte` if nobody holds it, in this process or another.
    fn try_lock(&self, byte: u64) -> io::Result<Option<Locked<'_>>> {
        if !self.held_set().insert(byte) {
            return Ok(None);
        }
        match sys::try_lock_byte(&self.file, byte) {
            Ok(true) => Ok(Some(Locked { inner: self, byte })),
            other => {
                self.release(byte);
                other.map(|_| None)
            }
        }
    }

    /// Takes lock byte `byte`, waiting for it until `deadline`: `None` if
    /// it is still held then. fcntl has no timed wait, so the lock is
    /// polled; the only waiter is housekeeping, for a bucket a request
    /// holds for microseconds.
    fn lock(&self, byte: u64, deadline: Instant) -> io::Result<Option<Locked<'_>>> {
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(locked) = self.try_lock(byte)? {
                return Ok(Some(locked));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    fn bucket_lock(&self, bucket: u64) -> u64 {
        LOCKS + bucket * 16
    }

    fn slot_lock(&self, bucket: u64, i: usize) -> u64 {
        LOCKS + bucket * 16 + 1 + i as u64
    }

    fn slot_offset(&self, bucket: u64, i: usize) -> u64 {
        (HEADER + i * SLOT) as u64 + bucket * BUCKET as u64
    }

    fn read_bucket(&self, bucket: u64) -> io::Result<Vec<Slot>> {
        Ok(self
            .read_page(bucket)?
            .chunks(SLOT)
            .map(Slot::decode)
            .collect())
    }

    fn read_page(&self, bucket: u64) -> io::Result<Vec<u8>> {
        let mut page = vec![0u8; BUCKET];
        read_at(&self.file, &mut page, self.slot_offset(bucket, 0))?;
        Ok(page)
    }

    fn read_slot(&self, offset: u64) -> io::Result<Slot> {
        let mut b = [0u8; SLOT];
        read_at(&self.file, &mut b, offset)?;
        Ok(Slot::decode(&b))
    }

    fn write_slot(&self, offset: u64, slot: &Slot) -> io::Result<()> {
        self.file.write_all_at(&slot.encode(), offset)
    }

    /// Finds the code's entry, or claims a slot for it and writes the
    /// intent to deliver, so that other requests for the code find it;
    /// waits for no lock.
    fn attempt(&self, hash: &[u8; 32], asked: u64) -> io::Result<Attempt<'_>> {
        let bucket = self.bucket_of(hash);
        let bucket_byte = self.bucket_lock(bucket);
        let Some(_bucket_guard) = self.try_lock(bucket_byte)? else {
            return Ok(Attempt::Busy(Busy {
                kind: BusyKind::Bucket,
                again: false,
            }));
        };
        let now = now_nanos();
        let page = self.read_page(bucket)?;
        let slots: Vec<Slot> = page.chunks(SLOT).map(Slot::decode).collect();
        match find(&slots, hash, now, self.ttl, asked) {
            Some(i) => {
                let raw = &page[i * SLOT..(i + 1) * SLOT];
                if let Some(result) = final_answer(raw, &slots[i], now, self.ttl, asked) {
                    return Ok(Attempt::Done(result));
                }
                let byte = self.slot_lock(bucket, i);
                let Some(guard) = self.try_lock(byte)? else {
                    return Ok(Attempt::Busy(Busy {
                        kind: BusyKind::InFlight,
                        again: false,
                    }));
                };
                let offset = self.slot_offset(bucket, i);
                // Read again under the slot's lock: its holder may have
                // written the outcome since the bucket was read.
                let slot = self.read_slot(offset)?;
                if &slot.hash != hash || slot.entry == Entry::Empty {
                    // A refused delivery left nothing: look again at once.
                    return Ok(Attempt::Busy(Busy {
                        kind: BusyKind::Bucket,
                        again: true,
                    }));
                }
                let result = match verdict(&slot, now_nanos(), self.ttl, asked) {
                    Verdict::Replay(reply) => Ok((reply, Delivery::Replayed)),
                    Verdict::Fail(kind) => Err(Undelivered::Bot(kind.error())),
                    Verdict::Unconfirmed => {
                        warn!(
                            "replay store: the delivery of this code by pid {} ended without an answer",
                            slot.holder
                        );
                        Err(Undelivered::Unconfirmed)
                    }
                    Verdict::Deliver => {
                        self.write_intent(offset, hash)?;
                        return Ok(Attempt::Deliver(guard, offset));
                    }
                };
                Ok(Attempt::Done(result))
            }
            None => {
                for i in victims(&slots, now, self.ttl) {
                    if let Some(guard) = self.try_lock(self.slot_lock(bucket, i))? {
                        let offset = self.slot_offset(bucket, i);
                        self.write_intent(offset, hash)?;
                        return Ok(Attempt::Deliver(guard, offset));
                    }
                }
                // Every slot is in a delivery. Delivering without an
                // entry would let a repeat of this code through too: wait
                // for one to end.
                Ok(Attempt::Busy(Busy {
                    kind: BusyKind::NoRoom,
                    again: false,
                }))
            }
        }
    }

    /// Waits, for a blocking caller, until `busy` may have passed: at
    /// once when the entry went away as it was looked at, else until
    /// `until`. The holder is another process (a blocking caller is its
    /// process's only request), whose release no wake-up can tell.
    fn wait_for(&self, busy: Busy, until: Instant) {
        if busy.again {
            return;
        }
        thread::sleep(until.saturating_duration_since(Instant::now()));
    }

    fn write_intent(&self, offset: u64, hash: &[u8; 32]) -> io::Result<()> {
        self.write_slot(
            offset,
            &Slot {
                hash: *hash,
                at: now_nanos(),
                holder: self.pid,
                entry: Entry::Delivering,
            },
        )
    }

    fn housekeep(&self) -> io::Result<()> {
        if self.old_layout_left.load(Ordering::Relaxed) {
            self.remove_old_layout()?;
        }
        let Some(header_guard) = self.try_lock(HEADER_LOCK)? else {
            return Ok(()); // another thread or process is at it
        };
        let mut state = [0u8; 16];
        read_at(&self.file, &mut state, SWEEP_STATE as u64)?;
        let cursor = u64::from_le_bytes(state[..8].try_into().unwrap_or_default()) % self.buckets;
        let last = u64::from_le_bytes(state[8..].try_into().unwrap_or_default());
        let now = now_nanos();
        let lap = self.ttl.clamp(SWEEP_LAP_MIN, SWEEP_LAP_MAX);
        let (from, count, next_last) = sweep_turn(cursor, last, now, self.buckets, lap);
        if count == 0 {
            return Ok(());
        }
        state[..8].copy_from_slice(&((from + count) % self.buckets).to_le_bytes());
        state[8..].copy_from_slice(&next_last.to_le_bytes());
        self.file.write_all_at(&state, SWEEP_STATE as u64)?;
        drop(header_guard);
        // Most buckets have nothing to do: look at them SWEEP_READ at a time,
        // in one read, before locking any.
        let mut page = vec![0u8; BUCKET * SWEEP_READ as usize];
        let mut k = 0;
        while k < count {
            let first = (from + k) % self.buckets;
            let n = (count - k).min(SWEEP_READ).min(self.buckets - first);
            let run = &mut page[..n as usize * BUCKET];
            read_at(&self.file, run, self.slot_offset(first, 0))?;
            let now = now_nanos();
            for (j, bucket) in run.chunks(BUCKET).enumerate() {
                let slots: Vec<Slot> = bucket.chunks(SLOT).map(Slot::decode).collect();
                if !self.expired(&slots, now).is_empty() {
                    self.sweep_bucket(first + j as u64)?;
                }
            }
            k += n;
        }
        Ok(())
    }

    /// Says once, loudly, when the directory's `replay.table` is no longer
    /// the file this process has open (an operator removed, truncated or
    /// replaced it; the next relay to start then made a new one): until
    /// this process is restarted, a code could reach the bot once through
    /// each table.
    fn check_still_the_table(&self) {
        if self.replaced.load(Ordering::Relaxed) {
            return;
        }
        let ours = self.file.metadata();
        let named = sys::open_at(&self.dir, TABLE.as_bytes(), false)
            .map(File::from)
            .and_then(|f| f.metadata());
        let same = match (&ours, &named) {
            (Ok(a), Ok(b)) => {
                a.dev() == b.dev() && a.ino() == b.ino() && a.len() == table_size(self.buckets)
            }
            (_, Err(e)) if e.kind() != io::ErrorKind::NotFound => return, // cannot tell
            _ => false,
        };
        if !same {
            self.replaced.store(true, Ordering::Relaxed);
            log::error!(
                "replay store: replay.table was removed, cut short or replaced while this relay \
                 ran; this process keeps the table it opened, so a repeat of a code may reach the \
                 bot again through another relay: restart the relay"
            );
        }
    }

    /// The entries of a bucket whose time is up.
    fn expired(&self, slots: &[Slot], now: u64) -> Vec<usize> {
        (0..slots.len())
            .filter(|&i| slots[i].entry != Entry::Empty && slots[i].expired(now, self.ttl))
            .collect()
    }

    /// Removes up to [`OLD_LAYOUT_BATCH`] files of the older layout, if no
    /// other process is at it (the directory's flock), so that an upgrade
    /// over millions of them costs no request more than a bounded step.
    fn remove_old_layout(&self) -> io::Result<()> {
        if !sys::try_lock_exclusive(&self.dir)? {
            return Ok(());
        }
        let removed = (|| -> io::Result<usize> {
            let names = sys::list_dir(&self.dir)?;
            let old: Vec<&Vec<u8>> = names
                .iter()
                .filter(|n| old_layout(n))
                .take(OLD_LAYOUT_BATCH)
                .collect();
            // Only what went counts: a name that cannot be removed (a
            // directory, a file of root's) must not keep every step listing.
            Ok(old
                .iter()
                .filter(|name| sys::unlink_at(&self.dir, name).is_ok())
                .count())
        })();
        let _ = sys::unlock_exclusive(&self.dir);
        let removed = removed?;
        if removed < OLD_LAYOUT_BATCH {
            self.old_layout_left.store(false, Ordering::Relaxed);
            mark_old_layout_gone(&self.file);
        }
        if removed > 0 {
            info!("replay store: removed {removed} file(s) of the older one-file-per-code layout");
        }
        Ok(())
    }

    /// Zeroes the expired entries of one bucket that nobody holds.
    fn sweep_bucket(&self, bucket: u64) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(100);
        let Some(_bucket_guard) = self.lock(self.bucket_lock(bucket), deadline)? else {
            return Ok(()); // busy: next lap
        };
        for i in self.expired(&self.read_bucket(bucket)?, now_nanos()) {
            if let Some(_slot_guard) = self.try_lock(self.slot_lock(bucket, i))? {
                self.write_slot(self.slot_offset(bucket, i), &EMPTY)?;
            }
        }
        Ok(())
    }
}

/// Buckets that housekeeping reads at once (64 KiB).
const SWEEP_READ: u64 = 16;

/// A header byte: 1 once no file of the older layout is left in the
/// directory, so that a relay opening the table need not look.
const OLD_LAYOUT_GONE: u64 = 20;

fn mark_old_layout_gone(file: &File) {
    // Should the write fail, a later step looks again.
    let _ = file.write_all_at(&[1], OLD_LAYOUT_GONE);
}

/// How many files of the older layout one housekeeping step removes.
const OLD_LAYOUT_BATCH: usize = 2000;

/// Where the header keeps the housekeeping cursor (8 bytes, the next bucket)
/// and the time of the last step (8 bytes, ns since the epoch).
const SWEEP_STATE: usize = 64;

/// Which buckets a housekeeping step sweeps: `(first, count, new last)`.
/// Buckets come due at `buckets` per `lap` since the last step,
/// at most one lap at a time; the time of the part of a bucket not yet due
/// is carried over rather than lost.
fn sweep_turn(cursor: u64, last: u64, now: u64, buckets: u64, lap: Duration) -> (u64, u64, u64) {
    let lap = nanos(lap).max(1);
    let since = now.saturating_sub(last);
    // A last step in the future means the clock went back (an RTC that was
    // ahead, a restored snapshot): waiting for it to catch up would stop
    // the sweeping for as long, so the time starts again from now.
    if last > now || since >= lap {
        return (cursor, buckets, now);
    }
    let due = u64::try_from(u128::from(since) * u128::from(buckets) / u128::from(lap))
        .unwrap_or(buckets)
        .min(buckets);
    let used =
        u64::try_from(u128::from(due) * u128::from(lap) / u128::from(buckets)).unwrap_or(since);
    (cursor, due, last + used)
}

fn ours(name: &[u8]) -> bool {
    name == TABLE.as_bytes() || name == TABLE_NEW.as_bytes()
}

/// A file of the one-file-per-code layout: 64 hex digits, then `.entry`
/// (or, older still, `.lock`, `.json`, `.tmp`, `.failed`).
fn old_layout(name: &[u8]) -> bool {
    let (hex, rest) = name.split_at(name.len().min(64));
    hex.len() == 64
        && hex
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        && matches!(
            rest,
            b"" | b".entry" | b".lock" | b".json" | b".tmp" | b".failed"
        )
}

/// Opens the directory without following a symlink in its last
/// component, creating it (0700, its parent must exist) if missing.
fn open_dir(dir: &Path) -> Result<OwnedFd, OpenError> {
    let refuse = |why: &str| {
        OpenError::Refused(format!(
            "REGISTER_STATE_DIR={:?} cannot be used: {why}",
            dir.display().to_string()
        ))
    };
    if dir.as_os_str().as_bytes().contains(&0) {
        return Err(refuse("the path holds a NUL byte"));
    }
    // Apache runs CGI and mod_fcgid processes in different working
    // directories: a relative path would give each its own store.
    if !dir.is_absolute() {
        return Err(refuse("name it by an absolute path"));
    }
    // "link/" or "link/." would have the kernel follow the symlink before
    // O_NOFOLLOW looks at the last name: drop trailing slashes and dots.
    let normal: PathBuf = dir.components().collect();
    if normal.file_name().is_none() {
        return Err(refuse(
            "name the directory itself, not / or a path ending in ..",
        ));
    }
    let dir = normal.as_path();
    match sys::open_dir(dir) {
        Ok(fd) => return Ok(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            let is_link = std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink());
            if is_link {
                return Err(refuse("it is a symbolic link; name the real directory"));
            }
            if e.kind() == io::ErrorKind::NotADirectory {
                return Err(refuse("it is not a directory"));
            }
            return Err(refuse(&e.to_string()));
        }
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(refuse("its parent directory does not exist"));
        }
        Err(e) => return Err(refuse(&format!("cannot create it: {e}"))),
    }
    sys::open_dir(dir).map_err(|e| refuse(&e.to_string()))
}

/// Opens the table, or makes a new one when there is none or it is not
/// whole: that with the directory locked, so that relays starting together
/// agree on one file.
/// An open table: its file, salt and buckets, and whether its header
/// says that no file of the older layout is left.
type Opened = (File, [u8; 16], u64, bool);

fn open_table(dir: &OwnedFd, buckets: u64) -> io::Result<Opened> {
    // The usual case needs no lock: a table is only ever put in place
    // whole, by a rename, so one found whole stays whole.
    if let Some(found) = whole_table(dir)? {
        return Ok(found);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !sys::try_lock_exclusive(dir)? {
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the store directory stayed locked",
            ));
        }
        thread::sleep(Duration::from_millis(5));
    }
    // Another relay may have made it while this one waited.
    let result = match whole_table(dir) {
        Ok(Some(found)) => Ok(found),
        Ok(None) => make_table(dir, buckets),
        Err(e) => Err(e),
    };
    let _ = sys::unlock_exclusive(dir);
    result
}

/// The table in `dir` if it is a whole one, at the size in its header,
/// whatever `REGISTER_REPLAY_MAX` asks: relays that still have it open
/// would otherwise keep using a file no longer in the directory, and a
/// code could reach the bot once through each table.
fn whole_table(dir: &OwnedFd) -> io::Result<Option<Opened>> {
    let file = match sys::open_at(dir, TABLE.as_bytes(), false) {
        Ok(fd) => File::from(fd),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let meta = file.metadata()?;
    let mut header = [0u8; 64];
    if meta.is_file()
        && read_at(&file, &mut header, 0).is_ok()
        && let Some((b, salt)) = parse_header(&header)
        && b > 0
        && meta.len() == table_size(b)
    {
        // A table made sparse, by a relay from before tables were
        // reserved: reserve it now if the disk allows, else use it as is.
        if meta.blocks().saturating_mul(512) < meta.len()
            && let Err(e) = reserve(&file, meta.len())
        {
            warn!(
                "replay store: replay.table could not be given its blocks on disk, so a full disk would turn the protection off: {e}"
            );
        }
        let old_gone = header[OLD_LAYOUT_GONE as usize] == 1;
        return Ok(Some((file, salt, b, old_gone)));
    }
    info!(
        "replay store: replay.table is not a whole table; a new one replaces it, earlier answers are not kept"
    );
    Ok(None)
}

/// Gives the table its blocks on disk. A sparse table takes a block at
/// a bucket's first write, and on a full disk that write fails: the
/// protection would go exactly when the disk fills. A file system that
/// cannot reserve blocks keeps the table sparse, as before.
fn reserve(file: &File, size: u64) -> io::Result<()> {
    match sys::allocate(file, size) {
        Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
        other => other,
    }
}

fn table_size(buckets: u64) -> u64 {
    (HEADER as u64).saturating_add(buckets.saturating_mul(BUCKET as u64))
}

/// Makes a new table of `buckets` and renames it into place; the caller
/// holds the directory's lock.
fn make_table(dir: &OwnedFd, buckets: u64) -> io::Result<Opened> {
    let size = table_size(buckets);
    let file = File::from(sys::open_at(dir, TABLE_NEW.as_bytes(), true)?);
    let made = (|| {
        file.set_len(size)?;
        reserve(&file, size)?;
        let salt = random_salt();
        let mut header = [0u8; SWEEP_STATE + 16];
        header[..8].copy_from_slice(MAGIC);
        header[8..12].copy_from_slice(&VERSION.to_le_bytes());
        header[12..16].copy_from_slice(&(SLOT as u32).to_le_bytes());
        header[16..20].copy_from_slice(&(PER_BUCKET as u32).to_le_bytes());
        header[24..32].copy_from_slice(&buckets.to_le_bytes());
        header[32..48].copy_from_slice(&salt);
        header[SWEEP_STATE + 8..].copy_from_slice(&now_nanos().to_le_bytes());
        file.write_all_at(&header, 0)?;
        sys::rename_at(dir, TABLE_NEW.as_bytes(), TABLE.as_bytes())?;
        Ok(salt)
    })();
    match made {
        Ok(salt) => Ok((file, salt, buckets, false)),
        Err(e) => {
            let _ = sys::unlink_at(dir, TABLE_NEW.as_bytes());
            Err(e)
        }
    }
}

fn parse_header(h: &[u8; 64]) -> Option<(u64, [u8; 16])> {
    let u32_at = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    if &h[..8] != MAGIC
        || u32_at(8) != VERSION
        || u32_at(12) as usize != SLOT
        || u32_at(16) as usize != PER_BUCKET
    {
        return None;
    }
    let buckets = u64::from_le_bytes(h[24..32].try_into().ok()?);
    let salt: [u8; 16] = h[32..48].try_into().ok()?;
    Some((buckets, salt))
}

fn random_salt() -> [u8; 16] {
    let mut salt = [0u8; 16];
    let from_kernel = File::open("/dev/urandom").and_then(|f| f.read_exact_at(&mut salt, 0));
    if from_kernel.is_err() {
        // Without /dev/urandom the salt still differs per table.
        let seed = format!("{}-{}", now_nanos(), std::process::id());
        salt.copy_from_slice(&sha256(&[seed.as_bytes()])[..16]);
    }
    salt
}

/// pread of the whole buffer; past the end of the file reads as zeros.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                break;
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TTL: Duration = Duration::from_secs(600);
    const WAIT: Duration = Duration::from_secs(5);

    /// A fresh, private directory (not yet holding a store).
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("tr-replay-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir(&dir).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        dir
    }

    fn open(dir: &Path, ttl: Duration, max: usize) -> Store {
        Store::open(dir, ttl, max).unwrap_or_else(|e| panic!("{e}"))
    }

    fn ok(msg: &str) -> Result<BotReply, BotError> {
        Ok(BotReply {
            success: true,
            message: msg.into(),
        })
    }

    fn message(r: Result<(BotReply, Delivery), Undelivered>) -> (String, Delivery) {
        match r {
            Ok((reply, d)) => (reply.message, d),
            Err(e) => panic!("no answer: {e:?}"),
        }
    }

    fn slot(hash: u8, at: u64, entry: Entry) -> Slot {
        Slot {
            hash: [hash; 32],
            at,
            holder: 7,
            entry,
        }
    }

    fn answered(text: &str) -> Entry {
        Entry::Answered(BotReply {
            success: true,
            message: text.into(),
        })
    }

    // -- the plain logic -------------------------------------------------

    #[test]
    fn a_slot_reads_back_as_written() {
        for entry in [
            Entry::Delivering,
            answered("Welcome ✓"),
            Entry::Answered(BotReply {
                success: false,
                message: String::new(),
            }),
            Entry::Failed(FailureKind::Timeout),
            Entry::Failed(FailureKind::Invalid),
            Entry::Failed(FailureKind::TooLarge),
        ] {
            let s = slot(3, 123_456, entry);
            assert_eq!(Slot::decode(&s.encode()), s);
        }
        assert_eq!(Slot::decode(&EMPTY.encode()), EMPTY);
        assert_eq!(EMPTY.encode(), [0u8; SLOT]);
        // Garbage is an empty slot, never a panic.
        assert_eq!(Slot::decode(&[0xff; SLOT]), EMPTY);
        assert_eq!(Slot::decode(&[2; 10]), EMPTY);
    }

    #[test]
    fn a_slot_read_mid_write_is_not_sealed() {
        let new = slot(3, 200, answered("Welcome ✓")).encode();
        assert!(sealed(&new));
        let old = slot(3, 100, Entry::Delivering).encode();
        // A read crossing the write sees a mix of the two: sealed only if
        // it says what one of them says.
        let whole = [Slot::decode(&old), Slot::decode(&new)];
        let mut mixes = 0;
        for cut in 1..SLOT {
            for (a, b) in [(&old, &new), (&new, &old)] {
                let mut torn = *a;
                torn[cut..].copy_from_slice(&b[cut..]);
                if sealed(&torn) {
                    assert!(whole.contains(&Slot::decode(&torn)), "cut at {cut}");
                } else {
                    mixes += 1;
                }
            }
        }
        // Every cut inside the fields both read is caught, either way.
        assert!(mixes >= 2 * (SEAL_AT + 7), "{mixes}");
        // A slot written before seals were: read under its lock.
        let mut unsealed = new;
        unsealed[SEAL_AT..SEAL_AT + 8].fill(0);
        assert!(!sealed(&unsealed));
        assert_eq!(Slot::decode(&unsealed), Slot::decode(&new));
    }

    #[test]
    fn a_long_message_is_kept_cut_at_a_character_with_an_ellipsis() {
        let fits = "é".repeat(MESSAGE_MAX / 2);
        assert_eq!(
            Slot::decode(&slot(1, 1, answered(&fits)).encode()).entry,
            answered(&fits)
        );
        let long = format!("x{}", "é".repeat(1000));
        let back = match Slot::decode(&slot(1, 1, answered(&long)).encode()).entry {
            Entry::Answered(r) => r.message,
            other => panic!("{other:?}"),
        };
        assert!(back.ends_with('…'), "{back}");
        assert!(back.len() <= MESSAGE_MAX, "{}", back.len());
        assert!(long.starts_with(back.trim_end_matches('…')));
        assert!(!back.contains('\u{fffd}'), "cut inside a character: {back}");
    }

    #[test]
    fn a_full_bucket_gives_up_its_oldest_entry_first() {
        let now = 1_000_000_000_000;
        let ttl = Duration::from_secs(10);
        let old = now - nanos(Duration::from_secs(20));
        let mut slots: Vec<Slot> = (0..8u8)
            .map(|i| slot(i + 1, now - 1000 + u64::from(i) * 10, answered("a")))
            .collect();
        // All live: oldest first.
        assert_eq!(victims(&slots, now, ttl), [0, 1, 2, 3, 4, 5, 6, 7]);
        slots[0].at = now; // now the newest
        assert_eq!(victims(&slots, now, ttl)[0], 1);
        assert_eq!(*victims(&slots, now, ttl).last().unwrap(), 0);
        // An expired entry and an empty slot go before any live one.
        slots[5].at = old;
        slots[6] = EMPTY;
        assert_eq!(victims(&slots, now, ttl)[..2], [6, 5]);
        // The code's own entry is found while live, not once expired...
        assert_eq!(find(&slots, &[3; 32], now, ttl, now), Some(2));
        assert_eq!(find(&slots, &[6; 32], now, ttl, now), None);
        // ...but a delivery that may be going on is found whatever its age.
        slots[5].entry = Entry::Delivering;
        assert_eq!(find(&slots, &[6; 32], now, ttl, now), Some(5));
        assert_eq!(find(&slots, &[9; 32], now, ttl, now), None);
    }

    #[test]
    fn what_a_request_does_with_the_entry_it_finds() {
        let ttl = Duration::from_secs(10);
        let now = 1_000_000_000_000;
        let asked = now - 1_000;
        let before = asked - 1;
        let long_ago = now - nanos(Duration::from_secs(11));
        let reply = BotReply {
            success: true,
            message: "hi".into(),
        };
        let v = |at, entry| verdict(&slot(1, at, entry), now, ttl, asked);
        assert_eq!(
            v(before, Entry::Answered(reply.clone())),
            Verdict::Replay(reply.clone())
        );
        assert_eq!(
            v(long_ago, Entry::Answered(reply.clone())),
            Verdict::Deliver
        );
        // An intent whose holder is gone (its lock was free): not again.
        assert_eq!(v(before, Entry::Delivering), Verdict::Unconfirmed);
        assert_eq!(v(now, Entry::Delivering), Verdict::Unconfirmed);
        // ...until the TTL is over.
        assert_eq!(v(long_ago, Entry::Delivering), Verdict::Deliver);
        // A failure this request waited for is its answer too, kind intact.
        for kind in [
            FailureKind::Timeout,
            FailureKind::Closed,
            FailureKind::Invalid,
            FailureKind::TooLarge,
        ] {
            assert_eq!(v(now, Entry::Failed(kind)), Verdict::Fail(kind));
            // One that ended just before this request began (a repeat
            // queued behind it) answers it too.
            assert_eq!(v(before, Entry::Failed(kind)), Verdict::Fail(kind));
            // One from well before (a reload after its page) tries again.
            let reload = now - nanos(FAILURE_HOLD) - 1;
            assert_eq!(v(reload, Entry::Failed(kind)), Verdict::Deliver);
        }
        assert_eq!(v(now, Entry::Empty), Verdict::Deliver);
        // With a zero TTL, what happened while waiting still counts.
        assert_eq!(
            verdict(
                &slot(1, now, Entry::Answered(reply.clone())),
                now + 5,
                Duration::ZERO,
                asked
            ),
            Verdict::Replay(reply)
        );
    }

    #[test]
    fn housekeeping_sweeps_the_table_once_per_lap_in_small_turns() {
        let lap = nanos(SWEEP_LAP_MAX);
        let b = 1200;
        // Nothing due yet.
        assert_eq!(sweep_turn(5, 1000, 1000, b, SWEEP_LAP_MAX), (5, 0, 1000));
        // A tenth of a lap: a tenth of the buckets, time carried exactly.
        assert_eq!(
            sweep_turn(5, 0, lap / 10, b, SWEEP_LAP_MAX),
            (5, 120, lap / 10)
        );
        // Part of a bucket's time is not lost.
        let (_, n, last) = sweep_turn(0, 0, lap / b + lap / b / 2, b, SWEEP_LAP_MAX);
        assert_eq!((n, last), (1, lap / b));
        // Long idle (CGI between requests): one whole lap, no more.
        assert_eq!(
            sweep_turn(7, 0, lap * 50, b, SWEEP_LAP_MAX),
            (7, b, lap * 50)
        );
        // A clock that went back: one whole lap, and the time starts
        // again from now rather than when the clock catches up.
        assert_eq!(sweep_turn(7, lap, 0, b, SWEEP_LAP_MAX), (7, b, 0));
        let day = 86_400 * 1_000_000_000;
        assert_eq!(sweep_turn(7, lap + day, lap, b, SWEEP_LAP_MAX), (7, b, lap));
        assert_eq!(sweep_turn(7, lap, lap + lap / 10, b, SWEEP_LAP_MAX).1, 120);
    }

    #[test]
    fn only_the_store_s_own_names() {
        assert!(ours(b"replay.table") && ours(b"replay.table.new"));
        let hex = "0123456789abcdef".repeat(4);
        for suffix in ["", ".entry", ".lock", ".json", ".tmp", ".failed"] {
            assert!(old_layout(format!("{hex}{suffix}").as_bytes()), "{suffix}");
        }
        for name in [
            "backup.sql",
            "replay.table.bak",
            &hex[1..],
            &format!("{hex}.sql"),
            &hex.to_uppercase(),
            &format!("{hex}0"),
        ] {
            assert!(
                !ours(name.as_bytes()) && !old_layout(name.as_bytes()),
                "{name}"
            );
        }
    }

    // -- the table, in files (no sockets) -------------------------------

    #[test]
    fn a_second_delivery_is_replayed_and_nothing_is_in_clear() {
        let dir = temp_dir("seq");
        let store = open(&dir, TTL, 1000);
        let first = store.deliver_once("code-1", WAIT, || ok("welcome"));
        assert_eq!(message(first), ("welcome".into(), Delivery::First));
        let again = store.deliver_once("code-1", WAIT, || panic!("bot contacted twice"));
        assert_eq!(message(again), ("welcome".into(), Delivery::Replayed));
        // Another process (another open file) sees it too.
        let other = open(&dir, TTL, 1000);
        let there = other.deliver_once("code-1", WAIT, || panic!("bot contacted twice"));
        assert_eq!(message(there), ("welcome".into(), Delivery::Replayed));
        let (_, d) = message(store.deliver_once("code-2", WAIT, || ok("other")));
        assert_eq!(d, Delivery::First);
        let names: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["replay.table"]);
        let bytes = fs::read(dir.join("replay.table")).unwrap();
        assert_eq!(bytes.len(), HEADER + 125 * BUCKET);
        assert!(!bytes.windows(6).any(|w| w == b"code-1"));
        // Unsalted SHA-256 of the code is not there either.
        let plain = sha256(&[b"code-1"]);
        assert!(!bytes.windows(32).any(|w| w == plain));
        let _ = fs::remove_dir_all(&dir);
    }

    /// A made table has its blocks on disk, so no later write into it
    /// needs space the disk may no longer have.
    #[test]
    fn a_made_table_has_all_its_blocks() {
        use std::os::unix::fs::MetadataExt;
        let dir = temp_dir("blocks");
        let store = open(&dir, TTL, 1000);
        let meta = fs::metadata(dir.join("replay.table")).unwrap();
        assert_eq!(meta.len(), table_size(125));
        assert!(
            meta.blocks() * 512 >= meta.len(),
            "{} bytes allocated of {}",
            meta.blocks() * 512,
            meta.len()
        );
        // A table made sparse (by a relay from before tables were
        // reserved) is given its blocks when a relay opens it, and kept.
        drop(store);
        let sparse = dir.join("sparse");
        fs::copy(dir.join("replay.table"), &sparse).unwrap();
        let file = fs::OpenOptions::new().write(true).open(&sparse).unwrap();
        file.set_len(0).unwrap();
        file.set_len(meta.len()).unwrap();
        let mut header = fs::read(dir.join("replay.table")).unwrap();
        header.truncate(HEADER);
        file.write_all_at(&header, 0).unwrap();
        assert!(file.metadata().unwrap().blocks() * 512 < meta.len());
        fs::rename(&sparse, dir.join("replay.table")).unwrap();
        let _again = open(&dir, TTL, 1000);
        let meta = fs::metadata(dir.join("replay.table")).unwrap();
        assert!(meta.blocks() * 512 >= meta.len(), "{}", meta.blocks());
        assert_eq!(
            fs::read(dir.join("replay.table")).unwrap()[..HEADER],
            header[..]
        );
        let _ = fs::remove_dir_all(&dir);
    }

    /// The event loop's way in: nothing waits. A code in flight is busy
    /// (here and in another process), then replayed once finished; a kept
    /// failure goes to a request asked before it ended.
    #[test]
    fn begin_never_waits_and_a_finished_ticket_is_replayed() {
        let dir = temp_dir("begin");
        let store = open(&dir, TTL, 64);
        let other = open(&dir, TTL, 64);
        let Begin::Deliver(ticket) = store.begin("c", SystemTime::now()) else {
            panic!("no claim")
        };
        for s in [&store, &other] {
            let started = Instant::now();
            match s.begin("c", SystemTime::now()) {
                Begin::Busy(busy) => assert!(matches!(
                    busy.given_up(),
                    Undelivered::Bot(BotError::Timeout)
                )),
                x => panic!("{x:?}"),
            }
            assert!(started.elapsed() < WAIT);
        }
        ticket.finish(&ok("welcome"));
        for s in [&store, &other] {
            match s.begin("c", SystemTime::now()) {
                Begin::Done(r) => assert_eq!(message(r), ("welcome".into(), Delivery::Replayed)),
                x => panic!("{x:?}"),
            }
        }
        let asked = SystemTime::now();
        let Begin::Deliver(ticket) = store.begin("d", asked) else {
            panic!("no claim")
        };
        ticket.finish(&Err(BotError::Timeout));
        assert!(matches!(
            other.begin("d", asked),
            Begin::Done(Err(Undelivered::Bot(BotError::Timeout)))
        ));
        let _ = fs::remove_dir_all(&dir);
    }

    /// A replay takes no slot lock: with the slot's lock byte held by
    /// another open file description (as a process delivering another code
    /// through that slot would), it is answered, not made to wait. With no
    /// time to wait at all, a request that waited for the slot would fail.
    #[test]
    fn a_replay_is_answered_while_another_holds_the_slot_s_lock() {
        let dir = temp_dir("replay-unlocked");
        let store = open(&dir, TTL, 64);
        let (_, d) = message(store.deliver_once("done", WAIT, || ok("welcome")));
        assert_eq!(d, Delivery::First);
        let inner = &*store.inner;
        let hash = inner.hash("done");
        let bucket = inner.bucket_of(&hash);
        let slots = inner.read_bucket(bucket).unwrap();
        let i = find(&slots, &hash, now_nanos(), TTL, 0).expect("the answer is kept");
        let other = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(dir.join("replay.table"))
            .unwrap();
        assert!(sys::try_lock_byte(&other, inner.slot_lock(bucket, i)).unwrap());
        assert!(!sys::try_lock_byte(&inner.file, inner.slot_lock(bucket, i)).unwrap());
        for store in [&store, &open(&dir, TTL, 64)] {
            let again = store.deliver_once("done", Duration::ZERO, || panic!("sent twice"));
            assert_eq!(message(again), ("welcome".into(), Delivery::Replayed));
        }
        // A slot whose seal does not match is read under its lock: here
        // that lock stays held, so the repeat gives up at its bound.
        let offset = inner.slot_offset(bucket, i);
        other
            .write_all_at(&[0xAA], offset + SEAL_AT as u64)
            .unwrap();
        let r = store.deliver_once("done", Duration::ZERO, || panic!("sent twice"));
        assert!(
            matches!(r, Err(Undelivered::Bot(BotError::Timeout))),
            "{r:?}"
        );
        assert!(sys::unlock_byte(&other, inner.slot_lock(bucket, i)).unwrap());
        let again = store.deliver_once("done", WAIT, || panic!("sent twice"));
        assert_eq!(message(again), ("welcome".into(), Delivery::Replayed));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_table_keeps_the_latest_codes_within_its_size() {
        let dir = temp_dir("flood");
        // 16 entries: two buckets of eight.
        let store = open(&dir, TTL, 16);
        for n in 0..500 {
            store
                .deliver_once(&format!("flood-{n}"), WAIT, || ok(&format!("answer {n}")))
                .unwrap();
        }
        let size = fs::metadata(dir.join("replay.table")).unwrap().len();
        assert_eq!(size, (HEADER + 2 * BUCKET) as u64);
        // The last eight codes are all still there whatever their buckets
        // (each bucket keeps its newest eight), the first ones are gone.
        for n in 492..500 {
            let (text, d) = message(
                store.deliver_once(&format!("flood-{n}"), WAIT, || panic!("flood-{n} evicted")),
            );
            assert_eq!((text, d), (format!("answer {n}"), Delivery::Replayed));
        }
        let (_, d) = message(store.deliver_once("flood-0", WAIT, || ok("again")));
        assert_eq!(d, Delivery::First);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_refused_connection_leaves_no_entry_and_other_failures_are_not_replayed() {
        let dir = temp_dir("fail");
        let store = open(&dir, TTL, 64);
        let refused = BotError::Unavailable(io::ErrorKind::ConnectionRefused.into());
        let r = store.deliver_once("c", WAIT, || Err(refused));
        assert!(matches!(r, Err(Undelivered::Bot(BotError::Unavailable(_)))));
        let table = fs::read(dir.join("replay.table")).unwrap();
        assert!(table[HEADER..].iter().all(|&b| b == 0), "an entry was left");
        let r = store.deliver_once("c", WAIT, || Err(BotError::Timeout));
        assert!(matches!(r, Err(Undelivered::Bot(BotError::Timeout))));
        // A repeat right after the failure gets the same answer, unsent...
        let r = store.deliver_once("c", WAIT, || panic!("sent again at once"));
        assert!(matches!(r, Err(Undelivered::Bot(BotError::Timeout))));
        // ...and a reload after the failure's page tries again.
        thread::sleep(FAILURE_HOLD);
        let (_, d) = message(store.deliver_once("c", WAIT, || ok("now")));
        assert_eq!(d, Delivery::First);
        let _ = fs::remove_dir_all(&dir);
    }

    /// Requests sharing one open table, as the event loop's connections
    /// do, are kept apart by the in-process set of held bytes, since OFD
    /// locks do not tell them apart; threads stand in for them here.
    #[test]
    fn concurrent_repeats_in_one_process_wait_for_the_one_in_flight() {
        let dir = temp_dir("conc");
        let store = open(&dir, TTL, 64);
        let calls = AtomicUsize::new(0);
        let results: Vec<_> = thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    s.spawn(|| {
                        store.deliver_once("same", WAIT, || {
                            calls.fetch_add(1, Ordering::SeqCst);
                            thread::sleep(Duration::from_millis(200));
                            ok("first")
                        })
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| message(h.join().unwrap()))
                .collect()
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert!(results.iter().all(|(m, _)| m == "first"));
        let firsts = results
            .iter()
            .filter(|(_, d)| *d == Delivery::First)
            .count();
        assert_eq!(firsts, 1);
        let _ = fs::remove_dir_all(&dir);
    }

    /// Two opens of one table are two open file descriptions, as two
    /// processes have: the byte-range locks exclude each other.
    #[test]
    fn a_repeat_in_another_process_waits_and_gets_the_same_failure_kind() {
        let dir = temp_dir("xproc");
        let (a, b) = (open(&dir, TTL, 64), open(&dir, TTL, 64));
        for (code, error) in [
            ("inv", BotError::Invalid("not json".into())),
            ("big", BotError::TooLarge),
            ("late", BotError::Timeout),
        ] {
            let kind = error.kind();
            let repeat = thread::scope(|s| {
                let first = s.spawn(|| {
                    a.deliver_once(code, WAIT, || {
                        thread::sleep(Duration::from_millis(300));
                        Err(error)
                    })
                });
                thread::sleep(Duration::from_millis(100));
                let repeat = b.deliver_once(code, WAIT, || panic!("delivered twice"));
                assert!(first.join().unwrap().is_err());
                repeat
            });
            match repeat {
                Err(Undelivered::Bot(e)) => assert_eq!(e.kind(), kind, "{code}"),
                other => panic!("{code}: {other:?}"),
            }
        }
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_repeat_gives_up_after_the_bound_without_delivering() {
        let dir = temp_dir("bound");
        let (a, b) = (open(&dir, TTL, 64), open(&dir, TTL, 64));
        thread::scope(|s| {
            let slow = s.spawn(|| {
                a.deliver_once("c", WAIT, || {
                    thread::sleep(Duration::from_millis(800));
                    ok("late")
                })
            });
            thread::sleep(Duration::from_millis(100));
            for store in [&a, &b] {
                let r = store.deliver_once("c", Duration::from_millis(200), || {
                    panic!("delivered twice")
                });
                assert!(matches!(r, Err(Undelivered::Bot(BotError::Timeout))));
            }
            assert!(slow.join().unwrap().is_ok());
        });
        let _ = fs::remove_dir_all(&dir);
    }

    /// An intent written, then its holder gone without an outcome (a
    /// dropped claim releases the lock as a killed process does).
    #[test]
    fn an_intent_without_a_live_holder_is_unconfirmed_not_delivered_again() {
        let dir = temp_dir("intent");
        let dead = open(&dir, TTL, 64);
        // A ticket dropped unfinished (a connection gone mid-delivery).
        match dead.begin("orphan", SystemTime::now()) {
            Begin::Deliver(ticket) => drop(ticket),
            other => panic!("no claim: {other:?}"),
        }
        let later = open(&dir, TTL, 64);
        for store in [&later, &dead] {
            let r = store.deliver_once("orphan", WAIT, || panic!("delivered again"));
            assert!(matches!(r, Err(Undelivered::Unconfirmed)), "{r:?}");
        }
        // A waiter whose holder dies gets the same.
        let r = thread::scope(|s| {
            let Begin::Deliver(guard) = dead.begin("dies-while-held", SystemTime::now()) else {
                panic!("no claim")
            };
            let waiter = s.spawn(|| {
                later.deliver_once("dies-while-held", WAIT, || panic!("delivered again"))
            });
            thread::sleep(Duration::from_millis(300));
            drop(guard);
            waiter.join().unwrap()
        });
        assert!(matches!(r, Err(Undelivered::Unconfirmed)), "{r:?}");
        // Past the TTL the code is delivered again.
        let short = open(&dir, Duration::ZERO, 64);
        thread::sleep(Duration::from_millis(5));
        let (_, d) = message(short.deliver_once("orphan", WAIT, || ok("again")));
        assert_eq!(d, Delivery::First);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn housekeeping_zeroes_expired_entries_and_nothing_else() {
        let dir = temp_dir("sweep");
        let store = open(&dir, Duration::from_millis(200), 64);
        let keep = open(&dir, TTL, 64);
        store.deliver_once("expires", WAIT, || ok("one")).unwrap();
        thread::sleep(Duration::from_millis(300));
        keep.deliver_once("stays", WAIT, || ok("two")).unwrap();
        // Pretend the last step was a lap ago.
        store
            .inner
            .file
            .write_all_at(&0u64.to_le_bytes(), SWEEP_STATE as u64 + 8)
            .unwrap();
        store.housekeep().unwrap();
        let table = fs::read(dir.join("replay.table")).unwrap();
        let live: Vec<Slot> = table[HEADER..]
            .chunks(SLOT)
            .map(Slot::decode)
            .filter(|s| s.entry != Entry::Empty)
            .collect();
        assert_eq!(live.len(), 1, "{live:?}");
        assert_eq!(live[0].entry, answered("two"));
        let _ = fs::remove_dir_all(&dir);
    }

    /// Relays with different `REGISTER_REPLAY_MAX` on one directory share
    /// the table there, at its size: a code in flight in one is waited for
    /// by the other, never delivered twice.
    #[test]
    fn another_size_uses_the_table_there_at_its_size() {
        let dir = temp_dir("resize");
        let small = open(&dir, TTL, 64);
        small.deliver_once("c", WAIT, || ok("one")).unwrap();
        let bigger = open(&dir, TTL, 128);
        assert_eq!(
            fs::metadata(dir.join("replay.table")).unwrap().len(),
            (HEADER + 8 * BUCKET) as u64
        );
        assert_eq!(
            message(bigger.deliver_once("c", WAIT, || ok("two"))),
            ("one".into(), Delivery::Replayed)
        );
        let calls = AtomicUsize::new(0);
        let started = std::sync::Barrier::new(2);
        let (first, again) = thread::scope(|s| {
            let first = s.spawn(|| {
                small.deliver_once("in-flight", WAIT, || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    started.wait();
                    thread::sleep(Duration::from_millis(200));
                    ok("first")
                })
            });
            started.wait();
            let other = open(&dir, TTL, 256);
            let again = other.deliver_once("in-flight", WAIT, || {
                calls.fetch_add(1, Ordering::SeqCst);
                ok("second")
            });
            (message(first.join().unwrap()), message(again))
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1, "delivered twice");
        assert_eq!(first, ("first".into(), Delivery::First));
        assert_eq!(again, ("first".into(), Delivery::Replayed));
        let _ = fs::remove_dir_all(&dir);
    }

    /// A bucket whose every slot is in a delivery makes a new code wait for
    /// room rather than go through unprotected, so a double tap on it still
    /// reaches the bot once.
    #[test]
    fn a_full_bucket_of_deliveries_makes_a_code_wait_not_go_twice() {
        let dir = temp_dir("noroom");
        let store = open(&dir, TTL, 8);
        let started = std::sync::Barrier::new(PER_BUCKET + 1);
        let release = std::sync::Barrier::new(PER_BUCKET + 1);
        let calls = AtomicUsize::new(0);
        let players = thread::scope(|s| {
            for n in 0..PER_BUCKET {
                let (store, started, release) = (&store, &started, &release);
                s.spawn(move || {
                    store.deliver_once(&format!("holder-{n}"), WAIT, || {
                        started.wait();
                        release.wait();
                        ok("holder")
                    })
                });
            }
            started.wait();
            let players: Vec<_> = (0..2)
                .map(|_| {
                    s.spawn(|| {
                        store.deliver_once("player", WAIT, || {
                            calls.fetch_add(1, Ordering::SeqCst);
                            ok("player")
                        })
                    })
                })
                .collect();
            // Past its wait, a code finding no room is not sent (503).
            let gave_up = store.deliver_once("impatient", Duration::from_millis(300), || {
                panic!("sent without room")
            });
            assert!(
                matches!(gave_up, Err(Undelivered::Bot(BotError::Unavailable(_)))),
                "{gave_up:?}"
            );
            // Not a synchronisation: without the wait for room the players
            // are through by now, and the count below shows it.
            release.wait();
            players
                .into_iter()
                .map(|h| message(h.join().unwrap()).0)
                .collect::<Vec<_>>()
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1, "delivered twice");
        assert_eq!(players, ["player", "player"]);
        let _ = fs::remove_dir_all(&dir);
    }

    fn refused(dir: &Path) -> String {
        match Store::open(dir, TTL, 64) {
            Err(OpenError::Refused(why)) => why,
            Err(OpenError::Broken(e)) => panic!("broken, not refused: {e}"),
            Ok(_) => panic!("{} accepted", dir.display()),
        }
    }

    #[test]
    fn refuses_a_directory_that_is_not_its_own_and_touches_nothing() {
        let base = temp_dir("refuse");
        // Others' files: refused, and left as they were.
        let shared = base.join("shared");
        fs::create_dir(&shared).unwrap();
        fs::set_permissions(&shared, fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(shared.join("backup.sql"), b"precious").unwrap();
        let why = refused(&shared);
        assert!(
            why.contains("backup.sql") && why.contains(&*shared.to_string_lossy()),
            "{why}"
        );
        assert_eq!(fs::read(shared.join("backup.sql")).unwrap(), b"precious");
        assert_eq!(fs::read_dir(&shared).unwrap().count(), 1);
        // A symlink to a good directory, however it is spelt.
        let real = base.join("real");
        fs::create_dir(&real).unwrap();
        fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
        let link = base.join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let spelt = link.to_string_lossy().into_owned();
        for path in [
            spelt.clone(),
            format!("{spelt}/"),
            format!("{spelt}/."),
            format!("{spelt}//"),
        ] {
            assert!(
                refused(Path::new(&path)).contains("symbolic link"),
                "{path}"
            );
        }
        assert!(refused(&base.join("real/..")).contains("name the directory"));
        assert_eq!(fs::read_dir(&real).unwrap().count(), 0);
        // Not private.
        fs::set_permissions(&real, fs::Permissions::from_mode(0o755)).unwrap();
        assert!(refused(&real).contains("0755"));
        // Not a directory; no parent.
        let file = base.join("file");
        fs::write(&file, b"x").unwrap();
        assert!(refused(&file).contains("not a directory"));
        assert!(refused(&base.join("no/such")).contains("parent"));
        // A missing directory is made, private.
        let fresh = base.join("fresh");
        open(&fresh, TTL, 64);
        assert_eq!(fs::metadata(&fresh).unwrap().mode() & 0o777, 0o700);
        let _ = fs::remove_dir_all(&base);
    }

    /// Old-layout files are removed by housekeeping, a bounded batch per
    /// step, never while the store opens (on a request's path).
    #[test]
    fn files_of_the_older_layout_are_removed_by_housekeeping_in_batches() {
        let dir = temp_dir("old");
        let n = OLD_LAYOUT_BATCH + 10;
        for i in 0..n {
            let hex = crate::fingerprint::sha256_hex(i.to_string().as_bytes());
            fs::write(dir.join(format!("{hex}.entry")), b"{}").unwrap();
        }
        fs::write(dir.join("ab".repeat(32)), b"").unwrap();
        let count = || fs::read_dir(&dir).unwrap().count();
        let store = open(&dir, TTL, 64);
        assert_eq!(count(), n + 2, "removed while opening");
        store.housekeep().unwrap();
        assert_eq!(count(), n + 2 - OLD_LAYOUT_BATCH);
        store.housekeep().unwrap();
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["replay.table"]);
        assert!(!store.inner.old_layout_left.load(Ordering::Relaxed));
        // The table remembers: a relay opening it later (each CGI request)
        // does not look for them again.
        let again = open(&dir, TTL, 64);
        assert!(!again.inner.old_layout_left.load(Ordering::Relaxed));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_table_made_without_old_files_says_so_to_later_relays() {
        let dir = temp_dir("noold");
        let first = open(&dir, TTL, 64);
        assert!(!first.inner.old_layout_left.load(Ordering::Relaxed));
        let later = open(&dir, TTL, 64);
        assert!(!later.inner.old_layout_left.load(Ordering::Relaxed));
        let _ = fs::remove_dir_all(&dir);
    }

    /// A symlink or a directory under the store's own names is refused,
    /// and what it points to is left alone; so is a relative path.
    #[test]
    fn a_table_that_is_not_a_file_or_a_relative_path_is_refused() {
        let base = temp_dir("notfile");
        let precious = base.join("precious.txt");
        fs::write(&precious, b"keep").unwrap();
        for name in ["replay.table", "replay.table.new"] {
            let dir = base.join(format!("link-{name}"));
            fs::create_dir(&dir).unwrap();
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
            std::os::unix::fs::symlink(&precious, dir.join(name)).unwrap();
            let why = refused(&dir);
            assert!(why.contains(name) && why.contains("not a file"), "{why}");
        }
        let dir = base.join("dir-table");
        fs::create_dir_all(dir.join("replay.table")).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).unwrap();
        assert!(refused(&dir).contains("replay.table"));
        assert_eq!(fs::read(&precious).unwrap(), b"keep");
        let why = refused(Path::new("relative-store"));
        assert!(why.contains("absolute"), "{why}");
        assert!(!Path::new("relative-store").exists());
        let _ = fs::remove_dir_all(&base);
    }
}
