//! hivemind's `traverse_dht` (`hivemind/dht/traverse.py`): a beam search for the nodes nearest to
//! several queries at once, with up to `num_workers` concurrent `get_neighbors` calls.
//!
//! Each query keeps a nearest-first heap of unvisited candidates and a `beam_size` heap of the nearest
//! nodes found. A free worker picks the unfinished query with the fewest active workers (ties: the
//! nearest candidate), pops its nearest candidate, and asks that peer about it and up to
//! `queries_per_call - 1` other unfinished queries nearest to the peer. A query finishes when its
//! nearest candidate is farther than its `beam_size`-th nearest node and no worker is on it, when
//! `get_neighbors` says to stop, or when no candidates remain anywhere.
//!
//! hivemind's workers are tasks; here one future drives up to `num_workers` calls with
//! `FuturesUnordered`, making the same choices in the same order. Calls still in flight when every
//! query has finished are dropped (hivemind awaits and ignores them).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::future::Future;

use apiary_wire::dhtid::DhtId;
use futures::StreamExt;
use futures::stream::FuturesUnordered;

/// For each query asked: neighbours of the peer for that query, and whether to stop searching it.
pub type NeighborsReply = HashMap<DhtId, (Vec<DhtId>, bool)>;

/// What [`traverse_dht`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraverseResult {
    /// Up to `beam_size` nearest nodes per query, nearest first.
    pub nearest: HashMap<DhtId, Vec<DhtId>>,
    /// Every node asked about each query (including the given `visited_nodes`).
    pub visited: HashMap<DhtId, HashSet<DhtId>>,
}

/// Search parameters.
#[derive(Debug, Clone, Copy)]
pub struct TraverseParams {
    /// How many nearest nodes to find per query (hivemind: `bucket_size`, or `beam_size` of `get`).
    pub beam_size: usize,
    /// Concurrent `get_neighbors` calls (hivemind: `num_workers`, 4 by default).
    pub num_workers: usize,
    /// Queries packed into one call (hivemind: `chunk_size`, 16 by default).
    pub queries_per_call: usize,
}

struct QueryState {
    candidates: BinaryHeap<Reverse<(DhtId, DhtId)>>, // (distance, node), nearest first
    nearest: BinaryHeap<(DhtId, DhtId)>,             // (distance, node), farthest first
    known: HashSet<DhtId>,
    visited: HashSet<DhtId>,
    active: usize,
    finished: bool,
}

impl QueryState {
    fn upper_bound(&self, beam_size: usize) -> Option<DhtId> {
        // None = infinity
        (self.nearest.len() >= beam_size)
            .then(|| self.nearest.peek().map(|(d, _)| *d))
            .flatten()
    }

    fn within(&self, distance: DhtId, beam_size: usize) -> bool {
        self.upper_bound(beam_size).is_none_or(|ub| distance <= ub)
    }

    fn has_candidates(&self, beam_size: usize) -> bool {
        self.candidates
            .peek()
            .is_some_and(|Reverse((d, _))| self.within(*d, beam_size))
    }

    fn sorted_nearest(&self) -> Vec<DhtId> {
        let mut v: Vec<(DhtId, DhtId)> = self.nearest.iter().copied().collect();
        v.sort_unstable();
        v.into_iter().map(|(_, n)| n).collect()
    }
}

