//! HTTP/1.x: a request's label is its method and route (`GET /products/{id}`); a
//! response says its status.
//!
//! Pipelined requests each get a label: after one request's headers, a body announced by
//! `Content-Length` is skipped and the next request is read if it starts within the
//! bytes; a chunked body, or a body whose length is unknown, ends the walk (what was
//! seen counts). A request line cut by the end of the bytes still counts once its method
//! and the start of its target are there: the complete segments of the path are folded
//! and the cut one becomes `…` (`GET /api/users/…`); no `--route` pattern is tried on a
//! path whose end is unknown. A line break inside the target ends the request line, as
//! it does for the servers that accept bare LF.

use super::{routes, text::CUT, Responses, Routes};

/// Whether `method` is a request method: RFC 9110's, PATCH, or WebDAV's (RFC 4918, 3253,
/// 4791, 5323).
fn is_method(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET"
            | b"HEAD"
            | b"POST"
            | b"PUT"
            | b"DELETE"
            | b"PATCH"
            | b"OPTIONS"
            | b"CONNECT"
            | b"TRACE"
            | b"PROPFIND"
            | b"PROPPATCH"
            | b"MKCOL"
            | b"COPY"
            | b"MOVE"
            | b"LOCK"
            | b"UNLOCK"
            | b"REPORT"
            | b"SEARCH"
            | b"MKCALENDAR"
    )
}

/// A request line as far as the bytes hold it.
#[derive(Debug, PartialEq, Eq)]
struct RequestLine<'a> {
    method: &'a [u8],
    target: &'a [u8],
    /// Whether something ended the target (a space, a line break) before the bytes did.
    complete: bool,
}

/// What follows a message's headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Body {
    Empty,
    Length(usize),
    /// Chunked, or not delimited by anything the walk can follow.
    Unknown,
}

/// The end of a message's headers and what they say of its body.
#[derive(Debug, PartialEq, Eq)]
struct Head {
    end: usize,
    body: Body,
}

/// Whether `first` starts like an HTTP/1.x request: a known method, a space, and a
/// target of the forms HTTP uses (a path, `*`, an absolute URL, `host:port`).
pub fn detect(first: &[u8]) -> bool {
    request_line(first).is_some()
}

/// The labels of the requests that begin in `bytes`.
pub fn requests(bytes: &[u8], routes: &Routes) -> Vec<Vec<u8>> {
    let mut labels = Vec::new();
    let mut pos = 0;
    loop {
        // A client may send line breaks between requests (RFC 9112, section 2.2).
        while bytes.get(pos).is_some_and(|b| matches!(b, b'\r' | b'\n')) {
            pos += 1;
        }
        let Some(line) = request_line(&bytes[pos..]) else { break };
        labels.push(label(&line, routes));
        if !line.complete {
            break;
        }
        let line_end = pos + line.method.len() + 1 + line.target.len();
        match head(bytes, line_end) {
            Some(Head { end, body: Body::Empty }) => pos = end,
            Some(Head { end, body: Body::Length(n) }) => pos = end.saturating_add(n),
            _ => break,
        }
        if pos >= bytes.len() {
            break;
        }
    }
    labels
}

/// The statuses of the responses that begin in `bytes`. An interim response (1xx) is no
/// answer to a request and is passed over, except `101 Switching Protocols`, after which
/// the bytes are no longer HTTP.
pub fn responses(bytes: &[u8]) -> Responses {
    let mut out = Responses::default();
    let mut pos = 0;
    while let Some(status) = status(&bytes[pos..]) {
        if !(100..200).contains(&status) || status == 101 {
            out.statuses.push(status);
        }
        let Some(head) = head(bytes, pos) else { break };
        let body = match head.body {
            _ if status == 101 => break,
            _ if (100..200).contains(&status) || status == 204 || status == 304 => 0,
            // The answer to a HEAD request announces a length and sends no body: the next
            // response follows at once.
            Body::Length(_) if bytes[head.end..].starts_with(b"HTTP/1.") => 0,
            Body::Empty => 0,
            Body::Length(n) => n,
            Body::Unknown => break,
        };
        pos = head.end.saturating_add(body);
        if pos >= bytes.len() {
            break;
        }
    }
    out
}

/// `METHOD ROUTE` of a request line.
fn label(line: &RequestLine, routes: &Routes) -> Vec<u8> {
    // Room for the route: the target's length, and some for `{id}`s and a cut mark.
    let mut label = Vec::with_capacity(line.method.len() + 1 + line.target.len() + 8);
    label.extend_from_slice(line.method);
    label.push(b' ');
    route(&mut label, line.method, line.target, line.complete, routes);
    label
}

