//! hivemind's `DictionaryDHTValue` (ext `0x50`, `hivemind/dht/storage.py`).

use std::cmp::Ordering;

use super::{
    DICTIONARY_DHT_VALUE_EXT_CODE, DecodeError, Number, ShapeError, Sink, Value, decode, emit,
    emit_array_header, emit_bin, emit_number,
};

/// One sub-key of a [`DictionaryDhtValue`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DictionaryEntry {
    /// The sub-key, deserialized (the DHT sends `msgpack(subkey)`; hivemind stores the decoded value).
    pub subkey: Value,
    /// The stored value: msgpack bytes (with a `[signature:…]` suffix for owner-protected records).
    pub value: Vec<u8>,
    /// When this entry expires (DHT time, UNIX seconds).
    pub expiration_time: Number,
}

/// A DHT value that maps sub-keys to values with their own expirations: hivemind's `DictionaryDHTValue`,
/// what a DHT node holds under a key once anyone stored a sub-key there, and what `rpc_find` returns as
/// `FOUND_DICTIONARY`.
///
/// Its msgpack form (ext `0x50`) is `[maxsize, latest_expiration_time, [[subkey, value, expiration], …]]`
/// with `maxsize = float("inf")` in practice and every `value` msgpack bytes itself (double-encoded).
/// Entries keep their insertion order, as the Python `dict` underneath does.
///
/// This type mirrors the storage in its *frozen* state (what `unpackb` builds): nothing is dropped for
/// having expired, since that needs a clock; callers that hold one call
/// [`DictionaryDhtValue::remove_outdated`] (hivemind does so before serializing).
///
/// ```
/// use apiary_wire::msgpack::{self, DictionaryDhtValue, Value};
///
/// let mut prefix = DictionaryDhtValue::new();
/// let declaration = msgpack::encode(&Value::from(("ffn.0.5", "QmFakePeer")));
/// assert!(prefix.store(5, declaration.clone(), 1_795_759_842.5));
/// assert!(!prefix.store(5, declaration, 1_000.0)); // older: rejected
/// let bytes = msgpack::encode(&Value::from(prefix.clone()));
/// assert_eq!(msgpack::decode(&bytes)?, Value::from(prefix));
/// # Ok::<(), msgpack::DecodeError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct DictionaryDhtValue {
    maxsize: Number,
    latest_expiration_time: Number,
    entries: Vec<DictionaryEntry>,
}

impl Default for DictionaryDhtValue {
    fn default() -> Self {
        Self::new()
    }
}

impl DictionaryDhtValue {
    /// An empty dictionary: `maxsize = inf`, `latest_expiration_time = -inf`, as `DictionaryDHTValue()`.
    pub fn new() -> Self {
        DictionaryDhtValue {
            maxsize: Number::Float(f64::INFINITY),
            latest_expiration_time: Number::Float(f64::NEG_INFINITY),
            entries: Vec::new(),
        }
    }

    /// An empty dictionary with a size bound, as `DictionaryDHTValue(maxsize)`: a zero bound means none
    /// (`maxsize or float("inf")`). The bound is carried on the wire only; this frozen view never
    /// evicts.
    pub fn with_maxsize(maxsize: impl Into<Number>) -> Self {
        let maxsize = maxsize.into();
        DictionaryDhtValue {
            maxsize: if maxsize.is_truthy() {
                maxsize
            } else {
                Number::Float(f64::INFINITY)
            },
            ..Self::new()
        }
    }

    /// The size bound (`inf` for every dictionary hivemind makes).
    pub fn maxsize(&self) -> Number {
        self.maxsize
    }

    /// The latest expiration ever stored (`-inf` when empty); also the dictionary's own expiration.
    pub fn latest_expiration_time(&self) -> Number {
        self.latest_expiration_time
    }

    /// Overrides the latest expiration, as `unpackb` does with the transmitted one.
    pub fn set_latest_expiration_time(&mut self, t: impl Into<Number>) {
        self.latest_expiration_time = t.into();
    }

