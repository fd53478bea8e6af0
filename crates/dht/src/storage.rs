//! hivemind's `TimedStorage` (`utils/timed_storage.py`) and `DHTLocalStorage` (`dht/storage.py`).
//!
//! A [`TimedStorage`] keeps `key → (value, expiration)` until the expiration passes, up to `maxsize`
//! entries (evicting those expiring first). `store` rejects values that already expired and values
//! that do not expire strictly later than the one held. The clock is an argument (`now`), hivemind's
//! `get_dht_time()`. A *frozen* storage drops nothing and accepts expired values (hivemind's
//! `freeze()`, used while deserializing).
//!
//! One deliberate difference: hivemind re-points its expiration heap at a *rejected* store's
//! expiration, so an older store makes a newer value vanish when the older expiration passes (anyone
//! could evict any key from a node that way). Here a rejected store changes nothing.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;
use std::ops::{Deref, DerefMut};

use apiary_wire::dhtid::DhtId;
use apiary_wire::msgpack::{DictionaryDhtValue, Number, Value};

use crate::DhtExpiration;

/// A value with its expiration (hivemind's `ValueWithExpiration`).
#[derive(Debug, Clone, PartialEq)]
pub struct ValueWithExpiration<V> {
    /// The value.
    pub value: V,
    /// When it expires (DHT time).
    pub expiration_time: DhtExpiration,
}

#[derive(Debug, Clone)]
struct Entry<V> {
    value: V,
    expiration_time: DhtExpiration,
    /// insertion order (Python dicts iterate in insertion order; replacing keeps the position)
    seq: u64,
    /// the heap entry that currently stands for this key
    heap_seq: u64,
}

#[derive(Debug, Clone, PartialEq)]
struct HeapEntry<K> {
    expiration_time: DhtExpiration,
    key: K,
    seq: u64,
}

impl<K: Ord> Eq for HeapEntry<K> {}
impl<K: Ord> PartialOrd for HeapEntry<K> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<K: Ord> Ord for HeapEntry<K> {
    fn cmp(&self, other: &Self) -> Ordering {
        self.expiration_time
            .total_cmp(&other.expiration_time)
            .then_with(|| self.key.cmp(&other.key))
            .then_with(|| self.seq.cmp(&other.seq))
    }
}

/// hivemind's `TimedStorage`: a map whose entries live until their expiration, at most `maxsize` of them.
#[derive(Debug, Clone)]
pub struct TimedStorage<K, V> {
    maxsize: Option<usize>,
    frozen: bool,
    data: HashMap<K, Entry<V>>,
    heap: BinaryHeap<Reverse<HeapEntry<K>>>,
    next_seq: u64,
}

impl<K: Ord + Hash + Clone, V> Default for TimedStorage<K, V> {
    fn default() -> Self {
        Self::new(None)
    }
}

impl<K: Ord + Hash + Clone, V> TimedStorage<K, V> {
    /// An empty storage; `None` (or `Some(0)`, as Python's `maxsize or inf`) means unbounded.
    pub fn new(maxsize: Option<usize>) -> Self {
        TimedStorage {
            maxsize: maxsize.filter(|&m| m > 0),
            frozen: false,
            data: HashMap::new(),
            heap: BinaryHeap::new(),
            next_seq: 0,
        }
    }

    /// The size bound, `None` when unbounded.
    pub fn maxsize(&self) -> Option<usize> {
        self.maxsize
    }

    /// Whether expired entries are kept (see [`freeze`](Self::freeze)).
    pub fn is_frozen(&self) -> bool {
        self.frozen
    }

