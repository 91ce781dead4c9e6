//! Reports: the same snapshot of the statistics rendered as text or JSON.

pub mod json;
pub mod text;

use crate::{stats::Stats, timeline::ClosedConnection};

/// Why a report is printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    Interval,
    Final,
}

impl ReportKind {
    pub fn name(self) -> &'static str {
        match self {
            ReportKind::Interval => "interval",
            ReportKind::Final => "final",
        }
    }
}

pub struct Snapshot<'a> {
    pub kind: ReportKind,
    pub stats: &'a Stats,
    /// Seconds covered by the report.
    pub elapsed_s: f64,
}

/// One output format.
pub trait Format {
    fn connection(&self, conn: &ClosedConnection) -> String;
    fn report(&self, snapshot: &Snapshot<'_>) -> String;
}

/// Human-readable duration with three significant digits: `850ns`, `12.3µs`, `1.50ms`, `2.00s`.
pub fn duration(ns: u64) -> String {
    let (value, unit) = match ns {
        0..1_000 => return format!("{ns}ns"),
        1_000..1_000_000 => (ns as f64 / 1e3, "µs"),
        1_000_000..1_000_000_000 => (ns as f64 / 1e6, "ms"),
        _ => (ns as f64 / 1e9, "s"),
    };
    if value >= 100.0 {
        format!("{value:.0}{unit}")
    } else if value >= 10.0 {
        format!("{value:.1}{unit}")
    } else {
        format!("{value:.2}{unit}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_keep_three_digits() {
        assert_eq!(duration(0), "0ns");
        assert_eq!(duration(999), "999ns");
        assert_eq!(duration(12_345), "12.3µs");
        assert_eq!(duration(1_500_000), "1.50ms");
        assert_eq!(duration(300_000_000), "300ms");
        assert_eq!(duration(2_000_000_000), "2.00s");
    }
}