    /// Stores `value` under `subkey` unless an entry for an equal sub-key (Python equality: `1 == 1.0 ==
    /// True`) expires later or at the same time; returns whether it was stored. As in hivemind, the
    /// latest expiration moves forward even when the entry is rejected, an accepted replacement keeps
    /// the original sub-key object and position, and a `list`/`dict` sub-key (unhashable in Python,
    /// where `store` raises) is not stored.
    pub fn store(
        &mut self,
        subkey: impl Into<Value>,
        value: impl Into<Vec<u8>>,
        expiration_time: impl Into<Number>,
    ) -> bool {
        let subkey = subkey.into();
        let expiration_time = expiration_time.into();
        if !subkey.is_hashable() {
            return false;
        }
        // latest_expiration_time = max(latest_expiration_time, expiration_time)
        if expiration_time.numeric_cmp(&self.latest_expiration_time) == Some(Ordering::Greater) {
            self.latest_expiration_time = expiration_time;
        }
        match self.entries.iter_mut().find(|e| e.subkey.py_eq(&subkey)) {
            Some(entry) => {
                if entry.expiration_time.numeric_cmp(&expiration_time) == Some(Ordering::Less) {
                    entry.value = value.into();
                    entry.expiration_time = expiration_time;
                    true
                } else {
                    false
                }
            }
            None => {
                self.entries.push(DictionaryEntry {
                    subkey,
                    value: value.into(),
                    expiration_time,
                });
                true
            }
        }
    }

    /// Drops what hivemind's `TimedStorage._remove_outdated` drops when not frozen: entries that expired
    /// before `now`, then, while more than `maxsize` remain, those expiring first. hivemind runs this
    /// before serializing (`packb` iterates `items()`), so a node serving a dictionary calls it with the
    /// current DHT time before encoding; [`super::encode`] itself has no clock and writes every entry.
    pub fn remove_outdated(&mut self, now: f64) {
        let now = Number::Float(now);
        self.entries
            .retain(|e| e.expiration_time.numeric_cmp(&now) != Some(Ordering::Less));
        let maxsize = self.maxsize;
        while Number::from(self.entries.len() as u64).numeric_cmp(&maxsize) == Some(Ordering::Greater) {
            let earliest = (0..self.entries.len()).reduce(|best, i| {
                match self.entries[i]
                    .expiration_time
                    .numeric_cmp(&self.entries[best].expiration_time)
                {
                    Some(Ordering::Less) => i,
                    _ => best,
                }
            });
            match earliest {
                Some(i) => {
                    self.entries.remove(i);
                }
                None => break,
            }
        }
    }

    /// The entry for `subkey` (Python equality), if any.
    pub fn get(&self, subkey: &Value) -> Option<&DictionaryEntry> {
        self.entries.iter().find(|e| e.subkey.py_eq(subkey))
    }

    /// Removes and returns the entry for `subkey` (Python equality), if any; the latest expiration stays.
    pub fn remove(&mut self, subkey: &Value) -> Option<DictionaryEntry> {
        let i = self.entries.iter().position(|e| e.subkey.py_eq(subkey))?;
        Some(self.entries.remove(i))
    }

    /// The entries, in insertion order.
    pub fn entries(&self) -> &[DictionaryEntry] {
        &self.entries
    }

    /// The entries, in insertion order.
    pub fn iter(&self) -> std::slice::Iter<'_, DictionaryEntry> {
        self.entries.iter()
    }

    /// The entries, in insertion order.
    pub fn into_entries(self) -> Vec<DictionaryEntry> {
        self.entries
    }

    /// How many sub-keys there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no sub-keys.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The ext `0x50` payload, as `DictionaryDHTValue.packb()` writes it.
    pub fn to_payload(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.emit_payload(&mut super::BufSink(&mut out));
        out
    }

    /// Reads an ext `0x50` payload, as `DictionaryDHTValue.unpackb()` does (default [`super::Limits`]).
    pub fn from_payload(payload: &[u8]) -> Result<Self, DecodeError> {
        let v = decode(payload)?;
        Self::from_value(v).map_err(|e| DecodeError::ExtShape {
            code: DICTIONARY_DHT_VALUE_EXT_CODE,
            offset: 0,
            reason: e.0,
        })
    }

    /// Builds the dictionary from its decoded payload `[maxsize, latest_expiration_time, items]` the way
    /// `unpackb` does: a falsy `maxsize` becomes `inf`, items are stored one by one (so repeated sub-keys
    /// merge), then the transmitted latest expiration is set.
    pub fn from_value(v: Value) -> Result<Self, ShapeError> {
        let [maxsize, latest, items] = match v {
            Value::List(parts) | Value::Tuple(parts) => <[Value; 3]>::try_from(parts)
                .map_err(|_| ShapeError("expected [maxsize, latest_expiration_time, items]"))?,
            _ => return Err(ShapeError("expected [maxsize, latest_expiration_time, items]")),
        };
        let maxsize = if maxsize.is_truthy() {
            Number::from_value(&maxsize).ok_or(ShapeError("maxsize is not a number"))?
        } else {
            Number::Float(f64::INFINITY)
        };
        let latest =
            Number::from_value(&latest).ok_or(ShapeError("latest_expiration_time is not a number"))?;
        let items = match items {
            Value::List(items) | Value::Tuple(items) => items,
            _ => return Err(ShapeError("items is not a list")),
        };
        let mut out = DictionaryDhtValue {
            maxsize,
            ..Self::new()
        };
        for item in items {
            let [subkey, value, expiration] = match item {
                Value::List(parts) | Value::Tuple(parts) => <[Value; 3]>::try_from(parts)
                    .map_err(|_| ShapeError("an item is not [subkey, value, expiration]"))?,
                _ => return Err(ShapeError("an item is not [subkey, value, expiration]")),
            };
            if !subkey.is_hashable() {
                return Err(ShapeError("a sub-key is unhashable"));
            }
            let Value::Bin(value) = value else {
                return Err(ShapeError("an item's value is not bytes"));
            };
            let expiration =
                Number::from_value(&expiration).ok_or(ShapeError("an item's expiration is not a number"))?;
            out.store(subkey, value, expiration);
        }
        out.latest_expiration_time = latest;
        Ok(out)
    }

    /// `[maxsize, latest_expiration_time, [[subkey, value, expiration], …]]`: lists, not tuples.
    pub(super) fn emit_payload<S: Sink>(&self, s: &mut S) {
        emit_array_header(3, s);
        emit_number(self.maxsize, s);
        emit_number(self.latest_expiration_time, s);
        emit_array_header(self.entries.len(), s);
        for e in &self.entries {
            emit_array_header(3, s);
            emit(&e.subkey, s);
            emit_bin(&e.value, s);
            emit_number(e.expiration_time, s);
        }
    }
}