/// hivemind's `traverse_dht`. `get_neighbors(peer, queries)` asks `peer` about `queries`; an `Err` counts
/// as an empty answer (hivemind's `DHTNode` turns failed calls into empty answers). `found` is called
/// once per query as it finishes, with its nearest nodes and the nodes visited for it.
pub async fn traverse_dht<F, Fut, E>(
    queries: &[DhtId],
    initial_nodes: &[DhtId],
    params: TraverseParams,
    mut get_neighbors: F,
    mut found: impl FnMut(DhtId, &[DhtId], &HashSet<DhtId>),
    visited_nodes: HashMap<DhtId, HashSet<DhtId>>,
) -> TraverseResult
where
    F: FnMut(DhtId, Vec<DhtId>) -> Fut,
    Fut: Future<Output = Result<NeighborsReply, E>>,
{
    let beam = params.beam_size.max(1);
    let mut states: HashMap<DhtId, QueryState> = HashMap::new();
    let mut order: Vec<DhtId> = Vec::new(); // unfinished queries, in the given order
    for &q in queries {
        if states.contains_key(&q) {
            continue;
        }
        let mut st = QueryState {
            candidates: BinaryHeap::new(),
            nearest: BinaryHeap::new(),
            known: initial_nodes.iter().copied().collect(),
            visited: visited_nodes.get(&q).cloned().unwrap_or_default(),
            active: 0,
            finished: false,
        };
        for &n in initial_nodes {
            let d = q.xor_distance(&n);
            st.candidates.push(Reverse((d, n)));
            st.nearest.push((d, n));
            if st.nearest.len() > beam {
                st.nearest.pop();
            }
        }
        states.insert(q, st);
        order.push(q);
    }
    let mut unfinished: Vec<DhtId> = order.clone();
    let mut in_flight = FuturesUnordered::new();

    let mut finish = |q: DhtId, states: &mut HashMap<DhtId, QueryState>, unfinished: &mut Vec<DhtId>| {
        unfinished.retain(|u| *u != q);
        if let Some(st) = states.get_mut(&q) {
            st.finished = true;
            found(q, &st.sorted_nearest(), &st.visited);
        }
    };

    while !unfinished.is_empty() {
        // start calls while workers are free
        while in_flight.len() < params.num_workers.max(1) && !unfinished.is_empty() {
            let chosen = unfinished
                .iter()
                .copied()
                .min_by_key(|q| {
                    let st = &states[q];
                    if st.has_candidates(beam) {
                        let Reverse((d, _)) = st
                            .candidates
                            .peek()
                            .copied()
                            .unwrap_or(Reverse((DhtId::MAX, DhtId::MAX)));
                        (0u8, st.active, d)
                    } else {
                        (1u8, usize::MAX, DhtId::MAX)
                    }
                })
                .unwrap_or(DhtId::MIN);
            let Some(st) = states.get_mut(&chosen) else { break };
            if !st.has_candidates(beam) {
                if in_flight.is_empty() {
                    for q in unfinished.clone() {
                        finish(q, &mut states, &mut unfinished);
                    }
                }
                break; // wait for other workers to bring candidates
            }
            let Some(Reverse((distance, peer))) = st.candidates.pop() else {
                break;
            };
            if st.visited.contains(&peer) || !st.within(distance, beam) {
                if !st.within(distance, beam) && st.active == 0 {
                    finish(chosen, &mut states, &mut unfinished);
                }
                continue;
            }
            let mut others: Vec<DhtId> = unfinished
                .iter()
                .copied()
                .filter(|q| *q != chosen && !states[q].visited.contains(&peer))
                .collect();
            others.sort_unstable_by_key(|q| peer.xor_distance(q));
            others.truncate(params.queries_per_call.saturating_sub(1));
            let mut to_call = vec![chosen];
            to_call.extend(others);
            for q in &to_call {
                if let Some(st) = states.get_mut(q) {
                    st.active += 1;
                    st.visited.insert(peer);
                }
            }
            let fut = get_neighbors(peer, to_call.clone());
            in_flight.push(async move { (to_call, fut.await) });
        }
        if unfinished.is_empty() {
            break;
        }
        let Some((asked, reply)) = in_flight.next().await else {
            // nothing in flight and nothing to start: every query was finished above
            break;
        };
        let reply = reply.unwrap_or_default();
        for (q, (neighbors, should_stop)) in reply {
            let Some(st) = states.get_mut(&q) else { continue };
            if should_stop && !st.finished {
                finish(q, &mut states, &mut unfinished);
                continue;
            }
            if st.finished {
                continue;
            }
            for n in neighbors {
                if st.known.insert(n) {
                    let d = q.xor_distance(&n);
                    if st.within(d, beam) || st.nearest.len() < beam {
                        st.candidates.push(Reverse((d, n)));
                        st.nearest.push((d, n));
                        if st.nearest.len() > beam {
                            st.nearest.pop();
                        }
                    }
                }
            }
        }
        for q in asked {
            if let Some(st) = states.get_mut(&q) {
                st.active = st.active.saturating_sub(1);
            }
        }
    }

    let mut result = TraverseResult::default();
    for q in order {
        if let Some(st) = states.remove(&q) {
            result.nearest.insert(q, st.sorted_nearest());
            result.visited.insert(q, st.visited);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng, rngs::StdRng};

    #[tokio::test]
    async fn finds_true_nearest_in_a_random_graph_of_thousands() {
        let mut rng = StdRng::seed_from_u64(7);
        let n = 2000;
        let mut nodes: Vec<DhtId> = (0..n).map(|_| DhtId::from(rng.r#gen::<[u8; 20]>())).collect();
        nodes.sort_unstable();
        // a Kademlia-style graph: for each prefix length l, each node knows up to 3 random nodes that
        // share exactly l leading bits with it (the sibling subtree at depth l is a sorted range)
        let sibling_range = |a: &DhtId, l: u32| -> (DhtId, DhtId) {
            let mut lo = a.to_bytes();
            let mut hi = a.to_bytes();
            for bit in l..160 {
                let (byte, mask) = ((bit / 8) as usize, 0x80u8 >> (bit % 8));
                if bit == l {
                    lo[byte] ^= mask;
                    hi[byte] ^= mask;
                } else {
                    lo[byte] &= !mask;
                    hi[byte] |= mask;
                }
            }
            (DhtId::from(lo), DhtId::from(hi))
        };
        let mut graph: HashMap<DhtId, Vec<DhtId>> = HashMap::new();
        for a in &nodes {
            let mut neighbors = Vec::new();
            for l in 0..24 {
                let (lo, hi) = sibling_range(a, l);
                let start = nodes.partition_point(|x| *x < lo);
                let end = nodes.partition_point(|x| *x <= hi);
                neighbors.extend(nodes[start..end].choose_multiple(&mut rng, 3).copied());
            }
            graph.insert(*a, neighbors);
        }
        let queries: Vec<DhtId> = (0..40).map(|_| DhtId::from(rng.r#gen::<[u8; 20]>())).collect();
        let initial: Vec<DhtId> = nodes.choose_multiple(&mut rng, 3).copied().collect();
        let mut calls = 0usize;
        let mut found_count = 0usize;
        let params = TraverseParams {
            beam_size: 20,
            num_workers: 4,
            queries_per_call: 16,
        };
        let result = traverse_dht(
            &queries,
            &initial,
            params,
            |peer, qs| {
                calls += 1;
                let neighbors = graph[&peer].clone();
                async move {
                    tokio::task::yield_now().await;
                    let reply: NeighborsReply =
                        qs.into_iter().map(|q| (q, (neighbors.clone(), false))).collect();
                    Ok::<_, ()>(reply)
                }
            },
            |_, nearest, _| {
                assert!(!nearest.is_empty());
                found_count += 1;
            },
            HashMap::new(),
        )
        .await;
        assert_eq!(found_count, queries.len());
        let mut exact = 0;
        for q in &queries {
            let mut truth = nodes.clone();
            truth.sort_unstable_by_key(|b| q.xor_distance(b));
            let got = &result.nearest[q];
            assert_eq!(got.len(), 20);
            assert!(
                got.windows(2)
                    .all(|w| q.xor_distance(&w[0]) < q.xor_distance(&w[1]))
            );
            assert_eq!(got[0], truth[0], "the nearest node is always found");
            if got[..5] == truth[..5] {
                exact += 1;
            }
        }
        assert!(
            exact >= queries.len() * 9 / 10,
            "top-5 exact for {exact}/{}",
            queries.len()
        );
        // far fewer calls than nodes: the beam search does not crawl the graph
        assert!(calls < n / 2, "{calls} calls");
    }

    #[tokio::test]
    async fn stop_flag_and_failures_end_the_search() {
        let ids: Vec<DhtId> = (1..=50u8)
            .map(|i| {
                let mut b = [0u8; 20];
                b[0] = i;
                DhtId::from(b)
            })
            .collect();
        let q = ids[0];
        let all = ids.clone();
        let result = traverse_dht(
            &[q],
            &ids[10..12],
            TraverseParams {
                beam_size: 5,
                num_workers: 2,
                queries_per_call: 4,
            },
            |peer, qs| {
                let all = all.clone();
                async move {
                    if peer == all[10] {
                        return Err("unreachable");
                    }
                    Ok(qs.into_iter().map(|q| (q, (all.clone(), true))).collect())
                }
            },
            |_, _, _| {},
            HashMap::new(),
        )
        .await;
        // a failed call and a should_stop answer: as in hivemind, the stopped query keeps what it had
        // before that answer (the neighbours that came with `should_stop` are not added)
        assert_eq!(result.visited[&q].len(), 2);
        assert_eq!(result.nearest[&q], vec![ids[10], ids[11]]);
    }
}
