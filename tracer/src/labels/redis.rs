//! Redis's RESP (2 and 3): a request is a command, labelled by its name uppercased
//! (`SET`, `HGETALL`; the first word is enough for CLIENT, CONFIG and the like); a
//! response counts its error replies.
//!
//! Commands come as arrays of bulk strings (`*3\r\n$3\r\nSET\r\n...`) or, from a person
//! at a terminal, as inline lines (`PING\r\n`). Pipelined commands are walked one after
//! the other; a command cut by the end of the bytes counts once its name was read, and
//! anything malformed ends the walk. Only the name is read: keys and values are passed
//! over by their lengths.

use super::Responses;

/// The longest command name taken as such.
const MAX_NAME: usize = 32;
/// Bounds on the lengths a well-behaved peer sends (Redis's own limits:
/// proto-max-bulk-len 512 MB, and far fewer than 2^31 elements).
const MAX_BULK: usize = 512 << 20;
const MAX_ELEMENTS: usize = 1 << 31;
/// How deep replies nest before the walk gives up.
const MAX_DEPTH: usize = 32;

/// How the walk over one command went.
enum Step {
    /// A command, and where the next one starts.
    Next(Vec<u8>, usize),
    /// A command whose end lies beyond the bytes (or is malformed): the walk stops.
    Last(Vec<u8>),
    /// No command: the walk stops.
    Stop,
}

/// Whether `first` starts like a Redis command: an array whose first element is a bulk
/// string, or an inline command made of letters alone (`PING\r\n`).
pub fn detect(first: &[u8]) -> bool {
    is_array_start(first) || is_inline_word(first)
}

fn is_array_start(first: &[u8]) -> bool {
    let Some((header, next)) = line(first, 0) else { return false };
    let elements = header.strip_prefix(b"*").and_then(|n| count(n, MAX_ELEMENTS));
    let bulk = line(first, next).and_then(|(header, _)| count(header.strip_prefix(b"$")?, MAX_BULK));
    elements.is_some_and(|n| n > 0) && bulk.is_some()
}

fn is_inline_word(first: &[u8]) -> bool {
    line(first, 0).is_some_and(|(text, _)| (1..=16).contains(&text.len()) && text.iter().all(u8::is_ascii_alphabetic))
}

/// The labels of the commands that begin in `bytes`.
pub fn requests(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut labels = Vec::new();
    let mut pos = 0;
    loop {
        while bytes.get(pos).is_some_and(|b| matches!(b, b'\r' | b'\n')) {
            pos += 1;
        }
        let step = match bytes.get(pos) {
            Some(b'*') => array_command(bytes, pos),
            Some(b) if b.is_ascii_alphabetic() => inline_command(bytes, pos),
            _ => Step::Stop,
        };
        match step {
            Step::Next(label, next) => {
                labels.push(label);
                pos = next;
            }
            Step::Last(label) => {
                labels.push(label);
                break;
            }
            Step::Stop => break,
        }
    }
    labels
}

/// `*N\r\n` then N bulk strings, the first one the command's name.
fn array_command(bytes: &[u8], pos: usize) -> Step {
    let Some((header, mut pos)) = line(bytes, pos) else { return Step::Stop };
    let Some(elements) = header.strip_prefix(b"*").and_then(|n| count(n, MAX_ELEMENTS)).filter(|&n| n > 0) else {
        return Step::Stop;
    };
    let label = match bulk(bytes, pos) {
        Bulk::Whole(name, next) => {
            pos = next;
            name_label(name)
        }
        Bulk::Unended(name) => return Step::Last(name_label(name)),
        Bulk::Cut => return Step::Stop,
    };
    for _ in 1..elements {
        match bulk(bytes, pos) {
            Bulk::Whole(_, next) => pos = next,
            _ => return Step::Last(label),
        }
    }
    Step::Next(label, pos)
}

