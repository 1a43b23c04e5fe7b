//! Authenticated connections. Every process of a cluster is given the same secret (a file named by
//! `--secret-file` or `DFS_SECRET_FILE`); before any Cap'n Proto message is read, both ends of a
//! connection prove they know it, so a party without it is handed no capability at all.
//!
//! The handshake, in the clear on the fresh TCP stream (the secret never crosses it):
//! 1. client → server: `MAGIC`, whether it has a secret (1 byte), a fresh 32-byte nonce Nc;
//! 2. server → client: `PROCEED` (neither side has a secret), or `REFUSED` with a message, or
//!    `CHALLENGE`, a fresh nonce Ns and HMAC-SHA256(secret, "dfs server" ‖ Nc ‖ Ns);
//! 3. client → server: HMAC-SHA256(secret, "dfs client" ‖ Nc ‖ Ns), once the server's proof
//!    checked out (so a client does not talk to an impostor either);
//! 4. server → client: `PROCEED` or `REFUSED`.
//!
//! Both nonces are fresh per connection, so a recorded handshake replayed on a new connection fails
//! (the server's nonce differs); the labels keep one side's proof from being reflected as the
//! other's. This authenticates connections; it does not encrypt them (run the cluster on a network
//! you trust with its data, or under a tunnel).

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Opens every connection, so that a stray client (or a port scanner) is told what this is.
const MAGIC: &[u8; 8] = b"DFSAUTH1";
const PROCEED: u8 = 0;
const CHALLENGE: u8 = 1;
const REFUSED: u8 = 2;
const NONCE: usize = 32;
const MAC: usize = 32;
/// The shortest secret accepted: 128 bits.
pub const MIN_SECRET: usize = 16;
/// A handshake not done by then is dropped (a client trickling bytes holds a connection no longer).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The environment variable naming the secret file when no `--secret-file` is given.
pub const SECRET_ENV: &str = "DFS_SECRET_FILE";

/// The cluster secret. Its bytes are never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secret({} bytes)", self.0.len())
    }
}

/// Why a secret file's mode lets others than its owner read it, if it does.
fn loose(m: &std::fs::Metadata) -> Option<String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = m.permissions().mode() & 0o777;
    (mode & 0o044 != 0).then(|| format!("can be read by others than its owner (mode {mode:04o})"))
}

impl Secret {
    /// A secret of these bytes (at least `MIN_SECRET` of them).
    pub fn new(bytes: Vec<u8>) -> Result<Secret, String> {
        if bytes.len() < MIN_SECRET {
            return Err(format!("{} bytes; a cluster secret has at least {MIN_SECRET}", bytes.len()));
        }
        Ok(Secret(bytes))
    }

    /// The secret in `path`: its bytes, without a trailing newline (as `echo` or an editor leave).
    pub fn from_file(path: &Path) -> Result<Secret, String> {
        let mut bytes = std::fs::read(path).map_err(|e| format!("secret file {}: {e}", path.display()))?;
        if let Some(why) = std::fs::metadata(path).ok().and_then(|m| loose(&m)) {
            tracing::warn!(file = %path.display(), "the cluster secret {why}: anyone who can read it can act as a client or server (chmod 600 it)");
        }
        while bytes.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            bytes.pop();
        }
        Secret::new(bytes).map_err(|e| format!("secret file {}: {e}", path.display()))
    }

    fn mac(&self, label: &[u8], nc: &[u8], ns: &[u8]) -> Hmac<Sha256> {
        // HMAC takes a key of any length.
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.0).unwrap_or_else(|_| unreachable!());
        m.update(label);
        m.update(nc);
        m.update(ns);
        m
    }
}

/// What this process uses on its connections.
#[derive(Debug)]
struct Policy {
    secret: Option<Secret>,
    /// Listening on a non-loopback address without a secret was asked for.
    insecure: bool,
}

static POLICY: OnceLock<Policy> = OnceLock::new();

/// Sets this process's secret: the file given, else the one `DFS_SECRET_FILE` names, else none.
/// `insecure` allows serving on a non-loopback address without one. Call once, at start, before
/// any connection; a second call with another secret is an error.
pub fn init(file: Option<&Path>, insecure: bool) -> Result<(), String> {
    let file: Option<PathBuf> = file
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os(SECRET_ENV).filter(|v| !v.is_empty()).map(PathBuf::from));
    let secret = file.as_deref().map(Secret::from_file).transpose()?;
    set(secret, insecure)
}

