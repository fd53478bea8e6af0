//! hivemind's `RoutingTable` and `KBucket` (`hivemind/dht/routing.py`): Kademlia k-buckets over the
//! 160-bit id space, split on demand, with a replacement cache per bucket.
//!
//! A bucket covers the ids that share its first `depth` bits with `lower`. When a full bucket receives a
//! new node it is split if it contains our own id or if `depth % depth_modulo != 0` (Kademlia §4.2);
//! otherwise the node goes to the bucket's replacement cache and the least-recently-seen node of the
//! bucket is returned for the caller to ping (§2.2). Nodes are kept in least-recently-seen-first order,
//! as the Python `dict`s underneath keep them.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use apiary_wire::dhtid::DhtId;
use libp2p_identity::PeerId;

/// One k-bucket: up to `size` nodes whose ids share the first `depth` bits with `lower`.
#[derive(Debug, Clone)]
pub struct KBucket {
    lower: DhtId,
    depth: u32,
    size: usize,
    /// Least recently seen first.
    nodes: Vec<(DhtId, PeerId)>,
    /// Least recently seen first; the most recent is promoted when a node leaves.
    replacement_nodes: Vec<(DhtId, PeerId)>,
    nodes_requested_for_ping: HashSet<DhtId>,
    last_updated: Instant,
}

impl KBucket {
    fn new(lower: DhtId, depth: u32, size: usize) -> Self {
        KBucket {
            lower,
            depth,
            size,
            nodes: Vec::new(),
            replacement_nodes: Vec::new(),
            nodes_requested_for_ping: HashSet::new(),
            last_updated: Instant::now(),
        }
    }

    /// The smallest id in range.
    pub fn lower(&self) -> DhtId {
        self.lower
    }

    /// How many times the whole space was halved to make this bucket.
    pub fn depth(&self) -> u32 {
        self.depth
    }

    /// When a node was last added or refreshed here (hivemind's `last_updated`, used for refreshes).
    pub fn last_updated(&self) -> Instant {
        self.last_updated
    }

    /// The active nodes, least recently seen first.
    pub fn nodes(&self) -> &[(DhtId, PeerId)] {
        &self.nodes
    }

    /// The replacement cache, least recently seen first.
    pub fn replacement_nodes(&self) -> &[(DhtId, PeerId)] {
        &self.replacement_nodes
    }

    /// `lower <= node_id < upper`.
    pub fn has_in_range(&self, node_id: &DhtId) -> bool {
        self.depth == 0 || self.lower.common_prefix_len(node_id) >= self.depth
    }

    /// The peer of `node_id`, active or replacement.
    pub fn get(&self, node_id: &DhtId) -> Option<PeerId> {
        self.nodes
            .iter()
            .chain(self.replacement_nodes.iter())
            .find(|(id, _)| id == node_id)
            .map(|(_, p)| *p)
    }

    /// `KBucket.add_or_update_node`: adds or refreshes the node (moving it to most-recent); `false` when
    /// the bucket is full, in which case the node goes (or moves) to the end of the replacement cache.
    pub fn add_or_update_node(&mut self, node_id: DhtId, peer_id: PeerId) -> bool {
        self.nodes_requested_for_ping.remove(&node_id);
        self.last_updated = Instant::now();
        if let Some(i) = self.nodes.iter().position(|(id, _)| *id == node_id) {
            self.nodes.remove(i);
            self.nodes.push((node_id, peer_id));
        } else if self.nodes.len() < self.size {
            self.nodes.push((node_id, peer_id));
        } else {
            self.replacement_nodes.retain(|(id, _)| *id != node_id);
            self.replacement_nodes.push((node_id, peer_id));
            return false;
        }
        true
    }

    /// `KBucket.request_ping_node`: the least-recently-seen node not already being pinged, marked as
    /// being pinged.
    pub fn request_ping_node(&mut self) -> Option<(DhtId, PeerId)> {
        let found = self
            .nodes
            .iter()
            .find(|(id, _)| !self.nodes_requested_for_ping.contains(id))
            .copied()?;
        self.nodes_requested_for_ping.insert(found.0);
        Some(found)
    }

