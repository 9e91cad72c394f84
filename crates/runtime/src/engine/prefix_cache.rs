//! KV reuse across requests: system prompts, earlier chat turns, shared few-shot blocks.
//!
//! Keyed like vLLM's: a token sequence is cut into blocks of [`BLOCK_TOKENS`] tokens, and block
//! i's key hashes block i-1's key with block i's tokens, so a key stands for the whole prefix up
//! to its block. A lookup walks the keys of a prompt and stops at the first block the cache does
//! not hold (each hit block's tokens and parent are compared too, so a hash collision cannot
//! hand out another prefix's KV). Only full blocks are cached.
//!
//! Storage is by extent: the new blocks of one finished sequence are stored together, per layer
//! and direction as (kv_heads, tokens, head_dim), so a hit is one strided copy per layer and
//! direction for each extent it spans, not one per block. A sequence that extends an earlier
//! one (the next chat turn) stores only the blocks after what it reused, as an extent whose
//! parent is the earlier one's. The cache is bounded in bytes and evicts the least recently used
//! extent first, together with the extents that continue it (they can no longer be reached).
//!
//! Images: every image's pad tokens have the same id, so two prompts that differ only in an
//! image have the same tokens. As vLLM's extra keys do, the content hash of each image whose pad
//! tokens fall in a block goes into that block's key (and so into every later block's), and is
//! compared on a hit like the tokens.
//!
//! This module keeps the index; where the bytes live (`S`) and the copies are the runner's.

use std::collections::{HashMap, HashSet};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::ops::Range;

use sha2::{Digest, Sha256};

/// Tokens per block: the granularity of prefix matches (vLLM's default block size).
pub const BLOCK_TOKENS: usize = 16;

pub type BlockHash = u64;
type ExtentId = u64;
/// A content hash a block's key covers besides its tokens (an image's SHA-256).
pub type ExtraKey = [u8; 32];

/// The key of one full block: the hash of the whole prefix up to it, and the content hashes of
/// the images whose tokens fall in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockKey {
    pub hash: BlockHash,
    pub extra: Box<[ExtraKey]>,
}

/// The keys of `tokens`' full blocks, each covering the whole prefix up to its block; `extra`
/// gives the token ranges of content the tokens do not show (an image's pad tokens) with its
/// hash.
pub fn block_keys(tokens: &[u32], extra: &[(Range<usize>, ExtraKey)]) -> Vec<BlockKey> {
    let mut parent = None;
    tokens
        .chunks_exact(BLOCK_TOKENS)
        .enumerate()
        .map(|(i, block)| {
            let span = i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS;
            let extra: Box<[ExtraKey]> = extra
                .iter()
                .filter(|(range, _)| range.start < span.end && span.start < range.end)
                .map(|(_, key)| *key)
                .collect();
            let mut h = DefaultHasher::new();
            parent.hash(&mut h);
            block.hash(&mut h);
            extra.hash(&mut h);
            let hash = h.finish();
            parent = Some(hash);
            BlockKey { hash, extra }
        })
        .collect()
}

/// The extra key of a request's `cache_salt`, given to its first block: a salted prompt's blocks
/// match only the blocks of prompts with the same salt (the first block's key holds it, and every
/// later block's hash and parent chain start from that one).
pub fn salt_key(salt: &str) -> (Range<usize>, ExtraKey) {
    let mut h = Sha256::new();
    h.update(b"pio cache_salt\0");
    h.update(salt.as_bytes());
    (0..1, h.finalize().into())
}

/// [`block_keys`] of tokens without images.
#[cfg(test)]
pub fn block_hashes(tokens: &[u32]) -> Vec<BlockKey> {
    block_keys(tokens, &[])
}

struct Block {
    extent: ExtentId,
    /// Position of the block inside its extent.
    index: usize,
    parent: Option<BlockHash>,
    tokens: Box<[u32]>,
    extra: Box<[ExtraKey]>,
}

pub struct Extent<S> {
    pub storage: S,
    /// Blocks stored (their tokens are the extent's length).
    pub blocks: usize,
    keys: Vec<BlockHash>,
    parent: Option<ExtentId>,
    children: Vec<ExtentId>,
    last_used: u64,
}

/// Blocks `first..first + blocks` of an extent, which hold the sequence's blocks
/// `to..to + blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HitPiece {
    pub extent: ExtentId,
    pub first: usize,
    pub blocks: usize,
    pub to: usize,
}