/// Sets this process's secret directly (tests, and `init`).
pub fn set(secret: Option<Secret>, insecure: bool) -> Result<(), String> {
    let policy = POLICY.get_or_init(|| Policy { secret: secret.clone(), insecure });
    if policy.secret != secret {
        return Err("this process already has another cluster secret".into());
    }
    Ok(())
}

/// This process's secret. Without `init`, the one `DFS_SECRET_FILE` names, if it can be read.
fn policy() -> &'static Policy {
    POLICY.get_or_init(|| {
        let secret = std::env::var_os(SECRET_ENV).filter(|v| !v.is_empty()).and_then(|f| {
            Secret::from_file(Path::new(&f))
                .inspect_err(|e| tracing::error!("{SECRET_ENV}: {e}; connecting without a secret"))
                .ok()
        });
        Policy { secret, insecure: false }
    })
}

pub fn secret() -> Option<&'static Secret> {
    policy().secret.as_ref()
}

/// Refuses to serve on a non-loopback address without a secret, unless asked to (`--insecure`).
pub fn check_listen(ip: IpAddr) -> Result<(), String> {
    let p = policy();
    if p.secret.is_none() && !p.insecure && !ip.is_loopback() {
        return Err(format!(
            "{ip} is not a loopback address and no cluster secret was given: anyone who reaches the port could \
             read and change every file. Give --secret-file (or {SECRET_ENV}), or --insecure to serve anyway"
        ));
    }
    Ok(())
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication failed: {0}")]
    Failed(String),
    #[error("authentication failed: the connection broke during the handshake: {0}")]
    Io(#[from] std::io::Error),
}

impl AuthError {
    /// How the failure reads to callers. Only a refusal (another secret, or none) is
    /// `PermissionDenied`, which they give up on: retrying does not mend it. A handshake the
    /// network cut short (the server was killed or restarted meanwhile) keeps its kind, as a
    /// refused connection does, so that a writer waits for the server instead of failing.
    pub fn kind(&self) -> std::io::ErrorKind {
        match self {
            AuthError::Failed(_) => std::io::ErrorKind::PermissionDenied,
            AuthError::Io(io) if io.kind() == std::io::ErrorKind::PermissionDenied => std::io::ErrorKind::Other,
            AuthError::Io(io) => io.kind(),
        }
    }
}

fn failed(why: impl Into<String>) -> AuthError {
    AuthError::Failed(why.into())
}

fn nonce() -> [u8; NONCE] {
    let mut n = [0u8; NONCE];
    rand::rng().fill_bytes(&mut n);
    n
}

async fn refuse<S: AsyncWrite + Unpin>(s: &mut S, why: &str) -> Result<(), AuthError> {
    let why = &why.as_bytes()[..why.len().min(255)];
    let mut m = vec![REFUSED, why.len() as u8];
    m.extend_from_slice(why);
    s.write_all(&m).await?;
    s.flush().await?;
    Ok(())
}

async fn read_refusal<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, AuthError> {
    let len = s.read_u8().await?;
    let mut why = vec![0u8; usize::from(len)];
    s.read_exact(&mut why).await?;
    Ok(String::from_utf8_lossy(&why).into_owned())
}

/// The connecting side's handshake on a fresh stream.
pub async fn client_side<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: Option<&Secret>,
) -> Result<(), AuthError> {
    let nc = nonce();
    let mut hello = MAGIC.to_vec();
    hello.push(u8::from(secret.is_some()));
    hello.extend_from_slice(&nc);
    s.write_all(&hello).await?;
    s.flush().await?;
    match s.read_u8().await? {
        PROCEED if secret.is_none() => Ok(()),
        PROCEED => Err(failed("the server has no cluster secret, and this side has one")),
        REFUSED => Err(failed(format!("the server refused: {}", read_refusal(s).await?))),
        CHALLENGE => {
            let secret = secret.ok_or_else(|| failed("the server asks for the cluster secret, and none was given"))?;
            let mut ns = [0u8; NONCE];
            s.read_exact(&mut ns).await?;
            let mut proof = [0u8; MAC];
            s.read_exact(&mut proof).await?;
            secret
                .mac(b"dfs server", &nc, &ns)
                .verify_slice(&proof)
                .map_err(|_| failed("the server does not know this cluster secret"))?;
            let ours = secret.mac(b"dfs client", &nc, &ns).finalize().into_bytes();
            s.write_all(&ours).await?;
            s.flush().await?;
            match s.read_u8().await? {
                PROCEED => Ok(()),
                REFUSED => Err(failed(format!("the server refused: {}", read_refusal(s).await?))),
                b => Err(failed(format!("unexpected answer {b} from the server"))),
            }
        }
        b => Err(failed(format!("unexpected answer {b}: not a DFS server, or another version"))),
    }
}

