//! CoAP over DTLS 1.2 (ThingsBoard's CoAPS, port 5684) on OpenSSL, one session per peer on one
//! UDP socket.
//!
//! The server presents the certificate of its PEM files. A device may present a client
//! certificate: the DTLS layer accepts any (after checking that the device holds its key), and
//! the registry decides — it is looked up as X.509 credentials by the SHA3-256 of its base64
//! DER, as for MQTT over TLS, and the device then uses ThingsBoard's paths without a token
//! (`/api/v1/telemetry`). Without a certificate the token in the path authenticates, as over
//! plain CoAP.
//!
//! OpenSSL works on an in-memory pair of queues per peer ([`PeerIo`]): a received datagram
//! goes into the peer's inbox, OpenSSL reads one record datagram at a time from it, and what it
//! writes (handshake flights, encrypted CoAP messages) is sent from the outbox after the lock
//! is released.

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::sync::{Mutex, OnceLock};

use openssl::ex_data::Index;
use openssl::ssl::{
    ErrorCode, Ssl, SslContext, SslContextBuilder, SslFiletype, SslMethod, SslOptions, SslRef, SslStream,
    SslVerifyMode,
};
use thingraft_proto::records::x509_key;
use tokio::net::UdpSocket;

/// The largest datagram OpenSSL may write (IPv4/IPv6 MTU less headers, with room to spare).
const MTU: u32 = 1280;

/// DTLS record content type of a handshake message.
const HANDSHAKE: u8 = 22;

/// The DTLS context of a certificate chain and key (PEM files).
pub fn context(cert_file: &str, key_file: &str) -> anyhow::Result<SslContext> {
    let mut b = SslContextBuilder::new(SslMethod::dtls())?;
    b.set_certificate_chain_file(cert_file)
        .map_err(|e| anyhow::anyhow!("reading {cert_file}: {e}"))?;
    b.set_private_key_file(key_file, SslFiletype::PEM)
        .map_err(|e| anyhow::anyhow!("reading the key {key_file}: {e}"))?;
    b.check_private_key()?;
    // Ask for a client certificate and take any: the registry decides who it is.
    b.set_verify_callback(SslVerifyMode::PEER, |_, _| true);
    // No MTU discovery through the socket: OpenSSL does not own it. A ClientHello is first
    // answered with a HelloVerifyRequest (a small cookie), so a spoofed source address cannot
    // make the server send its certificate chain to someone else (RFC 6347 §4.2.1).
    b.set_options(SslOptions::NO_QUERY_MTU | SslOptions::COOKIE_EXCHANGE);
    let mut secret = [0u8; 32];
    openssl::rand::rand_bytes(&mut secret)?;
    let key = openssl::pkey::PKey::hmac(&secret)?;
    let verify_key = key.clone();
    b.set_cookie_generate_cb(move |ssl, out| {
        let cookie = cookie(&key, ssl)?;
        out[..cookie.len()].copy_from_slice(&cookie);
        Ok(cookie.len())
    });
    b.set_cookie_verify_cb(move |ssl, got| {
        cookie(&verify_key, ssl).is_ok_and(|want| want.len() == got.len() && openssl::memcmp::eq(&want, got))
    });
    Ok(b.build())
}

/// The peer address of a session, for its cookie.
fn peer_index() -> Index<Ssl, SocketAddr> {
    static INDEX: OnceLock<Index<Ssl, SocketAddr>> = OnceLock::new();
    *INDEX.get_or_init(|| Ssl::new_ex_index().expect("OpenSSL ex-data index"))
}

/// A cookie for the session's peer: HMAC-SHA256 of its address under this process's secret.
fn cookie(
    key: &openssl::pkey::PKey<openssl::pkey::Private>,
    ssl: &SslRef,
) -> Result<Vec<u8>, openssl::error::ErrorStack> {
    let peer = ssl
        .ex_data(peer_index())
        .map(ToString::to_string)
        .unwrap_or_default();
    let mut signer = openssl::sign::Signer::new(openssl::hash::MessageDigest::sha256(), key)?;
    signer.update(peer.as_bytes())?;
    signer.sign_to_vec()
}

/// One peer's datagrams in and out of OpenSSL.
#[derive(Default)]
struct PeerIo {
    inbox: VecDeque<Vec<u8>>,
    outbox: Vec<Vec<u8>>,
}

impl Read for PeerIo {
    /// One datagram per read, as DTLS expects of its transport.
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.inbox.pop_front() {
            Some(d) => {
                let n = d.len().min(buf.len());
                buf[..n].copy_from_slice(&d[..n]);
                Ok(n)
            }
            None => Err(std::io::ErrorKind::WouldBlock.into()),
        }
    }
}

