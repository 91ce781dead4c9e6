//! Untrusted bytes made printable: whoever sends a request chooses the bytes of its
//! label, and the label ends up in a terminal, a JSON string, a log line and a
//! Prometheus label value.
//!
//! Every character that could steer one of those is replaced by `?` (one byte, so the
//! shape of the original stays visible: `/a"b` reads `/a?b`): invalid UTF-8, C0 and C1
//! controls and DEL (terminal escapes, line breaks), Unicode format and bidi controls
//! (text that displays in another order than it reads, invisible characters), the line
//! and paragraph separators, and the quotes and backslash that end or escape a string.
//! The result is then bounded, on a character boundary, ending in `…` when cut.

/// Marks a cut: of a label too long for its bound, of a path or a statement whose end
/// was not captured.
pub const CUT: char = '…';

/// What replaces a byte or a character that is not safe to print.
const REPLACEMENT: char = '?';

/// Makes untrusted bytes safe for a terminal, a JSON string, a log line or a Prometheus
/// label value, bounded to `max` bytes.
pub fn sanitize(raw: Vec<u8>, max: usize) -> String {
    // The usual label, printable ASCII with nothing to replace and within the bound,
    // keeps its allocation.
    if raw.len() <= max && raw.iter().all(|&b| is_safe_ascii(b)) {
        return String::from_utf8(raw).expect("printable ASCII is UTF-8");
    }
    replaced(&raw, max)
}

/// [`sanitize`]'s general case: unsafe characters replaced, then bounded.
fn replaced(raw: &[u8], max: usize) -> String {
    let mut out = String::with_capacity(raw.len().min(max));
    for chunk in raw.utf8_chunks() {
        out.extend(chunk.valid().chars().map(|c| if is_safe(c) { c } else { REPLACEMENT }));
        if !chunk.invalid().is_empty() {
            out.push(REPLACEMENT);
        }
        // Enough to know that it will be cut; the rest is not looked at.
        if out.len() > max {
            break;
        }
    }
    bound(out, max)
}

/// Whether `c` prints as itself without steering what displays or parses it.
fn is_safe(c: char) -> bool {
    !(c.is_control() || is_invisible_format(c) || is_quote(c))
}

/// The quotes and the backslash, which end or escape a string.
#[inline]
fn is_quote(c: char) -> bool {
    matches!(c, '"' | '\\' | '\'' | '`')
}

/// Whether byte `b` is ASCII that prints as itself: [`is_safe`] for ASCII, where the
/// controls are C0 and DEL and no format character lies (a test holds the two equal on
/// every byte). Asked of every byte of every label: a few compares, inlined.
#[inline]
fn is_safe_ascii(b: u8) -> bool {
    b.is_ascii() && !b.is_ascii_control() && !is_quote(b as char)
}

/// Unicode format characters (category Cf), the bidi controls among them, and the line
/// and paragraph separators: invisible, or reorder or break what displays around them.
fn is_invisible_format(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}'
        | '\u{200B}'..='\u{200F}'
        | '\u{2028}'..='\u{202E}'
        | '\u{2060}'..='\u{206F}'
        | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}'
        | '\u{FFF0}'..='\u{FFFB}'
        | '\u{0600}'..='\u{0605}' | '\u{06DD}' | '\u{070F}' | '\u{08E2}' | '\u{110BD}' | '\u{110CD}'
        | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}'
        | '\u{E0000}'..='\u{E0FFF}')
}

/// `s` cut to at most `max` bytes on a character boundary, ending in `…` when cut (the
/// mark counts in the bound; a bound too small for it gets no mark).
fn bound(mut s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let room = max.checked_sub(CUT.len_utf8());
    let keep = floor_char_boundary(&s, room.unwrap_or(max));
    s.truncate(keep);
    if room.is_some() {
        s.push(CUT);
    }
    s
}