/// The route of a request target: `*`; the authority of a CONNECT; otherwise the path
/// (of an absolute URL too) without query string or fragment, as a `--route` pattern
/// when one matches, folded when none does; added to `out`.
fn route(out: &mut Vec<u8>, method: &[u8], target: &[u8], complete: bool, routes: &Routes) {
    if target == b"*" || method == b"CONNECT" {
        out.extend_from_slice(target);
        return;
    }
    let end = target.iter().position(|&b| b == b'?' || b == b'#').unwrap_or(target.len());
    let path = path(&target[..end]);
    // The path is whole once a query string or a fragment began, or the target ended.
    if !complete && end == target.len() {
        return cut_path(out, path);
    }
    match routes.find(path) {
        Some(pattern) => out.extend_from_slice(pattern.as_bytes()),
        None => routes::fold(out, path),
    }
}

/// The path of a target in origin form (`/a/b`) or absolute form (`http://host:port/a/b`,
/// whose path is `/` when it has none); query string and fragment already cut off.
fn path(target: &[u8]) -> &[u8] {
    match absolute_form_path(target) {
        Some([]) => b"/",
        Some(path) => path,
        None => target,
    }
}

/// The path part of `scheme://authority/path`, or None when `target` is no absolute URL.
fn absolute_form_path(target: &[u8]) -> Option<&[u8]> {
    let colon = target.iter().position(|&b| b == b':')?;
    let scheme = &target[..colon];
    let is_scheme = scheme.first()?.is_ascii_alphabetic()
        && scheme.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    let rest = target[colon..].strip_prefix(b"://").filter(|_| is_scheme)?;
    Some(rest.iter().position(|&b| b == b'/').map_or(&[][..], |slash| &rest[slash..]))
}

/// A path whose end was not captured: its complete segments folded, the cut one `…`.
fn cut_path(out: &mut Vec<u8>, path: &[u8]) {
    let complete = path.iter().rposition(|&b| b == b'/').map_or(&[][..], |slash| &path[..slash]);
    routes::fold(out, complete);
    out.push(b'/');
    out.extend_from_slice(CUT.encode_utf8(&mut [0; 4]).as_bytes());
}

/// The request line at the start of `bytes`, if they start with one.
fn request_line(bytes: &[u8]) -> Option<RequestLine<'_>> {
    let space = bytes.iter().take(17).position(|&b| b == b' ')?;
    let method = &bytes[..space];
    if !is_method(method) {
        return None;
    }
    let rest = &bytes[space + 1..];
    let end = rest.iter().position(|&b| matches!(b, b' ' | b'\r' | b'\n'));
    let target = &rest[..end.unwrap_or(rest.len())];
    let complete = end.is_some();
    if !is_target(method, target, complete) {
        return None;
    }
    Some(RequestLine { method, target, complete })
}

/// Whether `target` starts like a request target: a path, `*`, an absolute URL, or for
/// CONNECT an authority. A cut target passes on its first bytes (`/`, `ht`).
fn is_target(method: &[u8], target: &[u8], complete: bool) -> bool {
    let starts_url = |scheme: &[u8]| target.len() < scheme.len() && scheme.starts_with(&target.to_ascii_lowercase());
    match target.first() {
        None => false,
        Some(_) if method == b"CONNECT" => target.iter().all(u8::is_ascii_graphic),
        Some(b'/') => true,
        Some(b'*') => target == b"*",
        Some(_) => {
            absolute_form_path(target).is_some() || (!complete && (starts_url(b"http://") || starts_url(b"https://")))
        }
    }
}

/// `HTTP/1.x NNN` at the start of `bytes`: the status, when its three digits and what
/// ends them are there.
fn status(bytes: &[u8]) -> Option<u16> {
    let rest = bytes.strip_prefix(b"HTTP/1.")?;
    let (version, rest) = rest.split_first()?;
    let rest = rest.strip_prefix(b" ").filter(|_| version.is_ascii_digit())?;
    let (digits, after) = (rest.get(..3)?, rest.get(3)?);
    if !digits.iter().all(u8::is_ascii_digit) || digits[0] == b'0' || !matches!(after, b' ' | b'\r' | b'\n') {
        return None;
    }
    Some(digits.iter().fold(0, |n, d| n * 10 + u16::from(d - b'0')))
}