/// Room made for a sequence's blocks `first_block..first_block + blocks` (those the cache does
/// not hold yet); [`PrefixCache::commit`] stores them once their bytes are copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub first_block: usize,
    pub blocks: usize,
    pub(super) parent: Option<ExtentId>,
}

pub struct PrefixCache<S> {
    blocks: HashMap<BlockHash, Block>,
    extents: HashMap<ExtentId, Extent<S>>,
    block_bytes: u64,
    limit_bytes: u64,
    used_bytes: u64,
    clock: u64,
    next_extent: ExtentId,
}

impl<S> PrefixCache<S> {
    /// A cache of at most `limit_bytes`, each block costing `block_bytes`.
    pub fn new(limit_bytes: u64, block_bytes: u64) -> Self {
        PrefixCache {
            blocks: HashMap::new(),
            extents: HashMap::new(),
            block_bytes: block_bytes.max(1),
            limit_bytes,
            used_bytes: 0,
            clock: 0,
            next_extent: 0,
        }
    }

    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    pub fn extent(&self, id: ExtentId) -> Option<&Extent<S>> {
        self.extents.get(&id)
    }

    /// The blocks of the longest cached prefix of `tokens`, with the extent each is in.
    fn walk(&self, tokens: &[u32], keys: &[BlockKey]) -> Vec<(BlockHash, ExtentId, usize)> {
        let mut found = Vec::new();
        let mut parent = None;
        for (i, key) in keys.iter().enumerate() {
            let Some(block) = self.blocks.get(&key.hash) else { break };
            let want = &tokens[i * BLOCK_TOKENS..(i + 1) * BLOCK_TOKENS];
            if block.parent != parent || &*block.tokens != want || block.extra != key.extra {
                break;
            }
            found.push((key.hash, block.extent, block.index));
            parent = Some(key.hash);
        }
        found
    }

    /// How many leading tokens of `tokens` (whole blocks) the cache holds; does not count as a
    /// use. `keys` are [`block_hashes`] of `tokens`.
    pub fn lookup(&self, tokens: &[u32], keys: &[BlockKey]) -> usize {
        self.walk(tokens, keys).len() * BLOCK_TOKENS
    }

    fn touch(&mut self, extent: ExtentId) {
        self.clock += 1;
        if let Some(e) = self.extents.get_mut(&extent) {
            e.last_used = self.clock;
        }
    }

    /// The cached prefix of `tokens` (at most `max_blocks` blocks) as runs of consecutive blocks
    /// of one extent, marked as just used.
    pub fn acquire(&mut self, tokens: &[u32], keys: &[BlockKey], max_blocks: usize) -> Vec<HitPiece> {
        let mut pieces: Vec<HitPiece> = Vec::new();
        for (to, (_, extent, index)) in self.walk(tokens, keys).into_iter().take(max_blocks).enumerate() {
            match pieces.last_mut() {
                Some(p) if p.extent == extent && p.first + p.blocks == index => p.blocks += 1,
                _ => pieces.push(HitPiece { extent, first: index, blocks: 1, to }),
            }
        }
        for p in &pieces {
            self.touch(p.extent);
        }
        pieces
    }

    /// Makes room for the blocks of `tokens` the cache does not hold, evicting least recently
    /// used extents (not those `tokens` runs through). None when every block is cached already or
    /// nothing fits. Fewer blocks than are new are reserved when not all fit (the earliest).
    pub fn reserve(&mut self, tokens: &[u32], keys: &[BlockKey]) -> Option<Reservation> {
        let held = self.walk(tokens, keys);
        let chain: HashSet<ExtentId> = held.iter().map(|&(_, e, _)| e).collect();
        for &e in &chain {
            self.touch(e);
        }
        let first_block = held.len();
        let new = keys.len() - first_block;
        if new == 0 {
            return None;
        }
        let need = new as u64 * self.block_bytes;
        while self.used_bytes + need > self.limit_bytes {
            let victim = self
                .extents
                .iter()
                .filter(|(id, _)| !chain.contains(id))
                .min_by_key(|(_, e)| e.last_used)
                .map(|(&id, _)| id);
            match victim {
                Some(id) => self.evict(id),
                None => break,
            }
        }
        let room = ((self.limit_bytes.saturating_sub(self.used_bytes)) / self.block_bytes) as usize;
        let blocks = new.min(room);
        let parent = held.last().map(|&(_, e, _)| e);
        (blocks > 0).then_some(Reservation { first_block, blocks, parent })
    }

