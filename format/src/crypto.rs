//! The payload encryption envelope: AES-256-GCM with the write descriptor as associated data
//! (`docs/formats.md`, "Encryption envelope").

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

use crate::record::{TAG_LEN, WriteDesc};

pub const KEY_BYTES: usize = 32;

/// A key that cannot be used or a payload that does not authenticate.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("read key file {path}: {err}")]
    Read { path: String, err: std::io::Error },
    /// The key file does not hold exactly 32 bytes.
    #[error("key file {path}: expected {KEY_BYTES} bytes, found {found}")]
    BadLength { path: String, found: usize },
    /// The record names another key than the one given.
    #[error("record is encrypted with key id {record}, but key id {given} was given")]
    WrongKeyId { record: u32, given: u32 },
    /// AES-GCM authentication failed: wrong key, or payload/descriptor modified.
    #[error("payload of volume {volume_id} seq {volume_seq} does not authenticate (wrong key, or modified data)")]
    Authentication { volume_id: u64, volume_seq: u64 },
    /// The stored payload is shorter than the tag or does not match the descriptor's length.
    #[error("stored payload is {found} bytes, expected {expected}")]
    PayloadLength { found: usize, expected: usize },
}

/// The 12-byte nonce: the WRL's nonce domain and a counter that is never reused within it.
pub fn nonce(wrl_id: u32, counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[..4].copy_from_slice(&wrl_id.to_le_bytes());
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

/// Splits a nonce into its domain and counter.
pub fn nonce_parts(nonce: &[u8; 12]) -> (u32, u64) {
    (u32::from_le_bytes(nonce[..4].try_into().expect("4")), u64::from_le_bytes(nonce[4..].try_into().expect("8")))
}

/// One version of a volume's data key.
#[derive(Clone)]
pub struct VolumeKey {
    id: u32,
    cipher: Aes256Gcm,
}

impl std::fmt::Debug for VolumeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("VolumeKey").field("id", &self.id).finish_non_exhaustive()
    }
}

impl VolumeKey {
    pub fn from_bytes(id: u32, bytes: &[u8; KEY_BYTES]) -> Self {
        let cipher = Aes256Gcm::new(bytes.into());
        VolumeKey { id, cipher }
    }

    /// Reads a 32-byte key file.
    pub fn load(id: u32, path: &std::path::Path) -> Result<Self, KeyError> {
        let p = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|err| KeyError::Read { path: p.clone(), err })?;
        let arr: [u8; KEY_BYTES] =
            bytes.as_slice().try_into().map_err(|_| KeyError::BadLength { path: p, found: bytes.len() })?;
        Ok(Self::from_bytes(id, &arr))
    }

    pub fn id(&self) -> u32 {
        self.id
    }

    /// Encrypts `plaintext` for `desc` (whose `key_id`, `nonce` and `length` must already be set)
    /// and appends ciphertext and tag to `out`.
    pub fn seal(&self, desc: &WriteDesc, plaintext: &[u8], out: &mut Vec<u8>) {
        assert_eq!(desc.key_id, self.id, "descriptor names another key");
        assert_eq!(desc.length as usize, plaintext.len(), "descriptor length");
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_inout_detached(&Nonce::from(desc.nonce), &desc.aad(), (&mut out[start..]).into())
            .expect("AES-GCM accepts payloads up to 64 GiB");
        out.extend_from_slice(&tag);
    }

    /// Authenticates and decrypts a stored payload (ciphertext || tag) of `desc`.
    pub fn open(&self, desc: &WriteDesc, stored: &[u8]) -> Result<Vec<u8>, KeyError> {
        if desc.key_id != self.id {
            return Err(KeyError::WrongKeyId { record: desc.key_id, given: self.id });
        }
        let expected = desc.length as usize + TAG_LEN;
        if stored.len() != expected {
            return Err(KeyError::PayloadLength { found: stored.len(), expected });
        }
        let (ct, tag) = stored.split_at(desc.length as usize);
        let mut plain = ct.to_vec();
        let tag: [u8; TAG_LEN] = tag.try_into().expect("16");
        self.cipher
            .decrypt_inout_detached(&Nonce::from(desc.nonce), &desc.aad(), plain.as_mut_slice().into(), &Tag::from(tag))
            .map_err(|_| KeyError::Authentication { volume_id: desc.volume_id, volume_seq: desc.volume_seq })?;
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Flags;

    fn desc(len: u32) -> WriteDesc {
        WriteDesc {
            volume_id: 1,
            volume_seq: 2,
            epoch: 3,
            offset: 4096,
            length: len,
            flags: Flags::FUA,
            key_id: 9,
            nonce: nonce(5, 77),
            capture_unix: 1_700_000_000,
        }
    }

    #[test]
    fn seal_open_round_trip_and_tamper() {
        let key = VolumeKey::from_bytes(9, &[7u8; 32]);
        let plain = b"hello block world".to_vec();
        let d = desc(plain.len() as u32);
        let mut stored = Vec::new();
        key.seal(&d, &plain, &mut stored);
        assert_eq!(stored.len(), plain.len() + TAG_LEN);
        assert_ne!(&stored[..plain.len()], &plain[..]);
        assert_eq!(key.open(&d, &stored).unwrap(), plain);

        // The descriptor is authenticated: another offset does not open.
        let mut moved = d;
        moved.offset += 512;
        assert!(matches!(key.open(&moved, &stored), Err(KeyError::Authentication { .. })));
        // So is the capture time: a record cannot be passed off as written at another time.
        let later = WriteDesc { capture_unix: d.capture_unix + 3600, ..d };
        assert!(matches!(key.open(&later, &stored), Err(KeyError::Authentication { .. })));
        // A flipped ciphertext bit does not open.
        let mut bad = stored.clone();
        bad[0] ^= 1;
        assert!(key.open(&d, &bad).is_err());
        // Another key does not open.
        let other = VolumeKey::from_bytes(9, &[8u8; 32]);
        assert!(other.open(&d, &stored).is_err());
    }

    #[test]
    fn nonce_layout() {
        let n = nonce(0x01020304, 0x1122334455667788);
        assert_eq!(nonce_parts(&n), (0x01020304, 0x1122334455667788));
        assert_eq!(n[0], 4);
    }
}
