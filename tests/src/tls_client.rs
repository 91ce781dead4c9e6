//! The tests' own TLS client (rustls, on ring), which can hold its side of a handshake:
//! it sends its ClientHello, takes in the server's whole first flight (ServerHello to
//! Finished on TLS 1.3, ServerHello to ServerHelloDone on TLS 1.2), waits a pause of the
//! test's choosing and only then sends its own flight. Then one HTTP/1.1 request on the
//! connection, which the server closes after its response.

use std::{
    io::{self, Write as _},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _, Result};
use rustls::{
    client::{
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
        Resumption,
    },
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{pem::PemObject as _, CertificateDer, ServerName, UnixTime},
    ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme, SupportedProtocolVersion,
};

/// The protocol version the client offers (it offers that one only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

impl TlsVersion {
    fn rustls(self) -> &'static SupportedProtocolVersion {
        match self {
            TlsVersion::Tls12 => &rustls::version::TLS12,
            TlsVersion::Tls13 => &rustls::version::TLS13,
        }
    }

    fn wire(self) -> rustls::ProtocolVersion {
        match self {
            TlsVersion::Tls12 => rustls::ProtocolVersion::TLSv1_2,
            TlsVersion::Tls13 => rustls::ProtocolVersion::TLSv1_3,
        }
    }
}

/// What the client measured of one connection.
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    /// From connect() returning to the server's first flight processed (the client's
    /// own flight then ready), in ms.
    pub server_flight_ms: f64,
    /// How long the client actually held its flight, in ms.
    pub paused_ms: f64,
    /// From connect() returning to the handshake complete on the client's side (its
    /// flight written and, on TLS 1.2, the server's Finished processed), in ms.
    pub handshake_ms: f64,
    /// The HTTP status of the response.
    pub status: u16,
    /// The response body's length.
    pub body_len: usize,
}

/// A client for one server certificate and one protocol version. Session resumption is
/// off: every connection makes a full handshake.
pub struct TlsClient {
    config: Arc<ClientConfig>,
    version: TlsVersion,
}

/// A TLS record's content type (the first byte of its header).
const CHANGE_CIPHER_SPEC: u8 = 20;
const RECORD_HEADER: usize = 5;

/// Whether `out`, whole records the client wants to send, holds anything but
/// ChangeCipherSpec records: the start of the client's flight. (A TLS 1.3 client sends a
/// ChangeCipherSpec for middleboxes as soon as it has processed the ServerHello, before
/// the rest of the server's flight.)
fn holds_client_flight(mut out: &[u8]) -> bool {
    while out.len() >= RECORD_HEADER {
        if out[0] != CHANGE_CIPHER_SPEC {
            return true;
        }
        let len = u16::from_be_bytes([out[3], out[4]]) as usize;
        out = &out[(RECORD_HEADER + len).min(out.len())..];
    }
    false
}

/// Trusts one certificate: the server must present exactly it, and sign the handshake
/// with its key. (The tests' certificate is self-signed, made by `openssl req -x509`,
/// which marks it a CA: a web PKI verifier refuses it as the server's own.)
#[derive(Debug)]
struct PinnedCert {
    cert: CertificateDer<'static>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if end_entity.as_ref() != self.cert.as_ref() {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

impl TlsClient {
    /// Trusts the certificate of the PEM file `cert` (the tests' self-signed one), and
    /// no other.
    pub fn new(cert: &Path, version: TlsVersion) -> Result<Self> {
        let trusted = CertificateDer::from_pem_file(cert).with_context(|| format!("reading {}", cert.display()))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = PinnedCert { cert: trusted, algorithms: provider.signature_verification_algorithms };
        let mut config = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[version.rustls()])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        config.resumption = Resumption::disabled();
        Ok(Self { config: Arc::new(config), version })
    }

    /// Connects to `addr` (as `localhost`), makes the handshake holding the client's
    /// flight for `pause` once the server's first flight is in, then sends
    /// `GET /?size=100` with `Connection: close` and reads the response until the server
    /// closes; then sends its close_notify and closes.
    pub fn exchange(&self, addr: SocketAddr, pause: Duration) -> Result<Exchange> {
        let name = ServerName::try_from("localhost")?;
        let mut conn = ClientConnection::new(self.config.clone(), name)?;
        let mut sock = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        let connected = Instant::now();
        sock.set_nodelay(true)?;
        // A server that stops answering fails the exchange instead of hanging the test.
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;

        // The ClientHello.
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }

        // The server's first flight: read and process records, keeping what the client
        // wants to send in `held`, until it holds more than a ChangeCipherSpec.
        let mut held = Vec::new();
        while !holds_client_flight(&held) {
            if conn.read_tls(&mut sock)? == 0 {
                bail!("the server closed the connection during its first flight");
            }
            let processed = conn.process_new_packets();
            while conn.wants_write() {
                conn.write_tls(&mut held)?;
            }
            if let Err(e) = processed {
                // Tell the server why (the alert is in `held`).
                let _ = sock.write_all(&held);
                bail!("handshake failed: {e}");
            }
        }
        let server_flight = connected.elapsed();