    /// Stores the reserved blocks of `tokens`, whose bytes are in `storage`.
    pub fn commit(&mut self, reservation: Reservation, tokens: &[u32], keys: &[BlockKey], storage: S) -> ExtentId {
        let id = self.next_extent;
        self.next_extent += 1;
        let Reservation { first_block, blocks, parent } = reservation;
        let extent_keys: Vec<BlockHash> = keys[first_block..first_block + blocks].iter().map(|k| k.hash).collect();
        for (index, key) in keys[first_block..first_block + blocks].iter().enumerate() {
            let b = first_block + index;
            let block_parent = b.checked_sub(1).map(|p| keys[p].hash);
            let block_tokens = tokens[b * BLOCK_TOKENS..(b + 1) * BLOCK_TOKENS].into();
            let block =
                Block { extent: id, index, parent: block_parent, tokens: block_tokens, extra: key.extra.clone() };
            self.blocks.insert(key.hash, block);
        }
        // A parent evicted since the reservation would leave this extent unreachable: it is
        // reachable only while its parent is (see `evict`).
        let parent = parent.filter(|p| self.extents.contains_key(p));
        if let Some(p) = parent.and_then(|p| self.extents.get_mut(&p)) {
            p.children.push(id);
        }
        self.clock += 1;
        self.used_bytes += blocks as u64 * self.block_bytes;
        self.extents.insert(
            id,
            Extent { storage, blocks, keys: extent_keys, parent, children: Vec::new(), last_used: self.clock },
        );
        id
    }

    /// Drops an extent and every extent that continues it.
    fn evict(&mut self, id: ExtentId) {
        let Some(extent) = self.extents.remove(&id) else { return };
        for key in &extent.keys {
            if self.blocks.get(key).is_some_and(|b| b.extent == id) {
                self.blocks.remove(key);
            }
        }
        self.used_bytes -= extent.blocks as u64 * self.block_bytes;
        if let Some(p) = extent.parent.and_then(|p| self.extents.get_mut(&p)) {
            p.children.retain(|&c| c != id);
        }
        for child in extent.children {
            self.evict(child);
        }
    }

