//! Request labels: what a request asked for (`GET /products/{id}`, `SELECT
//! pgbench_accounts`, `SET`), so that phases can be told apart per kind of request.
//! With `--labels` the kernel programs copy the first bytes of a connection's payloads
//! (at most 1024 of a request, 128 of a response): the first read of each request a
//! server reads, the first write of each response, each request the traced process
//! writes upstream and the first read of the upstream's response. This module reads
//! those bytes once, in userspace, and keeps nothing of them but the labels and the
//! response facts (HTTP statuses, error counts); a connection keeps only what decoding
//! its next bytes needs (PostgreSQL's prepared statements' labels). Everything read is
//! untrusted — whoever sends a request chooses its bytes — so parsing stops at the
//! first thing malformed, and every label passes through `sanitize` and fits
//! `MAX_LABEL` bytes before it leaves.

mod http;
mod postgres;
mod redis;
mod routes;
mod sql;
mod text;

pub use routes::Routes;
pub use text::sanitize;

/// Bytes of a whole label: method or kind included, `…` included when cut.
pub const MAX_LABEL: usize = 96;

/// A protocol whose requests get labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http,
    Postgres,
    Redis,
}

/// The protocol of a connection from the first bytes its client sent (None: unknown,
/// no labels). PostgreSQL's binary start is tried first; HTTP needs a method and a
/// target, so Redis's inline `GET key` is not taken for HTTP.
pub fn detect(first: &[u8]) -> Option<Protocol> {
    if postgres::detect(first) {
        Some(Protocol::Postgres)
    } else if http::detect(first) {
        Some(Protocol::Http)
    } else if redis::detect(first) {
        Some(Protocol::Redis)
    } else {
        None
    }
}

/// What a response prefix says.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Responses {
    /// HTTP status per response seen, in order.
    pub statuses: Vec<u16>,
    /// PostgreSQL ErrorResponse messages, Redis error replies.
    pub errors: u32,
}

/// Per-connection decoding state (one per traced connection, server side or upstream
/// side).
#[derive(Debug)]
pub struct Decoder {
    state: State,
}

#[derive(Debug)]
enum State {
    Http,
    Postgres(postgres::Session),
    Redis,
}

impl Decoder {
    pub fn new(protocol: Protocol) -> Self {
        let state = match protocol {
            Protocol::Http => State::Http,
            Protocol::Postgres => State::Postgres(postgres::Session::default()),
            Protocol::Redis => State::Redis,
        };
        Decoder { state }
    }

    /// The requests that begin in `bytes` (the first bytes of what one read or write
    /// carried; `whole` is false when the call carried more than `bytes`). One label per
    /// request seen, in order: pipelined requests each get one. Empty when the bytes hold
    /// nothing the protocol counts as a request. Only PostgreSQL's extended-query runs
    /// span calls, and only they look at `whole`.
    pub fn requests(&mut self, bytes: &[u8], whole: bool, routes: &Routes) -> Vec<String> {
        let raw = match &mut self.state {
            State::Http => http::requests(bytes, routes),
            State::Postgres(session) => session.requests(bytes, whole),
            State::Redis => redis::requests(bytes),
        };
        // (Collected in place: a label's bytes and its string share one allocation.)
        raw.into_iter().map(|label| sanitize(label, MAX_LABEL)).collect()
    }

    /// What the first bytes of a response (or of several pipelined responses) say.
    pub fn responses(&mut self, bytes: &[u8]) -> Responses {
        match self.state {
            State::Http => http::responses(bytes),
            State::Postgres(_) => postgres::responses(bytes),
            State::Redis => redis::responses(bytes),
        }
    }
}

