//! Rate limits for a device's guest traffic: token buckets in the manner of
//! Firecracker's, one for bytes and one for operations (requests, frames).
//!
//! A bucket holds up to `size` tokens and refills at `size` tokens per
//! `refill_time_ms`. An operation goes ahead as soon as every bucket it is
//! limited by holds a token, and takes its whole cost, which may leave a
//! bucket in debt; the operations after it wait the debt out. Otherwise
//! [`RateLimiter::consume`] says how long to wait, and the device leaves
//! the request in its queue and asks its event loop to come back after
//! that time (a timer, never a busy wait). Nothing is dropped.
//!
//! The average is the limit either way. Debt instead of waiting for a
//! whole operation's tokens matters for large operations: a 64 KiB frame
//! held for its own transmission time stalls a TCP connection whose window
//! is one or two such frames (measured on the user network: two thirds of
//! a 128 KiB/s limit reached, all of it with debt), and a 4 MiB disk read
//! under a 1 MiB bucket would wait forever.
//!
//! Arithmetic is exact: a bucket counts in units of 1/`refill_time_ns` of
//! a token, so a refill of `elapsed_ns * size` units never rounds.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Errors in a rate-limit configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("{0}: \"size\" is 0; give the bucket a size (bytes or operations per refill), or leave the limit out")]
    ZeroSize(&'static str),
    #[error("{0}: \"refill_time_ms\" must be 1 to {MAX_REFILL_MS} ms")]
    BadRefillTime(&'static str),
}

/// Longest refill time accepted (an hour).
pub const MAX_REFILL_MS: u64 = 3_600_000;
/// The shortest wait a throttled device asks for: a finer timer would only
/// wake the event loop for a handful of tokens.
pub const MIN_WAIT: Duration = Duration::from_micros(500);

/// One token bucket's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// Tokens the bucket holds: bytes, or operations.
    pub size: u64,
    /// Time to refill an empty bucket, in milliseconds.
    pub refill_time_ms: u64,
}

impl BucketConfig {
    fn validate(&self, what: &'static str) -> Result<(), Error> {
        if self.size == 0 {
            return Err(Error::ZeroSize(what));
        }
        if !(1..=MAX_REFILL_MS).contains(&self.refill_time_ms) {
            return Err(Error::BadRefillTime(what));
        }
        Ok(())
    }
}

/// The limits of one direction of a device: bandwidth (bytes) and
/// operations (disk requests; network frames, also spelt `packets`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<BucketConfig>,
    #[serde(default, alias = "packets", skip_serializing_if = "Option::is_none")]
    pub ops: Option<BucketConfig>,
}

impl RateLimitConfig {
    /// Checks both buckets; `what` names the limit in errors.
    pub fn validate(&self, what: &'static str) -> Result<(), Error> {
        if let Some(b) = &self.bandwidth {
            b.validate(what)?;
        }
        if let Some(o) = &self.ops {
            o.validate(what)?;
        }
        Ok(())
    }
}

impl RateLimitConfig {
    /// The most bytes per second these limits let through when each
    /// operation moves at most `op_bytes`; None without limits.
    pub fn bytes_per_sec(&self, op_bytes: u64) -> Option<u64> {
        let per_sec = |b: &BucketConfig| {
            let rate = u128::from(b.size) * 1000 / u128::from(b.refill_time_ms.max(1));
            u64::try_from(rate).unwrap_or(u64::MAX)
        };
        let bandwidth = self.bandwidth.as_ref().map(per_sec);
        let ops = self
            .ops
            .as_ref()
            .map(|b| per_sec(b).saturating_mul(op_bytes));
        match (bandwidth, ops) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}

/// A token bucket (see the module's comment for its units).
#[derive(Debug, Clone)]
struct TokenBucket {
    /// Tokens a full bucket holds.
    size: u64,
    refill_ns: u128,
    /// Units held: `tokens * refill_ns`; negative while in debt.
    units: i128,
    last: Instant,
}

impl TokenBucket {
    fn new(config: &BucketConfig, now: Instant) -> Self {
        let refill_ns = u128::from(config.refill_time_ms.max(1)) * 1_000_000;
        TokenBucket {
            size: config.size,
            refill_ns,
            units: Self::scaled(config.size, refill_ns),
            last: now,
        }
    }

