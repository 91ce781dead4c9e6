//! Per-endpoint statistics (`--labels`): each listener and upstream peer keeps a table of
//! its request labels, bounded in size, with compact histograms.
//!
//! A listener's full histograms (HDR, 1 ns to 1 hour at three digits) take 256 KiB each;
//! two hundred endpoints with five of them would take a quarter of a gigabyte. An
//! endpoint's [`Sketch`] keeps only the powers of two its samples fell in, at 1/128
//! relative precision (under 0.8%): 512 bytes per power of two its samples fell in.

use std::{
    collections::HashSet,
    hash::{BuildHasher as _, RandomState},
};

use hashbrown::{hash_map::EntryRef, HashMap};

use hdrhistogram::Histogram;

use crate::stats::new_histogram;

/// Sub-buckets per power of two: the relative precision of a [`Sketch`].
const MANTISSA_BITS: u32 = 7;

/// A histogram that stores only the powers of two its samples fell in: each as 128
/// buckets (512 bytes), allocated when its first sample comes. Recording is an index,
/// with no search.
#[derive(Clone, Debug, Default)]
pub struct Sketch {
    /// Per power of two (the bucket index's high bits), its 128 buckets' counts.
    chunks: Vec<Option<Chunk>>,
    count: u64,
    sum: u128,
    max: u64,
}

const BUCKETS_PER_CHUNK: usize = 1 << MANTISSA_BITS;

/// The counts of one power of two: 32 bits each until one would overflow (four billion
/// samples in one bucket), then 64.
#[derive(Clone, Debug)]
enum Chunk {
    Narrow(Box<[u32; BUCKETS_PER_CHUNK]>),
    Wide(Box<[u64; BUCKETS_PER_CHUNK]>),
}

impl Chunk {
    fn add(&mut self, slot: usize) {
        match self {
            Chunk::Narrow(counts) => match counts[slot].checked_add(1) {
                Some(n) => counts[slot] = n,
                None => {
                    let mut wide = Box::new(std::array::from_fn(|i| counts[i] as u64));
                    wide[slot] += 1;
                    *self = Chunk::Wide(wide);
                }
            },
            Chunk::Wide(counts) => counts[slot] += 1,
        }
    }

    fn get(&self, slot: usize) -> u64 {
        match self {
            Chunk::Narrow(counts) => counts[slot] as u64,
            Chunk::Wide(counts) => counts[slot],
        }
    }
}

/// The bucket of `v`: values below 2^7 are their own bucket; above, 128 buckets per
/// power of two.
fn bucket(v: u64) -> u16 {
    let exp = 63 - v.max(1).leading_zeros();
    if exp < MANTISSA_BITS {
        return v as u16;
    }
    let mantissa = (v >> (exp - MANTISSA_BITS)) & ((1 << MANTISSA_BITS) - 1);
    (((exp - MANTISSA_BITS + 1) << MANTISSA_BITS) as u64 + mantissa) as u16
}

/// The highest value of bucket `i`.
fn bucket_top(i: u16) -> u64 {
    let i = i as u64;
    let per = 1u64 << MANTISSA_BITS;
    if i < per {
        return i;
    }
    let exp = (i >> MANTISSA_BITS) + MANTISSA_BITS as u64 - 1;
    let mantissa = i & (per - 1);
    let step = 1u64 << (exp - MANTISSA_BITS as u64);
    ((per + mantissa) << (exp - MANTISSA_BITS as u64)) + (step - 1)
}

impl Sketch {
    pub fn record(&mut self, v: u64) {
        let b = bucket(v) as usize;
        let (chunk, slot) = (b >> MANTISSA_BITS, b & (BUCKETS_PER_CHUNK - 1));
        if self.chunks.len() <= chunk {
            self.chunks.resize(chunk + 1, None);
        }
        self.chunks[chunk].get_or_insert_with(|| Chunk::Narrow(Box::new([0; BUCKETS_PER_CHUNK]))).add(slot);
        self.count += 1;
        self.sum += v as u128;
        self.max = self.max.max(v);
    }

