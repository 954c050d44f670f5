//! The userspace capture path, for stock kernels without the module: the agent serves the
//! volume's image as one file through FUSE, and a loop device (direct I/O) over that file is the
//! protected block device.
//!
//! ```text
//!  application ─► /dev/loopN (direct I/O) ─► FUSE file STATE/fuse/volume ─► this agent
//!                                                                            │ write: staging, ack,
//!                                                                            ▼ then the image
//!                                                                     image (PATH, the local disk)
//! ```
//!
//! - **Writes** arrive as FUSE `WRITE` requests (`FOPEN_DIRECT_IO`, so never through a page
//!   cache; `FOPEN_PARALLEL_DIRECT_WRITES` and `FUSE_ASYNC_DIO`, so the loop device's queue depth
//!   reaches the agent). Each is handed to [`Agent::write`], which holds it until staging has it
//!   durably and then writes the image; only then does the FUSE reply, and with it the loop
//!   device's completion, go out. The partial write order follows: a write the application issues
//!   after another completed reaches the agent after that one's reply.
//! - **Flushes**: the loop device turns a block FLUSH (and the post-flush of a FUA write: loop
//!   announces no FUA) into `fsync` of its backing file, which FUSE delivers as `FSYNC`: a FLUSH
//!   record for the agent, then `fdatasync` of the image.
//! - **Reads** are served from the image directly.
//!
//! **Crash of the agent.** The kernel aborts the FUSE connection: every request in flight and every
//! later one to the loop device fails with EIO (a mounted filesystem sees I/O errors and stops;
//! nothing is written to the image behind the agent's back, so no write goes unrecorded). The
//! marker `STATE/user-attached` names the loop device. `drv attach` again: it detaches that loop
//! device (only if its backing file is still this volume's FUSE file), lazily unmounts the dead
//! FUSE mount, resyncs the writes in doubt (the agent's activity log) and binds a new loop device;
//! the filesystem is then checked and mounted from the new device. See ARCHITECTURE.md.

use std::path::Path;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use drv_format::record::Flags;
use drv_userdev::{Attach, Backend, Done, ReadReply};
pub use drv_userdev::{FILE_NAME, MARKER, Marker, UserDevice, UserError, UserStats, backing_of, mount_point, recover};

use crate::Agent;

/// The agent's side of the device: writes go through the agent (staging first), reads come from
/// the image.
struct VolumeBackend {
    agent: Agent,
    image: Arc<std::fs::File>,
    rt: tokio::runtime::Handle,
}

impl Backend for VolumeBackend {
    fn read(&self, offset: u64, len: usize, reply: ReadReply) {
        let image = self.image.clone();
        // Off the FUSE thread: reads of a large queue run in parallel.
        self.rt.spawn_blocking(move || {
            let mut buf = vec![0u8; len];
            match std::os::unix::fs::FileExt::read_exact_at(&*image, &mut buf, offset) {
                Ok(()) => reply.data(&buf),
                Err(e) => {
                    tracing::error!("read of {len} bytes at {offset} from the image: {e}");
                    reply.error(libc::EIO)
                }
            }
        });
    }

    fn write(&self, offset: u64, data: &[u8], reply: Done) {
        let len = data.len();
        let data = Bytes::copy_from_slice(data);
        let agent = self.agent.clone();
        self.rt.spawn(async move {
            match agent.write(offset, data, Flags::default()).await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::error!("write of {len} bytes at {offset} failed: {e}");
                    reply.error(libc::EIO)
                }
            }
        });
    }

    fn fsync(&self, reply: Done) {
        let agent = self.agent.clone();
        self.rt.spawn(async move {
            match agent.write(0, Bytes::new(), Flags::FLUSH).await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    tracing::error!("flush failed: {e}");
                    reply.error(libc::EIO)
                }
            }
        });
    }
}

/// Mounts the FUSE file of `agent`'s volume (the image `image`, `size` bytes) under `state` and
/// binds a loop device with direct I/O to it. Call [`recover`] first.
pub fn attach(
    volume: &str,
    agent: Agent,
    image: std::fs::File,
    size: u64,
    state: &Path,
    rt: tokio::runtime::Handle,
) -> Result<UserDevice, UserError> {
    let backend = VolumeBackend { agent, image: Arc::new(image), rt };
    UserDevice::attach(Attach { label: volume, size, state, read_only: false }, backend)
}

/// An attached userspace device shared with the control socket's hooks.
pub struct Served {
    /// `None` once detached.
    pub device: Arc<Mutex<Option<UserDevice>>>,
    /// Resolves when `drv detach` detached it.
    pub ended: tokio::sync::oneshot::Receiver<()>,
    pub detach: crate::control::DetachHook,
    pub capture: crate::control::CaptureHook,
}

/// Hands the device to the control socket: `detach` detaches it (then `on_detached` runs),
/// `capture` reports its figures, with `extra()` (the order check's) as `order_check`.
pub fn serve(
    dev: UserDevice,
    state: &Path,
    on_detached: impl Fn() + Send + Sync + 'static,
    extra: impl Fn() -> Option<crate::control::OrderFigures> + Send + Sync + 'static,
) -> Served {
    let (stats, loop_dev, fuse) = (dev.stats.clone(), dev.loop_dev.clone(), mount_point(state).join(FILE_NAME));
    let capture: crate::control::CaptureHook = Arc::new(move || {
        use std::sync::atomic::Ordering::Relaxed;
        crate::control::CaptureReport {
            mode: "user".into(),
            device: loop_dev.display().to_string(),
            fuse: fuse.display().to_string(),
            writes: stats.writes.load(Relaxed),
            flushes: stats.flushes.load(Relaxed),
            reads: stats.reads.load(Relaxed),
            failed: stats.failed.load(Relaxed),
            order_check: extra(),
        }
    });
    let device = Arc::new(Mutex::new(Some(dev)));
    let (tx, ended) = tokio::sync::oneshot::channel();
    let (dv, done) = (device.clone(), Mutex::new(Some(tx)));
    let detach: crate::control::DetachHook = Arc::new(move || {
        let mut g = dv.lock().expect("device");
        let Some(d) = g.as_mut() else { return Err("already detached".into()) };
        d.detach()?;
        *g = None;
        on_detached();
        if let Some(tx) = done.lock().expect("done").take() {
            let _ = tx.send(());
        }
        Ok(())
    });
    Served { device, ended, detach, capture }
}
