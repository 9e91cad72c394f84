//! Vision encodings kept across requests, keyed by the image's content hash (`pio_image::ImageHash`,
//! the SHA-256 of its encoded bytes), bounded in bytes, least recently used first out. A
//! conversation resends its images every turn (OpenAI clients do): each is encoded once.
//!
//! The key does not cover the image processor's settings, so a cache belongs to one model (one
//! engine). An entry evicted while a running request still uses it stays alive until that request
//! lets go of it (the features are shared), so the bound is on what the cache keeps, not on every
//! encoding in flight.

use std::collections::HashMap;
use std::sync::Arc;

use pio_image::ImageHash;

use super::ImageFeatures;

struct Entry {
    features: Arc<ImageFeatures>,
    last_used: u64,
}

pub struct EncoderCache {
    entries: HashMap<ImageHash, Entry>,
    limit_bytes: u64,
    used_bytes: u64,
    clock: u64,
}

impl EncoderCache {
    /// A cache of at most `limit_bytes` of features (0: keeps nothing).
    pub fn new(limit_bytes: u64) -> Self {
        EncoderCache { entries: HashMap::new(), limit_bytes, used_bytes: 0, clock: 0 }
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The features of the image with this hash, marked as just used.
    pub fn get(&mut self, hash: &ImageHash) -> Option<Arc<ImageFeatures>> {
        self.clock += 1;
        let entry = self.entries.get_mut(hash)?;
        entry.last_used = self.clock;
        Some(Arc::clone(&entry.features))
    }

    /// Keeps `features` under `hash`, evicting the least recently used entries until they fit.
    /// Features larger than the whole cache are not kept.
    pub fn insert(&mut self, hash: ImageHash, features: Arc<ImageFeatures>) {
        let bytes = features.bytes() as u64;
        if bytes > self.limit_bytes {
            return;
        }
        self.remove(&hash);
        while self.used_bytes + bytes > self.limit_bytes {
            let Some(victim) = self.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(h, _)| *h) else { break };
            self.remove(&victim);
        }
        self.clock += 1;
        self.used_bytes += bytes;
        self.entries.insert(hash, Entry { features, last_used: self.clock });
    }

    fn remove(&mut self, hash: &ImageHash) {
        if let Some(old) = self.entries.remove(hash) {
            self.used_bytes -= old.features.bytes() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Features of `tokens` rows of 2 floats and no deepstack: 8 bytes a token.
    fn features(tokens: usize) -> Arc<ImageFeatures> {
        crate::ort_lib::environment().unwrap(); // tensors need ONNX Runtime loaded
        let grid = pio_image::GridThw { t: 1, h: 2, w: 2 };
        Arc::new(ImageFeatures::from_host_f32(vec![0.5; tokens * 2], vec![], 2, 0, grid).unwrap())
    }

    fn hash(n: u8) -> ImageHash {
        ImageHash::of_encoded(&[n])
    }

    #[test]
    fn the_least_recently_used_encoding_goes_first_and_what_cannot_fit_is_not_kept() {
        let mut cache = EncoderCache::new(80);
        cache.insert(hash(1), features(4)); // 32 bytes
        cache.insert(hash(2), features(4));
        assert!(cache.get(&hash(1)).is_some(), "1 is now the most recently used");
        cache.insert(hash(3), features(4)); // 96 > 80: 2 goes
        assert!(cache.get(&hash(2)).is_none());
        assert!(cache.get(&hash(1)).is_some() && cache.get(&hash(3)).is_some());
        assert_eq!((cache.len(), cache.used_bytes()), (2, 64));
        cache.insert(hash(4), features(20)); // 160 bytes: over the whole cache
        assert!(cache.get(&hash(4)).is_none());
        assert_eq!(cache.len(), 2);
        let mut none = EncoderCache::new(0);
        none.insert(hash(1), features(1));
        assert!(none.is_empty());
    }
}