    /// Stops dropping outdated entries (and accepting expired ones) until the guard drops: hivemind's
    /// `with storage.freeze():`.
    pub fn freeze(&mut self) -> Frozen<'_, K, V> {
        let previous = self.frozen;
        self.frozen = true;
        Frozen {
            storage: self,
            previous,
        }
    }

    fn remove_outdated(&mut self, now: DhtExpiration) {
        if self.frozen {
            return;
        }
        while let Some(Reverse(root)) = self.heap.peek() {
            let over = self.maxsize.is_some_and(|m| self.data.len() > m);
            if !(root.expiration_time < now || over) {
                break;
            }
            let Some(Reverse(root)) = self.heap.pop() else {
                break;
            };
            if self.data.get(&root.key).is_some_and(|e| e.heap_seq == root.seq) {
                self.data.remove(&root.key);
            }
        }
    }

    fn push_heap(&mut self, key: K, expiration_time: DhtExpiration) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.heap.push(Reverse(HeapEntry {
            expiration_time,
            key,
            seq,
        }));
        seq
    }

    /// `TimedStorage.store`: `true` when stored; `false` when already expired (unless frozen) or when the
    /// held value expires at the same time or later.
    pub fn store(&mut self, key: K, value: V, expiration_time: DhtExpiration, now: DhtExpiration) -> bool {
        if expiration_time < now && !self.frozen {
            return false;
        }
        if let Some(held) = self.data.get(&key) {
            if held.expiration_time < expiration_time {
                let heap_seq = self.push_heap(key.clone(), expiration_time);
                if let Some(entry) = self.data.get_mut(&key) {
                    entry.value = value;
                    entry.expiration_time = expiration_time;
                    entry.heap_seq = heap_seq;
                }
                return true;
            }
            return false;
        }
        let heap_seq = self.push_heap(key.clone(), expiration_time);
        let seq = heap_seq;
        self.data.insert(
            key,
            Entry {
                value,
                expiration_time,
                seq,
                heap_seq,
            },
        );
        self.remove_outdated(now);
        true
    }

    /// `TimedStorage.store(key, <the value held>, expiration_time)`: moves the held value's expiration
    /// later, keeping the value and its position; same acceptance rules as [`store`](Self::store).
    pub fn refresh(&mut self, key: &K, expiration_time: DhtExpiration, now: DhtExpiration) -> bool {
        if expiration_time < now && !self.frozen {
            return false;
        }
        match self.data.get(key) {
            Some(held) if held.expiration_time < expiration_time => {
                let heap_seq = self.push_heap(key.clone(), expiration_time);
                if let Some(entry) = self.data.get_mut(key) {
                    entry.expiration_time = expiration_time;
                    entry.heap_seq = heap_seq;
                }
                true
            }
            _ => false,
        }
    }

    /// `TimedStorage.get`: the live value of `key`.
    pub fn get(&mut self, key: &K, now: DhtExpiration) -> Option<ValueWithExpiration<&V>> {
        self.remove_outdated(now);
        self.data.get(key).map(|e| ValueWithExpiration {
            value: &e.value,
            expiration_time: e.expiration_time,
        })
    }

    /// The live value of `key`, mutable (the expiration stays; hivemind mutates dictionaries in place).
    pub fn get_mut(&mut self, key: &K, now: DhtExpiration) -> Option<ValueWithExpiration<&mut V>> {
        self.remove_outdated(now);
        self.data.get_mut(key).map(|e| ValueWithExpiration {
            value: &mut e.value,
            expiration_time: e.expiration_time,
        })
    }

    /// `TimedStorage.items()`: live entries in insertion order.
    pub fn items(&mut self, now: DhtExpiration) -> Vec<(&K, ValueWithExpiration<&V>)> {
        self.remove_outdated(now);
        let mut items: Vec<_> = self.data.iter().collect();
        items.sort_unstable_by_key(|(_, e)| e.seq);
        items
            .into_iter()
            .map(|(k, e)| {
                (
                    k,
                    ValueWithExpiration {
                        value: &e.value,
                        expiration_time: e.expiration_time,
                    },
                )
            })
            .collect()
    }

    /// `TimedStorage.top()`: the live entry expiring first (ties: smallest key).
    pub fn top(&mut self, now: DhtExpiration) -> Option<(&K, ValueWithExpiration<&V>)> {
        self.remove_outdated(now);
        while let Some(Reverse(root)) = self.heap.peek() {
            if self.data.get(&root.key).is_some_and(|e| e.heap_seq == root.seq) {
                break;
            }
            self.heap.pop();
        }
        let Reverse(root) = self.heap.peek()?;
        let (k, e) = self.data.get_key_value(&root.key)?;
        Some((
            k,
            ValueWithExpiration {
                value: &e.value,
                expiration_time: e.expiration_time,
            },
        ))
    }

    /// `key in storage`.
    pub fn contains(&mut self, key: &K, now: DhtExpiration) -> bool {
        self.remove_outdated(now);
        self.data.contains_key(key)
    }

    /// `len(storage)`: live entries.
    pub fn len(&mut self, now: DhtExpiration) -> usize {
        self.remove_outdated(now);
        self.data.len()
    }

    /// Whether nothing is held, expired or not (Python's `bool(storage)`).
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// `del storage[key]`: the removed value.
    pub fn remove(&mut self, key: &K) -> Option<ValueWithExpiration<V>> {
        self.data.remove(key).map(|e| ValueWithExpiration {
            value: e.value,
            expiration_time: e.expiration_time,
        })
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.data.clear();
        self.heap.clear();
    }
}