/// The accepting side's handshake on a fresh stream: `Ok` once the client proved it knows
/// `secret` (or neither side has one).
pub async fn server_side<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    secret: Option<&Secret>,
) -> Result<(), AuthError> {
    let mut hello = [0u8; MAGIC.len() + 1 + NONCE];
    s.read_exact(&mut hello).await?;
    if &hello[..MAGIC.len()] != MAGIC {
        return Err(failed("the client did not open with a DFS handshake"));
    }
    let has_secret = hello[MAGIC.len()] != 0;
    let nc = &hello[MAGIC.len() + 1..];
    let Some(secret) = secret else {
        // The client decides whether to go on with a server that has no secret (it does not).
        s.write_all(&[PROCEED]).await?;
        s.flush().await?;
        return if has_secret { Err(failed("the client has a cluster secret and this server none")) } else { Ok(()) };
    };
    if !has_secret {
        let why = format!("this server needs the cluster secret (--secret-file or {SECRET_ENV})");
        refuse(s, &why).await?;
        return Err(failed("the client has no cluster secret"));
    }
    let ns = nonce();
    let mut challenge = vec![CHALLENGE];
    challenge.extend_from_slice(&ns);
    challenge.extend_from_slice(&secret.mac(b"dfs server", nc, &ns).finalize().into_bytes());
    s.write_all(&challenge).await?;
    s.flush().await?;
    let mut proof = [0u8; MAC];
    s.read_exact(&mut proof).await?;
    if secret.mac(b"dfs client", nc, &ns).verify_slice(&proof).is_err() {
        refuse(s, "wrong cluster secret").await?;
        return Err(failed("the client's proof is wrong (another secret, or a replayed handshake)"));
    }
    s.write_all(&[PROCEED]).await?;
    s.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(b: u8) -> Secret {
        Secret::new(vec![b; 32]).expect("secret")
    }

    /// A secret file others can read is told of (and still used: a group-readable file may be
    /// how a service group shares it).
    #[test]
    fn a_secret_file_others_can_read_is_told_of() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("secret");
        std::fs::write(&path, [7u8; 32]).expect("write");
        let mode = |m: u32| {
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m)).expect("chmod");
            loose(&std::fs::metadata(&path).expect("stat"))
        };
        assert_eq!(mode(0o600), None);
        assert_eq!(mode(0o400), None);
        assert_eq!(mode(0o644).as_deref(), Some("can be read by others than its owner (mode 0644)"));
        assert!(mode(0o640).is_some());
        assert_eq!(mode(0o620), None, "written, not read, by its group");
        assert!(Secret::from_file(&path).is_ok(), "still used");
    }

    /// Runs both sides over an in-memory pipe.
    async fn pair(client: Option<&Secret>, server: Option<&Secret>) -> (Result<(), AuthError>, Result<(), AuthError>) {
        let (mut a, mut b) = tokio::io::duplex(4096);
        // Each side drops its end when it is done, as a connection is closed on a failed handshake.
        tokio::join!(async move { client_side(&mut a, client).await }, async move { server_side(&mut b, server).await })
    }

    #[tokio::test]
    async fn the_same_secret_on_both_sides_connects() {
        let s = secret(7);
        let (c, sv) = pair(Some(&s), Some(&s)).await;
        assert!(c.is_ok() && sv.is_ok(), "{c:?} {sv:?}");
        let (c, sv) = pair(None, None).await;
        assert!(c.is_ok() && sv.is_ok(), "no secret on either side: {c:?} {sv:?}");
    }

    #[tokio::test]
    async fn a_wrong_or_missing_secret_is_refused_on_both_sides() {
        let (c, sv) = pair(Some(&secret(1)), Some(&secret(2))).await;
        let c = c.expect_err("a client with another secret").to_string();
        assert!(c.contains("authentication failed") && c.contains("does not know"), "{c}");
        assert!(sv.is_err(), "the server never got a proof, and must not proceed");
        let (c, sv) = pair(None, Some(&secret(2))).await;
        let c = c.expect_err("a client without a secret").to_string();
        assert!(c.contains("needs the cluster secret"), "{c}");
        assert!(sv.is_err());
        let (c, sv) = pair(Some(&secret(2)), None).await;
        assert!(c.expect_err("a server without a secret").to_string().contains("no cluster secret"));
        assert!(sv.is_err());
    }

    /// A client that knows the server's proof format but not the secret: it records a good
    /// client's handshake and replays its proof on a new connection.
    #[tokio::test]
    async fn a_replayed_handshake_is_refused() {
        let s = secret(9);
        let nc = [5u8; NONCE];
        // The honest exchange, as seen on the wire.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { server_side(&mut b, Some(&secret(9))).await });
        let mut hello = MAGIC.to_vec();
        hello.push(1);
        hello.extend_from_slice(&nc);
        a.write_all(&hello).await.unwrap();
        let mut challenge = [0u8; 1 + NONCE + MAC];
        a.read_exact(&mut challenge).await.unwrap();
        let proof = s.mac(b"dfs client", &nc, &challenge[1..1 + NONCE]).finalize().into_bytes();
        a.write_all(&proof).await.unwrap();
        assert_eq!(a.read_u8().await.unwrap(), PROCEED);
        assert!(server.await.unwrap().is_ok());
        // The replay: same hello, same proof, without the secret.
        let (mut a, mut b) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move { server_side(&mut b, Some(&secret(9))).await });
        a.write_all(&hello).await.unwrap();
        let mut fresh = [0u8; 1 + NONCE + MAC];
        a.read_exact(&mut fresh).await.unwrap();
        assert_ne!(fresh[1..1 + NONCE], challenge[1..1 + NONCE], "the server's nonce is fresh");
        a.write_all(&proof).await.unwrap();
        assert_eq!(a.read_u8().await.unwrap(), REFUSED);
        assert!(server.await.unwrap().is_err());
    }

    #[tokio::test]
    async fn garbage_instead_of_a_handshake_is_dropped() {
        let (mut a, mut b) = tokio::io::duplex(4096);
        a.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n-------------------").await.unwrap();
        let r = server_side(&mut b, Some(&secret(3))).await;
        assert!(r.expect_err("garbage").to_string().contains("did not open with a DFS handshake"));
    }

    #[test]
    fn short_secrets_and_missing_files_are_refused_clearly() {
        assert!(Secret::new(vec![1; 15]).unwrap_err().contains("at least 16"));
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("s");
        std::fs::write(&f, "0123456789abcdef\n").unwrap();
        assert_eq!(Secret::from_file(&f).unwrap(), Secret(b"0123456789abcdef".to_vec()));
        std::fs::write(&f, "short\n").unwrap();
        assert!(Secret::from_file(&f).unwrap_err().contains("at least 16"));
        assert!(Secret::from_file(&dir.path().join("none")).unwrap_err().contains("secret file"));
    }

    #[test]
    fn only_a_refusal_reads_as_permission_denied() {
        let refused = AuthError::Failed("the server refused: wrong cluster secret".into());
        assert_eq!(refused.kind(), std::io::ErrorKind::PermissionDenied);
        let reset = AuthError::Io(std::io::ErrorKind::ConnectionReset.into());
        assert_eq!(reset.kind(), std::io::ErrorKind::ConnectionReset);
        let odd = AuthError::Io(std::io::ErrorKind::PermissionDenied.into());
        assert_ne!(odd.kind(), std::io::ErrorKind::PermissionDenied);
    }
}
