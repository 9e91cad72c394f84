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
