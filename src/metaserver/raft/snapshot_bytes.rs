//! A snapshot's bytes in memory, as a member builds, sends and receives them.
//!
//! openraft receives a snapshot chunk by chunk, each at the offset its message names: it seeks
//! there and writes the chunk. Over a plain `Cursor<Vec<u8>>` a seek past the end is allowed and
//! the write fills the gap with zeros: one message naming an offset near 2^63 panicked the member
//! (the vector's capacity overflowed), one naming a few GiB took that much memory. Here the
//! chunks must follow each other (a seek goes no further than what was received) and a snapshot
//! is at most [`MAX_SNAPSHOT`]: anything else is an error, answered to the message.

use std::io::{self, Cursor, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// The largest snapshot a member takes: the namespace's whole store, held in memory. 16 GiB is
/// some hundred million inodes.
pub const MAX_SNAPSHOT: u64 = 16 << 30;

#[derive(Debug)]
pub struct SnapshotBytes {
    bytes: Cursor<Vec<u8>>,
    limit: u64,
}

impl SnapshotBytes {
    /// `bytes`, to be read from the start.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self::with_limit(bytes, MAX_SNAPSHOT)
    }

    fn with_limit(bytes: Vec<u8>, limit: u64) -> Self {
        SnapshotBytes { bytes: Cursor::new(bytes), limit }
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.bytes.into_inner()
    }
}

impl Default for SnapshotBytes {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

fn refused(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, what)
}

impl AsyncRead for SnapshotBytes {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.bytes).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotBytes {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let end = self.bytes.position().saturating_add(buf.len() as u64);
        if end > self.limit {
            return Poll::Ready(Err(refused(format!("a snapshot of over {} bytes", self.limit))));
        }
        Pin::new(&mut self.bytes).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.bytes).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.bytes).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotBytes {
    fn start_seek(mut self: Pin<&mut Self>, to: SeekFrom) -> io::Result<()> {
        let len = self.bytes.get_ref().len() as u64;
        let at = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => len.checked_add_signed(d),
            SeekFrom::Current(d) => self.bytes.position().checked_add_signed(d),
        };
        match at {
            Some(n) if n <= len => Pin::new(&mut self.bytes).start_seek(SeekFrom::Start(n)),
            _ => Err(refused(format!("a seek to {to:?} in a snapshot of {len} bytes"))),
        }
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.bytes).poll_complete(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn chunks_follow_each_other_up_to_the_limit() {
        let mut s = SnapshotBytes::with_limit(Vec::new(), 8);
        s.write_all(b"abcd").await.expect("first chunk");
        // A chunk sent again (a retry) goes over what was received.
        s.seek(SeekFrom::Start(2)).await.expect("back");
        s.write_all(b"CDef").await.expect("again, and past");
        assert!(s.seek(SeekFrom::Start(7)).await.is_err(), "past the end");
        assert!(s.seek(SeekFrom::Start(1 << 63)).await.is_err(), "far past the end");
        assert!(s.seek(SeekFrom::Current(-100)).await.is_err(), "before the start");
        s.seek(SeekFrom::End(0)).await.expect("the end");
        assert!(s.write_all(b"ghi").await.is_err(), "past the limit");
        s.seek(SeekFrom::Start(0)).await.expect("the start");
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"abCDef");
        assert_eq!(s.into_inner(), b"abCDef");
    }
}