    fn scaled(tokens: u64, refill_ns: u128) -> i128 {
        // At most 2^64 * 3.6e12 < 2^106: fits.
        (u128::from(tokens) * refill_ns) as i128
    }

    fn capacity(&self) -> i128 {
        Self::scaled(self.size, self.refill_ns)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_nanos();
        self.last = now;
        let gained = elapsed.saturating_mul(u128::from(self.size));
        let room = (self.capacity() - self.units) as u128;
        self.units += gained.min(room) as i128;
    }

    /// How long until an operation of `cost` may go ahead (zero: now): one
    /// token is enough, debt or not.
    fn wait_for(&self, cost: u64) -> Duration {
        let need = Self::scaled(cost.min(1), self.refill_ns);
        if self.units >= need {
            return Duration::ZERO;
        }
        let missing = (need - self.units) as u128;
        let ns = missing.div_ceil(u128::from(self.size));
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    fn take(&mut self, cost: u64) {
        self.units -= Self::scaled(cost, self.refill_ns);
    }
}

/// A device's limits for one direction: both buckets must allow an
/// operation before it runs.
#[derive(Debug, Clone, Default)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
}

impl RateLimiter {
    /// Buckets start full.
    pub fn new(config: &RateLimitConfig) -> Self {
        let now = Instant::now();
        RateLimiter {
            bandwidth: config.bandwidth.map(|b| TokenBucket::new(&b, now)),
            ops: config.ops.map(|b| TokenBucket::new(&b, now)),
        }
    }

    /// Whether no limit is set.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }

    /// Takes `bytes` and `ops` tokens now, or takes nothing and says how
    /// long to wait before trying again.
    pub fn consume(&mut self, bytes: u64, ops: u64) -> Result<(), Duration> {
        self.consume_at(Instant::now(), bytes, ops)
    }

