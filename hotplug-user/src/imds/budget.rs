//! Limits on how hard the agent leans on IMDS: a global token bucket far below the link-local
//! limit (about 1024 packets/s per ENI, beyond which calls are dropped, not answered), and
//! exponential backoff with full jitter bounded by a per-event deadline.
use std::time::Duration;

use tokio::{sync::Mutex, time::Instant};

/// A token bucket: `rate` requests per second on average, bursts of at most `rate`.
pub struct Budget {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Budget {
    pub fn new(rate_per_second: u32) -> Self {
        let rate = f64::from(rate_per_second.max(1));
        Self { rate, state: Mutex::new((rate, Instant::now())) }
    }

    /// Waits until a request may be sent.
    pub async fn acquire(&self) {
        loop {
            let wait = {
                let mut state = self.state.lock().await;
                let now = Instant::now();
                let refill = now.duration_since(state.1).as_secs_f64() * self.rate;
                state.0 = (state.0 + refill).min(self.rate);
                state.1 = now;
                if state.0 >= 1.0 {
                    state.0 -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - state.0) / self.rate)
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Exponential backoff with full jitter: attempt n waits a random time in [0, min(cap, base·2ⁿ)].
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration) -> Self {
        // Jitter only needs to de-synchronise agents, not to be unpredictable: the clock suffices.
        let seed = u64::from(std::process::id()) ^ crate::clock::monotonic_ns() | 1;
        Self { base, cap, attempt: 0, seed }
    }

    fn random(&mut self) -> u64 {
        // xorshift64
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        self.seed
    }

    /// The next wait.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.base.saturating_mul(1u32 << self.attempt.min(16)).min(self.cap);
        self.attempt += 1;
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(if nanos == 0 { 0 } else { self.random() % (nanos + 1) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_the_cap_with_jitter_below_it() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let delays: Vec<Duration> = (0..12).map(|_| backoff.next_delay()).collect();
        for (n, delay) in delays.iter().enumerate() {
            let ceiling =
                Duration::from_millis(100).saturating_mul(1 << n.min(16)).min(Duration::from_secs(2));
            assert!(*delay <= ceiling, "attempt {n}: {delay:?} > {ceiling:?}");
        }
        assert!(
            delays.iter().skip(6).any(|d| *d > Duration::from_millis(400)),
            "later waits reach higher: {delays:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_budget_holds_the_rate() {
        let budget = Budget::new(10);
        let start = Instant::now();
        for _ in 0..30 {
            budget.acquire().await;
        }
        // 10 at once (the burst), then 20 more at 10/s.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(1900) && elapsed <= Duration::from_millis(2100),
            "{elapsed:?}"
        );
    }
}
