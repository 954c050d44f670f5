//! Helpers shared by the integration tests.

use drv_format::crypto::VolumeKey;

/// The key every test record is encrypted with.
pub fn test_key() -> VolumeKey {
    VolumeKey::from_bytes(1, &[0x5a; 32])
}

pub use drv_format::pattern;

/// The `drv` binary of this build (built by `cargo build --bins`, which `cargo xtask test` runs first).
pub fn drv_bin() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().and_then(|p| p.parent()).expect("target dir");
    let bin = dir.join("drv");
    assert!(bin.exists(), "{} not found: run `cargo build --bins` first (cargo xtask test does)", bin.display());
    bin
}
