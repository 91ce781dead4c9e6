//! PostgreSQL's protocol v3: a request is a simple query (`Q`), or a run of extended
//! query messages (Parse, Bind, Describe, Execute, Close) up to the Sync or Flush after
//! which the client waits for the server. Its label is the SQL's kind and main table
//! (see `sql`): from the run's Parse, or for a run without one (a prepared statement
//! executed again) from what the statement's Parse said, remembered per connection.
//!
//! The session's own messages — StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest, password and SASL exchanges, Terminate — and COPY data are no
//! requests. A run whose end lies beyond the captured bytes counts at their end; when
//! the call carried no more than was captured, the rest of the run is awaited in the
//! next call and does not count again.

use std::collections::{HashMap, VecDeque};

use super::{sql, text::CUT, Responses};

/// Protocol codes of the messages a client may start a connection with (no type byte).
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// Protocol 3.x's major version, in a StartupMessage's high 16 bits.
const PROTOCOL_3: u32 = 3;

/// The largest message length taken as such: PostgreSQL refuses messages over 1 GB.
const MAX_MESSAGE: usize = 1 << 30;
/// The largest startup packet PostgreSQL accepts.
const MAX_STARTUP: usize = 10_000;

/// How many prepared statements' labels a connection remembers (pgbench -M prepared
/// uses a handful; ORMs a few hundred at most). The oldest is forgotten first.
const STATEMENTS: usize = 256;
/// The longest statement name kept as a key (PostgreSQL's own identifiers stop at 63).
const MAX_NAME: usize = 128;

/// Messages a client sends once the session has started.
const FRONTEND_TYPES: &[u8] = b"QPBDESHCpXFdcf";
/// Messages a server sends.
const BACKEND_TYPES: &[u8] = b"RKSZTDCEN123nstIGHWcdAVv";

/// A connection's state: the statements it prepared and the extended-query run in
/// progress.
#[derive(Debug, Default)]
pub struct Session {
    statements: Statements,
    run: Option<Run>,
}

/// Extended-query messages up to their Sync.
#[derive(Debug, Default)]
struct Run {
    label: Option<Vec<u8>>,
    /// Counted already (at the end of an earlier call's bytes).
    counted: bool,
}

/// One message as far as the bytes hold it.
struct Message<'a> {
    kind: u8,
    body: &'a [u8],
    /// Whether all of it is in the bytes.
    whole: bool,
}

/// Whether `first` is how a client starts a PostgreSQL connection.
pub fn detect(first: &[u8]) -> bool {
    untyped_length(first).is_some()
}

impl Session {
    /// The labels of the requests in `bytes`; `whole` is false when the call carried more.
    pub fn requests(&mut self, bytes: &[u8], whole: bool) -> Vec<Vec<u8>> {
        let mut labels = Vec::new();
        let mut pos = 0;
        while let Some(length) = untyped_length(&bytes[pos..]) {
            pos = pos.saturating_add(length).min(bytes.len());
        }
        let mut cut = false;
        while let Some(message) = message(&bytes[pos..], FRONTEND_TYPES) {
            self.apply(&message, &mut labels);
            if !message.whole {
                cut = true;
                break;
            }
            pos += 1 + 4 + message.body.len();
        }
        if let Some(run) = self.run.as_mut().filter(|run| !run.counted) {
            labels.push(run.label.clone().unwrap_or_else(|| b"?".to_vec()));
            run.counted = true;
        }
        // The rest of the run went by unseen in this call, or is cut mid-message.
        if !whole || cut {
            self.run = None;
        }
        labels
    }

    fn apply(&mut self, message: &Message, labels: &mut Vec<Vec<u8>>) {
        match message.kind {
            b'Q' => {
                self.end_run(labels);
                let (query, complete) = c_string(message.body);
                labels.push(sql::label(query, complete));
            }
            b'P' => self.parse(message.body),
            b'B' => self.bind(message.body),
            b'D' | b'E' => {
                self.run.get_or_insert_with(Run::default);
            }
            b'C' => self.close(message.body),
            b'S' | b'H' => self.end_run(labels),
            // Password and SASL, Terminate, function calls, COPY data.
            _ => {}
        }
    }

