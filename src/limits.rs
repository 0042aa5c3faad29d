//! Limits that keep one workload, or a flood of connections, from hurting
//! everyone else: a cap on concurrent sessions, a per-identity token bucket
//! on role creation (sessions and `/v1/creds` alike, so nobody can flood the
//! catalog with roles), and one on the admin API's lease lookups for
//! identities that are not admins.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// A token bucket per identity: `burst` actions at once, refilled at
/// `rate` per second.
#[derive(Debug)]
pub struct RateLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Buckets kept before full ones are forgotten (a full bucket is the same
/// as no bucket).
const MAX_TRACKED: usize = 10_000;

impl RateLimiter {
    pub fn new(rate_per_second: f64, burst: u32) -> Self {
        RateLimiter {
            rate: rate_per_second,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    pub fn burst(&self) -> u32 {
        self.burst as u32
    }

    /// Take one token for `identity`; false if it has none left.
    pub fn try_take(&self, identity: &str) -> bool {
        self.try_take_at(identity, Instant::now())
    }

    fn try_take_at(&self, identity: &str, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() >= MAX_TRACKED {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| refill(*b, now, rate, burst).tokens < burst);
        }
        let bucket = buckets.entry(identity.to_owned()).or_insert(Bucket {
            tokens: self.burst,
            last: now,
        });
        *bucket = refill(*bucket, now, self.rate, self.burst);
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

fn refill(bucket: Bucket, now: Instant, rate: f64, burst: f64) -> Bucket {
    let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
    Bucket {
        tokens: (bucket.tokens + elapsed * rate).min(burst),
        last: now,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let limiter = RateLimiter::new(2.0, 3);
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.try_take_at("a", start));
        }
        assert!(!limiter.try_take_at("a", start));
        assert!(
            limiter.try_take_at("b", start),
            "identities are independent"
        );
        assert!(limiter.try_take_at("a", start + Duration::from_millis(500)));
        assert!(!limiter.try_take_at("a", start + Duration::from_millis(500)));
        assert!(limiter.try_take_at("a", start + Duration::from_secs(10)));
    }
}
