//! The one way a code is named without being written in clear: its
//! SHA-256, salted for the replay store's table, in hex and cut short for
//! the log.

use sha2::{Digest, Sha256};

/// The SHA-256 of `parts` one after the other.
pub fn sha256(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in parts {
        h.update(part);
    }
    h.finalize().into()
}

/// The SHA-256 of `data` in lowercase hex (64 digits).
pub fn sha256_hex(data: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let digest = sha256(&[data]);
    let mut out = String::with_capacity(64);
    for b in digest.iter() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 15)]));
    }
    out
}

/// The first 8 hex digits of the code's SHA-256: enough to follow one
/// player's request through the logs, useless for redeeming the code.
pub fn fingerprint(code: &str) -> String {
    let mut hex = sha256_hex(code.as_bytes());
    hex.truncate(8);
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_is_eight_hex_digits_of_sha256() {
        // sha256("abc") = ba7816bf...
        assert_eq!(fingerprint("abc"), "ba7816bf");
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256(&[b"a", b"", b"bc"]), sha256(&[b"abc"]));
    }
}
