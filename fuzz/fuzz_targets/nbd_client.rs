//! Fuzzes the NBD client's protocol core (what `drv restore` reads from the server it copies
//! from): any server bytes, fed to the client's handshake in the pieces a network could deliver
//! (the first byte sets their size), then the rest as simple replies. Nothing may panic, a step
//! never consumes more than it was given nor asks for fewer bytes than it has.
#![no_main]

use drv_proto::nbd::{ClientHandshake, ClientStep, decode_simple_reply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((first, mut rest)) = data.split_first() else { return };
    let piece = 1 + *first as usize % 64;
    let mut h = ClientHandshake::new();
    let mut buf: Vec<u8> = Vec::new();
    'outer: while !rest.is_empty() {
        let n = piece.min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match h.step(&buf) {
                ClientStep::Need(n) => {
                    assert!(n > buf.len(), "asked for {n} with {} there", buf.len());
                    break;
                }
                ClientStep::Consumed(n) => {
                    assert!(n <= buf.len());
                    buf.drain(..n);
                }
                ClientStep::Open { consumed, .. } => {
                    assert!(consumed <= buf.len());
                    buf.drain(..consumed);
                    break 'outer;
                }
                ClientStep::Fail(_) => return,
            }
        }
    }
    buf.extend_from_slice(rest);
    for reply in buf.chunks_exact(16) {
        let _ = decode_simple_reply(reply.try_into().expect("16 bytes"));
    }
});