/// The largest character boundary of `s` at or below `index`.
fn floor_char_boundary(s: &str, index: usize) -> usize {
    (0..=index.min(s.len())).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sanitize(raw: &[u8], max: usize) -> String {
        super::sanitize(raw.to_vec(), max)
    }

    /// What every sanitized string must be, whatever went in.
    fn assert_safe(s: &str, max: usize) {
        assert!(s.len() <= max, "{s:?} is longer than {max}");
        assert!(s.bytes().all(|b| b >= 0x20 && b != 0x7f), "{s:?} has a control byte");
        assert!(s.chars().all(|c| c == CUT || is_safe(c)), "{s:?} has an unsafe character");
    }

    /// A small deterministic generator (xorshift64): garbage without a crate.
    struct Garbage(u64);

    impl Garbage {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn bytes(&mut self, len: usize) -> Vec<u8> {
            (0..len).map(|_| self.next() as u8).collect()
        }
    }

    #[test]
    fn printable_text_passes_unchanged() {
        assert_eq!(sanitize(b"GET /products/{id}", 96), "GET /products/{id}");
        assert_eq!(sanitize("SELECT Ünïcödé 商品".as_bytes(), 96), "SELECT Ünïcödé 商品");
        assert_eq!(sanitize(b"%00%1b", 96), "%00%1b");
    }

    #[test]
    fn the_ascii_test_is_the_character_test() {
        for b in 0..=255u8 {
            assert_eq!(is_safe_ascii(b), b.is_ascii() && is_safe(b as char), "byte {b:#04x}");
        }
    }

    #[test]
    fn every_byte_value_alone_is_safe() {
        for b in 0..=255u8 {
            let s = sanitize(&[b], 96);
            assert_safe(&s, 96);
            let expected = if (0x20..0x7f).contains(&b) && !b"\"\\'`".contains(&b) { b as char } else { '?' };
            assert_eq!(s, expected.to_string(), "byte {b:#04x}");
        }
    }

    #[test]
    fn all_bytes_at_once_are_safe() {
        let all: Vec<u8> = (0..=255u8).collect();
        assert_safe(&sanitize(&all, 1024), 1024);
        assert_safe(&sanitize(&all, 96), 96);
    }

    #[test]
    fn random_garbage_is_safe_at_every_bound() {
        let mut garbage = Garbage(0x9E37_79B9_7F4A_7C15);
        for round in 0..2000 {
            let raw = garbage.bytes(round % 300);
            let max = (garbage.next() % 130) as usize;
            assert_safe(&sanitize(&raw, max), max);
        }
    }

    #[test]
    fn random_utf8_with_controls_is_safe() {
        // Characters from everywhere in Unicode, C1 and bidi controls included.
        let mut garbage = Garbage(42);
        for _ in 0..500 {
            let text: String = (0..40).filter_map(|_| char::from_u32((garbage.next() % 0x11_0000) as u32)).collect();
            assert_safe(&sanitize(text.as_bytes(), 96), 96);
        }
    }

    #[test]
    fn terminal_escapes_and_line_breaks_are_replaced() {
        assert_eq!(sanitize(b"/a\x1b[31mred", 96), "/a?[31mred");
        assert_eq!(sanitize(b"/a\nb\r\tc\0", 96), "/a?b??c?");
        assert_eq!(sanitize("/a\u{85}b\u{9b}c".as_bytes(), 96), "/a?b?c");
    }

    #[test]
    fn quotes_and_backslash_are_replaced() {
        assert_eq!(sanitize(b"/a\"b'c`d\\e", 96), "/a?b?c?d?e");
    }

    #[test]
    fn bidi_and_invisible_characters_are_replaced() {
        for c in ['\u{202E}', '\u{200B}', '\u{2066}', '\u{2067}', '\u{2068}', '\u{2069}', '\u{FEFF}', '\u{2028}'] {
            assert_eq!(sanitize(format!("/a{c}b").as_bytes(), 96), "/a?b", "U+{:04X}", c as u32);
        }
    }

    #[test]
    fn invalid_utf8_becomes_one_replacement_per_bad_sequence() {
        assert_eq!(sanitize(b"/a\xffb", 96), "/a?b");
        assert_eq!(sanitize(b"/a\xc3", 96), "/a?");
        assert_eq!(sanitize(b"/\xe2\x82x", 96), "/?x");
    }

    #[test]
    fn long_input_is_cut_on_a_char_boundary_with_a_mark() {
        let long = "é".repeat(100);
        let s = sanitize(long.as_bytes(), 96);
        assert_safe(&s, 96);
        assert!(s.ends_with(CUT));
        // 93 bytes of room: 46 two-byte characters.
        assert_eq!(s, format!("{}{CUT}", "é".repeat(46)));
        assert_eq!(sanitize(&[b'a'; 10_000], 96).len(), 96);
    }

    #[test]
    fn exact_fit_is_not_cut() {
        assert_eq!(sanitize(b"abcd", 4), "abcd");
        assert_eq!(sanitize(b"abcde", 4), "a…");
    }

    #[test]
    fn bounds_too_small_for_the_mark_cut_without_it() {
        assert_eq!(sanitize(b"abcde", 2), "ab");
        assert_eq!(sanitize(b"abcde", 0), "");
        assert_eq!(sanitize("éé".as_bytes(), 2), "é");
        assert_eq!(sanitize("éé".as_bytes(), 3), "…");
    }
}
