//! A look at a pickle's opcodes before it is decoded.
//!
//! The bot's pickle reply is one dict of two plain values. The decoder
//! builds whatever the bytes describe, so a hostile reply could make it
//! do far more work than its size:
//! - it walks the value recursively, so lists nested a few thousand deep
//!   (a few kilobytes) would overflow the stack and end the process, with
//!   every request in flight;
//! - it copies a value wherever the pickle uses one twice (DUP, a memo
//!   read, a memo write of a value already in the memo), so a list
//!   appended to itself doubles with every two bytes of the reply;
//! - it sets aside a new stack of 4 KiB for every MARK, so a reply of
//!   marks alone would take a quarter of a gigabyte.
//!
//! The count here bounds both. Containers bound the nesting (a value can
//! only hold containers made before it). DUP is refused, and so is a read
//! of a memoised container: either lets a container hold itself, and
//! Python's pickler writes neither for a reply, whose only shared values
//! are strings. A memo read of a plain value counts as a container, so
//! the copies are at most the cap times the reply's size. A memo write is
//! only taken right after the opcode that made its value, where Python
//! writes it, so it moves a fresh value into the memo and copies nothing.
//! The count needs no recursion: the opcodes are read one after another,
//! their arguments skipped by their known sizes, up to STOP.

use std::collections::HashMap;

/// What an opcode leaves on top of the stack, as far as the count cares.
#[derive(Clone, Copy, PartialEq)]
enum Made {
    /// A new container or object: counted.
    Container,
    /// A new plain value (a string, a number, a global).
    Plain,
    /// Anything else: the top may be a value used before.
    Other,
    /// A mark: no value, but counted as a container.
    Mark,
}

/// How many containers, objects, marks and memo reads the pickle in `bytes`
/// makes before its STOP, or why it cannot be read that far or is refused.
pub fn containers(bytes: &[u8]) -> Result<usize, String> {
    let mut made = 0usize;
    let mut at = 0usize;
    // What the last opcode (FRAME aside) left on top.
    let mut top = Made::Other;
    // What each memo slot holds: a container may not be read back.
    let mut memo: HashMap<u64, Made> = HashMap::new();
    loop {
        let Some(&op) = bytes.get(at) else {
            return Err("pickle ends before its STOP".into());
        };
        at += 1;
        let (skip, left) = match op {
            b'.' => return Ok(made),
            // Containers and objects: the only ways a value can hold another.
            b']' | b'}' | b')' | b'l' | b'd' | b't' | 0x85 | 0x86 | 0x87 | 0x8f | 0x91 | b'R'
            | b'o' | 0x81 | 0x92 => (Arg::None, Made::Container),
            b'i' => (Arg::Lines(2), Made::Container),
            // Plain values.
            b'N' | 0x88 | 0x89 | 0x93 => (Arg::None, Made::Plain),
            b'F' | b'I' | b'L' | b'S' | b'V' => (Arg::Lines(1), Made::Plain),
            b'c' => (Arg::Lines(2), Made::Plain),
            b'K' => (Arg::Fixed(1), Made::Plain),
            b'M' => (Arg::Fixed(2), Made::Plain),
            b'J' => (Arg::Fixed(4), Made::Plain),
            b'G' => (Arg::Fixed(8), Made::Plain),
            b'U' | b'C' | 0x8a | 0x8c => (Arg::Counted(1), Made::Plain),
            b'T' | b'X' | b'B' | 0x8b => (Arg::Counted(4), Made::Plain),
            0x8d | 0x8e | 0x96 => (Arg::Counted(8), Made::Plain),
            b'2' => return Err("pickle copies a value (DUP), which Python never writes".into()),
            // Memo writes and reads.
            b'p' | b'q' | b'r' | 0x94 | b'g' | b'h' | b'j' => {
                let arg = match op {
                    b'p' | b'g' => Arg::Lines(1),
                    b'q' | b'h' => Arg::Fixed(1),
                    b'r' | b'j' => Arg::Fixed(4),
                    _ => Arg::None,
                };
                let end = arg.past(bytes, at)?;
                let id = match op {
                    // serde-pickle numbers MEMOIZE by the memo's size.
                    0x94 => memo.len() as u64,
                    b'p' | b'g' => std::str::from_utf8(&bytes[at..end - 1])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .ok_or("pickle has a memo index that is not a number")?,
                    _ => {
                        let mut le = [0u8; 8];
                        le[..end - at].copy_from_slice(&bytes[at..end]);
                        u64::from_le_bytes(le)
                    }
                };
                at = end;
                if matches!(op, b'g' | b'h' | b'j') {
                    match memo.get(&id) {
                        Some(Made::Plain) => made += 1,
                        Some(_) => return Err("pickle reads a container back from its memo".into()),
                        None => return Err("pickle reads a memo slot never written".into()),
                    }
                    top = Made::Other;
                } else {
                    if top == Made::Other {
                        return Err("pickle memoises a value it did not just make".into());
                    }
                    memo.insert(id, top);
                    // The value is now in the memo: a second write would copy it.
                    top = Made::Other;
                }
                continue;
            }
            // A mark makes no value, but the decoder sets aside a new stack
            // for it (4 KiB each): counted as a container, which also
            // bounds it (Python writes one per list, tuple or dict it
            // fills with more than one item).
            b'(' => (Arg::None, Made::Mark),
            // Neither make nor copy a value.
            b'0' | b'1' | b'Q' | b'a' | b'b' | b'e' | b's' | b'u' | 0x90 | 0x97 | 0x98 => {
                (Arg::None, Made::Other)
            }
            b'P' => (Arg::Lines(1), Made::Other),
            0x80 => (Arg::Fixed(1), Made::Other),
            0x82 => (Arg::Fixed(1), Made::Other),
            0x83 => (Arg::Fixed(2), Made::Other),
            0x84 => (Arg::Fixed(4), Made::Other),
            // A frame only groups opcodes; it changes nothing on the stack.
            0x95 => (Arg::Fixed(8), top),
            other => return Err(format!("unknown pickle opcode 0x{other:02x}")),
        };
        top = match left {
            Made::Container => {
                made += 1;
                left
            }
            Made::Mark => {
                made += 1;
                Made::Other
            }
            _ => left,
        };
        at = skip.past(bytes, at)?;
    }
}

