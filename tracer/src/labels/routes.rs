//! HTTP paths reduced to routes: a `--route` pattern when one matches, otherwise the
//! path with its identifier-like segments folded into `{id}`, so that `/products/42`
//! and `/products/43` count as one route and the label set stays small.
//!
//! Matching goes segment by segment: a literal segment compares byte for byte (no
//! percent-decoding, no case folding), `{name}` takes exactly one non-empty segment.
//! One trailing slash is ignored on both sides (`/products/` matches `/products`, and
//! the pattern `/products/` matches `/products`): frameworks mostly route both to the
//! same handler, and a label per spelling would split one route in two. The first
//! matching pattern in the order given wins.

use anyhow::{bail, Result};

use super::MAX_LABEL;

/// The longest method a label carries, and the space after it.
const METHOD_ROOM: usize = 16 + 1;

/// The `--route PATTERN` list, e.g. `/products/{id}`, `/api/{version}/users/{id}`.
#[derive(Debug, Default, Clone)]
pub struct Routes {
    patterns: Vec<Pattern>,
}

#[derive(Debug, Clone)]
struct Pattern {
    text: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    Parameter,
}

impl Routes {
    /// The patterns, checked; the error names the pattern and what is wrong with it.
    pub fn parse(patterns: &[String]) -> Result<Routes> {
        let patterns = patterns.iter().map(|p| Pattern::parse(p)).collect::<Result<_>>()?;
        Ok(Routes { patterns })
    }

    /// The first pattern matching `path` (a path without query string).
    pub fn find(&self, path: &[u8]) -> Option<&str> {
        let segments: Vec<&[u8]> = segments(path).collect();
        self.patterns.iter().find(|p| p.matches(&segments)).map(|p| p.text.as_str())
    }
}

impl Pattern {
    fn parse(text: &str) -> Result<Pattern> {
        if !text.starts_with('/') {
            bail!("--route '{text}': a route starts with '/', as in /products/{{id}}");
        }
        if text.len() > MAX_LABEL - METHOD_ROOM {
            bail!("--route '{text}': longer than {} bytes", MAX_LABEL - METHOD_ROOM);
        }
        if let Some(c) = text.chars().find(|&c| !c.is_ascii_graphic() || "\"'`\\?#".contains(c)) {
            bail!("--route '{text}': {c:?} has no place in a route (no spaces, quotes, query string or fragment)");
        }
        let segments = segments(text.as_bytes()).map(|s| Segment::parse(text, s)).collect::<Result<_>>()?;
        Ok(Pattern { text: text.to_owned(), segments })
    }

    fn matches(&self, path: &[&[u8]]) -> bool {
        self.segments.len() == path.len()
            && self.segments.iter().zip(path).all(|(pattern, segment)| match pattern {
                Segment::Literal(literal) => literal.as_bytes() == *segment,
                Segment::Parameter => !segment.is_empty(),
            })
    }
}

impl Segment {
    fn parse(pattern: &str, segment: &[u8]) -> Result<Segment> {
        // The pattern was checked to be ASCII.
        let segment = std::str::from_utf8(segment).unwrap_or_default();
        if segment.is_empty() {
            bail!("--route '{pattern}': an empty segment ('//')");
        }
        if !segment.contains(['{', '}']) {
            return Ok(Segment::Literal(segment.to_owned()));
        }
        let name = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}'));
        match name {
            Some(name) if !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
                Ok(Segment::Parameter)
            }
            Some(_) if segment.matches(['{', '}']).count() == 2 => {
                bail!("--route '{pattern}': a parameter is named with letters, digits and '_', as in {{id}}")
            }
            _ => bail!(
                "--route '{pattern}': '{segment}' — braces must be balanced and a parameter takes a whole \
                 segment, as in /products/{{id}}"
            ),
        }
    }
}

