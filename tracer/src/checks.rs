//! Budget checks for CI: `--check 'think.p99<50ms'`, evaluated on the final report.
//!
//! Grammar: `SUBJECT OP VALUE`, where SUBJECT is `PHASE.STAT` or `COUNTER`, either
//! optionally scoped with `[...]` right after the name: a listening port (`think[:8080]`
//! or `think[8080]`) or an upstream peer (`upstream[10.0.0.5:5432]`). OP is one of
//! `<`, `<=`, `>`, `>=`, `==`, `!=`. VALUE is a duration (`50ms`, `1.5s`) for phase
//! statistics and a number for counters and `count`. Without a scope a phase merges all
//! listeners (server phases) or all peers (`connect`, `upstream`), and a counter sums
//! them.
//!
//! With `--labels`, a scope may also name a request label in double quotes, alone or
//! after the listener or peer: `think[:8080 "GET /products"].p99<50ms`,
//! `upstream[10.0.0.5:5432 "SELECT items"].p50<5ms`, `requests["GET /products"]>=10`.
//! Labelled scopes take the per-request phases (`recv_wait`, `think`, `send`,
//! `delivery`, `time` — their sum — and `upstream`) and the counters `requests`,
//! `aborted`, `bytes_in`, `bytes_out`, `errors`, `upstream_requests` and `unanswered`.

use std::{fmt, net::SocketAddr};

use anyhow::{bail, Context as _, Result};
use hdrhistogram::Histogram;

use crate::{
    cli::parse_duration,
    endpoints::{EndpointStats, Endpoints},
    report::duration,
    stats::{new_histogram, ListenerStats, PeerStats, Stats},
    timeline::Phase,
};

