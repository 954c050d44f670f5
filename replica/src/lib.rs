//! drv replica server: receives encrypted records from staging, logs them in its DR log and applies
//! whole epochs in order to the target volume.
//!
//! Not built yet: the staging/replica servers issue brings the server, the DR log and the
//! epoch-atomic apply. The crate exists now so the workspace has its final shape; the record format
//! it will consume is `drv_format::record` (decrypt with `drv_format::VolumeKey::open`).