/// The headers of the message whose start line begins at `start`: where they end (after
/// the empty line) and what they say of the body. None when the bytes end first.
fn head(bytes: &[u8], start: usize) -> Option<Head> {
    // Found in one pass first: the headers are read only when a message follows them
    // (pipelining), which is rare; the usual request or response ends with them or is
    // cut by the end of the bytes.
    let end = head_end(bytes, start)?;
    if end >= bytes.len() {
        return Some(Head { end, body: Body::Empty });
    }
    let mut lines = Lines { bytes, pos: start };
    lines.next()?; // the start line
    let mut body = Body::Empty;
    loop {
        let line = lines.next()?;
        if line.is_empty() {
            return Some(Head { end: lines.pos, body });
        }
        body = merge(body, header_body(line));
    }
}

/// Just past the empty line that ends the headers of the message starting at `start`.
fn head_end(bytes: &[u8], start: usize) -> Option<usize> {
    for lf in memchr::memchr_iter(b'\n', bytes.get(start..)?) {
        let at = start + lf + 1;
        match (bytes.get(at), bytes.get(at + 1)) {
            (Some(b'\n'), _) => return Some(at + 1),
            (Some(b'\r'), Some(b'\n')) => return Some(at + 2),
            (None, _) => return None,
            _ => {}
        }
    }
    None
}

/// The body a header announces, if it is about the body.
fn header_body(line: &[u8]) -> Option<Body> {
    let colon = line.iter().position(|&b| b == b':')?;
    let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
    if name.eq_ignore_ascii_case(b"content-length") {
        let length = std::str::from_utf8(value).ok().and_then(|v| v.parse().ok());
        Some(length.map_or(Body::Unknown, Body::Length))
    } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
        Some(Body::Unknown)
    } else {
        None
    }
}

/// Two announcements of the body: any transfer coding, or lengths that disagree, leave
/// it unknown.
fn merge(body: Body, header: Option<Body>) -> Body {
    match (body, header) {
        (body, None) => body,
        (Body::Empty, Some(header)) => header,
        (Body::Length(a), Some(Body::Length(b))) if a == b => body,
        _ => Body::Unknown,
    }
}

