//! Fuzzes the NBD server's protocol core (what an export reads from any TCP client): the bytes
//! after the first are the client's side of a connection, fed to the handshake in the pieces a
//! network could deliver (the first byte sets their size), then the rest as requests. Nothing may panic, a step never consumes more
//! than it was given, and every request that decodes encodes back to its bytes.
#![no_main]

use drv_proto::nbd::{Export, Handshake, REQUEST_LEN, Request, Step, check};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let exports = [
        Export { name: "snap".into(), size: 1 << 30, writable: false, description: "a snapshot".into() },
        Export { name: "rw".into(), size: 1 << 20, writable: true, description: String::new() },
    ];
    // The first byte sets the size of the pieces the rest arrives in.
    let Some((first, mut rest)) = data.split_first() else { return };
    let piece = 1 + *first as usize % 64;
    let mut h = Handshake::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut export = None;
    'outer: while !rest.is_empty() {
        let n = piece.min(rest.len());
        buf.extend_from_slice(&rest[..n]);
        rest = &rest[n..];
        loop {
            match h.step(&buf, &exports) {
                Step::Need(n) => {
                    assert!(n > buf.len(), "asked for {n} with {} there", buf.len());
                    break;
                }
                Step::Reply { consumed, .. } => {
                    assert!(consumed <= buf.len());
                    buf.drain(..consumed);
                }
                Step::Go { consumed, export: i, .. } => {
                    assert!(consumed <= buf.len());
                    buf.drain(..consumed);
                    export = Some(i);
                    break 'outer;
                }
                Step::Close { .. } => return,
            }
        }
    }
    let Some(i) = export else { return };
    buf.extend_from_slice(rest);
    for req in buf.chunks_exact(REQUEST_LEN) {
        let Some(r) = Request::decode(req.try_into().expect("28 bytes")) else { return };
        assert_eq!(&r.encode()[..], req);
        let _ = check(&r, &exports[i]);
    }
});
