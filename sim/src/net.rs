//! The simulated network: a connection is two FIFO queues (streams are reliable and in order, as
//! QUIC streams and TLS over TCP are), which can break at any moment: what is in flight on it is
//! lost, and the client connects again later (a new generation).

use std::collections::VecDeque;

/// One connection between a client (`A` messages to the server) and a server (`B` back).
pub struct Link<A, B> {
    pub up: bool,
    pub to_server: VecDeque<A>,
    pub to_client: VecDeque<B>,
    /// Breaks so far (the current connection's generation).
    pub breaks: u64,
    /// The client may connect again from this step on.
    pub down_until: u64,
}

impl<A, B> Default for Link<A, B> {
    fn default() -> Self {
        Link { up: false, to_server: VecDeque::new(), to_client: VecDeque::new(), breaks: 0, down_until: 0 }
    }
}

impl<A, B> Link<A, B> {
    /// The connection breaks: everything in flight is lost; the client may reconnect at `until`.
    pub fn break_at(&mut self, until: u64) {
        self.up = false;
        self.to_server.clear();
        self.to_client.clear();
        self.breaks += 1;
        self.down_until = until;
    }

    /// Connects (the client's first message is queued by the caller).
    pub fn connect(&mut self) {
        debug_assert!(!self.up);
        self.up = true;
    }

    pub fn send_to_server(&mut self, m: A) {
        if self.up {
            self.to_server.push_back(m);
        }
    }

    pub fn send_to_client(&mut self, m: B) {
        if self.up {
            self.to_client.push_back(m);
        }
    }
}

/// A seeded xorshift generator: every decision of a run comes from it, so a seed replays a run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A number below `n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True one time in `n`.
    pub fn one_in(&mut self, n: u64) -> bool {
        self.below(n) == 0
    }
}