    /// Parse: statement name, query, parameter types.
    fn parse(&mut self, body: &[u8]) {
        let (name, name_whole) = c_string(body);
        let label = if name_whole {
            let (query, complete) = c_string(&body[name.len() + 1..]);
            let label = sql::label(query, complete);
            self.statements.insert(name, label.clone());
            label
        } else {
            CUT.to_string().into_bytes()
        };
        self.run.get_or_insert_with(Run::default).label.get_or_insert(label);
    }

    /// Bind: portal name, statement name, ... — a prepared statement executed again is
    /// labelled by what its Parse said.
    fn bind(&mut self, body: &[u8]) {
        let (portal, portal_whole) = c_string(body);
        let statement = portal_whole.then(|| c_string(&body[portal.len() + 1..]));
        let run = self.run.get_or_insert_with(Run::default);
        if run.label.is_none() {
            run.label = match statement {
                Some((name, true)) => self.statements.get(name).map(<[u8]>::to_vec),
                _ => Some(CUT.to_string().into_bytes()),
            };
        }
    }

    /// Close of a statement (`S`) or a portal (`P`): the statement's label is forgotten.
    fn close(&mut self, body: &[u8]) {
        self.run.get_or_insert_with(Run::default);
        if let Some((b'S', rest)) = body.split_first() {
            if let (name, true) = c_string(rest) {
                self.statements.remove(name);
            }
        }
    }

    /// A Sync or Flush, or a simple query, ends the run in progress: it is one request.
    fn end_run(&mut self, labels: &mut Vec<Vec<u8>>) {
        if let Some(run) = self.run.take().filter(|run| !run.counted) {
            labels.push(run.label.unwrap_or_else(|| b"?".to_vec()));
        }
    }
}

/// ErrorResponse messages among the server messages in `bytes`.
pub fn responses(bytes: &[u8]) -> Responses {
    let mut out = Responses::default();
    let mut pos = 0;
    while let Some(message) = message(&bytes[pos..], BACKEND_TYPES) {
        if message.kind == b'E' {
            out.errors += 1;
        }
        if !message.whole {
            break;
        }
        pos += 1 + 4 + message.body.len();
    }
    out
}

/// The message at the start of `bytes`: a type byte of `types`, a length, and the body
/// as far as the bytes hold it. None when the header is cut or makes no sense.
fn message<'a>(bytes: &'a [u8], types: &[u8]) -> Option<Message<'a>> {
    let (&kind, rest) = bytes.split_first()?;
    let length = be_u32(rest)? as usize;
    if !types.contains(&kind) || !(4..=MAX_MESSAGE).contains(&length) {
        return None;
    }
    let body = &rest[4..];
    let body_length = length - 4;
    Some(Message { kind, body: &body[..body_length.min(body.len())], whole: body.len() >= body_length })
}

/// The length of the untyped message at the start of `bytes`, if they start with one:
/// StartupMessage (protocol 3.x), SSLRequest, GSSENCRequest or CancelRequest.
fn untyped_length(bytes: &[u8]) -> Option<usize> {
    let length = be_u32(bytes)? as usize;
    let code = be_u32(&bytes[4..])?;
    let known = code >> 16 == PROTOCOL_3 || matches!(code, SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST);
    (known && (8..=MAX_STARTUP).contains(&length)).then_some(length)
}

fn be_u32(bytes: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?))
}

/// The NUL-terminated string at the start of `bytes`, and whether its NUL is there.
fn c_string(bytes: &[u8]) -> (&[u8], bool) {
    match bytes.iter().position(|&b| b == 0) {
        Some(nul) => (&bytes[..nul], true),
        None => (bytes, false),
    }
}

/// Prepared statements' labels by name, the oldest forgotten past `STATEMENTS`.
#[derive(Debug, Default)]
struct Statements {
    labels: HashMap<Vec<u8>, Vec<u8>>,
    order: VecDeque<Vec<u8>>,
}

impl Statements {
    fn key(name: &[u8]) -> Vec<u8> {
        name[..name.len().min(MAX_NAME)].to_vec()
    }

