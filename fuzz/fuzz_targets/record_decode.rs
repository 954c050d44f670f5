//! Fuzzes every WRL decoder with arbitrary bytes: none may panic, and whatever decodes must
//! encode back to the same bytes.
#![no_main]

use drv_format::layout::{BatchHeader, DeviceHeader, MetaBlock, SegmentHeader};
use drv_format::record::{RECORD_HEADER_LEN, RecordHeader, decode_record};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((h, payload)) = decode_record(data) {
        assert_eq!(&h.encode()[..], &data[..RECORD_HEADER_LEN]);
        assert_eq!(payload.len(), h.stored_len as usize);
    }
    if let Ok(h) = RecordHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..RECORD_HEADER_LEN]);
    }
    if let Ok(h) = BatchHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..64]);
    }
    if let Ok(h) = SegmentHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..128]);
    }
    if let Ok(h) = MetaBlock::decode(data) {
        assert_eq!(&h.encode()[..], &data[..128]);
    }
    if let Ok(h) = DeviceHeader::decode(data) {
        assert_eq!(&h.encode()[..], &data[..128]);
    }
});