/// A phase statistic of `hist`, or why it cannot be judged.
fn judge(hist: &Histogram<u64>, name: &str, stat: &Stat, min_samples: u64) -> Result<f64, String> {
    if *stat == Stat::Count {
        return Ok(hist.len() as f64);
    }
    if hist.len() < min_samples {
        return Err(format!("only {} samples of {name} (--min-samples {min_samples}): too few to judge", hist.len()));
    }
    Ok(match stat {
        Stat::Count => unreachable!(),
        Stat::Mean => hist.mean(),
        Stat::Quantile(q) => hist.value_at_quantile(*q) as f64,
        Stat::Max => hist.max() as f64,
    })
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stat {
    Count,
    Mean,
    Quantile(f64),
    Max,
}

impl Stat {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "count" => Self::Count,
            "mean" => Self::Mean,
            "p50" => Self::Quantile(0.5),
            "p90" => Self::Quantile(0.9),
            "p99" => Self::Quantile(0.99),
            "p99.9" => Self::Quantile(0.999),
            "max" => Self::Max,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    fn holds(self, a: f64, b: f64) -> bool {
        match self {
            Op::Lt => a < b,
            Op::Le => a <= b,
            Op::Gt => a > b,
            Op::Ge => a >= b,
            Op::Eq => a == b,
            Op::Ne => a != b,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Scope {
    All,
    /// A port: its listeners in every network namespace, merged; or the one in the
    /// namespace given (`:8080@4026532301`, as the reports name it).
    Listener(u16, Option<u32>),
    Peer(SocketAddr),
}

impl Scope {
    fn listener_name(port: u16, netns: Option<u32>) -> String {
        match netns {
            Some(ns) => format!(":{port}@{ns}"),
            None => format!(":{port}"),
        }
    }
}

/// What a check measures.
#[derive(Debug, Clone, PartialEq)]
pub enum Subject {
    /// A server phase (`handshake` … `delivery`) or a client one (`connect`, `upstream`;
    /// `tls` scoped to a peer).
    Phase {
        name: String,
        scope: Scope,
        /// Only the requests with this label.
        label: Option<String>,
        stat: Stat,
    },
    Counter {
        name: String,
        scope: Scope,
        label: Option<String>,
    },
}

/// Phases a labelled scope has: the request's own, their sum, and the upstream wait.
const LABELLED_PHASES: [&str; 6] = ["recv_wait", "think", "send", "delivery", "time", "upstream"];
/// Counters a labelled scope has.
const LABELLED_COUNTERS: [&str; 7] =
    ["requests", "aborted", "bytes_in", "bytes_out", "errors", "upstream_requests", "unanswered"];

#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    pub text: String,
    pub subject: Subject,
    pub op: Op,
    /// Nanoseconds for durations, the number itself otherwise.
    pub limit: f64,
}

const CLIENT_PHASES: [&str; 2] = ["connect", "upstream"];
const LISTENER_COUNTERS: [&str; 10] = [
    "connections",
    "requests",
    "aborted",
    "closed_by_peer",
    "bytes_in",
    "bytes_out",
    "synack_retransmits",
    "listen_drops",
    "resets_sent",
    "resets_received",
];
const PEER_COUNTERS: [&str; 5] =
    ["upstream_requests", "syn_retransmits", "connect_failures", "unanswered", "unattributed"];
const GLOBAL_COUNTERS: [&str; 3] = ["lost_events", "untracked_connections", "missed_setups"];

fn is_server_phase(name: &str) -> bool {
    Phase::ALL.iter().any(|p| p.name() == name)
}

fn parse_scope(s: &str) -> Result<Scope> {
    let s = s.trim();
    if let Some(port) = s.strip_prefix(':') {
        let (port, netns) = match port.split_once('@') {
            Some((port, ns)) => (
                port,
                Some(ns.parse().with_context(|| {
                    format!("'{s}': after '@' comes a network namespace's inode number, like :8080@4026532301")
                })?),
            ),
            None => (port, None),
        };
        let port = port.parse().with_context(|| format!("'{s}' is not a listening port like :8080"))?;
        return Ok(Scope::Listener(port, netns));
    }
    if let Ok(port) = s.parse::<u16>() {
        return Ok(Scope::Listener(port, None));
    }
    s.parse::<SocketAddr>()
        .map(Scope::Peer)
        .with_context(|| format!("'{s}' is neither a listening port (:8080) nor a peer (10.0.0.5:5432, [::1]:80)"))
}

/// A scope's listener or peer, and its label in double quotes.
fn parse_labelled_scope(s: &str) -> Result<(Scope, Option<String>)> {
    let Some(open) = s.find('"') else { return Ok((parse_scope(s)?, None)) };
    let close = s.rfind('"').filter(|c| *c > open).context("a label in a scope needs its closing '\"'")?;
    if !s[close + 1..].trim().is_empty() {
        bail!("unexpected '{}' after the label", s[close + 1..].trim());
    }
    let label = s[open + 1..close].to_owned();
    if label.is_empty() {
        bail!("empty label in the scope");
    }
    let rest = s[..open].trim();
    let scope = if rest.is_empty() { Scope::All } else { parse_scope(rest)? };
    Ok((scope, Some(label)))
}

/// `NAME` or `NAME[SCOPE]`, and what follows.
fn split_scope(s: &str) -> Result<(&str, Scope, Option<String>, &str)> {
    match s.find('[') {
        None => Ok((s, Scope::All, None, "")),
        Some(open) => {
            // Matching bracket: an IPv6 peer brings its own ([[::1]:80]).
            let mut depth = 0;
            let mut quoted = false;
            let close = s[open..]
                .char_indices()
                .find(|&(_, c)| {
                    if c == '"' {
                        quoted = !quoted;
                    }
                    depth += match (c, quoted) {
                        ('[', false) => 1,
                        (']', false) => -1,
                        _ => 0,
                    };
                    depth == 0
                })
                .map(|(i, _)| open + i)
                .context("'[' without a closing ']'")?;
            let (scope, label) = parse_labelled_scope(&s[open + 1..close])?;
            Ok((&s[..open], scope, label, &s[close + 1..]))
        }
    }
}

pub fn parse(text: &str) -> Result<Check> {
    let context = || format!("in --check '{text}'");
    // The comparison comes after the scope, whose label may hold any character.
    let after_scope = text.rfind(']').map_or(0, |i| i + 1);
    let (at, op_len, op) = ["<=", ">=", "==", "!=", "<", ">"]
        .iter()
        .find_map(|op| text[after_scope..].find(op).map(|at| (after_scope + at, op.len(), *op)))
        .with_context(|| format!("no comparison (<, <=, >, >=, ==, !=) {}", context()))?;
    let op = match op {
        "<=" => Op::Le,
        ">=" => Op::Ge,
        "==" => Op::Eq,
        "!=" => Op::Ne,
        "<" => Op::Lt,
        _ => Op::Gt,
    };
    let (lhs, rhs) = (text[..at].trim(), text[at + op_len..].trim());
    if rhs.is_empty() {
        bail!("nothing to compare with after the operator {}", context());
    }
    let (name, scope, label, rest) = split_scope(lhs).with_context(context)?;
    let name = name.trim();
    let subject = if let Some(stat) = rest.strip_prefix('.').or_else(|| name.split_once('.').map(|(_, s)| s)) {
        let name = name.split_once('.').map_or(name, |(n, _)| n);
        if label.is_some() && !LABELLED_PHASES.contains(&name) {
            bail!("a labelled scope has the phases {} {}", LABELLED_PHASES.join(", "), context());
        }
        if !is_server_phase(name) && !CLIENT_PHASES.contains(&name) && label.is_none() {
            bail!(
                "unknown phase '{name}' {}: use handshake, accept_wait, tls, recv_wait, think, send, delivery, connect or upstream",
                context()
            );
        }
        let stat = Stat::parse(stat).with_context(|| {
            format!("unknown statistic '{stat}' {}: use count, mean, p50, p90, p99, p99.9 or max", context())
        })?;
        Subject::Phase { name: name.to_owned(), scope, label, stat }
    } else if !rest.trim().is_empty() {
        bail!("unexpected '{rest}' after the scope {}", context());
    } else if label.is_some() {
        if !LABELLED_COUNTERS.contains(&name) {
            bail!("a labelled scope has the counters {} {}", LABELLED_COUNTERS.join(", "), context());
        }
        Subject::Counter { name: name.to_owned(), scope, label }
    } else if LISTENER_COUNTERS.contains(&name) || PEER_COUNTERS.contains(&name) || GLOBAL_COUNTERS.contains(&name) {
        if GLOBAL_COUNTERS.contains(&name) && scope != Scope::All {
            bail!("{name} is not per listener or peer {}", context());
        }
        Subject::Counter { name: name.to_owned(), scope, label: None }
    } else if is_server_phase(name) || CLIENT_PHASES.contains(&name) {
        bail!("a phase needs a statistic, e.g. {name}.p99 {}", context());
    } else {
        bail!(
            "unknown counter '{name}' {}: use {}, {}, {}, or PHASE.STAT",
            context(),
            LISTENER_COUNTERS.join(", "),
            PEER_COUNTERS.join(", "),
            GLOBAL_COUNTERS.join(", ")
        );
    };
    let is_duration = matches!(subject, Subject::Phase { stat, .. } if stat != Stat::Count);
    let limit = if is_duration {
        parse_duration(rhs).with_context(context)?.as_nanos() as f64
    } else {
        rhs.parse::<f64>().with_context(|| format!("'{rhs}' is not a number {}", context()))?
    };
    Ok(Check { text: text.trim().to_owned(), subject, op, limit })
}

/// A check's result on a report.
#[derive(Debug, Clone, PartialEq)]
pub struct Verdict {
    pub check: String,
    pub passed: bool,
    /// The measured value (nanoseconds for phase statistics), when there is one.
    pub value: Option<f64>,
    pub is_duration: bool,
    /// Why it failed without a value, or the measured value in words.
    pub message: String,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", if self.passed { "PASS" } else { "FAIL" }, self.check, self.message)
    }
}

fn listeners<'a>(stats: &'a Stats, scope: &Scope) -> Result<Vec<&'a ListenerStats>, String> {
    match scope {
        Scope::All => Ok(stats.listeners.values().collect()),
        Scope::Listener(port, netns) => {
            let found: Vec<&ListenerStats> = stats
                .listeners_on(*port)
                .filter(|(id, _)| netns.is_none_or(|ns| ns == id.netns))
                .map(|(_, l)| l)
                .collect();
            if found.is_empty() {
                return Err(format!("no listener {} was traced", Scope::listener_name(*port, *netns)));
            }
            Ok(found)
        }
        Scope::Peer(p) => Err(format!("{p} is a peer; this check is per listener (use :PORT)")),
    }
}

