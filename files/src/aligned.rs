//! A heap buffer aligned to 4096 bytes, as `O_DIRECT` reads and writes need (the one such buffer
//! of the project: the WRL's batches, the agent's reads of a device, the benchmarks' writes).

/// A heap buffer aligned to 4096 bytes, as `O_DIRECT` needs.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: AlignedBuf owns its allocation exclusively, like a Vec<u8>.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared references give only `&[u8]` (no interior mutability), like a Vec<u8>.
unsafe impl Sync for AlignedBuf {}

pub const BUF_ALIGN: usize = 4096;

impl AlignedBuf {
    pub fn with_capacity(cap: usize) -> Self {
        let cap = cap.max(BUF_ALIGN).next_multiple_of(BUF_ALIGN);
        let layout = std::alloc::Layout::from_size_align(cap, BUF_ALIGN).expect("layout");
        // SAFETY: layout has non-zero size.
        let raw = unsafe { std::alloc::alloc_zeroed(layout) };
        let ptr = std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, cap, len: 0 }
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    pub fn capacity(&self) -> usize {
        self.cap
    }
    pub fn clear(&mut self) {
        self.len = 0;
    }
    /// Makes sure `additional` more bytes fit, keeping the contents.
    pub fn reserve(&mut self, additional: usize) {
        if self.len + additional > self.cap {
            let mut bigger = AlignedBuf::with_capacity((self.len + additional).max(self.cap * 2));
            bigger.extend_from_slice(self);
            *self = bigger;
        }
    }
    pub fn extend_from_slice(&mut self, bytes: &[u8]) {
        self.reserve(bytes.len());
        self.spare()[..bytes.len()].copy_from_slice(bytes);
        self.len += bytes.len();
    }
    /// Appends `n` zero bytes.
    pub fn extend_zero(&mut self, n: usize) {
        self.reserve(n);
        self.spare()[..n].fill(0);
        self.len += n;
    }
    /// Sets the length to `len` (growing with zeros).
    pub fn resize(&mut self, len: usize) {
        if len > self.len {
            self.extend_zero(len - self.len);
        } else {
            self.len = len;
        }
    }
    fn spare(&mut self) -> &mut [u8] {
        // SAFETY: the allocation is `cap` bytes, initialised (alloc_zeroed) and owned by self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.len), self.cap - self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.cap, BUF_ALIGN).expect("layout");
        // SAFETY: allocated in with_capacity with this layout.
        unsafe { std::alloc::dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the first `len` bytes are initialised.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and self is borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AlignedBuf {
    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut b = AlignedBuf::with_capacity(len);
        b.resize(len);
        b
    }
}
