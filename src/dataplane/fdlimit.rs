//! Running out of file descriptors without losing the admin endpoint.
//!
//! Every TCP flow costs etp two descriptors (more while it splices), so a node under a
//! connection flood, or a daemon started with a low `RLIMIT_NOFILE`, reaches `EMFILE`. Two
//! things must then hold: the data path must stop churning (accepting a client only to fail
//! its upstream `socket(2)` and reset it, over and over), and `/live`, `/ready` and `/metrics`
//! must still answer, or a liveness probe restarts etp and every established flow dies with it.
//!
//! - [`Pressure`]: a shared back-off. Any data-path `EMFILE`/`ENFILE` (accept or upstream
//!   socket) pushes the accept loops back, doubling from 10 ms to 1 s; a flow that gets its
//!   upstream clears it.
//! - [`Spare`]: one descriptor (`/dev/null`) held in reserve for the admin endpoint. When its
//!   accept fails with `EMFILE`, the admin closes the spare, accepts into the freed slot,
//!   answers, and takes the slot back after the connection closes (the classic reserve-fd
//!   technique; see accept(2), "EMFILE" handling in libev's documentation).

use std::fs::File;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// First and last back-off step.
const BACKOFF_FIRST: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Errors that mean "out of descriptors or kernel memory": retrying at once would spin.
pub fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// The data path's shared back-off after descriptor exhaustion. Every accepted connection
/// asks [`Pressure::wait_left`] and every connected flow calls [`Pressure::clear`], so both are
/// one atomic load when there is no pressure; only [`Pressure::hit`] (rare) takes the lock.
#[derive(Debug)]
pub struct Pressure {
    /// Milliseconds after `epoch` until which accepts wait; 0: no pressure.
    until_ms: AtomicU64,
    /// The current back-off step (doubled by each hit).
    step: Mutex<Duration>,
    epoch: Instant,
}

impl Default for Pressure {
    fn default() -> Self {
        Pressure {
            until_ms: AtomicU64::new(0),
            step: Mutex::new(Duration::ZERO),
            epoch: Instant::now(),
        }
    }
}

impl Pressure {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Records an exhaustion error; returns the new back-off step.
    pub fn hit(&self) -> Duration {
        let mut step = self.step.lock().unwrap_or_else(|e| e.into_inner());
        *step = (*step * 2).clamp(BACKOFF_FIRST, BACKOFF_MAX);
        // At least 1, so that "until" is never the "no pressure" value.
        let until = (self.now_ms() + step.as_millis() as u64).max(1);
        self.until_ms.store(until, Ordering::Release);
        *step
    }

    /// A flow got all its descriptors: the pressure is gone.
    pub fn clear(&self) {
        if self.until_ms.load(Ordering::Acquire) != 0 {
            let mut step = self.step.lock().unwrap_or_else(|e| e.into_inner());
            *step = Duration::ZERO;
            self.until_ms.store(0, Ordering::Release);
        }
    }

    /// How long a new accept should still wait, if at all.
    pub fn wait_left(&self) -> Option<Duration> {
        let until = self.until_ms.load(Ordering::Acquire);
        if until == 0 {
            return None;
        }
        let now = self.now_ms();
        (until > now).then(|| Duration::from_millis(until - now))
    }
}

/// One descriptor held back so that the admin endpoint can answer while the process is at
/// its descriptor limit.
#[derive(Debug)]
pub struct Spare(Mutex<Option<File>>);

impl Spare {
    /// Takes the reserve now (at start-up, when descriptors are plentiful).
    pub fn new() -> Spare {
        let s = Spare(Mutex::new(None));
        s.restore();
        s
    }

    /// Gives the reserved descriptor back to the kernel; false when none was held.
    pub fn release(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some()
    }

    /// Takes a descriptor into reserve again, if it is not held and one is free.
    pub fn restore(&self) {
        let mut held = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_none() {
            *held = File::open("/dev/null").ok();
        }
    }

    #[cfg(test)]
    fn is_held(&self) -> bool {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).is_some()
    }
}

impl Default for Spare {
    fn default() -> Self {
        Spare::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pressure_doubles_to_its_cap_and_clears() {
        let p = Pressure::default();
        assert_eq!(p.wait_left(), None);
        assert_eq!(p.hit(), BACKOFF_FIRST);
        assert_eq!(p.hit(), BACKOFF_FIRST * 2);
        assert!(p.wait_left().is_some_and(|d| d <= BACKOFF_FIRST * 2));
        for _ in 0..20 {
            p.hit();
        }
        assert_eq!(p.hit(), BACKOFF_MAX);
        p.clear();
        assert_eq!(p.wait_left(), None);
        assert_eq!(p.hit(), BACKOFF_FIRST, "a cleared back-off starts over");
    }

    #[test]
    fn exhaustion_errors_are_recognised() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(is_exhaustion(&io::Error::from_raw_os_error(errno)));
        }
        assert!(!is_exhaustion(&io::Error::from_raw_os_error(
            libc::ECONNREFUSED
        )));
    }

    #[test]
    fn the_spare_is_released_once_and_restored() {
        let s = Spare::new();
        assert!(s.is_held());
        assert!(s.release());
        assert!(!s.release(), "nothing left to release");
        s.restore();
        assert!(s.is_held());
    }
}