impl<'a> IntoIterator for &'a DictionaryDhtValue {
    type Item = &'a DictionaryEntry;
    type IntoIter = std::slice::Iter<'a, DictionaryEntry>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::super::encode;
    use super::*;

    #[test]
    fn store_semantics() {
        let mut d = DictionaryDhtValue::new();
        assert!(d.store(1, b"a".to_vec(), 10.0));
        assert!(!d.store(1.0, b"b".to_vec(), 10.0)); // same expiration: rejected
        assert!(d.store(true, b"c".to_vec(), 11.0)); // 1 == True: replaces, keeps sub-key 1
        assert_eq!(d.len(), 1);
        assert_eq!(d.entries()[0].subkey, Value::from(1));
        assert_eq!(d.entries()[0].value, b"c");
        assert!(d.store(2, b"x".to_vec(), 5.0));
        assert_eq!(d.len(), 2);
        assert_eq!(d.latest_expiration_time(), Number::Float(11.0));
        assert!(!d.store(Value::list([1]), b"x".to_vec(), 50.0));
    }

    #[test]
    fn payload_layout() {
        let mut d = DictionaryDhtValue::new();
        d.store(5, b"x".to_vec(), 1e10);
        d.store(6, b"y".to_vec(), 1e10 + 1.0);
        // MSGPackSerializer.dumps of the same DictionaryDHTValue in hivemind 1.1.12
        let expected = "c7305093cb7ff0000000000000cb4202a05f20080000929305c40178cb4202a05f200000009306c40179cb4202a05f20080000";
        let got: String = encode(&Value::from(d.clone()))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(DictionaryDhtValue::from_payload(&d.to_payload()).unwrap(), d);
    }

    #[test]
    fn remove_outdated() {
        let mut d = DictionaryDhtValue::with_maxsize(2);
        d.store(1, b"a".to_vec(), 10.0);
        d.store(2, b"b".to_vec(), 30.0);
        d.store(3, b"c".to_vec(), 20.0);
        d.store(4, b"d".to_vec(), 5.0);
        d.remove_outdated(6.0); // 4 expired; then 3 entries > maxsize 2: drop the earliest (1)
        let left: Vec<_> = d.iter().map(|e| e.subkey.clone()).collect();
        assert_eq!(left, vec![Value::from(2), Value::from(3)]);
        assert_eq!(d.latest_expiration_time(), Number::Float(30.0));
    }

    #[test]
    fn falsy_maxsize_is_infinite() {
        let payload = encode(&Value::list([Value::Nil, Value::Float(1.0), Value::List(vec![])]));
        let d = DictionaryDhtValue::from_payload(&payload).unwrap();
        assert_eq!(d.maxsize(), Number::Float(f64::INFINITY));
        assert_eq!(
            DictionaryDhtValue::with_maxsize(0).maxsize(),
            Number::Float(f64::INFINITY)
        );
    }
}
