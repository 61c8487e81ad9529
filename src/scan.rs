//! Finding the first byte of a small set in a long run of text, eight
//! bytes at a time: the code in a query string and in the message to the
//! bot is a kilobyte with nothing to decode or escape, and a byte-by-byte
//! loop over it was the largest cost left after hashing.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Nonzero if some byte of `word` is zero.
pub fn has_zero(word: u64) -> u64 {
    word.wrapping_sub(ONES) & !word & HIGHS
}

/// Nonzero if some byte of `word` is `byte`.
pub fn has_byte(word: u64, byte: u8) -> u64 {
    has_zero(word ^ (ONES * u64::from(byte)))
}

/// Nonzero if some byte of `word` is below `n` (`n` at most 128).
pub fn has_below(word: u64, n: u8) -> u64 {
    word.wrapping_sub(ONES * u64::from(n)) & !word & HIGHS
}

/// The index of the first byte of `bytes` for which `is` holds, or its
/// length. `any` must be nonzero for every eight-byte word holding such a
/// byte (it may be nonzero for others too: those are looked at byte by byte).
pub fn first(bytes: &[u8], any: impl Fn(u64) -> u64, is: impl Fn(u8) -> bool) -> usize {
    let mut words = bytes.chunks_exact(8);
    let mut at = 0;
    for word in words.by_ref() {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(word);
        if any(u64::from_le_bytes(eight)) != 0
            && let Some(i) = word.iter().position(|&b| is(b))
        {
            return at + i;
        }
        at += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&b| is(b))
        .map_or(bytes.len(), |i| at + i)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_byte_of_the_set_wherever_it_is() {
        let json = |b: u8| b < 0x20 || b == b'"' || b == b'\\';
        let json_word = |w: u64| has_below(w, 0x20) | has_byte(w, b'"') | has_byte(w, b'\\');
        for len in 0..40 {
            for at in 0..=len {
                for special in [0u8, 0x1f, b'"', b'\\'] {
                    for filler in [b'a', 0x20, 0x7f, 0x80, 0xff, b'#', b']'] {
                        let mut bytes = vec![filler; len];
                        if at < len {
                            bytes[at] = special;
                        }
                        assert_eq!(first(&bytes, json_word, json), at, "{bytes:?}");
                    }
                }
            }
        }
        // Every byte value, alone and after a run of others.
        for b in 0..=255u8 {
            let bytes = [b'x', b'x', b'x', b'x', b'x', b'x', b'x', b'x', b'x', b];
            let want = if json(b) { 9 } else { 10 };
            assert_eq!(first(&bytes, json_word, json), want, "{b}");
            let word = u64::from_le_bytes([b; 8]);
            assert_eq!(json_word(word) != 0, json(b), "{b}");
        }
    }
}