    fn insert(&mut self, name: &[u8], label: Vec<u8>) {
        let key = Self::key(name);
        if self.labels.insert(key.clone(), label).is_none() {
            self.order.push_back(key);
        }
        while self.order.len() > STATEMENTS {
            if let Some(oldest) = self.order.pop_front() {
                self.labels.remove(&oldest);
            }
        }
    }

    fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.labels.get(&Self::key(name)).map(Vec::as_slice)
    }

    fn remove(&mut self, name: &[u8]) {
        let key = Self::key(name);
        if self.labels.remove(&key).is_some() {
            self.order.retain(|k| *k != key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A typed frontend or backend message.
    fn msg(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn query(sql: &str) -> Vec<u8> {
        msg(b'Q', &[sql.as_bytes(), b"\0"].concat())
    }

    fn parse(name: &str, sql: &str) -> Vec<u8> {
        msg(b'P', &[name.as_bytes(), b"\0", sql.as_bytes(), b"\0", &[0, 0]].concat())
    }

    fn bind(portal: &str, statement: &str) -> Vec<u8> {
        msg(b'B', &[portal.as_bytes(), b"\0", statement.as_bytes(), b"\0", &[0, 0, 0, 0, 0, 0]].concat())
    }

    fn describe_portal() -> Vec<u8> {
        msg(b'D', b"P\0")
    }

    fn execute() -> Vec<u8> {
        msg(b'E', b"\0\0\0\0\0")
    }

    fn sync() -> Vec<u8> {
        msg(b'S', b"")
    }

    fn startup() -> Vec<u8> {
        let body = [&196_608u32.to_be_bytes()[..], b"user\0bench\0database\0bench\0\0"].concat();
        [&(body.len() as u32 + 4).to_be_bytes()[..], &body].concat()
    }

    fn untyped(code: u32) -> Vec<u8> {
        [8u32.to_be_bytes(), code.to_be_bytes()].concat()
    }

    fn strings(labels: Vec<Vec<u8>>) -> Vec<String> {
        labels.into_iter().map(|l| String::from_utf8(l).unwrap()).collect()
    }

    fn requests(session: &mut Session, bytes: &[u8]) -> Vec<String> {
        strings(session.requests(bytes, true))
    }

    #[test]
    fn detects_how_clients_start() {
        assert!(detect(&startup()));
        assert!(detect(&untyped(SSL_REQUEST)));
        assert!(detect(&untyped(GSSENC_REQUEST)));
        assert!(detect(&[&16u32.to_be_bytes()[..], &CANCEL_REQUEST.to_be_bytes(), &[0; 8]].concat()));
        // Protocol 3.2 (PostgreSQL 18).
        assert!(detect(&[&8u32.to_be_bytes()[..], &0x0003_0002u32.to_be_bytes()].concat()));
    }

    #[test]
    fn refuses_other_first_bytes() {
        assert!(!detect(&[8, 0, 0, 0, 0, 3, 0, 0]));
        assert!(!detect(&[&8u32.to_be_bytes()[..], &0x0002_0000u32.to_be_bytes()].concat()));
        assert!(!detect(&[&4u32.to_be_bytes()[..], &SSL_REQUEST.to_be_bytes()].concat()));
        assert!(!detect(&untyped(SSL_REQUEST)[..7]));
        assert!(!detect(&query("SELECT 1")));
        assert!(!detect(b"GET / HTTP/1.1\r\n"));
    }

    #[test]
    fn session_messages_are_no_requests() {
        let mut s = Session::default();
        assert!(requests(&mut s, &untyped(SSL_REQUEST)).is_empty());
        assert!(requests(&mut s, &startup()).is_empty());
        assert!(requests(&mut s, &msg(b'p', b"SCRAM-SHA-256\0\0\0\0\x20n,,n=,r=abc")).is_empty());
        assert!(requests(&mut s, &msg(b'X', b"")).is_empty());
        assert!(requests(&mut s, &msg(b'd', b"1\t2\n")).is_empty());
        assert!(requests(&mut s, &msg(b'c', b"")).is_empty());
    }

    #[test]
    fn startup_then_query_in_one_call() {
        let bytes = [startup(), query("SELECT 1")].concat();
        assert_eq!(requests(&mut Session::default(), &bytes), ["SELECT"]);
    }

    #[test]
    fn one_request_per_simple_query() {
        let bytes = [query("SELECT abalance FROM pgbench_accounts WHERE aid = 123;"), query("BEGIN")].concat();
        assert_eq!(requests(&mut Session::default(), &bytes), ["SELECT pgbench_accounts", "BEGIN"]);
    }

    #[test]
    fn an_extended_run_is_one_request_labelled_by_its_parse() {
        let bytes =
            [parse("", "UPDATE accounts SET x = $1"), bind("", ""), describe_portal(), execute(), sync()].concat();
        assert_eq!(requests(&mut Session::default(), &bytes), ["UPDATE accounts"]);
    }

    #[test]
    fn pipelined_runs_each_count() {
        let run = |sql: &str| [parse("", sql), bind("", ""), execute(), sync()].concat();
        let bytes = [run("SELECT * FROM a"), run("INSERT INTO b VALUES (1)"), query("COMMIT")].concat();
        assert_eq!(requests(&mut Session::default(), &bytes), ["SELECT a", "INSERT b", "COMMIT"]);
    }

    #[test]
    fn prepared_statements_are_labelled_by_their_parse() {
        // pgbench -M prepared: Parse once (with a Describe and Sync), then Bind/Execute.
        let mut s = Session::default();
        let prepare =
            [parse("P0_1", "SELECT abalance FROM pgbench_accounts WHERE aid = $1;"), msg(b'D', b"SP0_1\0"), sync()];
        assert_eq!(requests(&mut s, &prepare.concat()), ["SELECT pgbench_accounts"]);
        for _ in 0..3 {
            let execute_again = [bind("", "P0_1"), describe_portal(), execute(), sync()].concat();
            assert_eq!(requests(&mut s, &execute_again), ["SELECT pgbench_accounts"]);
        }
    }

    #[test]
    fn the_unnamed_statement_is_remembered_too() {
        let mut s = Session::default();
        assert_eq!(requests(&mut s, &[parse("", "DELETE FROM sessions"), sync()].concat()), ["DELETE sessions"]);
        assert_eq!(requests(&mut s, &[bind("", ""), execute(), sync()].concat()), ["DELETE sessions"]);
        assert_eq!(requests(&mut s, &[parse("", "SELECT 1"), sync()].concat()), ["SELECT"]);
        assert_eq!(requests(&mut s, &[bind("", ""), execute(), sync()].concat()), ["SELECT"]);
    }

    #[test]
    fn an_unknown_statement_is_unknown() {
        let mut s = Session::default();
        assert_eq!(requests(&mut s, &[bind("", "S_7"), execute(), sync()].concat()), ["?"]);
    }

    #[test]
    fn a_closed_statement_is_forgotten() {
        let mut s = Session::default();
        requests(&mut s, &[parse("s1", "SELECT * FROM t"), sync()].concat());
        assert_eq!(requests(&mut s, &[msg(b'C', b"Ss1\0"), sync()].concat()), ["?"]);
        assert_eq!(requests(&mut s, &[bind("", "s1"), execute(), sync()].concat()), ["?"]);
    }

    #[test]
    fn the_oldest_statements_are_forgotten_past_the_bound() {
        let mut s = Session::default();
        for i in 0..STATEMENTS + 10 {
            requests(&mut s, &[parse(&format!("s{i}"), &format!("SELECT * FROM t{i}")), sync()].concat());
        }
        assert_eq!(s.statements.labels.len(), STATEMENTS);
        assert_eq!(s.statements.order.len(), STATEMENTS);
        assert_eq!(requests(&mut s, &[bind("", "s0"), execute(), sync()].concat()), ["?"]);
        let last = STATEMENTS + 9;
        assert_eq!(
            requests(&mut s, &[bind("", &format!("s{last}")), execute(), sync()].concat()),
            [format!("SELECT t{last}")]
        );
    }

    #[test]
    fn flush_ends_a_run_too() {
        let mut s = Session::default();
        let bytes = [parse("q", "SELECT * FROM t"), msg(b'D', b"Sq\0"), msg(b'H', b"")].concat();
        assert_eq!(requests(&mut s, &bytes), ["SELECT t"]);
        assert_eq!(requests(&mut s, &[bind("", "q"), execute(), sync()].concat()), ["SELECT t"]);
    }

    #[test]
    fn a_run_continued_in_the_next_call_counts_once() {
        let mut s = Session::default();
        assert_eq!(requests(&mut s, &[parse("", "INSERT INTO t VALUES ($1)"), bind("", "")].concat()), ["INSERT t"]);
        assert!(requests(&mut s, &[execute(), sync()].concat()).is_empty());
        assert_eq!(requests(&mut s, &query("SELECT 1")), ["SELECT"]);
    }

    #[test]
    fn a_run_cut_by_the_capture_counts_and_is_not_awaited() {
        let mut s = Session::default();
        let bytes = [parse("", "SELECT * FROM big"), bind("", "")].concat();
        assert_eq!(strings(s.requests(&bytes, false)), ["SELECT big"]);
        assert_eq!(requests(&mut s, &[bind("", ""), execute(), sync()].concat()), ["SELECT big"]);
    }

    #[test]
    fn a_cut_message_keeps_the_label_it_holds() {
        let bytes = query("SELECT abalance FROM pgbench_accounts WHERE aid = 123;");
        assert_eq!(strings(Session::default().requests(&bytes[..45], false)), ["SELECT pgbench_accounts"]);
        assert_eq!(strings(Session::default().requests(&bytes[..30], false)), ["SELECT …"]);
        assert_eq!(strings(Session::default().requests(&bytes[..5], false)), ["…"]);
        assert!(Session::default().requests(&bytes[..4], false).is_empty());
        let run = [parse("stmt", "UPDATE accounts SET x = 1"), bind("", "stmt")].concat();
        assert_eq!(strings(Session::default().requests(&run[..30], false)), ["UPDATE accounts"]);
        assert_eq!(strings(Session::default().requests(&run[..8], false)), ["…"]);
    }

    #[test]
    fn garbage_ends_the_walk() {
        let mut s = Session::default();
        let bytes = [query("SELECT 1"), b"\x00\x01junk".to_vec(), query("SELECT 2")].concat();
        assert_eq!(requests(&mut s, &bytes), ["SELECT"]);
        assert!(requests(&mut s, &msg(b'Q', b"x")[..3]).is_empty());
        assert!(requests(&mut s, &[b'Q', 0, 0, 0, 2]).is_empty());
        assert!(requests(&mut s, &[b'Q', 0x7f, 0xff, 0xff, 0xff]).is_empty());
    }

    #[test]
    fn errors_are_counted_among_server_messages() {
        let ready = msg(b'Z', b"I");
        let error = msg(b'E', b"SERROR\0C42P01\0Mrelation does not exist\0\0");
        let ok = [msg(b'1', b""), msg(b'2', b""), msg(b'C', b"SELECT 1\0"), ready.clone()].concat();
        assert_eq!(responses(&ok), Responses::default());
        assert_eq!(responses(&[error.clone(), ready.clone()].concat()).errors, 1);
        assert_eq!(responses(&[error.clone(), ready.clone(), error.clone(), ready].concat()).errors, 2);
    }

    #[test]
    fn a_cut_error_counts_once_its_header_is_there() {
        let error = msg(b'E', b"SERROR\0C42P01\0Mrelation does not exist\0\0");
        assert_eq!(responses(&error[..10]).errors, 1);
        assert_eq!(responses(&error[..5]).errors, 1);
        assert_eq!(responses(&error[..4]).errors, 0);
    }

    #[test]
    fn ssl_answers_and_garbage_are_no_errors() {
        assert_eq!(responses(b"N").errors, 0);
        assert_eq!(responses(b"S").errors, 0);
        assert_eq!(responses(b"\x16\x03\x03\x00\x7aE\x00\x00\x00\x08abcd").errors, 0);
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0x1234_5678_9ABC_DEF1u64;
        let mut s = Session::default();
        for round in 0..3000 {
            let len = round % 80;
            // Small lengths and type letters often enough to walk some messages.
            let bytes = crate::labels::garbage(&mut state, b"\0\0\0\x05\x08QPBSECD\xff", len);
            s.requests(&bytes, round % 2 == 0);
            responses(&bytes);
        }
    }
}
