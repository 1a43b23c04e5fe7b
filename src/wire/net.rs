//! Cap'n Proto RPC over TCP: connecting, serving, and the limits put on incoming messages.
//! capnp-rpc is `!Send`: everything here runs inside a tokio `LocalSet`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use capnp::message::ReaderOptions;
use capnp_rpc::{rpc_twoparty_capnp::Side, twoparty, RpcSystem};
use futures::AsyncReadExt;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio_util::compat::TokioAsyncReadCompatExt;
use tracing::{debug, warn};

use super::auth;

/// The most a message may carry, in bytes (see [`reader_options`]).
pub const MAX_MESSAGE_BYTES: usize = 64 << 20;

/// What a party accepts from the other, set for hostile peers. A frame may announce at most 64 MiB
/// (capnp refuses a larger segment table before allocating) and 511 segments; reading one may
/// visit at most 64 MiB worth of words in all, however often its pointers share a list; structs may
/// nest 64 deep (our schema's deepest is under ten). A frame beyond these, or garbage, ends that
/// connection only.
pub fn reader_options() -> ReaderOptions {
    let mut o = ReaderOptions::new();
    o.traversal_limit_in_words(Some(MAX_MESSAGE_BYTES / 8));
    o.nesting_limit(64);
    o
}

/// Read and write buffer per connection. The default (8 KiB) is smaller than a block reply, which
/// then went out in two sends and woke the reader twice (a random 4 KiB read paid ~10 us for it).
const IO_BUFFER: usize = 64 << 10;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection may go unanswered by the other side's kernel before it is dropped: data
/// sent and not acknowledged (TCP_USER_TIMEOUT), or, while waiting for an answer, keepalive probes
/// (the first after 2 s of silence, then one a second). A peer cut off by the network would
/// otherwise hold a call for TCP's own limit, about 15 minutes; a peer that is only slow, or
/// stopped, still has its kernel answer, and keeps its connections.
const DEAD_PEER: Duration = Duration::from_secs(8);

/// Sets up a new connection: no Nagle delay, and dropped once the peer's kernel stops answering.
fn tune(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let s = socket2::SockRef::from(stream);
    let keepalive =
        socket2::TcpKeepalive::new().with_time(Duration::from_secs(2)).with_interval(Duration::from_secs(1));
    s.set_tcp_keepalive(&keepalive)?;
    s.set_tcp_user_timeout(Some(DEAD_PEER))
}

/// One side of a two-party RPC connection over `stream`, with our message limits.
fn rpc_system(stream: TcpStream, side: Side, bootstrap: Option<capnp::capability::Client>) -> RpcSystem<Side> {
    let (reader, writer) = stream.compat().split();
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::with_capacity(IO_BUFFER, reader),
        futures::io::BufWriter::with_capacity(IO_BUFFER, writer),
        side,
        reader_options(),
    );
    RpcSystem::new(Box::new(network), bootstrap)
}

/// Connects to `addr` and returns its bootstrap capability.
pub async fn connect<C: capnp::capability::FromClientHook>(addr: &str) -> std::io::Result<C> {
    connect_from(addr, None).await
}

/// Opens a TCP connection to `addr`, from the local address `from` if given (a metaserver group's
/// member talks to the others from the address it listens on, so that they, and the network, see
/// one address per member).
async fn tcp(addr: &str, from: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let Some(from) = from else { return TcpStream::connect(addr).await };
    let to = tokio::net::lookup_host(addr).await?.find(|a| a.is_ipv4() == from.is_ipv4()).ok_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::NotFound, format!("{addr}: no {from:?}-family address"))
    })?;
    let socket = if from.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.bind(SocketAddr::new(from, 0))?;
    socket.connect(to).await
}

/// [`connect`] from the local address `from`, if given.
pub async fn connect_from<C: capnp::capability::FromClientHook>(
    addr: &str,
    from: Option<IpAddr>,
) -> std::io::Result<C> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, tcp(addr, from))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("connect to {addr} timed out")))??;
    tune(&stream)?;
    let mut stream = stream;
    tokio::time::timeout(auth::HANDSHAKE_TIMEOUT, auth::client_side(&mut stream, auth::secret()))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, format!("{addr}: no handshake answer")))?
        .map_err(|e| std::io::Error::new(e.kind(), format!("{addr}: {e}")))?;
    let mut rpc = rpc_system(stream, Side::Client, None);
    let client: C = rpc.bootstrap(Side::Server);
    let addr = addr.to_string();
    tokio::task::spawn_local(async move {
        if let Err(e) = rpc.await {
            debug!("connection to {addr} ended: {e}");
        }
    });
    Ok(client)
}

/// Accepts connections forever, serving `bootstrap` on each. A connection that sends garbage or an
/// oversized frame is dropped; the others are unaffected.
pub async fn serve(listener: TcpListener, bootstrap: capnp::capability::Client) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(e) = tune(&stream) {
            debug!("setting up the connection from {peer}: {e}");
        }
        let bootstrap = bootstrap.clone();
        tokio::task::spawn_local(async move {
            let mut stream = stream;
            // Nothing is read as a message, and no capability handed out, before the handshake.
            match tokio::time::timeout(auth::HANDSHAKE_TIMEOUT, auth::server_side(&mut stream, auth::secret())).await {
                Ok(Ok(())) => {}
                // A port probe (connect, then close) is not worth a warning.
                Ok(Err(auth::AuthError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                    debug!(%peer, "connection closed before the handshake: {e}");
                    return;
                }
                Ok(Err(e)) => {
                    warn!(%peer, "connection refused: {e}");
                    return;
                }
                Err(_) => {
                    warn!(%peer, "connection dropped: no handshake in {:?}", auth::HANDSHAKE_TIMEOUT);
                    return;
                }
            }
            if let Err(e) = rpc_system(stream, Side::Server, Some(bootstrap)).await {
                debug!("connection from {peer} ended: {e}");
            }
        });
    }
}

/// Runs blocking work (an LMDB transaction) off the RPC thread, so a durable commit does not stall
/// other calls.
pub async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, capnp::Error> {
    crate::shared::blocking(f).await.map_err(|e| capnp::Error::failed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression: a server killed during the handshake read as a refusal (`PermissionDenied`),
    /// so a mount's write-back gave up on a dataserver being restarted and dropped the write.
    #[tokio::test]
    async fn a_handshake_the_server_breaks_off_is_not_a_refusal() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        tokio::spawn(async move {
            // Reads the client's opening, then goes away without an answer.
            let (mut s, _) = listener.accept().await.expect("accept");
            let mut hello = [0u8; 8];
            let _ = tokio::io::AsyncReadExt::read(&mut s, &mut hello).await;
        });
        let e = tokio::task::LocalSet::new()
            .run_until(connect_from::<crate::wire::dfs_capnp::data_server::Client>(&addr, None))
            .await
            .err()
            .expect("the handshake cannot succeed");
        assert_ne!(e.kind(), std::io::ErrorKind::PermissionDenied, "{e}");
        assert!(e.to_string().contains("broke during the handshake"), "{e}");
    }
}
