//! Fuzzes the wire frame decoder (what every node reads from the network): arbitrary bytes as
//! received must never panic; and with the header's length and checksum made right, so that the
//! body layouts of every frame type are explored, whatever decodes must encode back to the same
//! bytes.
#![no_main]

use drv_format::frame::{FRAME_HEADER_LEN, MAX_FRAME_BODY, decode_body, decode_frame, decode_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = decode_frame(data, MAX_FRAME_BODY);
    if data.len() < FRAME_HEADER_LEN {
        return;
    }
    let mut buf = data.to_vec();
    let body_len = (buf.len() - FRAME_HEADER_LEN) as u32;
    buf[8..12].copy_from_slice(&body_len.to_le_bytes());
    let crc = drv_format::crc32c(&[&buf[..12], &buf[FRAME_HEADER_LEN..]].concat());
    buf[12..16].copy_from_slice(&crc.to_le_bytes());
    let head: [u8; FRAME_HEADER_LEN] = buf[..FRAME_HEADER_LEN].try_into().expect("16 bytes");
    let Ok(h) = decode_header(&head, MAX_FRAME_BODY) else { return };
    if let Ok(f) = decode_body(&head, &h, bytes::Bytes::copy_from_slice(&buf[FRAME_HEADER_LEN..])) {
        assert_eq!(f.encode(), buf, "{:?} does not encode back to the bytes it came from", f.ftype());
    }
});
