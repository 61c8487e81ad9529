//! An in-memory stream for driving a connection without a socket: input
//! from a byte string, handed out in chunks of set sizes, output into a
//! Vec. The unit tests, the property tests and anyone replaying a capture
//! share it.

use std::io::{self, Read, Write};
use std::time::Duration;

use super::TimedStream;

/// Input from bytes, output into a Vec, counting reads and writes.
#[derive(Debug, Default)]
pub struct Duplex {
    input: Vec<u8>,
    pos: usize,
    /// Most bytes each read returns, cycled; empty: as many as asked.
    chunks: Vec<usize>,
    /// Reads so far.
    pub reads: usize,
    /// Everything written.
    pub output: Vec<u8>,
    /// Writes so far.
    pub writes: usize,
}

impl Duplex {
    /// A stream whose reads return `input`, as much as asked each time.
    pub fn new(input: Vec<u8>) -> Duplex {
        Duplex::chunked(input, Vec::new())
    }

    /// A stream whose reads return `input` at most `chunks[i]` bytes at a
    /// time, cycling through `chunks`, like a socket the bytes trickle in.
    pub fn chunked(input: Vec<u8>, chunks: Vec<usize>) -> Duplex {
        Duplex {
            input,
            chunks,
            ..Duplex::default()
        }
    }
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let chunk = match self.chunks.as_slice() {
            [] => usize::MAX,
            sizes => sizes[self.reads % sizes.len()],
        };
        self.reads += 1;
        let rest = &self.input[self.pos..];
        let n = buf.len().min(chunk).min(rest.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writes += 1;
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Memory never stalls: timeouts mean nothing to it.
impl TimedStream for Duplex {
    fn set_read_timeout(&mut self, _: Duration) -> io::Result<()> {
        Ok(())
    }

    fn set_write_timeout(&mut self, _: Duration) -> io::Result<()> {
        Ok(())
    }
}