/// Random test bytes, the same every run: `len` of them, each picked from `alphabet` by
/// a xorshift generator started at `seed` (which moves on).
#[cfg(test)]
pub fn garbage(seed: &mut u64, alphabet: &[u8], len: usize) -> Vec<u8> {
    (0..len)
        .map(|_| {
            *seed ^= *seed << 13;
            *seed ^= *seed >> 7;
            *seed ^= *seed << 17;
            alphabet[(*seed % alphabet.len() as u64) as usize]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(bytes: &[u8]) -> Vec<String> {
        Decoder::new(Protocol::Http).requests(bytes, true, &Routes::default())
    }

    fn assert_safe(labels: &[String]) {
        for label in labels {
            assert!(label.len() <= MAX_LABEL, "{label:?} is longer than {MAX_LABEL}");
            assert!(label.bytes().all(|b| b >= 0x20 && b != 0x7f), "{label:?} has a control byte");
        }
    }

    #[test]
    fn detects_each_protocol() {
        assert_eq!(detect(b"GET /products/42 HTTP/1.1\r\nHost: shop\r\n\r\n"), Some(Protocol::Http));
        assert_eq!(detect(b"*1\r\n$4\r\nPING\r\n"), Some(Protocol::Redis));
        assert_eq!(detect(b"PING\r\n"), Some(Protocol::Redis));
        let startup = [&[0, 0, 0, 9][..], &196_608u32.to_be_bytes(), b"\0"].concat();
        assert_eq!(detect(&startup), Some(Protocol::Postgres));
        assert_eq!(detect(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]), Some(Protocol::Postgres));
    }

    #[test]
    fn unknown_protocols_get_no_labels() {
        // A TLS ClientHello, an SSH banner, HTTP/2's preface, MySQL's client, nothing.
        for first in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            b"\x55\x00\x00\x01\x85\xa6\xff\x01",
            b"",
        ] {
            assert_eq!(detect(first), None, "{first:?}");
        }
    }

    #[test]
    fn the_decoder_dispatches_per_protocol() {
        let routes = Routes::parse(&["/products/{id}".to_owned()]).unwrap();
        let mut http = Decoder::new(Protocol::Http);
        assert_eq!(http.requests(b"GET /products/best HTTP/1.1\r\n\r\n", true, &routes), ["GET /products/{id}"]);
        assert_eq!(http.responses(b"HTTP/1.1 404 Not Found\r\n"), Responses { statuses: vec![404], errors: 0 });
        let mut redis = Decoder::new(Protocol::Redis);
        assert_eq!(redis.requests(b"*1\r\n$4\r\nping\r\n", true, &routes), ["PING"]);
        assert_eq!(redis.responses(b"-ERR x\r\n").errors, 1);
        let mut pg = Decoder::new(Protocol::Postgres);
        assert_eq!(pg.requests(b"Q\0\0\0\x0dSELECT 1\0", true, &routes), ["SELECT"]);
        assert_eq!(pg.responses(b"E\0\0\0\x04Z\0\0\0\x05I").errors, 1);
    }

    #[test]
    fn hostile_http_paths_become_safe_labels() {
        assert_eq!(http(b"GET /a\x1b[31mred HTTP/1.1\r\n\r\n"), ["GET /a?[31mred"]);
        assert_eq!(http(b"GET /a\"b HTTP/1.1\r\n\r\n"), ["GET /a?b"]);
        assert_eq!(http(b"GET /a\nb HTTP/1.1\r\n\r\n"), ["GET /a"]);
        assert_eq!(http(b"GET /a%00b%0a HTTP/1.1\r\n\r\n"), ["GET /a%00b%0a"]);
        assert_eq!(http(b"GET /caf\xe9/\xff\xfe HTTP/1.1\r\n\r\n"), ["GET /caf?/??"]);
        assert_eq!(http("GET /a\u{202E}gpj.exe HTTP/1.1\r\n\r\n".as_bytes()), ["GET /a?gpj.exe"]);
    }

    #[test]
    fn a_ten_kilobyte_path_fits_the_bound() {
        let one_segment = [b"GET /".as_slice(), &[b'a'; 10_000], b" HTTP/1.1\r\n\r\n"].concat();
        let labels = http(&one_segment);
        assert_safe(&labels);
        assert_eq!(labels[0].len(), MAX_LABEL);
        assert!(labels[0].ends_with('…'));
        // As captured: the first 1024 bytes, the path cut inside its one segment.
        assert_eq!(http(&one_segment[..1024]), ["GET /…"]);
        let many_segments = [b"GET ".as_slice(), &b"/abc".repeat(2500), b" HTTP/1.1\r\n\r\n"].concat();
        for bytes in [&many_segments[..], &many_segments[..1024]] {
            let labels = http(bytes);
            assert_safe(&labels);
            assert!(labels[0].starts_with("GET /abc/abc/") && labels[0].ends_with('…'), "{labels:?}");
        }
    }

    #[test]
    fn garbage_gives_safe_labels_for_every_protocol() {
        let mut state = 0x0123_4567_89AB_CDEFu64;
        let every_byte: Vec<u8> = (0..=255).collect();
        let routes = Routes::default();
        for protocol in [Protocol::Http, Protocol::Postgres, Protocol::Redis] {
            let mut decoder = Decoder::new(protocol);
            for round in 0..2000 {
                // A valid start, then random bytes: the parsers get past their first checks.
                let start: &[u8] = match protocol {
                    Protocol::Http => b"GET /",
                    Protocol::Postgres => b"Q\0\0\x01\0SELECT * FROM ",
                    Protocol::Redis => b"*2\r\n$40\r\n",
                };
                let garbage = super::garbage(&mut state, &every_byte, round % 200);
                let bytes = [start, &garbage].concat();
                assert_safe(&decoder.requests(&bytes, round % 3 == 0, &routes));
                decoder.responses(&garbage);
            }
        }
    }
}