    /// `KBucket.__delitem__`: removes the node; if it was active, the most recent replacement takes its
    /// place. Returns its peer, `None` when absent.
    pub fn remove(&mut self, node_id: &DhtId) -> Option<PeerId> {
        let mut found = None;
        if let Some(i) = self.replacement_nodes.iter().position(|(id, _)| id == node_id) {
            found = Some(self.replacement_nodes.remove(i).1);
        }
        if let Some(i) = self.nodes.iter().position(|(id, _)| id == node_id) {
            found = Some(self.nodes.remove(i).1);
            if let Some(promoted) = self.replacement_nodes.pop() {
                self.nodes.push(promoted);
            }
        }
        found
    }

    /// `KBucket.split`: two halves of this bucket, nodes then replacements re-added in order.
    ///
    /// hivemind sends a node whose id equals the midpoint to the left half (`int(node_id) <= midpoint`),
    /// outside that half's range; here it goes to the right half, where lookups search for it.
    fn split(&self) -> (KBucket, KBucket) {
        let mut left = KBucket::new(self.lower, self.depth + 1, self.size);
        let right_lower = with_bit(self.lower, self.depth, true);
        let mut right = KBucket::new(right_lower, self.depth + 1, self.size);
        for &(node_id, peer_id) in self.nodes.iter().chain(self.replacement_nodes.iter()) {
            if node_id.bit(self.depth) {
                right.add_or_update_node(node_id, peer_id);
            } else {
                left.add_or_update_node(node_id, peer_id);
            }
        }
        (left, right)
    }
}

fn with_bit(id: DhtId, i: u32, value: bool) -> DhtId {
    let mut bytes = id.to_bytes();
    let (byte, bit) = ((i / 8) as usize, i % 8);
    if let Some(b) = bytes.get_mut(byte) {
        if value {
            *b |= 0x80 >> bit;
        } else {
            *b &= !(0x80 >> bit);
        }
    }
    DhtId::from(bytes)
}

/// hivemind's `RoutingTable`: the k-buckets of one node, plus `node_id ↔ peer_id` maps covering every
/// node in a bucket or a replacement cache.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    node_id: DhtId,
    bucket_size: usize,
    depth_modulo: u32,
    buckets: Vec<KBucket>,
    peer_id_to_uid: HashMap<PeerId, DhtId>,
    uid_to_peer_id: HashMap<DhtId, PeerId>,
}

impl RoutingTable {
    /// An empty table for `node_id`: one bucket over the whole space. `depth_modulo` 0 is treated as 1.
    pub fn new(node_id: DhtId, bucket_size: usize, depth_modulo: u32) -> Self {
        RoutingTable {
            node_id,
            bucket_size,
            depth_modulo: depth_modulo.max(1),
            buckets: vec![KBucket::new(DhtId::MIN, 0, bucket_size)],
            peer_id_to_uid: HashMap::new(),
            uid_to_peer_id: HashMap::new(),
        }
    }

    /// Our own id, the one distances are measured from.
    pub fn node_id(&self) -> DhtId {
        self.node_id
    }

    /// `k`.
    pub fn bucket_size(&self) -> usize {
        self.bucket_size
    }

    /// The buckets, ordered by range.
    pub fn buckets(&self) -> &[KBucket] {
        &self.buckets
    }

    /// How many nodes the maps know (active and replacements).
    pub fn len(&self) -> usize {
        self.uid_to_peer_id.len()
    }

    /// Whether the table knows no node.
    pub fn is_empty(&self) -> bool {
        self.uid_to_peer_id.is_empty()
    }

    /// `get_bucket_index`: the bucket `node_id` falls into.
    pub fn bucket_index(&self, node_id: &DhtId) -> usize {
        // buckets tile the space in order: the last bucket whose lower bound is <= node_id
        self.buckets
            .partition_point(|b| b.lower <= *node_id)
            .saturating_sub(1)
    }

    /// `add_or_update_node`, called after every incoming request and every answered outgoing one.
    /// Returns the least-recently-seen node to ping when `node_id` could not be added (the bucket is
    /// full and may not be split); the new node then waits in the replacement cache.
    pub fn add_or_update_node(&mut self, node_id: DhtId, peer_id: PeerId) -> Option<(DhtId, PeerId)> {
        loop {
            let index = self.bucket_index(&node_id);
            let bucket = &mut self.buckets[index];
            let stored = bucket.add_or_update_node(node_id, peer_id);
            if bucket.get(&node_id).is_some() {
                self.uid_to_peer_id.insert(node_id, peer_id);
                self.peer_id_to_uid.insert(peer_id, node_id);
            }
            if stored {
                return None;
            }
            let bucket = &mut self.buckets[index];
            let splittable = bucket.depth < DhtId::BITS
                && (bucket.has_in_range(&self.node_id) || !bucket.depth.is_multiple_of(self.depth_modulo));
            if !splittable {
                return bucket.request_ping_node();
            }
            self.split_bucket(index);
        }
    }

