//! A snapshot's bytes in memory, as a member builds, sends and receives them.
//!
//! openraft receives a snapshot chunk by chunk, each at the offset its message names: it seeks
//! there and writes the chunk. Over a plain `Cursor<Vec<u8>>` a seek past the end is allowed and
//! the write fills the gap with zeros: one message naming an offset near 2^63 panicked the member
//! (the vector's capacity overflowed), one naming a few GiB took that much memory. Here the
//! chunks must follow each other: a seek goes no further than what was received, and one that
//! would is an error, answered to the message. (No bound on the whole: a namespace's store, and
//! so its snapshot, may be as large as its disk.)

use std::io::{self, Cursor, SeekFrom};
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

#[derive(Debug, Default)]
pub struct SnapshotBytes(Cursor<Vec<u8>>);

impl SnapshotBytes {
    /// `bytes`, to be read from the start.
    pub fn new(bytes: Vec<u8>) -> Self {
        SnapshotBytes(Cursor::new(bytes))
    }

    pub fn into_inner(self) -> Vec<u8> {
        self.0.into_inner()
    }
}

impl AsyncRead for SnapshotBytes {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for SnapshotBytes {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl AsyncSeek for SnapshotBytes {
    fn start_seek(mut self: Pin<&mut Self>, to: SeekFrom) -> io::Result<()> {
        let len = self.0.get_ref().len() as u64;
        let at = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => len.checked_add_signed(d),
            SeekFrom::Current(d) => self.0.position().checked_add_signed(d),
        };
        match at {
            Some(n) if n <= len => Pin::new(&mut self.0).start_seek(SeekFrom::Start(n)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a seek to {to:?} in a snapshot of {len} bytes received"),
            )),
        }
    }

    fn poll_complete(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Pin::new(&mut self.0).poll_complete(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn chunks_follow_each_other() {
        let mut s = SnapshotBytes::default();
        s.write_all(b"abcd").await.expect("first chunk");
        // A chunk sent again (a retry) goes over what was received.
        s.seek(SeekFrom::Start(2)).await.expect("back");
        s.write_all(b"CDef").await.expect("again, and past");
        assert!(s.seek(SeekFrom::Start(7)).await.is_err(), "past the end");
        assert!(s.seek(SeekFrom::Start(1 << 63)).await.is_err(), "far past the end");
        assert!(s.seek(SeekFrom::Current(-100)).await.is_err(), "before the start");
        s.seek(SeekFrom::End(0)).await.expect("the end");
        s.write_all(b"g").await.expect("the next chunk");
        s.seek(SeekFrom::Start(0)).await.expect("the start");
        let mut back = Vec::new();
        s.read_to_end(&mut back).await.expect("read");
        assert_eq!(back, b"abCDefg");
        assert_eq!(s.into_inner(), b"abCDefg");
    }
}
