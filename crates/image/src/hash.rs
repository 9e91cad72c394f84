//! A content hash for caching vision encodings.

use std::fmt;

use sha2::{Digest, Sha256};

/// SHA-256 of an image's *encoded* bytes (the file, or a data URI's decoded payload).
///
/// Why the encoded bytes and not the decoded pixels: the bytes determine the pixels (decoding is deterministic),
/// so the key is sound, and hashing them needs no decode: on a cache hit (the same image sent again in a
/// conversation, as an OpenAI client resends every turn) the runtime skips decoding and preprocessing too, which
/// cost more than the hash (a 1080p JPEG decodes in ~15 ms; its ~0.5 MB hash in well under 1 ms). The price is
/// that the same picture re-encoded (another JPEG quality, PNG instead of JPEG) misses the cache; that case is
/// rare within a conversation. The same bytes hash the same whether they arrive as a path, bytes or a data URI.
/// A cryptographic hash, because a cache shared by several users must not let one user forge another's key.
/// The key does not cover the processor settings: a cache must be per model (per image processor).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ImageHash([u8; 32]);

impl ImageHash {
    pub fn of_encoded(bytes: &[u8]) -> ImageHash {
        ImageHash(Sha256::digest(bytes).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for ImageHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|byte| write!(f, "{byte:02x}"))
    }
}

impl fmt::Debug for ImageHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageHash({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_the_sha256_of_the_bytes() {
        // sha256("abc"), FIPS 180-2 test vector.
        let expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
        assert_eq!(ImageHash::of_encoded(b"abc").to_string(), expected);
    }
}