    fn split_bucket(&mut self, index: usize) {
        let (left, right) = self.buckets[index].split();
        self.buckets[index] = left;
        self.buckets.insert(index + 1, right);
    }

    /// The peer of a node id (`table.get(node_id=…)`).
    pub fn peer_id(&self, node_id: &DhtId) -> Option<PeerId> {
        self.uid_to_peer_id.get(node_id).copied()
    }

    /// The node id of a peer (`table.get(peer_id=…)`).
    pub fn node_id_of(&self, peer_id: &PeerId) -> Option<DhtId> {
        self.peer_id_to_uid.get(peer_id).copied()
    }

    /// `node_id in table`.
    pub fn contains(&self, node_id: &DhtId) -> bool {
        self.uid_to_peer_id.contains_key(node_id)
    }

    /// `peer_id in table`.
    pub fn contains_peer(&self, peer_id: &PeerId) -> bool {
        self.peer_id_to_uid.contains_key(peer_id)
    }

    /// `del table[node_id]`: removes the node from its bucket (promoting a replacement) and the maps.
    pub fn remove(&mut self, node_id: &DhtId) -> Option<PeerId> {
        let index = self.bucket_index(node_id);
        self.buckets[index].remove(node_id)?;
        let peer_id = self.uid_to_peer_id.remove(node_id)?;
        if self.peer_id_to_uid.get(&peer_id) == Some(node_id) {
            self.peer_id_to_uid.remove(&peer_id);
        }
        Some(peer_id)
    }