fn peers<'a>(stats: &'a Stats, scope: &Scope) -> Result<Vec<&'a PeerStats>, String> {
    match scope {
        Scope::All => Ok(stats.peers.values().collect()),
        Scope::Peer(addr) => {
            stats.peers.get(addr).map(|p| vec![p]).ok_or_else(|| format!("no upstream peer {addr} was seen"))
        }
        Scope::Listener(port, netns) => Err(format!(
            "{} is a listener; this check is per upstream peer (use ADDR:PORT)",
            Scope::listener_name(*port, *netns)
        )),
    }
}

fn merged<'a>(hists: impl Iterator<Item = &'a Histogram<u64>>) -> Histogram<u64> {
    let mut out = new_histogram();
    for h in hists {
        out.add(h).expect("histograms share their bounds");
    }
    out
}

/// The endpoints labelled `label` in the listeners (or, for peer-side names, the peers)
/// of `scope`.
fn endpoints<'a>(
    stats: &'a Stats,
    scope: &Scope,
    label: &str,
    peer_side: bool,
) -> Result<Vec<&'a EndpointStats>, String> {
    let tables: Vec<&Endpoints> = if peer_side {
        peers(stats, scope)?.into_iter().map(|p| &p.endpoints).collect()
    } else {
        listeners(stats, scope)?.into_iter().map(|l| &l.endpoints).collect()
    };
    let found: Vec<&EndpointStats> = tables.into_iter().filter_map(|t| t.get(label)).collect();
    if found.is_empty() {
        let scope = match scope {
            Scope::All => String::new(),
            Scope::Listener(port, netns) => format!(" on {}", Scope::listener_name(*port, *netns)),
            Scope::Peer(peer) => format!(" to {peer}"),
        };
        return Err(format!("no request labelled \"{label}\" was seen{scope} (is --labels on?)"));
    }
    Ok(found)
}

