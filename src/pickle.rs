//! A look at a pickle's opcodes before it is decoded.
//!
//! The bot's pickle reply is one dict of two plain values. The decoder
//! builds whatever the bytes describe and then walks it recursively, so a
//! reply of lists nested a few thousand deep (a few kilobytes) would
//! overflow the stack and end the process, with every request in flight.
//! Counting the containers a pickle makes bounds how deep it can nest
//! (a value can only hold containers made before it), and the count needs
//! no recursion: the opcodes are read one after another, their arguments
//! skipped by their known sizes, up to STOP.

/// How many containers and objects the pickle in `bytes` makes before its
/// STOP, or why it cannot be read that far.
pub fn containers(bytes: &[u8]) -> Result<usize, String> {
    let mut made = 0usize;
    let mut at = 0usize;
    loop {
        let Some(&op) = bytes.get(at) else {
            return Err("pickle ends before its STOP".into());
        };
        at += 1;
        let skip = match op {
            b'.' => return Ok(made),
            // Containers and objects: the only ways a value can hold another.
            b']' | b'}' | b')' | b'l' | b'd' | b't' | 0x85 | 0x86 | 0x87 | 0x8f | 0x91 | b'R'
            | b'o' | 0x81 | 0x92 => {
                made += 1;
                Arg::None
            }
            b'i' => {
                made += 1;
                Arg::Lines(2)
            }
            // No argument.
            b'(' | b'0' | b'1' | b'2' | b'N' | b'Q' | b'a' | b'b' | b'e' | b's' | b'u' | 0x88
            | 0x89 | 0x90 | 0x93 | 0x94 | 0x97 | 0x98 => Arg::None,
            // A newline-terminated argument (protocol 0).
            b'F' | b'I' | b'L' | b'P' | b'S' | b'V' | b'g' | b'p' => Arg::Lines(1),
            b'c' => Arg::Lines(2),
            // Fixed sizes.
            b'K' | b'h' | b'q' | 0x80 | 0x82 => Arg::Fixed(1),
            b'M' | 0x83 => Arg::Fixed(2),
            b'J' | b'j' | b'r' | 0x84 => Arg::Fixed(4),
            b'G' | 0x95 => Arg::Fixed(8),
            // A length, then that many bytes.
            b'U' | b'C' | 0x8a | 0x8c => Arg::Counted(1),
            b'T' | b'X' | b'B' | 0x8b => Arg::Counted(4),
            0x8d | 0x8e | 0x96 => Arg::Counted(8),
            other => return Err(format!("unknown pickle opcode 0x{other:02x}")),
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

    #[test]
    fn a_reply_from_python_makes_one_container_in_every_protocol() {
        for (protocol, bytes) in PYTHON.iter().enumerate() {
            assert_eq!(containers(bytes), Ok(1), "protocol {protocol}");
        }
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