/// A bulk string: `$L\r\n`, L bytes, `\r\n`.
enum Bulk<'a> {
    /// Its bytes, and where what follows starts.
    Whole(&'a [u8], usize),
    /// Its bytes, whose `\r\n` lies beyond the end.
    Unended(&'a [u8]),
    /// Cut before the end of its bytes, or malformed.
    Cut,
}

fn bulk(bytes: &[u8], pos: usize) -> Bulk<'_> {
    let Some((length, start)) =
        line(bytes, pos).and_then(|(h, start)| Some((count(h.strip_prefix(b"$")?, MAX_BULK)?, start)))
    else {
        return Bulk::Cut;
    };
    let end = start + length;
    match (bytes.get(start..end), bytes.get(end..end + 2)) {
        (Some(value), Some(b"\r\n")) => Bulk::Whole(value, end + 2),
        (Some(value), None) if bytes[end..] == b"\r\n"[..bytes.len() - end] => Bulk::Unended(value),
        _ => Bulk::Cut,
    }
}

/// A command typed as a line of words; its name counts once a space or the line's end
/// follows it.
fn inline_command(bytes: &[u8], pos: usize) -> Step {
    let rest = &bytes[pos..];
    let name_end = rest.iter().position(|&b| matches!(b, b' ' | b'\t' | b'\r' | b'\n'));
    let Some(name_end) = name_end else { return Step::Stop };
    let label = name_label(&rest[..name_end]);
    match rest.iter().position(|&b| b == b'\n') {
        Some(lf) => Step::Next(label, pos + lf + 1),
        None => Step::Last(label),
    }
}

/// The command's name uppercased, or `?` when it is no plausible name.
fn name_label(name: &[u8]) -> Vec<u8> {
    let plausible = |b: &u8| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'|');
    if (1..=MAX_NAME).contains(&name.len()) && name.iter().all(plausible) {
        name.to_ascii_uppercase()
    } else {
        b"?".to_vec()
    }
}

/// The error replies among the top-level replies in `bytes`: simple errors (`-ERR ...`)
/// and blob errors (`!21\r\n...`). An error nested in an array (a failed command inside
/// EXEC's reply) belongs to a reply that itself succeeded and is not counted.
pub fn responses(bytes: &[u8]) -> Responses {
    let mut out = Responses::default();
    // Elements still expected by each aggregate being walked, outermost first.
    let mut open: Vec<usize> = Vec::new();
    let mut pos = 0;
    while let Some(&kind) = bytes.get(pos) {
        if open.is_empty() && matches!(kind, b'-' | b'!') {
            out.errors += 1;
        }
        let Some((elements, next)) = reply(bytes, pos) else { break };
        pos = next;
        if elements > 0 {
            if open.len() == MAX_DEPTH {
                break;
            }
            open.push(elements);
            continue;
        }
        // A complete value completes the aggregates it was the last element of.
        while let Some(remaining) = open.last_mut() {
            *remaining -= 1;
            if *remaining > 0 {
                break;
            }
            open.pop();
        }
    }
    out
}

/// The reply whose type byte is at `pos`: how many elements follow it (an aggregate) or
/// 0 (a complete value), and where what follows starts. None when it is cut or unknown.
fn reply(bytes: &[u8], pos: usize) -> Option<(usize, usize)> {
    let (header, next) = line(bytes, pos)?;
    let (&kind, value) = header.split_first()?;
    match kind {
        // Simple string and error, integer, null, double, boolean, big number.
        b'+' | b'-' | b':' | b'_' | b',' | b'#' | b'(' => Some((0, next)),
        // Bulk string, blob error, verbatim string.
        b'$' | b'!' | b'=' if value == b"-1" => Some((0, next)),
        b'$' | b'!' | b'=' => {
            let end = next + count(value, MAX_BULK)?;
            bytes.get(end..end + 2).filter(|crlf| *crlf == b"\r\n").map(|_| (0, end + 2))
        }
        // Array, set, push; map and attribute hold pairs.
        b'*' | b'~' | b'>' | b'%' | b'|' if value == b"-1" => Some((0, next)),
        b'*' | b'~' | b'>' => Some((count(value, MAX_ELEMENTS)?, next)),
        b'%' | b'|' => Some((count(value, MAX_ELEMENTS / 2)? * 2, next)),
        _ => None,
    }
}

/// The line from `pos` to its `\r\n`, and where the next one starts.
fn line(bytes: &[u8], pos: usize) -> Option<(&[u8], usize)> {
    let rest = bytes.get(pos..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..end], pos + end + 2))
}