/// A frozen [`TimedStorage`] (see [`TimedStorage::freeze`]); unfreezes when dropped.
#[derive(Debug)]
pub struct Frozen<'a, K, V> {
    storage: &'a mut TimedStorage<K, V>,
    previous: bool,
}

impl<K, V> Deref for Frozen<'_, K, V> {
    type Target = TimedStorage<K, V>;
    fn deref(&self) -> &Self::Target {
        self.storage
    }
}

impl<K, V> DerefMut for Frozen<'_, K, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        self.storage
    }
}

impl<K, V> Drop for Frozen<'_, K, V> {
    fn drop(&mut self) {
        self.storage.frozen = self.previous;
    }
}

/// What a DHT node holds under a key: serialized bytes, or a dictionary of sub-keys.
#[derive(Debug, Clone, PartialEq)]
pub enum StoredValue {
    /// A regular value: msgpack bytes (with a signature suffix when protected).
    Regular(Vec<u8>),
    /// hivemind's `DictionaryDHTValue`.
    Dictionary(DictionaryDhtValue),
}

/// hivemind's `DHTLocalStorage`: regular values and sub-key dictionaries with expirations. A node holds
/// two: its storage and its cache (the cache with a size bound).
#[derive(Debug, Clone, Default)]
pub struct DhtLocalStorage {
    inner: TimedStorage<DhtId, StoredValue>,
}

impl DhtLocalStorage {
    /// An empty storage; `maxsize` as for [`TimedStorage::new`].
    pub fn new(maxsize: Option<usize>) -> Self {
        DhtLocalStorage {
            inner: TimedStorage::new(maxsize),
        }
    }

    /// The underlying [`TimedStorage`] (items, top, len, freeze, remove…).
    pub fn timed(&mut self) -> &mut TimedStorage<DhtId, StoredValue> {
        &mut self.inner
    }

    /// `DHTLocalStorage.store`: a regular value when `subkey` is `None`, else
    /// [`store_subkey`](Self::store_subkey).
    pub fn store(
        &mut self,
        key: DhtId,
        value: Vec<u8>,
        expiration_time: DhtExpiration,
        subkey: Option<Value>,
        now: DhtExpiration,
    ) -> bool {
        match subkey {
            Some(subkey) => self.store_subkey(key, subkey, value, expiration_time, now),
            None => self
                .inner
                .store(key, StoredValue::Regular(value), expiration_time, now),
        }
    }

