//! Codes and states for the tests, and the fingerprint the relay logs in
//! their place.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

/// A long, unique, random-looking string: `prefix` then lowercase hex, `len`
/// bytes in all. Distinct in every call, in every process, so runs never see
/// each other's answers and a leak into a log cannot be mistaken for
/// anything else.
pub fn unique(prefix: &str, len: usize) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let seed = RandomState::new();
    let mut out = prefix.to_string();
    while out.len() < len {
        let mut h = seed.build_hasher();
        h.write_usize(NEXT.fetch_add(1, Ordering::Relaxed));
        h.write_u32(std::process::id());
        h.write_u128(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out.truncate(len);
    out
}

/// The README's code fingerprint, as the relay logs it (`code=...`): the
/// first 8 hex digits of SHA-256(code).
pub fn fingerprint(code: &str) -> String {
    Sha256::digest(code.as_bytes())
        .iter()
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect()
}