        let paused_at = Instant::now();
        thread::sleep(pause);
        let paused = paused_at.elapsed();

        // The client's flight, then whatever the handshake still needs (TLS 1.2: the
        // server's ChangeCipherSpec and Finished).
        sock.write_all(&held)?;
        while conn.is_handshaking() || conn.wants_write() {
            if conn.wants_write() {
                conn.write_tls(&mut sock)?;
                continue;
            }
            if conn.read_tls(&mut sock)? == 0 {
                bail!("the server closed the connection before the handshake's end");
            }
            if let Err(e) = conn.process_new_packets() {
                while conn.wants_write() {
                    let _ = conn.write_tls(&mut sock);
                }
                bail!("handshake failed: {e}");
            }
        }
        let handshake = connected.elapsed();
        if conn.protocol_version() != Some(self.version.wire()) {
            bail!("negotiated {:?}, not {:?}", conn.protocol_version(), self.version);
        }

        let (status, body_len) = {
            let mut tls = rustls::Stream::new(&mut conn, &mut sock);
            tls.write_all(b"GET /?size=100 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
            tls.flush()?;
            read_response(&mut tls)?
        };

        // Our goodbye: the server has closed its side already, so it may answer with
        // a reset, which is no error of the exchange.
        conn.send_close_notify();
        while conn.wants_write() {
            match conn.write_tls(&mut sock) {
                Ok(_) => {}
                Err(e) if matches!(e.kind(), io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset) => break,
                Err(e) => return Err(e.into()),
            }
        }
        drop(sock);
        Ok(Exchange {
            server_flight_ms: ms(server_flight),
            paused_ms: ms(paused),
            handshake_ms: ms(handshake),
            status,
            body_len,
        })
    }

    /// Connects to `addr` (as `localhost`), makes the handshake at once, sends
    /// `requests` requests for `GET /?size=100` on the one connection, each answered
    /// before the next, then sends its close_notify and waits `linger` before it closes
    /// the socket: a client slow to close after its goodbye. The responses' statuses.
    pub fn keep_alive(&self, addr: SocketAddr, requests: usize, linger: Duration) -> Result<Vec<u16>> {
        let name = ServerName::try_from("localhost")?;
        let mut conn = ClientConnection::new(self.config.clone(), name)?;
        let mut sock = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut statuses = Vec::new();
        {
            let mut tls = rustls::Stream::new(&mut conn, &mut sock);
            for _ in 0..requests {
                tls.write_all(b"GET /?size=100 HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
                tls.flush()?;
                statuses.push(read_sized_response(&mut tls)?);
            }
        }
        conn.send_close_notify();
        while conn.wants_write() {
            conn.write_tls(&mut sock)?;
        }
        thread::sleep(linger);
        drop(sock);
        Ok(statuses)
    }
}

/// Reads one HTTP/1.1 response whose body has a Content-Length, leaving the connection
/// open: its status.
fn read_sized_response(tls: &mut impl io::Read) -> Result<u16> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = std::str::from_utf8(&data[..end]).context("a response head that is not UTF-8")?;
            let (status, length) = response_head(head)?;
            let length = length.context("a response without Content-Length")?;
            if data.len() >= end + 4 + length {
                return Ok(status);
            }
        }
        match tls.read(&mut buf) {
            Ok(0) => bail!("the server closed the connection within a response"),
            Ok(n) => data.extend_from_slice(&buf[..n]),
            Err(e) => return Err(e).context("reading the response"),
        }
    }
}

/// A response head's status and Content-Length.
fn response_head(head: &str) -> Result<(u16, Option<usize>)> {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("status line {status_line:?}"))?;
    let length = lines
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.trim().parse::<usize>())
        .transpose()
        .context("Content-Length")?;
    Ok((status, length))
}

/// Reads an HTTP/1.1 response until the server ends the connection (its close_notify,
/// or the TCP close after a body of the announced length): its status and body length.
fn read_response(tls: &mut impl io::Read) -> Result<(u16, usize)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tls.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => data.extend_from_slice(&buf[..n]),
            // A server that closes without close_notify: the body's length tells
            // whether the response was whole.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break,
            Err(e) => return Err(e).context("reading the response"),
        }
    }
    let end = data.windows(4).position(|w| w == b"\r\n\r\n").context("a response without a header's end")?;
    let head = std::str::from_utf8(&data[..end]).context("a response head that is not UTF-8")?;
    let body_len = data.len() - end - 4;
    let (status, length) = response_head(head)?;
    if let Some(length) = length {
        if length != body_len {
            bail!("a body of {body_len} bytes where the response announced {length}");
        }
    }
    Ok((status, body_len))
}