    /// `get_nearest_neighbors`: up to `k` active nodes nearest to `query_id` by XOR distance, nearest
    /// first, without `exclude`. Like hivemind it gathers whole subtrees around `query_id`'s bucket until
    /// it holds `k` (+1 with `exclude`) candidates, so it is exact for the nodes it considers.
    pub fn get_nearest_neighbors(
        &self,
        query_id: &DhtId,
        k: usize,
        exclude: Option<&DhtId>,
    ) -> Vec<(DhtId, PeerId)> {
        let wanted = k + usize::from(exclude.is_some());
        let nearest_index = self.bucket_index(query_id);
        let nearest = &self.buckets[nearest_index];
        let mut candidates: Vec<(DhtId, DhtId, PeerId)> = Vec::new();
        let push_all = |candidates: &mut Vec<_>, bucket: &KBucket| {
            for &(node_id, peer_id) in &bucket.nodes {
                candidates.push((query_id.xor_distance(&node_id), node_id, peer_id));
            }
        };
        push_all(&mut candidates, nearest);
        let (mut left, mut right) = (nearest_index, nearest_index + 1);
        let (mut lower, mut depth) = (nearest.lower, nearest.depth);
        while depth > 0 && candidates.len() < wanted {
            depth -= 1;
            // the parent covers ids sharing `depth` bits with `lower`; merge the sibling side
            lower = with_bit(lower, depth, false);
            while right < self.buckets.len()
                && (depth == 0 || self.buckets[right].lower.common_prefix_len(&lower) >= depth)
            {
                push_all(&mut candidates, &self.buckets[right]);
                right += 1;
            }
            while left > 0 && (depth == 0 || self.buckets[left - 1].lower.common_prefix_len(&lower) >= depth)
            {
                left -= 1;
                push_all(&mut candidates, &self.buckets[left]);
            }
        }
        candidates.sort_unstable_by_key(|&(distance, node_id, _)| (distance, node_id));
        candidates.truncate(wanted);
        candidates
            .into_iter()
            .filter(|(_, node_id, _)| Some(node_id) != exclude)
            .map(|(_, node_id, peer_id)| (node_id, peer_id))
            .take(k)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn random_id(rng: &mut StdRng) -> DhtId {
        DhtId::from(rng.r#gen::<[u8; 20]>())
    }

    fn table_with(rng: &mut StdRng, n: usize) -> (RoutingTable, Vec<(DhtId, PeerId)>) {
        let mut table = RoutingTable::new(random_id(rng), 20, 5);
        let mut all = Vec::new();
        for _ in 0..n {
            let (id, peer) = (random_id(rng), PeerId::random());
            table.add_or_update_node(id, peer);
            all.push((id, peer));
        }
        (table, all)
    }

    #[test]
    fn buckets_tile_the_space_and_hold_their_nodes() {
        let mut rng = StdRng::seed_from_u64(1);
        let (table, all) = table_with(&mut rng, 2000);
        assert!(table.buckets().len() > 1);
        assert_eq!(table.buckets()[0].lower(), DhtId::MIN);
        for pair in table.buckets().windows(2) {
            // the next bucket starts where this one ends
            let end_bit = pair[0].depth() - 1;
            assert!(pair[1].lower() > pair[0].lower());
            assert!(pair[1].lower().common_prefix_len(&pair[0].lower()) <= end_bit);
        }
        for b in table.buckets() {
            assert!(b.nodes().len() <= 20);
            for (id, _) in b.nodes().iter().chain(b.replacement_nodes()) {
                assert!(b.has_in_range(id));
            }
        }
        // every node is known either as active or in a replacement cache
        for (id, peer) in &all {
            assert_eq!(table.peer_id(id), Some(*peer));
            assert_eq!(table.node_id_of(peer), Some(*id));
        }
    }

    #[test]
    fn nearest_neighbors_match_brute_force() {
        let mut rng = StdRng::seed_from_u64(2);
        let (table, _) = table_with(&mut rng, 1000);
        let active: Vec<(DhtId, PeerId)> = table.buckets().iter().flat_map(|b| b.nodes().to_vec()).collect();
        for _ in 0..200 {
            let q = random_id(&mut rng);
            let k = rng.gen_range(1..40);
            let got = table.get_nearest_neighbors(&q, k, None);
            // buckets near our own id are complete, so the true nearest active nodes are found there;
            // in general hivemind's answer is the nearest of the gathered subtrees
            assert!(got.len() == k.min(active.len()));
            for w in got.windows(2) {
                assert!(q.xor_distance(&w[0].0) < q.xor_distance(&w[1].0));
            }
            // excluding the nearest shifts the list by one
            let excl = table.get_nearest_neighbors(&q, k, Some(&got[0].0));
            assert!(excl.iter().all(|(id, _)| *id != got[0].0));
            assert_eq!(excl[..k.min(got.len()) - 1], got[1..]);
        }
        // queries at our own id: complete buckets, so the answer is the exact brute-force answer
        let own = table.node_id();
        let mut brute = active.clone();
        brute.sort_by_key(|(id, _)| own.xor_distance(id));
        let got = table.get_nearest_neighbors(&own, 20, None);
        assert_eq!(got, brute[..20]);
    }

    #[test]
    fn full_bucket_asks_to_ping_least_recently_seen_and_promotes_replacement() {
        // our id in the upper half; ids in the lower half fill a bucket that may not split at depth 5
        let own = DhtId::from([0xff; 20]);
        let mut table = RoutingTable::new(own, 2, 1);
        let ids: Vec<DhtId> = (1..=4u8)
            .map(|i| {
                let mut b = [0u8; 20];
                b[19] = i;
                DhtId::from(b)
            })
            .collect();
        let peers: Vec<PeerId> = (0..4).map(|_| PeerId::random()).collect();
        assert_eq!(table.add_or_update_node(ids[0], peers[0]), None);
        assert_eq!(table.add_or_update_node(ids[1], peers[1]), None);
        // depth_modulo 1: the far bucket (depth 1, no own id) never splits
        assert_eq!(
            table.add_or_update_node(ids[2], peers[2]),
            Some((ids[0], peers[0]))
        );
        // the next one asks for the next node not already pinged
        assert_eq!(
            table.add_or_update_node(ids[3], peers[3]),
            Some((ids[1], peers[1]))
        );
        assert!(table.contains(&ids[2]) && table.contains(&ids[3]));
        // the pinged node answered: it moves to most-recent and may be asked again
        assert_eq!(table.add_or_update_node(ids[0], peers[0]), None);
        // the other did not: removing it promotes the most recent replacement
        assert_eq!(table.remove(&ids[1]), Some(peers[1]));
        let bucket = &table.buckets()[table.bucket_index(&ids[0])];
        assert_eq!(bucket.nodes(), &[(ids[0], peers[0]), (ids[3], peers[3])]);
        assert_eq!(bucket.replacement_nodes(), &[(ids[2], peers[2])]);
        assert!(!table.contains(&ids[1]));
        assert_eq!(table.remove(&ids[1]), None);
    }
}