/// Lines ended by LF (a CR before it dropped); the last, unended one is not returned.
struct Lines<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Iterator for Lines<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        let rest = self.bytes.get(self.pos..)?;
        let lf = memchr::memchr(b'\n', rest)?;
        self.pos += lf + 1;
        Some(rest[..lf].strip_suffix(b"\r").unwrap_or(&rest[..lf]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(bytes: &[u8]) -> Vec<String> {
        labels_with(bytes, &Routes::default())
    }

    fn labels_with(bytes: &[u8], routes: &Routes) -> Vec<String> {
        requests(bytes, routes).into_iter().map(|l| String::from_utf8_lossy(&l).into_owned()).collect()
    }

    fn routes(patterns: &[&str]) -> Routes {
        Routes::parse(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn statuses(bytes: &[u8]) -> Vec<u16> {
        responses(bytes).statuses
    }

    #[test]
    fn detects_request_lines() {
        assert!(detect(b"GET / HTTP/1.1\r\n"));
        assert!(detect(b"POST /api/orders HTTP/1.1\r\nHost: x\r\n"));
        assert!(detect(b"OPTIONS * HTTP/1.1\r\n"));
        assert!(detect(b"GET http://example.com:8080/a HTTP/1.1\r\n"));
        assert!(detect(b"CONNECT example.com:443 HTTP/1.1\r\n"));
        assert!(detect(b"PROPFIND /dav/ HTTP/1.1\r\n"));
        assert!(detect(b"GET /cut-her"));
        assert!(detect(b"GET htt"));
        assert!(detect(b"GET HTTPS://exa"));
    }

    #[test]
    fn refuses_what_is_not_a_request_line() {
        assert!(!detect(b"get / HTTP/1.1\r\n"));
        assert!(!detect(b"FETCH / HTTP/1.1\r\n"));
        assert!(!detect(b"GET  / HTTP/1.1\r\n"));
        assert!(!detect(b"GET "));
        assert!(!detect(b"GET"));
        // Redis's inline GET.
        assert!(!detect(b"GET key\r\n"));
        assert!(!detect(b"GET htt\r\n"));
        assert!(!detect(b"GET 42\r\n"));
        assert!(!detect(b"GET *x HTTP/1.1\r\n"));
        assert!(!detect(b"\x16\x03\x01\x02\x00"));
        assert!(!detect(b"HTTP/1.1 200 OK\r\n"));
        assert!(!detect(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
    }

    #[test]
    fn label_is_method_and_folded_path_without_query() {
        assert_eq!(labels(b"GET /products/42?color=red HTTP/1.1\r\n\r\n"), ["GET /products/{id}"]);
        assert_eq!(labels(b"GET /productTypes#top HTTP/1.1\r\n\r\n"), ["GET /productTypes"]);
        assert_eq!(
            labels(b"DELETE /carts/123e4567-e89b-12d3-a456-426614174000 HTTP/1.1\r\n\r\n"),
            ["DELETE /carts/{id}"]
        );
    }

    #[test]
    fn absolute_form_keeps_only_the_path() {
        assert_eq!(labels(b"GET http://example.com:8080/users/7?x=1 HTTP/1.1\r\n\r\n"), ["GET /users/{id}"]);
        assert_eq!(labels(b"GET http://example.com HTTP/1.1\r\n\r\n"), ["GET /"]);
        assert_eq!(labels(b"GET https://example.com?q HTTP/1.1\r\n\r\n"), ["GET /"]);
    }

    #[test]
    fn asterisk_and_connect_targets_stay() {
        assert_eq!(labels(b"OPTIONS * HTTP/1.1\r\n\r\n"), ["OPTIONS *"]);
        assert_eq!(labels(b"CONNECT example.com:443 HTTP/1.1\r\n\r\n"), ["CONNECT example.com:443"]);
    }

    #[test]
    fn a_matching_route_pattern_is_the_label() {
        let r = routes(&["/products/{id}", "/api/{version}/users/{id}"]);
        assert_eq!(labels_with(b"GET /products/best?x=1 HTTP/1.1\r\n\r\n", &r), ["GET /products/{id}"]);
        assert_eq!(labels_with(b"PUT /api/v2/users/alice HTTP/1.1\r\n\r\n", &r), ["PUT /api/{version}/users/{id}"]);
        assert_eq!(labels_with(b"GET /products/42/ HTTP/1.1\r\n\r\n", &r), ["GET /products/{id}"]);
        // No pattern: folded as usual.
        assert_eq!(labels_with(b"GET /orders/42 HTTP/1.1\r\n\r\n", &r), ["GET /orders/{id}"]);
    }

    #[test]
    fn pipelined_requests_each_get_a_label() {
        let bytes = b"GET /a/1 HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\nHEAD /c HTTP/1.1\r\n\r\n";
        assert_eq!(labels(bytes), ["GET /a/{id}", "GET /b", "HEAD /c"]);
    }

    #[test]
    fn bodies_with_a_length_are_skipped() {
        let bytes = b"POST /orders HTTP/1.1\r\ncontent-LENGTH: 12\r\n\r\nGET / HTTP/1POST /x HTTP/1.1\r\n\r\n";
        assert_eq!(labels(bytes), ["POST /orders", "POST /x"]);
    }

    #[test]
    fn a_body_beyond_the_bytes_ends_the_walk() {
        assert_eq!(labels(b"POST /a HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"x\":1}"), ["POST /a"]);
    }

    #[test]
    fn a_chunked_body_ends_the_walk() {
        let bytes =
            b"POST /a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(labels(bytes), ["POST /a"]);
    }

    #[test]
    fn a_bad_or_conflicting_length_ends_the_walk() {
        assert_eq!(labels(b"POST /a HTTP/1.1\r\nContent-Length: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n"), ["POST /a"]);
        let twice = b"POST /a HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 3\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(labels(twice), ["POST /a"]);
        let same = b"POST /a HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\nGET /b HTTP/1.1\r\n\r\n";
        assert_eq!(labels(same), ["POST /a", "GET /b"]);
    }

    #[test]
    fn headers_cut_by_the_end_count_the_request_and_stop() {
        assert_eq!(labels(b"GET /a HTTP/1.1\r\nHost: exam"), ["GET /a"]);
        assert_eq!(labels(b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\nHo"), ["GET /a", "GET /b"]);
    }

    #[test]
    fn line_breaks_between_requests_are_passed_over() {
        assert_eq!(labels(b"\r\nGET /a HTTP/1.1\r\n\r\n\r\nGET /b HTTP/1.1\r\n\r\n"), ["GET /a", "GET /b"]);
    }

    #[test]
    fn bare_line_feeds_end_lines() {
        assert_eq!(labels(b"GET /a HTTP/1.1\nHost: x\n\nGET /b HTTP/1.1\n\n"), ["GET /a", "GET /b"]);
        assert_eq!(head_end(b"GET /a HTTP/1.1\n\n", 0), Some(17));
        assert_eq!(head_end(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", 0), Some(28));
        assert_eq!(head_end(b"GET /a HTTP/1.1\r\nHost: x\r\n\r", 0), None);
    }

    #[test]
    fn a_cut_target_counts_with_its_complete_segments() {
        assert_eq!(labels(b"GET /api/users/12"), ["GET /api/users/…"]);
        assert_eq!(labels(b"GET /api/42/item"), ["GET /api/{id}/…"]);
        assert_eq!(labels(b"GET /produ"), ["GET /…"]);
        assert_eq!(labels(b"GET /"), ["GET /…"]);
        assert_eq!(labels(b"GET http://example.com:80/users/1"), ["GET /users/…"]);
        assert_eq!(labels(b"GET http://exam"), ["GET /…"]);
        // The query string began: the path is whole.
        assert_eq!(labels(b"GET /api/users/12?page=3&si"), ["GET /api/users/{id}"]);
        // A cut path is not matched against the patterns: its end is unknown.
        assert_eq!(labels_with(b"GET /products/4", &routes(&["/products/{id}"])), ["GET /products/…"]);
    }

    #[test]
    fn a_method_without_a_target_is_no_request() {
        assert!(labels(b"GET ").is_empty());
        assert!(labels(b"GE").is_empty());
        assert!(labels(b"").is_empty());
    }

    #[test]
    fn garbage_after_a_request_ends_the_walk() {
        assert_eq!(labels(b"GET /a HTTP/1.1\r\n\r\n\x00\x01GET /b HTTP/1.1\r\n\r\n"), ["GET /a"]);
    }

    #[test]
    fn hostile_targets_stay_within_the_request_line() {
        // An escape sequence is part of the target (the label is sanitized later).
        assert_eq!(labels(b"GET /a\x1b[31mred HTTP/1.1\r\n\r\n"), ["GET /a\x1b[31mred"]);
        assert_eq!(labels(b"GET /a\"b HTTP/1.1\r\n\r\n"), ["GET /a\"b"]);
        assert_eq!(labels(b"GET /a%00b HTTP/1.1\r\n\r\n"), ["GET /a%00b"]);
        // A raw LF ends the request line; what follows it is a (bad) header line.
        assert_eq!(labels(b"GET /a\nb HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\n\r\n"), ["GET /a", "GET /c"]);
        assert_eq!(labels(b"GET /a\rb HTTP/1.1\r\n\r\n"), ["GET /a"]);
    }

    #[test]
    fn statuses_of_responses() {
        assert_eq!(statuses(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"), [200]);
        assert_eq!(statuses(b"HTTP/1.0 404 Not Found\r\n"), [404]);
        assert_eq!(statuses(b"HTTP/1.1 503\r\n\r\n"), [503]);
        assert_eq!(statuses(b"HTTP/1.1 500 "), [500]);
    }

    #[test]
    fn a_cut_status_line_has_no_status() {
        for cut in [&b"HTTP/1.1 20"[..], b"HTTP/1.1 200", b"HTTP/1.", b"HTTP/1.1", b"HT", b""] {
            assert!(statuses(cut).is_empty(), "{cut:?}");
        }
        assert!(statuses(b"HTTP/1.1 2000 OK\r\n").is_empty());
        assert!(statuses(b"HTTP/2 200 OK\r\n").is_empty());
        assert!(statuses(b"HTTP/1.1 abc OK\r\n").is_empty());
    }

    #[test]
    fn pipelined_responses_are_walked_while_they_fit() {
        let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok\
                      HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\nHTTP/1.1 500 E\r\n";
        assert_eq!(statuses(bytes), [200, 404, 500]);
    }

    #[test]
    fn the_walk_stops_at_a_body_it_cannot_follow() {
        let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nHTTP/1.1 201 OK\r\n\r\n";
        assert_eq!(statuses(chunked), [200]);
        let beyond = b"HTTP/1.1 200 OK\r\nContent-Length: 500\r\n\r\nHello";
        assert_eq!(statuses(beyond), [200]);
    }

    #[test]
    fn bodyless_responses_are_followed_at_once() {
        let bytes = b"HTTP/1.1 204 No Content\r\n\r\n\
                      HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\nHTTP/1.1 200 OK\r\n\r\n";
        assert_eq!(statuses(bytes), [204, 304, 200]);
        let head = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\nHTTP/1.1 404 Not Found\r\n\r\n";
        assert_eq!(statuses(head), [200, 404]);
    }

    #[test]
    fn interim_responses_are_passed_over() {
        assert_eq!(statuses(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\n\r\n"), [201]);
        assert_eq!(statuses(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x05hello"), [101]);
    }
}