/// A decimal count of at most `max`: digits only, no sign.
fn count(digits: &[u8], max: usize) -> Option<usize> {
    if digits.is_empty() || digits.len() > 10 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0usize, |n, d| n * 10 + usize::from(d - b'0'));
    (n <= max).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(bytes: &[u8]) -> Vec<String> {
        requests(bytes).into_iter().map(|l| String::from_utf8(l).unwrap()).collect()
    }

    /// A command as clients send it.
    fn command(words: &[&str]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", words.len()).into_bytes();
        for word in words {
            out.extend_from_slice(format!("${}\r\n{word}\r\n", word.len()).as_bytes());
        }
        out
    }

    fn errors(bytes: &[u8]) -> u32 {
        responses(bytes).errors
    }

    const BENCHMARK_SET: &[u8] = b"*3\r\n$3\r\nSET\r\n$16\r\nkey:__rand_int__\r\n$3\r\nxxx\r\n";

    #[test]
    fn detects_arrays_and_inline_commands() {
        assert!(detect(BENCHMARK_SET));
        assert!(detect(b"*1\r\n$4\r\nPING\r\n"));
        assert!(detect(b"*2\r\n$3\r\nGET\r\n$1\r"));
        assert!(detect(b"PING\r\n"));
        assert!(detect(b"quit\r\n"));
    }

    #[test]
    fn refuses_other_first_bytes() {
        assert!(!detect(b"*3\r\n"));
        assert!(!detect(b"*0\r\n$3\r\n"));
        assert!(!detect(b"*x\r\n$3\r\n"));
        assert!(!detect(b"*3\r\n:3\r\n"));
        assert!(!detect(b"GET key\r\n"));
        assert!(!detect(b"PING"));
        assert!(!detect(b"\r\n"));
        assert!(!detect(b"GET / HTTP/1.1\r\n"));
    }

    #[test]
    fn the_label_is_the_command_name_uppercased() {
        assert_eq!(labels(&command(&["get", "user:42"])), ["GET"]);
        assert_eq!(labels(&command(&["CLIENT", "SETNAME", "x"])), ["CLIENT"]);
        assert_eq!(labels(&command(&["FT.SEARCH", "idx", "*"])), ["FT.SEARCH"]);
        assert_eq!(labels(&command(&["acl|cat"])), ["ACL|CAT"]);
    }

    #[test]
    fn implausible_names_are_unknown() {
        assert_eq!(labels(&command(&["GET\x1b[31m", "k"])), ["?"]);
        assert_eq!(labels(&command(&["a b"])), ["?"]);
        assert_eq!(labels(&command(&[&"X".repeat(33)])), ["?"]);
        assert_eq!(labels(&command(&[""])), ["?"]);
        assert_eq!(labels(&command(&["é"])), ["?"]);
    }

    #[test]
    fn sixteen_pipelined_sets_from_redis_benchmark() {
        let bytes = BENCHMARK_SET.repeat(16);
        assert_eq!(bytes.len(), 720);
        assert_eq!(labels(&bytes), vec!["SET"; 16]);
    }

    #[test]
    fn a_pipeline_cut_by_the_capture_counts_the_commands_whose_name_was_read() {
        let bytes = BENCHMARK_SET.repeat(30);
        // 22 whole commands and the 23rd's name within 1024 bytes (45 bytes each).
        assert_eq!(labels(&bytes[..1024]), vec!["SET"; 23]);
        // Cut inside the name: not counted.
        assert_eq!(labels(&bytes[..45 + 10]), ["SET"]);
        // The name's bytes are all there (its length says so), its CRLF not yet.
        assert_eq!(labels(&bytes[..45 + 11]), ["SET", "SET"]);
        assert_eq!(labels(&bytes[..45 + 12]), ["SET", "SET"]);
        assert_eq!(labels(&bytes[..45 + 13]), ["SET", "SET"]);
    }

    #[test]
    fn a_mixed_pipeline() {
        let bytes = [command(&["MULTI"]), command(&["INCR", "c"]), command(&["EXPIRE", "c", "60"]), command(&["EXEC"])];
        assert_eq!(labels(&bytes.concat()), ["MULTI", "INCR", "EXPIRE", "EXEC"]);
    }

    #[test]
    fn inline_commands() {
        assert_eq!(labels(b"PING\r\n"), ["PING"]);
        assert_eq!(labels(b"set k v\r\nget k\r\n"), ["SET", "GET"]);
        assert_eq!(labels(b"PING\r\n*1\r\n$4\r\nPING\r\n"), ["PING", "PING"]);
        assert_eq!(labels(b"get some-long-k"), ["GET"]);
        assert!(labels(b"PIN").is_empty());
    }

    #[test]
    fn malformed_bytes_end_the_walk() {
        let good = command(&["GET", "k"]);
        assert_eq!(labels(&[good.clone(), b"\x00junk".to_vec(), good.clone()].concat()), ["GET"]);
        assert_eq!(labels(&[good.clone(), b"*2\r\n:1\r\n".to_vec()].concat()), ["GET"]);
        // A bulk string whose bytes do not end where its length says.
        assert_eq!(labels(b"*2\r\n$3\r\nGETX\r\n$1\r\nk\r\n"), Vec::<String>::new());
        assert_eq!(labels(b"*2\r\n$3\r\nGET\r\n$1\r\nkk\r\n*1\r\n$4\r\nPING\r\n"), ["GET"]);
        assert!(labels(b"*-1\r\n").is_empty());
        assert!(labels(b"*99999999999\r\n$3\r\nGET\r\n").is_empty());
    }

    #[test]
    fn errors_are_counted_among_top_level_replies() {
        assert_eq!(errors(b"+OK\r\n"), 0);
        assert_eq!(errors(b"-ERR unknown command\r\n"), 1);
        assert_eq!(errors(b"+OK\r\n-WRONGTYPE Operation\r\n:1\r\n-ERR x\r\n$-1\r\n"), 2);
        assert_eq!(errors(b"!21\r\nSYNTAX invalid syntax\r\n-ERR\r\n"), 2);
        assert_eq!(errors(&b"+OK\r\n".repeat(16)), 0);
    }

    #[test]
    fn nested_errors_are_not_counted_and_aggregates_are_walked() {
        // EXEC's reply with one failed command, then a top-level error.
        let bytes = b"*3\r\n+OK\r\n-ERR inside\r\n*2\r\n:1\r\n$3\r\nabc\r\n-ERR top\r\n";
        assert_eq!(errors(bytes), 1);
        let resp3 =
            b"%2\r\n+a\r\n:1\r\n+b\r\n~1\r\n#t\r\n_\r\n,1.5\r\n(123\r\n=7\r\ntxt:abc\r\n>2\r\n+x\r\n+y\r\n-ERR z\r\n";
        assert_eq!(errors(resp3), 1);
        assert_eq!(errors(b"*0\r\n-ERR\r\n"), 1);
        assert_eq!(errors(b"*-1\r\n-ERR\r\n"), 1);
    }

    #[test]
    fn a_cut_error_still_counts() {
        assert_eq!(errors(b"+OK\r\n-ERR unknown comm"), 1);
        assert_eq!(errors(b"!21\r\nSYNTAX"), 1);
        assert_eq!(errors(b"$10\r\n-ERR not an error"), 0);
    }

    #[test]
    fn garbage_ends_the_walk() {
        assert_eq!(errors(b"\x00-ERR\r\n"), 0);
        assert_eq!(errors(b"+OK\r\n?\r\n-ERR\r\n"), 0);
        assert_eq!(errors(b"$3\r\nabcd\r\n-ERR\r\n"), 0);
        let deep = [b"*1\r\n".repeat(40), b"-ERR\r\n".to_vec()].concat();
        assert_eq!(errors(&deep), 0);
    }

    #[test]
    fn garbage_never_panics() {
        let mut state = 0xDEAD_BEEF_CAFE_F00Du64;
        let alphabet = b"*$+-:!%~>|_,#(=0123\r\n\r\nx";
        for round in 0..3000 {
            let len = round % 70;
            let bytes = crate::labels::garbage(&mut state, alphabet, len);
            requests(&bytes);
            responses(&bytes);
        }
    }
}
