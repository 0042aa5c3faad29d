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

/// A cap on open connections where, at the cap, the oldest connection is
/// closed to make room for the new one (the admin API's policy: honest
/// clients make short requests; a flood of idle connections must not lock
/// an operator out, nor take every file descriptor).
#[derive(Debug)]
pub struct OpenConnections {
    cap: usize,
    /// Oldest first: each connection's id and the signal that closes it.
    open: Mutex<std::collections::VecDeque<(u64, std::sync::Arc<tokio::sync::Notify>)>>,
    next_id: std::sync::atomic::AtomicU64,
}

impl OpenConnections {
    pub fn new(cap: usize) -> Self {
        OpenConnections {
            cap: cap.max(1),
            open: Mutex::new(std::collections::VecDeque::new()),
            next_id: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Count a new connection in, closing the oldest if at the cap.
    pub fn admit(self: &std::sync::Arc<Self>) -> ConnectionSlot {
        let id = self
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let close = std::sync::Arc::new(tokio::sync::Notify::new());
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        while open.len() >= self.cap {
            if let Some((_, oldest)) = open.pop_front() {
                // notify_one stores a permit: works even before the
                // connection's task first waits.
                oldest.notify_one();
            }
        }
        open.push_back((id, close.clone()));
        ConnectionSlot {
            id,
            close,
            connections: self.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One connection's place under an [`OpenConnections`] cap.
#[derive(Debug)]
pub struct ConnectionSlot {
    id: u64,
    close: std::sync::Arc<tokio::sync::Notify>,
    connections: std::sync::Arc<OpenConnections>,
}

impl ConnectionSlot {
    /// Run the connection until it ends or is shed to make room.
    pub async fn run(self, connection: impl std::future::Future<Output = ()>) {
        tokio::select! {
            () = connection => {}
            () = self.close.notified() => {
                tracing::debug!("connection closed to make room for a newer one");
            }
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut open = self
            .connections
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        open.retain(|(id, _)| *id != self.id);
    }
}

/// How long an accept loop waits after a failed accept (typically out of
/// file descriptors, EMFILE): doubling from 10 ms to 1 s, so the loop
/// neither spins nor stays deaf for long once descriptors are free again.
#[derive(Debug)]
pub struct AcceptBackoff {
    next: std::time::Duration,
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        AcceptBackoff { next: Self::FIRST }
    }
}

impl AcceptBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(10);
    const MAX: std::time::Duration = std::time::Duration::from_secs(1);

    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Self::MAX);
    }

    pub fn reset(&mut self) {
        self.next = Self::FIRST;
    }
}

/// Raise the soft limit on open files to the hard limit, so that the
/// connection caps, not the usual soft limit of 1 024, are what bounds
/// Ephemera. Returns the new soft limit.
pub fn raise_file_limit() -> std::io::Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        return Ok(hard);
    }
    Ok(soft)
}

#[cfg(test)]
mod connection_tests {
    use super::*;
    use std::sync::Arc;

    #[tokio::test]
    async fn at_the_cap_the_oldest_connection_makes_room() {
        let open = Arc::new(OpenConnections::new(2));
        let first = open.admit();
        let _second = open.admit();
        let _third = open.admit();
        assert_eq!(open.len(), 2);
        // The first was told to close: its run ends at once.
        tokio::time::timeout(
            std::time::Duration::from_secs(5),
            first.run(std::future::pending()),
        )
        .await
        .expect("the oldest connection is shed");
    }
}

/// Refusal audit events, rate-limited per peer address: a client that is
/// refused in a loop (with or without a certificate) gets a few events a
/// second, not one per connection; what was left out is counted and said
/// in the next event that is written.
#[derive(Debug)]
pub struct RefusalEvents {
    limiter: RateLimiter,
    suppressed: Mutex<HashMap<std::net::IpAddr, u64>>,
}

impl Default for RefusalEvents {
    fn default() -> Self {
        RefusalEvents {
            limiter: RateLimiter::new(Self::PER_SECOND, Self::BURST),
            suppressed: Mutex::new(HashMap::new()),
        }
    }
}

impl RefusalEvents {
    const PER_SECOND: f64 = 2.0;
    const BURST: u32 = 10;

    /// `Some(n)`: record this refusal, saying that `n` before it were left
    /// out; `None`: leave it out (it is counted).
    pub fn admit(&self, peer: std::net::IpAddr) -> Option<u64> {
        let mut suppressed = self.suppressed.lock().unwrap_or_else(|p| p.into_inner());
        if self.limiter.try_take(&peer.to_string()) {
            Some(suppressed.remove(&peer).unwrap_or(0))
        } else {
            if suppressed.len() >= MAX_TRACKED && !suppressed.contains_key(&peer) {
                // Counted in the metric only.
                return None;
            }
            *suppressed.entry(peer).or_insert(0) += 1;
            None
        }
    }
}

/// A string a client sent before it was authenticated, fit for a log line
/// or an audit event: at most `max` characters, control characters and
/// anything outside printable ASCII escaped, and the original length said
/// when it was cut.
pub fn untrusted_text(text: &str, max: usize) -> String {
    let mut out = String::with_capacity(max.min(text.len()) + 16);
    for (shown, c) in text.chars().enumerate() {
        if shown == max {
            out.push_str(&format!("...({} bytes)", text.len()));
            return out;
        }
        if c.is_ascii_graphic() || c == ' ' {
            out.push(c);
        } else {
            out.extend(c.escape_default());
        }
    }
    out
}

#[cfg(test)]
mod refusal_tests {
    use super::*;

    #[test]
    fn untrusted_text_is_cut_and_escaped() {
        assert_eq!(untrusted_text("billing_rw", 64), "billing_rw");
        assert_eq!(untrusted_text("a\nb\u{1b}[31m", 64), "a\\nb\\u{1b}[31m");
        let long = "x".repeat(10_000);
        let shown = untrusted_text(&long, 64);
        assert!(shown.len() < 100, "{shown}");
        assert!(shown.ends_with("...(10000 bytes)"), "{shown}");
    }

    #[test]
    fn a_refused_peer_gets_a_burst_then_a_count_of_what_was_left_out() {
        let events = RefusalEvents::default();
        let peer: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let written = (0..100).filter_map(|_| events.admit(peer)).count();
        assert!(written <= 12, "{written}");
        assert!(events.suppressed.lock().unwrap()[&peer] >= 88);
        let other: std::net::IpAddr = "192.0.2.2".parse().unwrap();
        assert_eq!(events.admit(other), Some(0), "other peers are not affected");
    }
}
