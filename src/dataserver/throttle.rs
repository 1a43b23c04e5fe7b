//! A bandwidth cap (the assignment's premise: each server's bandwidth is limited). A leaky bucket over
//! a virtual clock: each transfer of n bytes occupies the link for n / rate seconds after the previous
//! one, and waits until its slot has passed. Without a cap it costs nothing.

use std::cell::Cell;
use std::time::Duration;

use tokio::time::Instant;

pub struct Throttle {
    bytes_per_s: Option<u64>,
    /// When the link is next free.
    free_at: Cell<Option<Instant>>,
}

impl Throttle {
    pub fn new(bytes_per_s: Option<u64>) -> Self {
        Throttle { bytes_per_s: bytes_per_s.filter(|&r| r > 0), free_at: Cell::new(None) }
    }

    /// Waits until `bytes` more may cross the link.
    pub async fn pass(&self, bytes: usize) {
        let Some(rate) = self.bytes_per_s else { return };
        let now = Instant::now();
        let start = self.free_at.get().filter(|&t| t > now).unwrap_or(now);
        let done = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        self.free_at.set(Some(done));
        tokio::time::sleep_until(done).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transfers_take_their_share_of_the_link() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let t = Throttle::new(Some(1000));
            let start = Instant::now();
            t.pass(500).await;
            t.pass(1500).await;
            assert_eq!(start.elapsed().as_millis(), 2000);
            let free = Throttle::new(None);
            let start = Instant::now();
            free.pass(1 << 30).await;
            assert_eq!(start.elapsed().as_millis(), 0);
        });
    }
}