/// The segments of a path after its leading slash, one trailing slash ignored: `/` has
/// none, `/a/b/` has `a` and `b`, `/a//b` has `a`, an empty one, and `b`.
fn segments(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    let path = path.strip_prefix(b"/").unwrap_or(path);
    let path = path.strip_suffix(b"/").unwrap_or(path);
    path.split(|&b| b == b'/').filter(move |_| !path.is_empty())
}

/// `path` with its identifier-like segments replaced by `{id}`, added to `out`; slashes,
/// empty segments and a trailing slash are kept as sent.
pub fn fold(out: &mut Vec<u8>, path: &[u8]) {
    for (i, segment) in path.split(|&b| b == b'/').enumerate() {
        if i > 0 {
            out.push(b'/');
        }
        out.extend_from_slice(if is_identifier(segment) { b"{id}" } else { segment });
    }
}

/// Whether a path segment looks like the identifier of one resource rather than a name
/// chosen by the application: a number, a UUID, a long hex string (a hash, an object id)
/// or a long token mixing letters and digits (base64, base64url, random ids).
fn is_identifier(segment: &[u8]) -> bool {
    let has_digit = segment.iter().any(u8::is_ascii_digit);
    let has_letter = segment.iter().any(u8::is_ascii_alphabetic);
    let all = |pred: fn(&u8) -> bool| segment.iter().all(pred);
    (!segment.is_empty() && all(u8::is_ascii_digit))
        || is_uuid(segment)
        || (segment.len() >= 12 && has_digit && all(u8::is_ascii_hexdigit))
        || (segment.len() >= 20 && has_digit && has_letter && all(is_token_byte))
}

fn is_token_byte(b: &u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'=' | b'+' | b'-')
}