    /// Every non-empty bucket (index, count), lowest first.
    fn buckets(&self) -> impl Iterator<Item = (u16, u64)> + '_ {
        self.chunks.iter().enumerate().filter_map(|(c, chunk)| Some((c, chunk.as_ref()?))).flat_map(|(c, counts)| {
            (0..BUCKETS_PER_CHUNK)
                .map(move |i| (i, counts.get(i)))
                .filter(|(_, n)| *n > 0)
                .map(move |(i, n)| ((c * BUCKETS_PER_CHUNK + i) as u16, n))
        })
    }

    /// Every non-empty bucket as (its highest value, never above the largest sample;
    /// its samples), lowest first: the samples to the bucket (within its 1/128).
    pub fn values(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.buckets().map(|(i, n)| (bucket_top(i).min(self.max), n))
    }

    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    pub fn mean(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            self.sum as f64 / self.count as f64
        }
    }

    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at quantile `q`: the top of the bucket holding that rank (never above
    /// the largest sample), as an HDR histogram answers.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q.clamp(0.0, 1.0) * self.count as f64).ceil() as u64).max(1);
        let mut seen = 0;
        for (i, n) in self.buckets() {
            seen += n;
            if seen >= rank {
                return bucket_top(i).min(self.max);
            }
        }
        self.max
    }

    /// Samples of at most `v` (to the bucket: within its 1/128).
    pub fn count_at_most(&self, v: u64) -> u64 {
        let last = bucket(v);
        self.buckets().take_while(|(i, _)| *i <= last).map(|(_, n)| n).sum()
    }

    /// The same samples in a full histogram (for checks, which judge histograms).
    pub fn to_histogram(&self) -> Histogram<u64> {
        let mut h = new_histogram();
        for (i, n) in self.buckets() {
            let _ = h.record_n(bucket_top(i).min(self.max).max(1), n);
        }
        h
    }
}

/// Status classes counted per endpoint: 1xx … 5xx.
pub const STATUS_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// One endpoint of a listener (its requests) or of an upstream peer (the traced
/// process's requests to it).
#[derive(Clone, Debug, Default)]
pub struct EndpointStats {
    /// Requests (pipelined ones each).
    pub requests: u64,
    /// Server side: requests aborted before any response. Peers: requests unanswered.
    pub aborted: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// HTTP responses per status class ([`STATUS_CLASSES`]).
    pub statuses: [u64; 5],
    /// Error responses: PostgreSQL's ErrorResponse, Redis error replies.
    pub errors: u64,
    /// Server side: the request's time in the server (recv_wait + think + send +
    /// delivery), and its phases.
    pub time: Sketch,
    pub recv_wait: Sketch,
    pub think: Sketch,
    pub send: Sketch,
    pub delivery: Sketch,
    /// Peers: the upstream wait.
    pub upstream: Sketch,
}

impl EndpointStats {
    pub fn count_status(&mut self, status: u16) {
        if (100..600).contains(&status) {
            self.statuses[status as usize / 100 - 1] += 1;
        }
    }

    /// The sketch of a phase by its report name.
    pub fn phase(&self, name: &str) -> Option<&Sketch> {
        Some(match name {
            "time" => &self.time,
            "recv_wait" => &self.recv_wait,
            "think" => &self.think,
            "send" => &self.send,
            "delivery" => &self.delivery,
            "upstream" => &self.upstream,
            _ => return None,
        })
    }

    /// Total time spent, for ranking endpoints.
    pub fn total_ns(&self) -> u128 {
        self.time.sum + self.upstream.sum
    }
}

/// The name of the endpoint that holds every label beyond the table's bound.
pub const OTHER: &str = "other";
/// Default bound on a table's labels (`--max-labels`).
pub const DEFAULT_MAX_LABELS: usize = 200;
/// Distinct folded labels remembered (by hash) to count them; beyond this the count
/// stops growing and is shown as a lower bound.
/// (64 Ki hashes, some 1 MiB per table at most: a scan of random paths must not grow
/// the tracer without end.)
pub const FOLDED_REMEMBERED: usize = 1 << 16;

/// A listener's or peer's endpoints: at most `max` labels, the rest folded into
/// [`OTHER`], whose distinct labels are counted.
#[derive(Clone, Debug, Default)]
pub struct Endpoints {
    labels: HashMap<String, EndpointStats>,
    other: Option<Box<EndpointStats>>,
    folded: HashSet<u64>,
    hasher: RandomState,
}

impl Endpoints {
    /// The stats of `label`, or of [`OTHER`] when the table already holds `max` labels.
    pub fn entry(&mut self, label: &str, max: usize) -> &mut EndpointStats {
        let full = self.labels.len() >= max;
        // (The label is copied only when it becomes a new entry.)
        match self.labels.entry_ref(label) {
            EntryRef::Occupied(e) => e.into_mut(),
            EntryRef::Vacant(e) if !full => e.insert(EndpointStats::default()),
            EntryRef::Vacant(_) => {
                if self.folded.len() < FOLDED_REMEMBERED {
                    self.folded.insert(self.hasher.hash_one(label));
                }
                self.other.get_or_insert_default()
            }
        }
    }