fn measure(check: &Check, stats: &Stats, min_samples: u64) -> Result<f64, String> {
    match &check.subject {
        Subject::Phase { name, scope, stat, label } => {
            if let Some(why) = stats.unavailable.get(name.as_str()) {
                return Err(format!("{name} is unavailable on this kernel: {why}"));
            }
            if let Some(label) = label {
                let found = endpoints(stats, scope, label, name == "upstream")?;
                let hists: Vec<Histogram<u64>> =
                    found.iter().filter_map(|e| e.phase(name)).map(|s| s.to_histogram()).collect();
                return judge(&merged(hists.iter()), name, stat, min_samples);
            }
            // `tls` is both: a listener's handshakes, or (scoped to a peer) the upstream
            // connections' to that peer.
            let peer_tls = name == "tls" && matches!(scope, Scope::Peer(_));
            let hist = if is_server_phase(name) && !peer_tls {
                let phase = Phase::ALL.into_iter().find(|p| p.name() == name).expect("checked at parse");
                merged(listeners(stats, scope)?.into_iter().map(|l| &l.phases[&phase]))
            } else {
                merged(peers(stats, scope)?.into_iter().map(|p| match name.as_str() {
                    "connect" => &p.connect,
                    "tls" => &p.tls,
                    _ => &p.upstream,
                }))
            };
            judge(&hist, name, stat, min_samples)
        }
        Subject::Counter { name, scope, label: Some(label) } => {
            let peer_side =
                matches!(name.as_str(), "upstream_requests" | "unanswered") || matches!(scope, Scope::Peer(_));
            let found = endpoints(stats, scope, label, peer_side)?;
            Ok(found
                .iter()
                .map(|e| match name.as_str() {
                    "requests" | "upstream_requests" => e.requests,
                    "aborted" | "unanswered" => e.aborted,
                    "bytes_in" => e.bytes_in,
                    "bytes_out" => e.bytes_out,
                    _ => e.errors,
                })
                .sum::<u64>() as f64)
        }
        Subject::Counter { name, scope, label: None } => {
            let name = name.as_str();
            if let Some(i) = GLOBAL_COUNTERS.iter().position(|c| *c == name) {
                return Ok([stats.lost_events, stats.state_full, stats.missed_setups][i] as f64);
            }
            if LISTENER_COUNTERS.contains(&name) {
                let sum: u64 = listeners(stats, scope)?
                    .into_iter()
                    .map(|l| match name {
                        "connections" => l.connections,
                        "requests" => l.requests,
                        "aborted" => l.aborted,
                        "closed_by_peer" => l.closed_by_peer,
                        "bytes_in" => l.bytes_in,
                        "bytes_out" => l.bytes_out,
                        "synack_retransmits" => l.synack_retransmits,
                        "listen_drops" => l.listen_drops,
                        "resets_sent" => l.resets_sent,
                        _ => l.resets_received,
                    })
                    .sum();
                return Ok(sum as f64);
            }
            let sum: u64 = peers(stats, scope)?
                .into_iter()
                .map(|p| match name {
                    "upstream_requests" => p.requests,
                    "syn_retransmits" => p.syn_retransmits,
                    "connect_failures" => p.failures.values().sum(),
                    "unattributed" => p.unattributed,
                    _ => p.unanswered,
                })
                .sum();
            Ok(sum as f64)
        }
    }
}