/// 8-4-4-4-12 hex digits, any case.
fn is_uuid(segment: &[u8]) -> bool {
    segment.len() == 36
        && segment.iter().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => *b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(patterns: &[&str]) -> Routes {
        Routes::parse(&patterns.iter().map(|p| p.to_string()).collect::<Vec<_>>()).unwrap()
    }

    fn error(pattern: &str) -> String {
        format!("{:#}", Routes::parse(&[pattern.to_owned()]).unwrap_err())
    }

    fn folded(path: &str) -> String {
        let mut out = Vec::new();
        fold(&mut out, path.as_bytes());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn numbers_are_folded() {
        assert_eq!(folded("/products/42"), "/products/{id}");
        assert_eq!(folded("/users/7/orders/1234"), "/users/{id}/orders/{id}");
    }

    #[test]
    fn names_chosen_by_the_application_stay() {
        for path in ["/productTypes", "/api/v2/users", "/static/app.js", "/deadbeefcafe", "/abc123", "/"] {
            assert_eq!(folded(path), path);
        }
    }

    #[test]
    fn uuids_in_any_case_are_folded() {
        assert_eq!(folded("/orders/123e4567-e89b-12d3-a456-426614174000"), "/orders/{id}");
        assert_eq!(folded("/orders/123E4567-E89B-12D3-A456-426614174000/items"), "/orders/{id}/items");
        // A hyphen out of place is no UUID (the token rule still folds such a segment).
        assert!(!is_uuid(b"123e4567e-89b-12d3-a456-42661417400"));
        assert!(!is_uuid(b"123e4567-e89b-12d3-a456-42661417400g"));
    }

    #[test]
    fn long_hex_with_a_digit_is_folded() {
        assert_eq!(folded("/commits/9fceb02d0ae5"), "/commits/{id}");
        assert_eq!(folded("/blobs/5f2b9c0e1d3a4b6c7d8e9f00"), "/blobs/{id}");
        // Eleven characters: too short to tell from a word.
        assert_eq!(folded("/x/9fceb02d0ae"), "/x/9fceb02d0ae");
    }

    #[test]
    fn long_tokens_mixing_letters_and_digits_are_folded() {
        assert_eq!(folded("/share/aGVsbG8gd29ybGQ9PQ=="), "/share/{id}");
        assert_eq!(folded("/t/Zx9_kq-2LmT8vB0wYt4rN"), "/t/{id}");
        // Letters only, however long: a name.
        assert_eq!(folded("/docs/getting_started_with_tracing"), "/docs/getting_started_with_tracing");
    }

    #[test]
    fn slashes_and_empty_segments_are_kept_as_sent() {
        assert_eq!(folded("/a//42/"), "/a//{id}/");
    }

    #[test]
    fn patterns_match_segment_by_segment() {
        let r = routes(&["/products/{id}", "/api/{version}/users/{id}"]);
        assert_eq!(r.find(b"/products/42"), Some("/products/{id}"));
        assert_eq!(r.find(b"/products/best-sellers"), Some("/products/{id}"));
        assert_eq!(r.find(b"/api/v2/users/alice"), Some("/api/{version}/users/{id}"));
        assert_eq!(r.find(b"/products"), None);
        assert_eq!(r.find(b"/products/42/reviews"), None);
        assert_eq!(r.find(b"/api/v2/groups/alice"), None);
    }

    #[test]
    fn literals_compare_exactly() {
        let r = routes(&["/Products/{id}"]);
        assert_eq!(r.find(b"/products/42"), None);
        assert_eq!(r.find(b"/Products/42"), Some("/Products/{id}"));
        assert_eq!(r.find(b"/Product%73/42"), None);
    }

    #[test]
    fn a_parameter_needs_a_non_empty_segment() {
        let r = routes(&["/products/{id}/reviews"]);
        assert_eq!(r.find(b"/products//reviews"), None);
    }

    #[test]
    fn one_trailing_slash_is_ignored_on_both_sides() {
        let r = routes(&["/products/{id}", "/cart/"]);
        assert_eq!(r.find(b"/products/42/"), Some("/products/{id}"));
        assert_eq!(r.find(b"/cart"), Some("/cart/"));
        assert_eq!(r.find(b"/cart/"), Some("/cart/"));
        assert_eq!(r.find(b"/products/42//"), None);
    }

    #[test]
    fn the_root_matches_only_the_root() {
        let r = routes(&["/"]);
        assert_eq!(r.find(b"/"), Some("/"));
        assert_eq!(r.find(b"/a"), None);
    }

    #[test]
    fn the_first_matching_pattern_wins() {
        let r = routes(&["/products/new", "/products/{id}"]);
        assert_eq!(r.find(b"/products/new"), Some("/products/new"));
        assert_eq!(r.find(b"/products/7"), Some("/products/{id}"));
    }

    #[test]
    fn no_routes_match_nothing() {
        assert_eq!(Routes::default().find(b"/products/42"), None);
        assert_eq!(routes(&[]).find(b"/"), None);
    }

    #[test]
    fn bad_patterns_are_refused_with_a_reason() {
        assert!(error("products/{id}").contains("starts with '/'"), "{}", error("products/{id}"));
        assert!(error("").contains("starts with '/'"));
        assert!(error("/products/{id").contains("braces must be balanced"));
        assert!(error("/products/id}").contains("braces must be balanced"));
        assert!(error("/products/{{id}}").contains("braces must be balanced"));
        assert!(error("/products/item-{id}").contains("whole segment"));
        assert!(error("/products/{}").contains("named with letters"));
        assert!(error("/products/{a-b}").contains("named with letters"));
        assert!(error("/a//b").contains("empty segment"));
        assert!(error("/a b").contains("no spaces"));
        assert!(error("/a?b=1").contains("query string"));
        assert!(error("/a\"b").contains("quotes"));
        assert!(error("/é").contains("no place"));
        assert!(error(&format!("/{}", "a".repeat(100))).contains("longer than"));
    }

    #[test]
    fn the_error_names_the_flag_and_the_pattern() {
        assert!(error("x").starts_with("--route 'x':"));
    }
}