    #[cfg(test)]
    pub fn extents(&self) -> usize {
        self.extents.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: usize = BLOCK_TOKENS;

    fn tokens(seed: u32, n: usize) -> Vec<u32> {
        (0..n as u32).map(|i| seed * 1000 + i).collect()
    }

    fn insert(cache: &mut PrefixCache<()>, t: &[u32]) -> Option<Reservation> {
        let keys = block_hashes(t);
        let r = cache.reserve(t, &keys)?;
        cache.commit(r, t, &keys, ());
        Some(r)
    }

    #[test]
    fn keys_cover_the_whole_prefix() {
        let a = tokens(1, 3 * B + 5);
        let mut b = a.clone();
        b[0] += 1; // same later blocks, another first block
        let (ka, kb) = (block_hashes(&a), block_hashes(&b));
        assert_eq!(ka.len(), 3, "only full blocks");
        assert!(ka.iter().zip(&kb).all(|(x, y)| x != y), "a different start changes every key");
        assert_eq!(block_hashes(&a[..2 * B]), ka[..2], "a prefix has the prefix's keys");
    }

    #[test]
    fn an_image_hash_keys_the_blocks_its_tokens_fall_in_and_every_later_one() {
        let mut cache = PrefixCache::new(1 << 20, 1);
        // Text, then an image's pad tokens over blocks 1 and 2, then text.
        let prompt = tokens(1, 4 * B);
        let image = |byte: u8| [(B + 5..3 * B - 2, [byte; 32])];
        let (a, b) = (block_keys(&prompt, &image(1)), block_keys(&prompt, &image(2)));
        assert_eq!(a[0], b[0], "the block before the image is shared");
        assert!(a[1..].iter().zip(&b[1..]).all(|(x, y)| x.hash != y.hash), "the image's blocks and those after differ");
        assert_eq!((a[1].extra.len(), a[3].extra.len()), (1, 0));
        let r = cache.reserve(&prompt, &a).unwrap();
        cache.commit(r, &prompt, &a, ());
        assert_eq!(cache.lookup(&prompt, &a), 4 * B);
        assert_eq!(cache.lookup(&prompt, &b), B, "another image: only the text before it is a hit");
        // A key hash that collides but carries another image is no hit either.
        let mut forged = b.clone();
        forged[1].hash = a[1].hash;
        assert_eq!(cache.lookup(&prompt, &forged), B);
    }

    #[test]
    fn an_earlier_requests_prefix_is_found_after_unrelated_ones() {
        let mut cache = PrefixCache::new(1 << 20, 1);
        let system = tokens(1, 8 * B);
        insert(&mut cache, &system);
        insert(&mut cache, &tokens(2, 5 * B)); // unrelated
        let mut c = system.clone();
        c.extend(tokens(3, 2 * B + 7));
        let keys = block_hashes(&c);
        assert_eq!(cache.lookup(&c, &keys), 8 * B);
        let pieces = cache.acquire(&c, &keys, usize::MAX);
        assert_eq!(pieces.len(), 1, "one extent, one piece: {pieces:?}");
        assert_eq!((pieces[0].first, pieces[0].blocks, pieces[0].to), (0, 8, 0));
        assert_eq!(cache.acquire(&c, &keys, 3)[0].blocks, 3, "capped at max_blocks");
    }

    #[test]
    fn a_continuation_stores_only_its_new_blocks_and_a_hit_spans_both_extents() {
        let mut cache = PrefixCache::new(1 << 20, 1);
        let turn1 = tokens(1, 4 * B);
        insert(&mut cache, &turn1);
        let mut turn2 = turn1.clone();
        turn2.extend(tokens(2, 3 * B));
        let r = insert(&mut cache, &turn2).unwrap();
        assert_eq!((r.first_block, r.blocks), (4, 3));
        assert_eq!(cache.used_bytes(), 7);
        assert!(insert(&mut cache, &turn2).is_none(), "nothing new the second time");
        let mut turn3 = turn2.clone();
        turn3.extend(tokens(3, B));
        let keys = block_hashes(&turn3);
        let pieces = cache.acquire(&turn3, &keys, usize::MAX);
        let shape: Vec<(usize, usize, usize)> = pieces.iter().map(|p| (p.first, p.blocks, p.to)).collect();
        assert_eq!(shape, [(0, 4, 0), (0, 3, 4)]);
    }

    #[test]
    fn a_block_with_the_same_tokens_after_another_prefix_is_not_a_hit() {
        let mut cache = PrefixCache::new(1 << 20, 1);
        let a = tokens(1, 2 * B);
        insert(&mut cache, &a);
        // b's second block equals a's second block, but its first does not.
        let mut b = tokens(9, B);
        b.extend_from_slice(&a[B..]);
        assert_eq!(cache.lookup(&b, &block_hashes(&b)), 0);
    }

    #[test]
    fn the_least_recently_used_extent_goes_first_with_what_continues_it() {
        let mut cache = PrefixCache::new(10, 1);
        let (a, b) = (tokens(1, 4 * B), tokens(2, 4 * B));
        insert(&mut cache, &a);
        insert(&mut cache, &b);
        let mut a2 = a.clone();
        a2.extend(tokens(3, 2 * B));
        insert(&mut cache, &a2); // 10 bytes: full
        assert_eq!(cache.used_bytes(), 10);
        // Use b, so a (and its continuation) are the least recently used.
        cache.acquire(&b, &block_hashes(&b), usize::MAX);
        let c = tokens(4, 3 * B);
        insert(&mut cache, &c);
        assert_eq!(cache.lookup(&a, &block_hashes(&a)), 0, "a was evicted");
        assert_eq!(cache.lookup(&a2, &block_hashes(&a2)), 0, "and its continuation with it");
        assert_eq!(cache.lookup(&b, &block_hashes(&b)), 4 * B);
        assert_eq!(cache.lookup(&c, &block_hashes(&c)), 3 * B);
        assert_eq!((cache.used_bytes(), cache.extents()), (7, 2));
    }

    #[test]
    fn what_does_not_fit_is_cut_to_the_earliest_blocks() {
        let mut cache = PrefixCache::new(3, 1);
        let long = tokens(1, 5 * B);
        let r = insert(&mut cache, &long).unwrap();
        assert_eq!((r.first_block, r.blocks), (0, 3));
        assert_eq!(cache.lookup(&long, &block_hashes(&long)), 3 * B);
        let mut zero = PrefixCache::<()>::new(0, 1);
        assert!(insert(&mut zero, &long).is_none());
    }
}