pub fn evaluate(check: &Check, stats: &Stats, min_samples: u64) -> Verdict {
    let is_duration = matches!(check.subject, Subject::Phase { stat, .. } if stat != Stat::Count);
    let show = |v: f64| if is_duration { duration(v.round() as u64) } else { format!("{v}") };
    match measure(check, stats, min_samples) {
        Ok(value) => {
            let passed = check.op.holds(value, check.limit);
            Verdict {
                check: check.text.clone(),
                passed,
                value: Some(value),
                is_duration,
                message: format!("measured {}", show(value)),
            }
        }
        Err(message) => Verdict { check: check.text.clone(), passed: false, value: None, is_duration, message },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::listeners::ListenerId;

    fn stats_with_think(samples_ms: &[u64]) -> Stats {
        let mut stats = Stats::default();
        let l = stats.listener(ListenerId::new(8080, 0));
        for ms in samples_ms {
            l.phases[&Phase::Think].record(ms * 1_000_000).unwrap();
        }
        l.requests = samples_ms.len() as u64;
        stats
    }

    #[test]
    fn parses_the_documented_forms() {
        let c = parse("think.p99<50ms").unwrap();
        assert_eq!(
            c.subject,
            Subject::Phase { name: "think".into(), scope: Scope::All, label: None, stat: Stat::Quantile(0.99) }
        );
        assert_eq!((c.op, c.limit), (Op::Lt, 50e6));
        let c = parse("accept_wait.max <= 10ms").unwrap();
        assert_eq!((c.op, c.limit), (Op::Le, 10e6));
        let c = parse("upstream[127.0.0.1:5432].p50<5ms").unwrap();
        assert_eq!(
            c.subject,
            Subject::Phase {
                name: "upstream".into(),
                scope: Scope::Peer("127.0.0.1:5432".parse().unwrap()),
                label: None,
                stat: Stat::Quantile(0.5)
            }
        );
        let c = parse("think[:8080].p99.9<1s").unwrap();
        assert_eq!(
            c.subject,
            Subject::Phase {
                name: "think".into(),
                scope: Scope::Listener(8080, None),
                label: None,
                stat: Stat::Quantile(0.999)
            }
        );
        let c = parse("connect[[::1]:5432].max<1s").unwrap();
        assert_eq!(
            c.subject,
            Subject::Phase {
                name: "connect".into(),
                scope: Scope::Peer("[::1]:5432".parse().unwrap()),
                label: None,
                stat: Stat::Max
            }
        );
        assert_eq!(
            parse("listen_drops==0").unwrap().subject,
            Subject::Counter { name: "listen_drops".into(), scope: Scope::All, label: None }
        );
        assert_eq!(parse("requests[8080]>=100").unwrap().limit, 100.0);
        assert_eq!(parse("think.count>=20").unwrap().limit, 20.0);
    }

    #[test]
    fn tls_is_checked_per_listener_or_per_peer() {
        let mut stats = Stats::default();
        for _ in 0..10 {
            stats.listener(ListenerId::new(8443, 0)).phases[&Phase::Tls].record(3_000_000).unwrap();
        }
        let peer: SocketAddr = "10.0.0.5:443".parse().unwrap();
        for _ in 0..10 {
            stats.peers.entry(peer).or_default().tls.record(30_000_000).unwrap();
        }
        let judge = |text: &str| evaluate(&parse(text).unwrap(), &stats, 10).passed;
        assert!(judge("tls[:8443].p50<5ms"));
        assert!(judge("tls.p99<5ms"), "unscoped: the listeners'");
        assert!(!judge("tls[10.0.0.5:443].p50<5ms"));
        assert!(judge("tls[10.0.0.5:443].p50<40ms"));
    }

    #[test]
    fn a_port_scope_takes_every_namespace_and_a_qualified_one_takes_one() {
        let mut stats = Stats::default();
        for (netns, requests) in [(4026532301, 7), (4026532302, 5)] {
            stats.listener(ListenerId::new(8080, netns)).requests = requests;
        }
        let judge = |text: &str| evaluate(&parse(text).unwrap(), &stats, 1);
        assert!(judge("requests[:8080]==12").passed);
        assert!(judge("requests[:8080@4026532301]==7").passed);
        assert!(judge("requests[:8080@4026532302]==5").passed);
        let missing = judge("requests[:8080@1]>0");
        assert!(!missing.passed && missing.message.contains("no listener :8080@1"), "{missing}");
        assert!(parse("requests[:8080@net]>0")
            .map_err(|e| format!("{e:#}"))
            .unwrap_err()
            .contains("network namespace"));
    }

    #[test]
    fn rejects_malformed_checks_with_a_pointer_to_the_error() {
        for (text, says) in [
            ("think.p99", "no comparison"),
            ("think.p99<", "nothing to compare"),
            ("thunk.p99<5ms", "unknown phase 'thunk'"),
            ("think.p98<5ms", "unknown statistic 'p98'"),
            ("think.p99<fast", "not a duration"),
            ("think<5ms", "needs a statistic"),
            ("drops==0", "unknown counter 'drops'"),
            ("requests==many", "not a number"),
            ("think[:http].p99<5ms", "listening port"),
            ("lost_events[:80]==0", "not per listener"),
        ] {
            let err = format!("{:#}", parse(text).unwrap_err());
            assert!(err.contains(says), "{text}: {err}");
            assert!(err.contains(text), "{text}: the message should quote the check: {err}");
        }
    }

    #[test]
    fn verdicts_carry_the_measured_value() {
        let stats = stats_with_think(&[100; 20]);
        let fail = evaluate(&parse("think.p99<50ms").unwrap(), &stats, 10);
        assert!(!fail.passed);
        assert_eq!(fail.message, "measured 100ms");
        assert_eq!(fail.to_string(), "FAIL think.p99<50ms: measured 100ms");
        let pass = evaluate(&parse("think.p99<500ms").unwrap(), &stats, 10);
        assert!(pass.passed);
        assert!(evaluate(&parse("requests[:8080]==20").unwrap(), &stats, 10).passed);
        assert!(evaluate(&parse("lost_events==0").unwrap(), &stats, 10).passed);
    }

    #[test]
    fn too_few_samples_fail_instead_of_passing() {
        let stats = stats_with_think(&[1, 2]);
        let v = evaluate(&parse("think.p99<50ms").unwrap(), &stats, 10);
        assert!(!v.passed);
        assert!(v.message.contains("only 2 samples"), "{}", v.message);
        // An idle listener, and one never traced.
        let v = evaluate(&parse("recv_wait.max<1s").unwrap(), &stats, 1);
        assert!(!v.passed, "{v}");
        let v = evaluate(&parse("think[:9090].p50<1s").unwrap(), &stats, 1);
        assert!(!v.passed && v.message.contains("no listener :9090"), "{v}");
    }

    #[test]
    fn labels_scope_checks_in_double_quotes() {
        let c = parse(r#"think[:8080 "GET /products"].p99<50ms"#).unwrap();
        assert_eq!(
            c.subject,
            Subject::Phase {
                name: "think".into(),
                scope: Scope::Listener(8080, None),
                label: Some("GET /products".into()),
                stat: Stat::Quantile(0.99)
            }
        );
        // The label may hold what would otherwise end the scope or compare.
        let c = parse(r#"requests["GET /a]<b>"]>=10"#).unwrap();
        assert_eq!(
            c.subject,
            Subject::Counter { name: "requests".into(), scope: Scope::All, label: Some("GET /a]<b>".into()) }
        );
        assert_eq!((c.op, c.limit), (Op::Ge, 10.0));
        let c = parse(r#"upstream[127.0.0.1:5432 "SELECT items"].p50<5ms"#).unwrap();
        assert!(matches!(c.subject, Subject::Phase { scope: Scope::Peer(_), label: Some(_), .. }));
        assert!(parse(r#"time["GET /"].p50<5ms"#).is_ok());
        for bad in [
            r#"handshake["GET /"].p50<1ms"#,
            r#"listen_drops["GET /"]==0"#,
            r#"think[:80 "x].p50<1ms"#,
            r#"think[""].p50<1ms"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn labelled_checks_judge_that_endpoint_only() {
        let mut stats = Stats::default();
        let l = stats.listener(ListenerId::new(8080, 0));
        for (label, ms) in [("GET /products", 200u64), ("GET /productTypes", 2)] {
            let e = l.endpoints.entry(label, 10);
            for _ in 0..20 {
                e.requests += 1;
                e.think.record(ms * 1_000_000);
            }
        }
        let judge = |text: &str| evaluate(&parse(text).unwrap(), &stats, 10);
        assert!(!judge(r#"think[:8080 "GET /products"].p99<50ms"#).passed);
        let v = judge(r#"think[:8080 "GET /productTypes"].p99<50ms"#);
        assert!(v.passed, "{v}");
        assert_eq!(judge(r#"requests["GET /products"]==20"#).value, Some(20.0));
        let missing = judge(r#"think[:8080 "GET /nope"].p50<1s"#);
        assert!(!missing.passed && missing.message.contains("no request labelled"), "{missing}");
    }
}