/// What follows an opcode.
enum Arg {
    None,
    Lines(usize),
    Fixed(usize),
    /// A little-endian length of this many bytes, then the bytes.
    Counted(usize),
}

impl Arg {
    /// Where the next opcode begins.
    fn past(self, bytes: &[u8], at: usize) -> Result<usize, String> {
        let short = || "pickle cut short in an opcode's argument".to_string();
        match self {
            Arg::None => Ok(at),
            Arg::Lines(n) => {
                let mut at = at;
                for _ in 0..n {
                    let line = bytes.get(at..).ok_or_else(short)?;
                    at += line.iter().position(|&b| b == b'\n').ok_or_else(short)? + 1;
                }
                Ok(at)
            }
            Arg::Fixed(n) => at
                .checked_add(n)
                .filter(|&end| end <= bytes.len())
                .ok_or_else(short),
            Arg::Counted(n) => {
                let field = bytes.get(at..at + n).ok_or_else(short)?;
                let mut le = [0u8; 8];
                le[..n].copy_from_slice(field);
                let len = usize::try_from(u64::from_le_bytes(le)).map_err(|_| short())?;
                (at + n)
                    .checked_add(len)
                    .filter(|&end| end <= bytes.len())
                    .ok_or_else(short)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `{'success': True, 'message': 'hi'}` as Python 3.11's pickle.dumps
    /// writes it, protocols 0 to 5.
    const PYTHON: [&[u8]; 6] = [
        b"(dp0\nVsuccess\np1\nI01\nsVmessage\np2\nVhi\np3\ns.",
        b"}q\x00(X\x07\x00\x00\x00successq\x01I01\nX\x07\x00\x00\x00messageq\x02X\x02\x00\x00\x00hiq\x03u.",
        b"\x80\x02}q\x00(X\x07\x00\x00\x00successq\x01\x88X\x07\x00\x00\x00messageq\x02X\x02\x00\x00\x00hiq\x03u.",
        b"\x80\x03}q\x00(X\x07\x00\x00\x00successq\x01\x88X\x07\x00\x00\x00messageq\x02X\x02\x00\x00\x00hiq\x03u.",
        b"\x80\x04\x95\x1f\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x07success\x94\x88\x8c\x07message\x94\x8c\x02hi\x94u.",
        b"\x80\x05\x95\x1f\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x07success\x94\x88\x8c\x07message\x94\x8c\x02hi\x94u.",
    ];

    /// One dict and the mark before its items.
    #[test]
    fn a_reply_from_python_makes_one_container_and_one_mark_in_every_protocol() {
        for (protocol, bytes) in PYTHON.iter().enumerate() {
            assert_eq!(containers(bytes), Ok(2), "protocol {protocol}");
        }
    }

    /// A reply with more than the two fields, one string shared by two of
    /// them (Python writes a memo read for it), a set, bytes, a tuple and
    /// the empty string, as Python 3's pickle.dumps writes it, protocols 0
    /// to 5.
    const PYTHON_RICHER: [&[u8]; 6] = [
        b"(dp0\x0aVsuccess\x0ap1\x0aI01\x0asVmessage\x0ap2\x0aVshared message\x0ap3\x0asVdetail\x0ap4\x0ag3\x0asVtags\x0ap5\x0ac__builtin__\x0aset\x0ap6\x0a((lp7\x0aVa\x0ap8\x0aaVb\x0ap9\x0aatp10\x0aRp11\x0asVraw\x0ap12\x0ac_codecs\x0aencode\x0ap13\x0a(Vxy\x0ap14\x0aVlatin1\x0ap15\x0atp16\x0aRp17\x0asVn\x0ap18\x0a(I1\x0aI2\x0atp19\x0asVe\x0ap20\x0aV\x0ap21\x0as.",
        b"}q\x00(X\x07\x00\x00\x00successq\x01I01\x0aX\x07\x00\x00\x00messageq\x02X\x0e\x00\x00\x00shared messageq\x03X\x06\x00\x00\x00detailq\x04h\x03X\x04\x00\x00\x00tagsq\x05c__builtin__\x0aset\x0aq\x06(]q\x07(X\x01\x00\x00\x00aq\x08X\x01\x00\x00\x00bq\x09etq\x0aRq\x0bX\x03\x00\x00\x00rawq\x0cc_codecs\x0aencode\x0aq\x0d(X\x02\x00\x00\x00xyq\x0eX\x06\x00\x00\x00latin1q\x0ftq\x10Rq\x11X\x01\x00\x00\x00nq\x12(K\x01K\x02tq\x13X\x01\x00\x00\x00eq\x14X\x00\x00\x00\x00q\x15u.",
        b"\x80\x02}q\x00(X\x07\x00\x00\x00successq\x01\x88X\x07\x00\x00\x00messageq\x02X\x0e\x00\x00\x00shared messageq\x03X\x06\x00\x00\x00detailq\x04h\x03X\x04\x00\x00\x00tagsq\x05c__builtin__\x0aset\x0aq\x06]q\x07(X\x01\x00\x00\x00aq\x08X\x01\x00\x00\x00bq\x09e\x85q\x0aRq\x0bX\x03\x00\x00\x00rawq\x0cc_codecs\x0aencode\x0aq\x0dX\x02\x00\x00\x00xyq\x0eX\x06\x00\x00\x00latin1q\x0f\x86q\x10Rq\x11X\x01\x00\x00\x00nq\x12K\x01K\x02\x86q\x13X\x01\x00\x00\x00eq\x14X\x00\x00\x00\x00q\x15u.",
        b"\x80\x03}q\x00(X\x07\x00\x00\x00successq\x01\x88X\x07\x00\x00\x00messageq\x02X\x0e\x00\x00\x00shared messageq\x03X\x06\x00\x00\x00detailq\x04h\x03X\x04\x00\x00\x00tagsq\x05cbuiltins\x0aset\x0aq\x06]q\x07(X\x01\x00\x00\x00aq\x08X\x01\x00\x00\x00bq\x09e\x85q\x0aRq\x0bX\x03\x00\x00\x00rawq\x0cC\x02xyq\x0dX\x01\x00\x00\x00nq\x0eK\x01K\x02\x86q\x0fX\x01\x00\x00\x00eq\x10X\x00\x00\x00\x00q\x11u.",
        b"\x80\x04\x95e\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x07success\x94\x88\x8c\x07message\x94\x8c\x0eshared message\x94\x8c\x06detail\x94h\x03\x8c\x04tags\x94\x8f\x94(\x8c\x01a\x94\x8c\x01b\x94\x90\x8c\x03raw\x94C\x02xy\x94\x8c\x01n\x94K\x01K\x02\x86\x94\x8c\x01e\x94\x8c\x00\x94u.",
        b"\x80\x05\x95e\x00\x00\x00\x00\x00\x00\x00}\x94(\x8c\x07success\x94\x88\x8c\x07message\x94\x8c\x0eshared message\x94\x8c\x06detail\x94h\x03\x8c\x04tags\x94\x8f\x94(\x8c\x01a\x94\x8c\x01b\x94\x90\x8c\x03raw\x94C\x02xy\x94\x8c\x01n\x94K\x01K\x02\x86\x94\x8c\x01e\x94\x8c\x00\x94u.",
    ];

    #[test]
    fn a_richer_reply_from_python_is_read_in_every_protocol() {
        for (protocol, bytes) in PYTHON_RICHER.iter().enumerate() {
            let made = containers(bytes);
            assert!(matches!(made, Ok(1..=16)), "protocol {protocol}: {made:?}");
            let reply = crate::bot::decode(crate::config::Wire::Pickle, bytes);
            assert!(
                matches!(&reply, Ok(r) if r.success && r.message == "shared message"),
                "protocol {protocol}: {reply:?}"
            );
        }
    }

    /// `[]` then DUP and APPEND `n` times: the list doubles with each pair.
    fn doubled_by_dup(n: usize) -> Vec<u8> {
        let mut bytes = b"\x80\x02]".to_vec();
        for _ in 0..n {
            bytes.extend(b"2a");
        }
        bytes.push(b'.');
        bytes
    }

    #[test]
    fn a_copy_on_the_stack_is_refused() {
        assert!(containers(&doubled_by_dup(10)).is_err());
        assert!(containers(b"N2.").is_err());
    }

    #[test]
    fn a_container_read_back_from_the_memo_is_refused() {
        // `[]`, memoised, then read back and appended to itself: doubling.
        let mut bytes = b"\x80\x02]q\x00".to_vec();
        for _ in 0..10 {
            bytes.extend(b"h\x00a");
        }
        bytes.push(b'.');
        assert!(containers(&bytes).is_err());
        assert!(containers(b"\x80\x02]q\x00j\x00\x00\x00\x00a.").is_err());
        assert!(containers(b"(lp0\ng0\na.").is_err());
        // A slot never written.
        assert!(containers(b"\x80\x02]h\x00a.").is_err());
    }

    #[test]
    fn each_memo_read_counts() {
        // One string, memoised, then read 100 times into a list: each read
        // is a copy of the string, so each counts (and the list's mark).
        let mut bytes = b"\x80\x02]q\x00(X\x04\x00\x00\x00textq\x01".to_vec();
        for _ in 0..100 {
            bytes.extend(b"h\x01");
        }
        bytes.extend(b"e.");
        assert_eq!(containers(&bytes), Ok(102));
        assert_eq!(containers(b"(Vx\np0\ng0\ng0\nl."), Ok(4));
    }

    #[test]
    fn a_memo_write_of_a_value_already_there_is_refused() {
        // Each write after the first would copy the string into a new slot.
        assert!(containers(b"\x80\x02X\x04\x00\x00\x00textq\x00q\x01.").is_err());
        assert!(containers(b"\x80\x04\x8c\x04text\x94\x94\x94.").is_err());
        assert!(containers(b"Vtext\np0\np1\n.").is_err());
        assert!(
            containers(b"\x80\x02X\x04\x00\x00\x00textr\x00\x00\x00\x00r\x01\x00\x00\x00.")
                .is_err()
        );
        // Nor of a value read back, or of a list after an append.
        assert!(containers(b"\x80\x02X\x01\x00\x00\x00tq\x00h\x00q\x01.").is_err());
        assert!(containers(b"\x80\x02]q\x00Naq\x01.").is_err());
    }

    #[test]
    fn nesting_is_counted_and_text_is_skipped() {
        // [[[[]]]] (protocol 2): four lists.
        let nested = b"\x80\x02]q\x00]q\x01]q\x02]q\x03aaa.";
        assert_eq!(containers(nested), Ok(4));
        // Opcode bytes inside a string are text, not containers.
        let text = b"\x80\x02}q\x00X\x04\x00\x00\x00]]]]q\x01X\x01\x00\x00\x00}q\x02s.";
        assert_eq!(containers(text), Ok(1));
        // The count stops at STOP; what follows is the decoder's business.
        assert_eq!(containers(b"N.]]]]"), Ok(0));
    }

    /// Marks left open in front of a reply make no value, but each one
    /// costs the decoder a stack: they count, so a reply of them is
    /// refused, not decoded.
    #[test]
    fn marks_are_counted() {
        let reply = PYTHON[2];
        let one_dict = containers(reply).unwrap();
        let mut marked = reply[..2].to_vec();
        marked.extend(std::iter::repeat_n(b'(', 10));
        marked.extend(&reply[2..]);
        assert_eq!(containers(&marked), Ok(one_dict + 10));
        let mut flood = b"\x80\x02".to_vec();
        flood.extend(std::iter::repeat_n(b'(', 64 * 1024 - 16));
        flood.extend(&reply[2..]);
        assert!(containers(&flood).unwrap() > crate::bot::PICKLE_CONTAINERS);
        assert!(matches!(
            crate::bot::decode(crate::config::Wire::Pickle, &flood),
            Err(crate::bot::BotError::Invalid(_))
        ));
    }

    #[test]
    fn a_cut_or_unknown_pickle_is_an_error_never_a_panic() {
        for bytes in PYTHON {
            for cut in 0..bytes.len() {
                assert!(containers(&bytes[..cut]).is_err(), "{cut}");
            }
        }
        assert!(containers(b"\xff.").is_err());
        assert!(containers(b"\x8d\xff\xff\xff\xff\xff\xff\xff\xff.").is_err());
        assert!(containers(b"X\xff\xff\xff\xffab.").is_err());
    }
}