    fn consume_at(&mut self, now: Instant, bytes: u64, ops: u64) -> Result<(), Duration> {
        let mut wait = Duration::ZERO;
        for (bucket, cost) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(b) = bucket {
                b.refill(now);
                wait = wait.max(b.wait_for(cost));
            }
        }
        if !wait.is_zero() {
            return Err(wait.max(MIN_WAIT));
        }
        for (bucket, cost) in [(&mut self.bandwidth, bytes), (&mut self.ops, ops)] {
            if let Some(b) = bucket {
                b.take(cost);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(bandwidth: Option<(u64, u64)>, ops: Option<(u64, u64)>) -> RateLimiter {
        let bucket = |(size, refill_time_ms)| BucketConfig {
            size,
            refill_time_ms,
        };
        RateLimiter::new(&RateLimitConfig {
            bandwidth: bandwidth.map(bucket),
            ops: ops.map(bucket),
        })
    }

    #[test]
    fn a_bucket_lets_its_size_through_then_its_rate() {
        // 1000 bytes per 100 ms: 10 bytes per ms.
        let mut l = limiter(Some((1000, 100)), None);
        let t0 = Instant::now();
        assert_eq!(l.consume_at(t0, 600, 1), Ok(()));
        // Tokens left: the operation goes ahead whole and leaves debt.
        assert_eq!(l.consume_at(t0, 600, 1), Ok(()));
        // 200 bytes of debt and one token: 20.1 ms.
        assert_eq!(l.consume_at(t0, 100, 1), Err(Duration::from_micros(20_100)));
        let t1 = t0 + Duration::from_micros(20_100);
        assert_eq!(l.consume_at(t1, 100, 1), Ok(()));
        // Over a long run the rate is the limit: 10 000 bytes at 10 per ms,
        // less the one operation that is always ahead.
        let mut now = t1;
        let mut sent = 0u64;
        while sent < 10_000 {
            match l.consume_at(now, 250, 1) {
                Ok(()) => sent += 250,
                Err(wait) => now += wait,
            }
        }
        let ms = (now - t1).as_secs_f64() * 1000.0;
        assert!((975.0..=1000.0).contains(&ms), "{ms} ms");
        // A bucket never holds more than its size.
        let later = now + Duration::from_secs(3600);
        assert_eq!(l.consume_at(later, 1000, 1), Ok(()));
        assert!(l.consume_at(later, 1, 1).is_err());
    }

    #[test]
    fn an_operation_larger_than_the_bucket_goes_ahead_and_leaves_debt() {
        let mut l = limiter(Some((1000, 100)), None);
        let t0 = Instant::now();
        assert_eq!(l.consume_at(t0, 500, 1), Ok(()));
        assert_eq!(l.consume_at(t0, 4000, 1), Ok(()));
        // 3500 bytes of debt and one token: 350.1 ms.
        assert_eq!(l.consume_at(t0, 1, 1), Err(Duration::from_micros(350_100)));
    }

    #[test]
    fn both_buckets_must_allow_and_a_refused_operation_takes_nothing() {
        // 100 bytes and 2 operations per second.
        let mut l = limiter(Some((100, 1000)), Some((2, 1000)));
        let t0 = Instant::now();
        assert_eq!(l.consume_at(t0, 10, 1), Ok(()));
        assert_eq!(l.consume_at(t0, 10, 1), Ok(()));
        assert_eq!(l.consume_at(t0, 10, 1), Err(Duration::from_millis(500)));
        // The refused operation took no bytes.
        let bytes = l.bandwidth.as_ref().unwrap();
        assert_eq!(bytes.units, TokenBucket::scaled(80, bytes.refill_ns));
        // Tiny waits are rounded up to the timer floor.
        let mut l = limiter(Some((1_000_000, 1)), None);
        l.consume_at(t0, 1_000_000, 0).unwrap();
        assert_eq!(l.consume_at(t0, 1, 0), Err(MIN_WAIT));
        // A request that moves nothing (a disk flush) costs no bytes.
        assert_eq!(l.consume_at(t0, 0, 0), Ok(()));
        assert!(limiter(None, None).is_unlimited());
        assert_eq!(limiter(None, None).consume(u64::MAX, u64::MAX), Ok(()));
    }

    #[test]
    fn extreme_configurations_neither_overflow_nor_panic() {
        let mut l = limiter(Some((u64::MAX, MAX_REFILL_MS)), Some((1, 1)));
        let t0 = Instant::now();
        assert_eq!(l.consume_at(t0, u64::MAX, 1), Ok(()));
        assert!(l.consume_at(t0, u64::MAX, 1).is_err());
        let far = t0 + Duration::from_secs(100 * 365 * 86400);
        assert_eq!(l.consume_at(far, u64::MAX, 1), Ok(()));
    }

    #[test]
    fn configurations_are_checked_and_packets_names_ops() {
        let c: RateLimitConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 1048576, "refill_time_ms": 1000}, "packets": {"size": 100, "refill_time_ms": 100}}"#,
        )
        .unwrap();
        assert_eq!(c.ops.unwrap().size, 100);
        assert_eq!(c.validate("rx"), Ok(()));
        let zero = RateLimitConfig {
            ops: Some(BucketConfig {
                size: 0,
                refill_time_ms: 10,
            }),
            ..c
        };
        assert_eq!(zero.validate("tx"), Err(Error::ZeroSize("tx")));
        let slow = RateLimitConfig {
            bandwidth: Some(BucketConfig {
                size: 1,
                refill_time_ms: 0,
            }),
            ops: None,
        };
        assert!(slow
            .validate("rootfs")
            .unwrap_err()
            .to_string()
            .starts_with("rootfs: \"refill_time_ms\" must be"));
        assert!(serde_json::from_str::<RateLimitConfig>(r#"{"bytes": {}}"#).is_err());
        // 1 MiB/s of bandwidth, 1000 packets/s of up to 1500 bytes.
        assert_eq!(c.bytes_per_sec(1500), Some(1_048_576));
        assert_eq!(c.bytes_per_sec(100), Some(100_000));
        assert_eq!(RateLimitConfig::default().bytes_per_sec(1500), None);
    }
}