    /// The label as this table knows it: itself, or [`OTHER`] when folded.
    pub fn name_of<'a>(&self, label: &'a str) -> &'a str {
        if self.labels.contains_key(label) || self.labels.is_empty() {
            label
        } else if self.other.is_some() && self.folded.contains(&self.hasher.hash_one(label)) {
            OTHER
        } else {
            label
        }
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty() && self.other.is_none()
    }

    /// Distinct labels folded into [`OTHER`].
    pub fn folded(&self) -> usize {
        self.folded.len()
    }

    /// Every endpoint, most total time first, [`OTHER`] last.
    pub fn ranked(&self) -> Vec<(&str, &EndpointStats)> {
        let mut all: Vec<(&str, &EndpointStats)> = self.labels.iter().map(|(l, s)| (l.as_str(), s)).collect();
        all.sort_by(|a, b| {
            b.1.total_ns().cmp(&a.1.total_ns()).then(b.1.requests.cmp(&a.1.requests)).then(a.0.cmp(b.0))
        });
        all.extend(self.other.as_deref().map(|o| (OTHER, o)));
        all
    }

    pub fn get(&self, label: &str) -> Option<&EndpointStats> {
        if label == OTHER && !self.labels.contains_key(OTHER) {
            return self.other.as_deref();
        }
        self.labels.get(label)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_hold_their_values_within_one_percent() {
        for v in [0u64, 1, 5, 127, 128, 129, 1_000, 12_345, 999_999, 40_000_000, 3_600_000_000_000, u64::MAX / 3] {
            let top = bucket_top(bucket(v));
            assert!(top >= v, "{v}: top {top}");
            assert!((top - v) as f64 <= v as f64 / 128.0 + 1.0, "{v}: top {top}");
            if v > 0 {
                assert!(bucket(v) >= bucket(v - 1), "monotonic at {v}");
            }
        }
    }

    #[test]
    fn quantiles_match_the_samples() {
        let mut s = Sketch::default();
        for ms in 1..=100u64 {
            s.record(ms * 1_000_000);
        }
        assert_eq!(s.len(), 100);
        let p50 = s.quantile(0.5) as f64 / 1e6;
        assert!((p50 - 50.0).abs() < 0.5, "p50 {p50}");
        assert_eq!(s.max(), 100_000_000);
        assert_eq!(s.quantile(1.0), 100_000_000);
        assert!((s.mean() - 50.5e6).abs() < 1.0);
        let h = s.to_histogram();
        assert_eq!(h.len(), 100);
        assert!((h.value_at_quantile(0.5) as f64 / 1e6 - 50.0).abs() < 0.5);
    }

    #[test]
    fn a_sketch_stays_small() {
        let mut s = Sketch::default();
        // A thousand samples spread over a decade of values: five powers of two.
        for i in 0..1000u64 {
            s.record(1_000_000 + i * 9_000);
        }
        assert!(s.chunks.iter().flatten().count() <= 5, "{} chunks", s.chunks.iter().flatten().count());
        assert_eq!(s.buckets().map(|(_, n)| n).sum::<u64>(), 1000);
        // The extremes have their buckets.
        s.record(0);
        s.record(u64::MAX);
        assert_eq!((s.quantile(0.0), s.max()), (0, u64::MAX));
    }

    #[test]
    fn a_bucket_past_four_billion_samples_widens_its_chunk() {
        let mut s = Sketch::default();
        s.record(5_000);
        s.record(5_000);
        s.record(9_000);
        let (b, c) = ((bucket(5_000) as usize) >> MANTISSA_BITS, bucket(5_000) as usize % BUCKETS_PER_CHUNK);
        match s.chunks[b].as_mut() {
            Some(Chunk::Narrow(counts)) => counts[c] = u32::MAX - 1,
            other => panic!("a first chunk is narrow: {other:?}"),
        }
        s.record(5_000);
        assert!(matches!(s.chunks[b], Some(Chunk::Narrow(_))));
        s.record(5_000);
        assert!(matches!(s.chunks[b], Some(Chunk::Wide(_))));
        let counts: Vec<(u16, u64)> = s.buckets().collect();
        assert_eq!(counts, vec![(bucket(5_000), u32::MAX as u64 + 1), (bucket(9_000), 1)]);
    }

    #[test]
    fn labels_beyond_the_bound_fold_into_other() {
        let mut t = Endpoints::default();
        for i in 0..1000 {
            t.entry(&format!("GET /p{i}"), 10).requests += 1;
        }
        t.entry("GET /p3", 10).requests += 1;
        let ranked = t.ranked();
        assert_eq!(ranked.len(), 11);
        assert_eq!(ranked.last().unwrap().0, OTHER);
        assert_eq!(ranked.last().unwrap().1.requests, 990);
        assert_eq!(t.folded(), 990);
        assert_eq!(t.get("GET /p3").unwrap().requests, 2);
        assert_eq!(t.name_of("GET /p500"), OTHER);
        assert_eq!(t.name_of("GET /p3"), "GET /p3");
    }

    #[test]
    fn statuses_count_by_class() {
        let mut e = EndpointStats::default();
        for s in [200, 204, 301, 404, 404, 503, 99, 600] {
            e.count_status(s);
        }
        assert_eq!(e.statuses, [0, 2, 1, 2, 1]);
    }
}