    /// `DHTLocalStorage.store_subkey`: (1) nothing held, or a regular value expiring earlier → a new
    /// dictionary with this one entry replaces it; (2) a dictionary held → the entry goes into it (which
    /// keeps it only if it expires later than that sub-key's entry), and the dictionary's own expiration
    /// moves forward if this one is later; (3) a regular value expiring at the same time or later →
    /// rejected.
    pub fn store_subkey(
        &mut self,
        key: DhtId,
        subkey: Value,
        value: Vec<u8>,
        expiration_time: DhtExpiration,
        now: DhtExpiration,
    ) -> bool {
        let frozen = self.inner.is_frozen();
        let previous = self.inner.get(&key, now).map(|held| match held.value {
            StoredValue::Regular(_) => Err(held.expiration_time),
            StoredValue::Dictionary(d) => Ok(d.latest_expiration_time().as_f64()),
        });
        match previous {
            None | Some(Err(_))
                if expiration_time > previous.and_then(|p| p.err()).unwrap_or(f64::NEG_INFINITY) =>
            {
                let mut dictionary = DictionaryDhtValue::new();
                dictionary_store(&mut dictionary, subkey, value, expiration_time, now, frozen);
                let latest = dictionary.latest_expiration_time().as_f64();
                self.inner
                    .store(key, StoredValue::Dictionary(dictionary), latest, now)
            }
            Some(Ok(latest)) => {
                if expiration_time > latest {
                    // refresh the key's own expiration: same dictionary, later expiration
                    self.inner.refresh(&key, expiration_time, now);
                }
                match self.inner.get_mut(&key, now) {
                    Some(ValueWithExpiration {
                        value: StoredValue::Dictionary(d),
                        ..
                    }) => dictionary_store(d, subkey, value, expiration_time, now, frozen),
                    _ => false,
                }
            }
            _ => false,
        }
    }

    /// The live value of `key`; a dictionary comes without its expired entries (as hivemind serves it).
    pub fn get(&mut self, key: &DhtId, now: DhtExpiration) -> Option<ValueWithExpiration<StoredValue>> {
        let frozen = self.inner.is_frozen();
        let held = self.inner.get(key, now)?;
        let mut value = held.value.clone();
        if let StoredValue::Dictionary(d) = &mut value
            && !frozen
        {
            d.remove_outdated(now);
        }
        Some(ValueWithExpiration {
            value,
            expiration_time: held.expiration_time,
        })
    }

    /// Live keys with their values, in insertion order.
    pub fn items(&mut self, now: DhtExpiration) -> Vec<(DhtId, ValueWithExpiration<StoredValue>)> {
        let keys: Vec<DhtId> = self.inner.items(now).into_iter().map(|(k, _)| *k).collect();
        keys.into_iter()
            .filter_map(|k| self.get(&k, now).map(|v| (k, v)))
            .collect()
    }
}

