//! Publish and ack rates for Stats, from samples of the topics' cumulative counters.
//!
//! The replicated state keeps only cumulative counts (`QueueCounters`), which every replica
//! agrees on; a rate needs two of them some time apart, and that is local bookkeeping of the
//! owner, not replicated state. The owner samples the topics it owns every [`SAMPLE_EVERY`] (and
//! at each Stats call), keeps [`WINDOW`] of samples, and reports the increase since the oldest
//! sample in the window divided by the time between them. When it has no sample that old (a
//! young topic, or a node that just became the owner) the rate is over the shorter span it
//! has: since the topic's creation if that is inside the window, otherwise since its first sample.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The span a rate is averaged over (queue.proto: "over the last 60 seconds").
pub const WINDOW: Duration = Duration::from_secs(60);
/// How often the owner samples its topics in the background.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Samples closer than this to the previous one are not kept (Stats calls in a tight loop).
const MIN_SPACING: Duration = Duration::from_secs(1);

/// Cumulative counts of one topic at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    /// When it was taken (this node's clock).
    pub at: Instant,
    /// Messages published so far.
    pub published: u64,
    /// Messages acknowledged so far.
    pub acked: u64,
}

/// Per-second rates.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Rates {
    /// Messages published per second.
    pub publish: f64,
    /// Messages acknowledged per second.
    pub ack: f64,
}

/// The samples of every topic this node owned lately.
#[derive(Default)]
pub struct RateTracker {
    /// Samples per topic, oldest first, none older than [`WINDOW`] before the newest but one
    /// (so a sample from the window's start is kept as the base).
    samples: Mutex<HashMap<String, VecDeque<Sample>>>,
}

impl RateTracker {
    /// Records a sample of `topic`.
    pub fn observe(&self, topic: &str, sample: Sample) {
        let mut all = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let list = all.entry(topic.to_string()).or_default();
        if list
            .back()
            .is_some_and(|last| sample.at.saturating_duration_since(last.at) < MIN_SPACING)
        {
            return;
        }
        // A topic deleted and created again starts from zero: its old samples mean nothing.
        if list
            .back()
            .is_some_and(|last| sample.published < last.published || sample.acked < last.acked)
        {
            list.clear();
        }
        list.push_back(sample);
        // Keep the newest sample at or before the window's start as the base.
        while list.len() > 2 && list[1].at + WINDOW <= sample.at {
            list.pop_front();
        }
    }

    /// Forgets every topic not in `keep` (topics deleted or now owned elsewhere).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        let mut all = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        all.retain(|topic, _| keep(topic));
    }

    /// The rates of `topic` now, given its current counts and its age (None if unknown); see
    /// the module docs for the span they cover.
    pub fn rates(&self, topic: &str, now: Sample, age: Option<Duration>) -> Rates {
        let all = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = all.get(topic).and_then(|l| {
            l.iter()
                .find(|s| now.at.saturating_duration_since(s.at) <= WINDOW)
                .or(l.back())
        });
        // A topic younger than the window: everything happened since its creation.
        let (span, base) = match (age, oldest) {
            (Some(age), _) if age <= WINDOW => (age, (0, 0)),
            (_, Some(s)) => (
                now.at.saturating_duration_since(s.at),
                (s.published, s.acked),
            ),
            _ => return Rates::default(),
        };
        let secs = span.as_secs_f64();
        if secs < 0.001 {
            return Rates::default();
        }
        Rates {
            publish: now.published.saturating_sub(base.0) as f64 / secs,
            ack: now.acked.saturating_sub(base.1) as f64 / secs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(at: Instant, published: u64, acked: u64) -> Sample {
        Sample {
            at,
            published,
            acked,
        }
    }

    #[test]
    fn a_young_topic_is_measured_since_its_creation() {
        let t = RateTracker::default();
        let now = Instant::now();
        let r = t.rates("t", sample(now, 100, 50), Some(Duration::from_secs(10)));
        assert_eq!(
            r,
            Rates {
                publish: 10.0,
                ack: 5.0
            }
        );
    }

    #[test]
    fn an_old_topic_is_measured_over_the_window_from_its_samples() {
        let t = RateTracker::default();
        let start = Instant::now();
        let old = Some(Duration::from_secs(3600));
        // Nothing known yet: no rate rather than a made-up one.
        assert_eq!(t.rates("t", sample(start, 5, 5), old), Rates::default());
        for i in 0..=30u64 {
            // 10 publishes and 2 acks per second, sampled every 5 s for 150 s.
            let s = start + Duration::from_secs(i * 5);
            t.observe("t", sample(s, 1_000 + i * 50, i * 10));
        }
        let now = start + Duration::from_secs(152);
        let r = t.rates("t", sample(now, 1_000 + 1_520, 304), old);
        assert!((r.publish - 10.0).abs() < 0.5, "{r:?}");
        assert!((r.ack - 2.0).abs() < 0.2, "{r:?}");
        let kept = t.samples.lock().unwrap()["t"].len();
        assert!(kept <= 14, "{kept} samples kept for a 60 s window at 5 s");
    }

    #[test]
    fn samples_in_a_tight_loop_and_recreated_topics_do_not_skew_rates() {
        let t = RateTracker::default();
        let start = Instant::now();
        t.observe("t", sample(start, 100, 0));
        t.observe("t", sample(start + Duration::from_millis(10), 101, 0));
        assert_eq!(t.samples.lock().unwrap()["t"].len(), 1);
        // Counters went down: the topic was deleted and created again.
        t.observe("t", sample(start + Duration::from_secs(2), 3, 0));
        assert_eq!(t.samples.lock().unwrap()["t"].len(), 1);
        t.retain(|topic| topic != "t");
        assert!(t.samples.lock().unwrap().is_empty());
    }
}