impl Write for PeerIo {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.outbox.push(buf.to_vec());
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Peer {
    stream: SslStream<PeerIo>,
    open: bool,
    /// Credentials key of the client certificate, once the handshake is done.
    credentials: Option<String>,
    last_seen: tokio::time::Instant,
}

/// The DTLS sessions of one socket.
pub struct Dtls {
    ctx: SslContext,
    pub(crate) socket: UdpSocket,
    peers: Mutex<HashMap<SocketAddr, Peer>>,
    peers_max: usize,
}

impl Dtls {
    pub fn new(ctx: SslContext, socket: UdpSocket, peers_max: usize) -> Dtls {
        Dtls {
            ctx,
            socket,
            peers: Mutex::default(),
            peers_max,
        }
    }

    fn new_peer(&self, addr: SocketAddr) -> Result<Peer, openssl::error::ErrorStack> {
        let mut ssl = Ssl::new(&self.ctx)?;
        ssl.set_ex_data(peer_index(), addr);
        ssl.set_mtu(MTU)?;
        ssl.set_accept_state();
        Ok(Peer {
            stream: SslStream::new(ssl, PeerIo::default())?,
            open: false,
            credentials: None,
            last_seen: tokio::time::Instant::now(),
        })
    }

    /// Takes one datagram from `peer`: advances its handshake, or returns the CoAP messages it
    /// carries. Sends whatever DTLS answers.
    pub async fn receive(&self, datagram: &[u8], peer: SocketAddr) -> Vec<Vec<u8>> {
        let mut plain = Vec::new();
        let out = {
            let mut peers = self
                .peers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // A handshake record of epoch 0 on an open session is a new ClientHello: the
            // device restarted. Its old session goes.
            let epoch0_handshake =
                datagram.first() == Some(&HANDSHAKE) && datagram.get(3..5) == Some(&[0, 0]);
            if epoch0_handshake && peers.get(&peer).is_some_and(|p| p.open) {
                peers.remove(&peer);
            }
            if !peers.contains_key(&peer) {
                if peers.len() >= self.peers_max {
                    // Bounded: the longest-idle session makes room.
                    if let Some(oldest) = peers.iter().min_by_key(|(_, p)| p.last_seen).map(|(a, _)| *a) {
                        peers.remove(&oldest);
                    }
                }
                match self.new_peer(peer) {
                    Ok(p) => {
                        peers.insert(peer, p);
                    }
                    Err(e) => {
                        tracing::warn!(%peer, error = %e, "DTLS session not created");
                        return plain;
                    }
                }
            }
            let p = peers.get_mut(&peer).expect("inserted above");
            p.last_seen = tokio::time::Instant::now();
            p.stream.get_mut().inbox.push_back(datagram.to_vec());
            let mut failed = None;
            let mut closed = false;
            if !p.open {
                match p.stream.accept() {
                    Ok(()) => {
                        p.open = true;
                        p.credentials = p
                            .stream
                            .ssl()
                            .peer_certificate()
                            .and_then(|c| c.to_der().ok())
                            .map(|der| x509_key(&der));
                        tracing::debug!(%peer, certificate = p.credentials.is_some(), "DTLS session open");
                    }
                    Err(e) if e.code() == ErrorCode::WANT_READ => {}
                    Err(e) => failed = Some(e.to_string()),
                }
            }
            if p.open {
                let mut buf = vec![0u8; 65536];
                loop {
                    match p.stream.ssl_read(&mut buf) {
                        Ok(n) => plain.push(buf[..n].to_vec()),
                        Err(e) if e.code() == ErrorCode::WANT_READ => break,
                        Err(e) if e.code() == ErrorCode::ZERO_RETURN => {
                            closed = true;
                            break;
                        }
                        Err(e) => {
                            failed = Some(e.to_string());
                            break;
                        }
                    }
                }
            }
            let out = std::mem::take(&mut p.stream.get_mut().outbox);
            if let Some(why) = failed {
                tracing::info!(%peer, error = %why, "DTLS session failed");
                peers.remove(&peer);
            } else if closed {
                tracing::debug!(%peer, "DTLS session closed by the device");
                peers.remove(&peer);
            }
            out
        };
        for d in out {
            if let Err(e) = self.socket.send_to(&d, peer).await {
                tracing::debug!(%peer, error = %e, "DTLS datagram not sent");
            }
        }
        plain
    }

    /// Sends a CoAP message to `peer` through its session.
    pub async fn send(&self, message: &[u8], peer: SocketAddr) -> std::io::Result<()> {
        let out = {
            let mut peers = self
                .peers
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let p = peers
                .get_mut(&peer)
                .filter(|p| p.open)
                .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotConnected, "no DTLS session"))?;
            p.stream
                .ssl_write(message)
                .map_err(|e| std::io::Error::other(e.to_string()))?;
            std::mem::take(&mut p.stream.get_mut().outbox)
        };
        for d in out {
            self.socket.send_to(&d, peer).await?;
        }
        Ok(())
    }

    /// The credentials key of the client certificate `peer` presented, if any.
    pub fn credentials(&self, peer: SocketAddr) -> Option<String> {
        let peers = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        peers.get(&peer).and_then(|p| p.credentials.clone())
    }
}