/// `DictionaryDHTValue.store` with its `TimedStorage` rules: the latest expiration moves forward first,
/// then an expired entry is rejected (unless frozen), then the per-sub-key comparison.
fn dictionary_store(
    d: &mut DictionaryDhtValue,
    subkey: Value,
    value: Vec<u8>,
    expiration_time: DhtExpiration,
    now: DhtExpiration,
    frozen: bool,
) -> bool {
    if expiration_time < now && !frozen {
        if d.latest_expiration_time()
            .numeric_cmp(&Number::Float(expiration_time))
            == Some(Ordering::Less)
        {
            d.set_latest_expiration_time(expiration_time);
        }
        return false;
    }
    let stored = d.store(subkey, value, expiration_time);
    if stored && !frozen {
        d.remove_outdated(now);
    }
    stored
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> DhtId {
        let mut b = [0u8; 20];
        b[19] = n;
        DhtId::from(b)
    }

    #[test]
    fn timed_storage_acceptance_and_expiry() {
        let mut s: TimedStorage<u32, &str> = TimedStorage::new(None);
        assert!(!s.store(1, "expired", 5.0, 10.0));
        assert!(s.store(1, "a", 20.0, 10.0));
        assert!(!s.store(1, "same", 20.0, 10.0));
        assert!(!s.store(1, "older", 15.0, 10.0));
        assert!(s.store(1, "newer", 30.0, 10.0));
        assert_eq!(s.get(&1, 10.0).map(|v| *v.value), Some("newer"));
        // a rejected older store does not shorten the newer value's life (see the module docs)
        assert!(s.get(&1, 16.0).is_some());
        assert!(s.get(&1, 30.0).is_some());
        assert!(s.get(&1, 30.5).is_none());
        assert_eq!(s.len(30.5), 0);
    }

    #[test]
    fn timed_storage_maxsize_evicts_earliest_and_keeps_order() {
        let mut s: TimedStorage<u32, u32> = TimedStorage::new(Some(3));
        for (k, exp) in [(1, 50.0), (2, 40.0), (3, 60.0)] {
            assert!(s.store(k, k, exp, 0.0));
        }
        assert!(s.store(2, 22, 45.0, 0.0)); // replacing keeps the insertion position
        assert!(s.store(4, 4, 70.0, 0.0)); // evicts key 2 (expires first)
        let keys: Vec<u32> = s.items(0.0).into_iter().map(|(k, _)| *k).collect();
        assert_eq!(keys, vec![1, 3, 4]);
        assert_eq!(s.top(0.0).map(|(k, v)| (*k, v.expiration_time)), Some((1, 50.0)));
        {
            let mut frozen = s.freeze();
            assert!(frozen.store(9, 9, 1.0, 100.0)); // frozen: accepts expired and drops nothing
            assert_eq!(frozen.len(100.0), 4);
        }
        assert_eq!(s.len(100.0), 0);
    }

    #[test]
    fn local_storage_subkey_rules() {
        let now = 100.0;
        let mut s = DhtLocalStorage::new(None);
        let k = id(1);
        assert!(s.store(k, b"regular".to_vec(), 200.0, None, now));
        // a sub-key expiring no later than the regular value is rejected
        assert!(!s.store_subkey(k, Value::from("a"), b"x".to_vec(), 200.0, now));
        // a later one replaces it with a dictionary
        assert!(s.store_subkey(k, Value::from("a"), b"x".to_vec(), 210.0, now));
        assert!(s.store_subkey(k, Value::from("b"), b"y".to_vec(), 150.0, now));
        assert!(!s.store_subkey(k, Value::from("b"), b"old".to_vec(), 140.0, now));
        // Python equality for sub-keys: 1 == 1.0 == True
        assert!(s.store_subkey(k, Value::from(1), b"one".to_vec(), 150.0, now));
        assert!(!s.store_subkey(k, Value::from(true), b"t".to_vec(), 150.0, now));
        let got = s.get(&k, now).unwrap();
        assert_eq!(got.expiration_time, 210.0);
        let StoredValue::Dictionary(d) = got.value else {
            panic!("dictionary expected")
        };
        assert_eq!(d.len(), 3);
        // a later sub-key refreshes the key's own expiration
        assert!(s.store_subkey(k, Value::from("c"), b"z".to_vec(), 300.0, now));
        assert_eq!(s.get(&k, now).unwrap().expiration_time, 300.0);
        // expired sub-entries vanish from what is served, the dictionary stays
        let StoredValue::Dictionary(d) = s.get(&k, 160.0).unwrap().value else {
            panic!()
        };
        assert_eq!(d.len(), 2);
        // a regular value replaces the dictionary only if it expires later
        assert!(!s.store(k, b"r".to_vec(), 300.0, None, now));
        assert!(s.store(k, b"r".to_vec(), 301.0, None, now));
        assert_eq!(s.get(&k, now).unwrap().value, StoredValue::Regular(b"r".to_vec()));
        // an expired sub-key is rejected outright
        assert!(!s.store_subkey(id(2), Value::from("a"), b"x".to_vec(), 50.0, now));
        assert!(s.get(&id(2), now).is_none());
    }
}
