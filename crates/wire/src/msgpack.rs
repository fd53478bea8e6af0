//! hivemind's `MSGPackSerializer`, byte for byte.
//!
//! hivemind serializes every DHT key, sub-key and value, and the expert metadata of `rpc_info`, with
//! `msgpack.packb(obj, use_bin_type=True, strict_types=True, default=…)` and reads them back with
//! `msgpack.unpackb(buf, raw=False, ext_hook=…)` (`hivemind/utils/serializer.py`). Three extension
//! types ride on top of plain msgpack:
//!
//! | ext code | Python type | payload |
//! |---|---|---|
//! | `0x40` | `tuple` | msgpack of the items as an array |
//! | `0x50` | `DictionaryDHTValue` | msgpack `[maxsize, latest_expiration_time, [[subkey, value_bytes, expiration], …]]` |
//! | `0x51` | `BatchTensorDescriptor` | msgpack dict of its fields (see [`BatchTensorDescriptor`]) |
//!
//! [`Value`] is the dynamic value model: it keeps tuples apart from lists, `str` apart from `bin`, and map
//! entries in order, so [`encode`] reproduces hivemind's bytes exactly (msgpack-python always picks the
//! narrowest encoding, and so does [`encode`]). [`decode`] accepts everything msgpack-python accepts
//! (non-minimal widths, `float32`, …) and rejects what hivemind's `loads` rejects, with a typed
//! [`DecodeError`] under configurable [`Limits`]; it never panics.
//!
//! ```
//! use apiary_wire::msgpack::{self, Value};
//!
//! // An expert declaration value: the tuple ("ffn.0.5", "QmPeer") is ext 0x40.
//! let value = Value::from(("ffn.0.5", "QmPeer"));
//! let bytes = msgpack::encode(&value);
//! assert_eq!(bytes, b"\xd8\x40\x92\xa7ffn.0.5\xa6QmPeer");
//! assert_eq!(msgpack::decode(&bytes)?, value);
//! # Ok::<(), msgpack::DecodeError>(())
//! ```
//!
//! Python semantics that [`decode`] mirrors, because hivemind peers behave that way:
//! - map keys must be `str` or `bin` (msgpack-python's `strict_map_key=True` default); a repeated key
//!   keeps its first position and takes the last value, as a Python `dict` does;
//! - a tuple payload may be any iterable: a list (what every encoder writes), a `str` (a tuple of
//!   characters), a `bin` (a tuple of ints), a map (a tuple of its keys) or an unknown ext (its bytes);
//! - `float32` is read as a float and written back as `float64`;
//! - the typed ext payloads are normalized the way hivemind's `unpackb` does (see [`DictionaryDhtValue`]
//!   and [`BatchTensorDescriptor`]).
//!
//! Deliberate differences: unknown ext codes stay [`Value::Ext`] (hivemind turns them into `bytes`),
//! msgpack timestamps (ext −1) are checked like msgpack-python does but kept as raw [`Ext`], and
//! encoding a [`DictionaryDhtValue`] writes every entry, where hivemind's `packb` first drops the expired
//! ones (it reads the clock; call [`DictionaryDhtValue::remove_outdated`] with the DHT time first).

mod dht_value;
mod tensor_descr;

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};

use bytes::BufMut;

pub use dht_value::{DictionaryDhtValue, DictionaryEntry};
pub use tensor_descr::{BatchTensorDescriptor, Device, RpcInfo, expert_info};

/// Ext type code of Python tuples.
pub const TUPLE_EXT_CODE: i8 = 0x40;
/// Ext type code of hivemind's `DictionaryDHTValue`.
pub const DICTIONARY_DHT_VALUE_EXT_CODE: i8 = 0x50;
/// Ext type code of hivemind's `BatchTensorDescriptor`.
pub const BATCH_TENSOR_DESCRIPTOR_EXT_CODE: i8 = 0x51;
/// Ext type code of msgpack timestamps (decoded natively by msgpack-python).
pub const TIMESTAMP_EXT_CODE: i8 = -1;

// ------------------------------------------------------------------------------------------------
// Int and Number

/// An integer in msgpack's range, `-2^63 ..= 2^64 - 1` (what msgpack-python can pack).
///
/// Non-negative values are written with the unsigned formats, negative values with the signed
/// ones, each in the narrowest width, exactly as msgpack-python does.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Int(IntRepr);

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum IntRepr {
    NonNegative(u64),
    /// Always `< 0`.
    Negative(i64),
}

impl Int {
    /// The smallest representable integer, `-2^63`.
    pub const MIN: Int = Int(IntRepr::Negative(i64::MIN));
    /// The largest representable integer, `2^64 - 1`.
    pub const MAX: Int = Int(IntRepr::NonNegative(u64::MAX));

    /// The integer as an `i64`, if it fits.
    pub fn as_i64(self) -> Option<i64> {
        match self.0 {
            IntRepr::NonNegative(u) => i64::try_from(u).ok(),
            IntRepr::Negative(i) => Some(i),
        }
    }

    /// The integer as a `u64`, if it is non-negative.
    pub fn as_u64(self) -> Option<u64> {
        match self.0 {
            IntRepr::NonNegative(u) => Some(u),
            IntRepr::Negative(_) => None,
        }
    }

    /// The integer as an `i128` (always exact).
    pub fn as_i128(self) -> i128 {
        match self.0 {
            IntRepr::NonNegative(u) => i128::from(u),
            IntRepr::Negative(i) => i128::from(i),
        }
    }

    /// The nearest `f64` (exact below 2^53 in magnitude).
    #[allow(clippy::cast_precision_loss)]
    pub fn as_f64(self) -> f64 {
        match self.0 {
            IntRepr::NonNegative(u) => u as f64,
            IntRepr::Negative(i) => i as f64,
        }
    }

    /// Whether the integer is below zero.
    pub fn is_negative(self) -> bool {
        matches!(self.0, IntRepr::Negative(_))
    }
}

impl PartialOrd for Int {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Int {
    fn cmp(&self, other: &Self) -> Ordering {
        self.as_i128().cmp(&other.as_i128())
    }
}

impl fmt::Debug for Int {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for Int {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IntRepr::NonNegative(u) => write!(f, "{u}"),
            IntRepr::Negative(i) => write!(f, "{i}"),
        }
    }
}

macro_rules! int_from_unsigned {
    ($($t:ty),*) => {$(
        impl From<$t> for Int {
            fn from(v: $t) -> Self {
                Int(IntRepr::NonNegative(v as u64))
            }
        }
    )*};
}
macro_rules! int_from_signed {
    ($($t:ty),*) => {$(
        impl From<$t> for Int {
            fn from(v: $t) -> Self {
                let v = v as i64;
                if v < 0 { Int(IntRepr::Negative(v)) } else { Int(IntRepr::NonNegative(v as u64)) }
            }
        }
    )*};
}
int_from_unsigned!(u8, u16, u32, u64, usize);
int_from_signed!(i8, i16, i32, i64, isize);

/// The integer is outside msgpack's range `-2^63 ..= 2^64 - 1` (msgpack-python raises `OverflowError`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("integer {0} is outside msgpack's range -2^63 ..= 2^64-1")]
pub struct IntOutOfRange(pub i128);

impl TryFrom<i128> for Int {
    type Error = IntOutOfRange;
    fn try_from(v: i128) -> Result<Self, Self::Error> {
        if let Ok(u) = u64::try_from(v) {
            Ok(Int(IntRepr::NonNegative(u)))
        } else if let Ok(i) = i64::try_from(v) {
            Ok(Int(IntRepr::Negative(i)))
        } else {
            Err(IntOutOfRange(v))
        }
    }
}

/// A Python number as hivemind stores expiration times: an `int` or a `float`.
///
/// hivemind's expirations are floats on the wire (`FindResult.expiration_time` is a `double`), but a
/// `DictionaryDHTValue` holds whatever number the storing user passed, so ints are kept as ints.
/// Equality is structural (`Int(1) != Float(1.0)`, floats compare by bits); use
/// [`Number::numeric_cmp`] for Python's numeric comparison.
#[derive(Clone, Copy, Debug)]
pub enum Number {
    /// A Python `int`.
    Int(Int),
    /// A Python `float` (written as msgpack `float64`).
    Float(f64),
}

impl Number {
    /// The number as an `f64` (ints rounded to the nearest float).
    pub fn as_f64(self) -> f64 {
        match self {
            Number::Int(i) => i.as_f64(),
            Number::Float(f) => f,
        }
    }

    /// Python's comparison of two numbers: exact between ints and floats, `None` when a NaN is involved.
    pub fn numeric_cmp(&self, other: &Number) -> Option<Ordering> {
        match (*self, *other) {
            (Number::Int(a), Number::Int(b)) => Some(a.cmp(&b)),
            (Number::Float(a), Number::Float(b)) => a.partial_cmp(&b),
            (Number::Int(a), Number::Float(b)) => cmp_int_float(a.as_i128(), b),
            (Number::Float(a), Number::Int(b)) => cmp_int_float(b.as_i128(), a).map(Ordering::reverse),
        }
    }

    /// Python's truthiness: zero is false.
    pub fn is_truthy(&self) -> bool {
        match *self {
            Number::Int(i) => i.as_i128() != 0,
            Number::Float(f) => f != 0.0,
        }
    }

    /// This number as a [`Value`].
    pub fn to_value(self) -> Value {
        match self {
            Number::Int(i) => Value::Int(i),
            Number::Float(f) => Value::Float(f),
        }
    }

    /// A number from a value: `Int` and `Float` (and `Bool`, as Python's `bool` is an `int`: `None`
    /// here, since hivemind never writes one in a number's place).
    pub fn from_value(v: &Value) -> Option<Number> {
        match *v {
            Value::Int(i) => Some(Number::Int(i)),
            Value::Float(f) => Some(Number::Float(f)),
            _ => None,
        }
    }
}

/// Exact comparison of an integer with a float, as Python does.
fn cmp_int_float(i: i128, f: f64) -> Option<Ordering> {
    if f.is_nan() {
        return None;
    }
    // |i| < 2^64 < 2^127, so out-of-range floats order trivially.
    const TWO_POW_100: f64 = 1.267_650_600_228_229_4e30;
    if f >= TWO_POW_100 {
        return Some(Ordering::Less);
    }
    if f <= -TWO_POW_100 {
        return Some(Ordering::Greater);
    }
    let floor = f.floor();
    #[allow(clippy::cast_possible_truncation)]
    let fi = floor as i128; // exact: floor is an integer with |floor| < 2^100
    Some(match i.cmp(&fi) {
        Ordering::Equal if f > floor => Ordering::Less,
        other => other,
    })
}

impl PartialEq for Number {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Number::Int(a), Number::Int(b)) => a == b,
            (Number::Float(a), Number::Float(b)) => a.to_bits() == b.to_bits(),
            _ => false,
        }
    }
}
impl Eq for Number {}
impl Hash for Number {
    fn hash<H: Hasher>(&self, state: &mut H) {
        match self {
            Number::Int(i) => {
                0u8.hash(state);
                i.hash(state);
            }
            Number::Float(f) => {
                1u8.hash(state);
                f.to_bits().hash(state);
            }
        }
    }
}

impl From<f64> for Number {
    fn from(v: f64) -> Self {
        Number::Float(v)
    }
}
impl From<Int> for Number {
    fn from(v: Int) -> Self {
        Number::Int(v)
    }
}
impl From<i64> for Number {
    fn from(v: i64) -> Self {
        Number::Int(v.into())
    }
}
impl From<u64> for Number {
    fn from(v: u64) -> Self {
        Number::Int(v.into())
    }
}
impl From<i32> for Number {
    fn from(v: i32) -> Self {
        Number::Int(v.into())
    }
}

// ------------------------------------------------------------------------------------------------
// Value

/// A raw msgpack extension value of a code that hivemind does not interpret.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ext {
    /// The ext type code.
    pub code: i8,
    /// The payload, verbatim.
    pub data: Vec<u8>,
}

/// A value as hivemind's `MSGPackSerializer` sees it.
///
/// Equality (and hashing) is structural and exact: floats compare by their bits (so `NaN == NaN` and
/// `0.0 != -0.0`), lists differ from tuples, `Int(1)` differs from `Float(1.0)` and `Bool(true)`, and map
/// entry order matters. Two values built by [`decode`] are equal exactly when they encode to the same
/// bytes. (Python's `==` is looser; [`DictionaryDhtValue`] uses Python's rules for its sub-keys.)
#[derive(Clone, Debug)]
pub enum Value {
    /// `None` (`0xc0`).
    Nil,
    /// `bool` (`0xc2`/`0xc3`).
    Bool(bool),
    /// `int`, in the narrowest msgpack width.
    Int(Int),
    /// `float`, always written as `float64` (`0xcb`); `float32` input is widened.
    Float(f64),
    /// `str` (fixstr/str8/16/32), valid UTF-8.
    Str(String),
    /// `bytes` (bin8/16/32).
    Bin(Vec<u8>),
    /// `list` (msgpack array).
    List(Vec<Value>),
    /// `tuple` (ext `0x40`, payload = the items as a msgpack array).
    Tuple(Vec<Value>),
    /// `dict` (msgpack map), entries in order.
    Map(Vec<(Value, Value)>),
    /// hivemind's `DictionaryDHTValue` (ext `0x50`).
    DictionaryDhtValue(DictionaryDhtValue),
    /// hivemind's `BatchTensorDescriptor` (ext `0x51`).
    TensorDescriptor(BatchTensorDescriptor),
    /// Any other ext type, kept verbatim.
    Ext(Ext),
}

impl Value {
    /// A `str` value.
    pub fn str(s: impl Into<String>) -> Value {
        Value::Str(s.into())
    }

    /// A `bytes` value.
    pub fn bin(b: impl Into<Vec<u8>>) -> Value {
        Value::Bin(b.into())
    }

    /// A `list` of the given items.
    pub fn list<T: Into<Value>>(items: impl IntoIterator<Item = T>) -> Value {
        Value::List(items.into_iter().map(Into::into).collect())
    }

    /// A `tuple` of the given items.
    pub fn tuple<T: Into<Value>>(items: impl IntoIterator<Item = T>) -> Value {
        Value::Tuple(items.into_iter().map(Into::into).collect())
    }

    /// A `dict` of the given entries, in order.
    pub fn map<K: Into<Value>, V: Into<Value>>(entries: impl IntoIterator<Item = (K, V)>) -> Value {
        Value::Map(entries.into_iter().map(|(k, v)| (k.into(), v.into())).collect())
    }

    /// The Python type name of this value (`"NoneType"`, `"int"`, `"tuple"`, …), for messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            Value::Nil => "NoneType",
            Value::Bool(_) => "bool",
            Value::Int(_) => "int",
            Value::Float(_) => "float",
            Value::Str(_) => "str",
            Value::Bin(_) => "bytes",
            Value::List(_) => "list",
            Value::Tuple(_) => "tuple",
            Value::Map(_) => "dict",
            Value::DictionaryDhtValue(_) => "DictionaryDHTValue",
            Value::TensorDescriptor(_) => "BatchTensorDescriptor",
            Value::Ext(_) => "ExtType",
        }
    }

    /// Whether this is `None`.
    pub fn is_nil(&self) -> bool {
        matches!(self, Value::Nil)
    }

    /// The `bool`, if this is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The `int`, if this is one.
    pub fn as_int(&self) -> Option<Int> {
        match *self {
            Value::Int(i) => Some(i),
            _ => None,
        }
    }

    /// The `int` as an `i64`, if this is one and it fits.
    pub fn as_i64(&self) -> Option<i64> {
        self.as_int().and_then(Int::as_i64)
    }

    /// The `int` as a `u64`, if this is a non-negative one.
    pub fn as_u64(&self) -> Option<u64> {
        self.as_int().and_then(Int::as_u64)
    }

    /// The `float`, if this is one (ints are not converted; see [`Value::as_number`]).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::Float(f) => Some(f),
            _ => None,
        }
    }

    /// The number, if this is an `int` or a `float`.
    pub fn as_number(&self) -> Option<Number> {
        Number::from_value(self)
    }

    /// The `str`, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The `bytes`, if this is one.
    pub fn as_bin(&self) -> Option<&[u8]> {
        match self {
            Value::Bin(b) => Some(b),
            _ => None,
        }
    }

    /// The items, if this is a `list`.
    pub fn as_list(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) => Some(items),
            _ => None,
        }
    }

    /// The items, if this is a `tuple`.
    pub fn as_tuple(&self) -> Option<&[Value]> {
        match self {
            Value::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The items, if this is a `list` or a `tuple`.
    pub fn as_seq(&self) -> Option<&[Value]> {
        match self {
            Value::List(items) | Value::Tuple(items) => Some(items),
            _ => None,
        }
    }

    /// The entries, if this is a `dict`.
    pub fn as_map(&self) -> Option<&[(Value, Value)]> {
        match self {
            Value::Map(entries) => Some(entries),
            _ => None,
        }
    }

    /// The value under the `str` key `key`, if this is a `dict` that has it.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.as_map()?
            .iter()
            .find(|(k, _)| k.as_str() == Some(key))
            .map(|(_, v)| v)
    }

    /// The `DictionaryDHTValue`, if this is one.
    pub fn as_dictionary(&self) -> Option<&DictionaryDhtValue> {
        match self {
            Value::DictionaryDhtValue(d) => Some(d),
            _ => None,
        }
    }

    /// The `BatchTensorDescriptor`, if this is one.
    pub fn as_tensor_descriptor(&self) -> Option<&BatchTensorDescriptor> {
        match self {
            Value::TensorDescriptor(d) => Some(d),
            _ => None,
        }
    }

    /// The raw ext, if this is an uninterpreted one.
    pub fn as_ext(&self) -> Option<&Ext> {
        match self {
            Value::Ext(e) => Some(e),
            _ => None,
        }
    }

    /// Python's truthiness (`bool(x)`): `None`, `False`, zeros and empty containers are false.
    pub fn is_truthy(&self) -> bool {
        match self {
            Value::Nil => false,
            Value::Bool(b) => *b,
            Value::Int(i) => i.as_i128() != 0,
            Value::Float(f) => *f != 0.0,
            Value::Str(s) => !s.is_empty(),
            Value::Bin(b) => !b.is_empty(),
            Value::List(v) | Value::Tuple(v) => !v.is_empty(),
            Value::Map(m) => !m.is_empty(),
            Value::DictionaryDhtValue(d) => !d.is_empty(),
            Value::TensorDescriptor(_) => true,
            // hivemind's loads turns unknown exts into `bytes`
            Value::Ext(e) => e.code == TIMESTAMP_EXT_CODE || !e.data.is_empty(),
        }
    }

    /// Whether Python could use this value as a `dict` key (lists and dicts cannot).
    pub fn is_hashable(&self) -> bool {
        match self {
            Value::List(_) | Value::Map(_) => false,
            Value::Tuple(items) => items.iter().all(Value::is_hashable),
            _ => true,
        }
    }

    /// Python's `==` for hashable values, as `dict` keys compare: numbers (and bools) numerically,
    /// `str` with `str`, `bytes` with `bytes` (an unknown ext decodes to `bytes` in hivemind), tuples
    /// item by item. A `DictionaryDHTValue` only equals itself by identity in Python, so never here.
    pub fn py_eq(&self, other: &Value) -> bool {
        fn num(v: &Value) -> Option<Number> {
            match *v {
                Value::Bool(b) => Some(Number::Int(Int::from(u8::from(b)))),
                Value::Int(i) => Some(Number::Int(i)),
                Value::Float(f) => Some(Number::Float(f)),
                _ => None,
            }
        }
        fn bytes(v: &Value) -> Option<&[u8]> {
            match v {
                Value::Bin(b) => Some(b),
                Value::Ext(e) if e.code != TIMESTAMP_EXT_CODE => Some(&e.data),
                _ => None,
            }
        }
        if let (Some(a), Some(b)) = (num(self), num(other)) {
            return a.numeric_cmp(&b) == Some(Ordering::Equal);
        }
        if let (Some(a), Some(b)) = (bytes(self), bytes(other)) {
            return a == b;
        }
        match (self, other) {
            (Value::Nil, Value::Nil) => true,
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Tuple(a), Value::Tuple(b)) | (Value::List(a), Value::List(b)) => {
                a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.py_eq(y))
            }
            (Value::TensorDescriptor(a), Value::TensorDescriptor(b)) => a == b,
            (Value::Ext(a), Value::Ext(b)) => a == b,
            (Value::Map(a), Value::Map(b)) => {
                a.len() == b.len()
                    && a.iter()
                        .all(|(k, v)| b.iter().any(|(k2, v2)| k.py_eq(k2) && v.py_eq(v2)))
            }
            _ => false,
        }
    }
}

impl PartialEq for Value {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Value::Nil, Value::Nil) => true,
            (Value::Bool(a), Value::Bool(b)) => a == b,
            (Value::Int(a), Value::Int(b)) => a == b,
            (Value::Float(a), Value::Float(b)) => a.to_bits() == b.to_bits(),
            (Value::Str(a), Value::Str(b)) => a == b,
            (Value::Bin(a), Value::Bin(b)) => a == b,
            (Value::List(a), Value::List(b)) | (Value::Tuple(a), Value::Tuple(b)) => a == b,
            (Value::Map(a), Value::Map(b)) => a == b,
            (Value::DictionaryDhtValue(a), Value::DictionaryDhtValue(b)) => a == b,
            (Value::TensorDescriptor(a), Value::TensorDescriptor(b)) => a == b,
            (Value::Ext(a), Value::Ext(b)) => a == b,
            _ => false,
        }
    }
}
impl Eq for Value {}

impl Hash for Value {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        match self {
            Value::Nil => {}
            Value::Bool(b) => b.hash(state),
            Value::Int(i) => i.hash(state),
            Value::Float(f) => f.to_bits().hash(state),
            Value::Str(s) => s.hash(state),
            Value::Bin(b) => b.hash(state),
            Value::List(v) | Value::Tuple(v) => v.hash(state),
            Value::Map(m) => m.hash(state),
            Value::DictionaryDhtValue(d) => d.hash(state),
            Value::TensorDescriptor(d) => d.hash(state),
            Value::Ext(e) => e.hash(state),
        }
    }
}

impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Bool(v)
    }
}
macro_rules! value_from_int {
    ($($t:ty),*) => {$(
        impl From<$t> for Value {
            fn from(v: $t) -> Self {
                Value::Int(Int::from(v))
            }
        }
    )*};
}
value_from_int!(u8, u16, u32, u64, usize, i8, i16, i32, i64, isize);
impl From<Int> for Value {
    fn from(v: Int) -> Self {
        Value::Int(v)
    }
}
impl From<Number> for Value {
    fn from(v: Number) -> Self {
        v.to_value()
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<f32> for Value {
    fn from(v: f32) -> Self {
        Value::Float(f64::from(v))
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Str(v.to_owned())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Str(v)
    }
}
impl From<&String> for Value {
    fn from(v: &String) -> Self {
        Value::Str(v.clone())
    }
}
impl From<&[u8]> for Value {
    fn from(v: &[u8]) -> Self {
        Value::Bin(v.to_vec())
    }
}
impl<const N: usize> From<&[u8; N]> for Value {
    fn from(v: &[u8; N]) -> Self {
        Value::Bin(v.to_vec())
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bin(v)
    }
}
impl From<Vec<Value>> for Value {
    fn from(v: Vec<Value>) -> Self {
        Value::List(v)
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Nil, Into::into)
    }
}
impl From<()> for Value {
    /// Python's `()`, the empty tuple.
    fn from((): ()) -> Self {
        Value::Tuple(Vec::new())
    }
}
impl From<DictionaryDhtValue> for Value {
    fn from(v: DictionaryDhtValue) -> Self {
        Value::DictionaryDhtValue(v)
    }
}
impl From<BatchTensorDescriptor> for Value {
    fn from(v: BatchTensorDescriptor) -> Self {
        Value::TensorDescriptor(v)
    }
}
impl From<Ext> for Value {
    fn from(v: Ext) -> Self {
        Value::Ext(v)
    }
}
macro_rules! value_from_tuple {
    ($($name:ident),+) => {
        impl<$($name: Into<Value>),+> From<($($name,)+)> for Value {
            /// A Rust tuple becomes a Python tuple (ext `0x40`).
            #[allow(non_snake_case)]
            fn from(($($name,)+): ($($name,)+)) -> Self {
                Value::Tuple(vec![$($name.into()),+])
            }
        }
    };
}
value_from_tuple!(A);
value_from_tuple!(A, B);
value_from_tuple!(A, B, C);
value_from_tuple!(A, B, C, D);

// ------------------------------------------------------------------------------------------------
// Encoding

/// Where encoded bytes go: a buffer, or a counter that only measures.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
    fn put_u8(&mut self, b: u8) {
        self.put(&[b]);
    }
}

struct Counter(usize);
impl Sink for Counter {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
    fn put_u8(&mut self, _: u8) {
        self.0 += 1;
    }
}

struct BufSink<'a, B: BufMut + ?Sized>(&'a mut B);
impl<B: BufMut + ?Sized> Sink for BufSink<'_, B> {
    fn put(&mut self, bytes: &[u8]) {
        self.0.put_slice(bytes);
    }
    fn put_u8(&mut self, b: u8) {
        self.0.put_u8(b);
    }
}

/// msgpack bytes of `value`, exactly as hivemind's `MSGPackSerializer.dumps` writes them.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(encoded_len(value));
    emit(value, &mut BufSink(&mut out));
    out
}

/// Appends the msgpack bytes of `value` to `buf` (a `Vec<u8>`, a `BytesMut`, …).
pub fn encode_into<B: BufMut + ?Sized>(value: &Value, buf: &mut B) {
    emit(value, &mut BufSink(buf));
}

/// The exact length of [`encode`]'s output, without encoding.
pub fn encoded_len(value: &Value) -> usize {
    let mut c = Counter(0);
    emit(value, &mut c);
    c.0
}

fn emit_int<S: Sink>(i: Int, s: &mut S) {
    match i.0 {
        IntRepr::NonNegative(u) => {
            if u < 0x80 {
                s.put_u8(u as u8);
            } else if u <= 0xff {
                s.put(&[0xcc, u as u8]);
            } else if u <= 0xffff {
                s.put_u8(0xcd);
                s.put(&(u as u16).to_be_bytes());
            } else if u <= 0xffff_ffff {
                s.put_u8(0xce);
                s.put(&(u as u32).to_be_bytes());
            } else {
                s.put_u8(0xcf);
                s.put(&u.to_be_bytes());
            }
        }
        IntRepr::Negative(i) => {
            if i >= -32 {
                s.put_u8(i as u8);
            } else if i >= -128 {
                s.put(&[0xd0, i as u8]);
            } else if i >= -32768 {
                s.put_u8(0xd1);
                s.put(&(i as i16).to_be_bytes());
            } else if i >= -(1 << 31) {
                s.put_u8(0xd2);
                s.put(&(i as i32).to_be_bytes());
            } else {
                s.put_u8(0xd3);
                s.put(&i.to_be_bytes());
            }
        }
    }
}

fn emit_float<S: Sink>(f: f64, s: &mut S) {
    s.put_u8(0xcb);
    s.put(&f.to_bits().to_be_bytes());
}

fn emit_number<S: Sink>(n: Number, s: &mut S) {
    match n {
        Number::Int(i) => emit_int(i, s),
        Number::Float(f) => emit_float(f, s),
    }
}

/// Writes a length header: `fix` form when `len < fix_max`, else 8 (when `b8` is given)/16/32-bit forms.
fn emit_len_header<S: Sink>(len: usize, fix: (u8, usize), b8: Option<u8>, b16: u8, b32: u8, s: &mut S) {
    let (fix_base, fix_max) = fix;
    if len < fix_max {
        s.put_u8(fix_base | len as u8);
    } else if let Some(b8) = b8.filter(|_| len <= 0xff) {
        s.put(&[b8, len as u8]);
    } else if len <= 0xffff {
        s.put_u8(b16);
        s.put(&(len as u16).to_be_bytes());
    } else {
        s.put_u8(b32);
        // msgpack cannot carry more than 2^32-1 items/bytes; msgpack-python raises there. Values that
        // large cannot come from `decode` and are out of scope for hivemind's 4 MiB messages.
        s.put(&(len as u32).to_be_bytes());
    }
}

fn emit_str<S: Sink>(v: &str, s: &mut S) {
    emit_len_header(v.len(), (0xa0, 32), Some(0xd9), 0xda, 0xdb, s);
    s.put(v.as_bytes());
}

fn emit_bin<S: Sink>(v: &[u8], s: &mut S) {
    emit_len_header(v.len(), (0, 0), Some(0xc4), 0xc5, 0xc6, s);
    s.put(v);
}

fn emit_array_header<S: Sink>(len: usize, s: &mut S) {
    emit_len_header(len, (0x90, 16), None, 0xdc, 0xdd, s);
}

fn emit_map_header<S: Sink>(len: usize, s: &mut S) {
    emit_len_header(len, (0x80, 16), None, 0xde, 0xdf, s);
}

fn emit_ext_header<S: Sink>(code: i8, len: usize, s: &mut S) {
    let code = code as u8;
    match len {
        1 => s.put(&[0xd4, code]),
        2 => s.put(&[0xd5, code]),
        4 => s.put(&[0xd6, code]),
        8 => s.put(&[0xd7, code]),
        16 => s.put(&[0xd8, code]),
        l if l <= 0xff => s.put(&[0xc7, l as u8, code]),
        l if l <= 0xffff => {
            s.put_u8(0xc8);
            s.put(&(l as u16).to_be_bytes());
            s.put_u8(code);
        }
        l => {
            s.put_u8(0xc9);
            s.put(&(l as u32).to_be_bytes());
            s.put_u8(code);
        }
    }
}

/// The payload of an ext type whose bytes Apiary computes.
enum Payload<'a> {
    Seq(&'a [Value]),
    Dictionary(&'a DictionaryDhtValue),
    Value(&'a Value),
}

fn emit_payload<S: Sink>(p: &Payload<'_>, s: &mut S) {
    match p {
        Payload::Seq(items) => emit_seq(items, s),
        Payload::Dictionary(d) => d.emit_payload(s),
        Payload::Value(v) => emit(v, s),
    }
}

/// Writes an ext with a computed payload: measured first, so that the header comes out right.
fn emit_ext_payload<S: Sink>(code: i8, p: Payload<'_>, s: &mut S) {
    let mut c = Counter(0);
    emit_payload(&p, &mut c);
    emit_ext_header(code, c.0, s);
    emit_payload(&p, s);
}

fn emit<S: Sink>(v: &Value, s: &mut S) {
    match v {
        Value::Nil => s.put_u8(0xc0),
        Value::Bool(false) => s.put_u8(0xc2),
        Value::Bool(true) => s.put_u8(0xc3),
        Value::Int(i) => emit_int(*i, s),
        Value::Float(f) => emit_float(*f, s),
        Value::Str(v) => emit_str(v, s),
        Value::Bin(v) => emit_bin(v, s),
        Value::List(items) => emit_seq(items, s),
        Value::Map(entries) => {
            emit_map_header(entries.len(), s);
            for (k, v) in entries {
                emit(k, s);
                emit(v, s);
            }
        }
        Value::Tuple(items) => emit_ext_payload(TUPLE_EXT_CODE, Payload::Seq(items), s),
        Value::DictionaryDhtValue(d) => {
            emit_ext_payload(DICTIONARY_DHT_VALUE_EXT_CODE, Payload::Dictionary(d), s)
        }
        Value::TensorDescriptor(d) => {
            let map = d.to_value();
            emit_ext_payload(BATCH_TENSOR_DESCRIPTOR_EXT_CODE, Payload::Value(&map), s);
        }
        Value::Ext(e) => {
            emit_ext_header(e.code, e.data.len(), s);
            s.put(&e.data);
        }
    }
}

fn emit_seq<S: Sink>(items: &[Value], s: &mut S) {
    emit_array_header(items.len(), s);
    for item in items {
        emit(item, s);
    }
}

// ------------------------------------------------------------------------------------------------
// Decoding

/// Bounds on what [`decode_with`] accepts; every bound yields a typed error, never a panic.
///
/// The decoder never allocates more than a small multiple of the input for the value tree it builds
/// (declared lengths are checked against the bytes that remain before anything is reserved); the
/// limits below bound the rest. Decoding keeps its own stack of open containers, so depth costs heap,
/// not call stack; [`encode`] (and `Drop`, `Clone`, `==` of a [`Value`]) do recurse once per level, which
/// the default depth keeps to a few hundred KiB even in debug builds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Deepest nesting of containers (lists, maps, ext payloads): default 1024, msgpack-python's own
    /// limit for nested arrays and maps.
    pub max_depth: usize,
    /// Largest accepted input, in bytes: default 64 MiB.
    pub max_input_len: usize,
    /// Most values decoded in total, nested ones and those inside ext payloads included: default 2^22.
    pub max_items: usize,
    /// Longest `str`, in bytes: default unbounded (the input length bounds it).
    pub max_str_len: usize,
    /// Longest `bin`, in bytes: default unbounded (the input length bounds it).
    pub max_bin_len: usize,
    /// Longest ext payload, in bytes: default unbounded (the input length bounds it).
    pub max_ext_len: usize,
}

impl Limits {
    /// The defaults (see the field docs).
    pub const DEFAULT: Limits = Limits {
        max_depth: 1024,
        max_input_len: 64 << 20,
        max_items: 1 << 22,
        max_str_len: usize::MAX,
        max_bin_len: usize::MAX,
        max_ext_len: usize::MAX,
    };

    /// Sets [`Limits::max_depth`].
    pub fn with_max_depth(mut self, v: usize) -> Self {
        self.max_depth = v;
        self
    }
    /// Sets [`Limits::max_input_len`].
    pub fn with_max_input_len(mut self, v: usize) -> Self {
        self.max_input_len = v;
        self
    }
    /// Sets [`Limits::max_items`].
    pub fn with_max_items(mut self, v: usize) -> Self {
        self.max_items = v;
        self
    }
    /// Sets [`Limits::max_str_len`].
    pub fn with_max_str_len(mut self, v: usize) -> Self {
        self.max_str_len = v;
        self
    }
    /// Sets [`Limits::max_bin_len`].
    pub fn with_max_bin_len(mut self, v: usize) -> Self {
        self.max_bin_len = v;
        self
    }
    /// Sets [`Limits::max_ext_len`].
    pub fn with_max_ext_len(mut self, v: usize) -> Self {
        self.max_ext_len = v;
        self
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}

/// Which length limit a value broke.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LengthKind {
    /// The whole input.
    Input,
    /// A `str`.
    Str,
    /// A `bin`.
    Bin,
    /// An ext payload.
    Ext,
}

impl fmt::Display for LengthKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LengthKind::Input => "input",
            LengthKind::Str => "str",
            LengthKind::Bin => "bin",
            LengthKind::Ext => "ext payload",
        })
    }
}

/// Why msgpack bytes could not be decoded. Offsets are relative to the buffer being decoded (for errors
/// inside an ext payload, to that payload; see [`DecodeError::ExtPayload`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input ends in the middle of a value.
    #[error("truncated msgpack: a value at offset {offset} needs {needed} more byte(s)")]
    Truncated {
        /// Where the incomplete value (or its part) starts.
        offset: usize,
        /// How many bytes are missing at least.
        needed: usize,
    },
    /// A complete value is followed by more bytes (msgpack-python's `ExtraData`).
    #[error("{remaining} trailing byte(s) after the msgpack value, at offset {offset}")]
    TrailingBytes {
        /// Where the extra bytes start.
        offset: usize,
        /// How many there are.
        remaining: usize,
    },
    /// The never-used format byte `0xc1`.
    #[error("reserved msgpack format byte 0xc1 at offset {offset}")]
    ReservedByte {
        /// Where it is.
        offset: usize,
    },
    /// A `str` is not valid UTF-8 (hivemind decodes with `raw=False`).
    #[error("invalid UTF-8 in the str at offset {offset}")]
    InvalidUtf8 {
        /// Where the str starts.
        offset: usize,
    },
    /// A map key is neither `str` nor `bin` (msgpack-python's `strict_map_key=True`).
    #[error("a {key_type} is not allowed as a map key (offset {offset}): only str and bytes are")]
    InvalidMapKey {
        /// The Python type of the key.
        key_type: &'static str,
        /// Where the key starts.
        offset: usize,
    },
    /// Containers nest deeper than [`Limits::max_depth`].
    #[error("msgpack nesting deeper than {max} at offset {offset}")]
    DepthExceeded {
        /// The limit.
        max: usize,
        /// Where the too-deep value starts.
        offset: usize,
    },
    /// More values than [`Limits::max_items`].
    #[error("more than {max} msgpack values")]
    TooManyItems {
        /// The limit.
        max: usize,
    },
    /// The input, a `str`, a `bin` or an ext payload is longer than its limit.
    #[error("{kind} of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// What was too long.
        kind: LengthKind,
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The payload of an ext type that hivemind interprets is not valid msgpack.
    #[error("bad payload of ext type {code:#04x} at offset {offset}")]
    ExtPayload {
        /// The ext type code.
        code: i8,
        /// Where the ext starts.
        offset: usize,
        /// What went wrong inside the payload (offsets relative to it).
        #[source]
        source: Box<DecodeError>,
    },
    /// The payload of an ext type that hivemind interprets decodes, but not to what that type needs.
    #[error("bad ext type {code:#04x} at offset {offset}: {reason}")]
    ExtShape {
        /// The ext type code.
        code: i8,
        /// Where the ext starts.
        offset: usize,
        /// What is wrong.
        reason: &'static str,
    },
}

impl DecodeError {
    /// The same error with its offset made relative to `base`.
    fn shifted(self, base: usize) -> Self {
        let sub = |o: usize| o.saturating_sub(base);
        match self {
            DecodeError::Truncated { offset, needed } => DecodeError::Truncated {
                offset: sub(offset),
                needed,
            },
            DecodeError::TrailingBytes { offset, remaining } => DecodeError::TrailingBytes {
                offset: sub(offset),
                remaining,
            },
            DecodeError::ReservedByte { offset } => DecodeError::ReservedByte { offset: sub(offset) },
            DecodeError::InvalidUtf8 { offset } => DecodeError::InvalidUtf8 { offset: sub(offset) },
            DecodeError::InvalidMapKey { key_type, offset } => DecodeError::InvalidMapKey {
                key_type,
                offset: sub(offset),
            },
            DecodeError::DepthExceeded { max, offset } => DecodeError::DepthExceeded {
                max,
                offset: sub(offset),
            },
            DecodeError::ExtPayload { code, offset, source } => DecodeError::ExtPayload {
                code,
                offset: sub(offset),
                source,
            },
            DecodeError::ExtShape { code, offset, reason } => DecodeError::ExtShape {
                code,
                offset: sub(offset),
                reason,
            },
            e @ (DecodeError::TooManyItems { .. } | DecodeError::TooLong { .. }) => e,
        }
    }
}

/// A decoded value does not have the shape a typed hivemind structure needs (a `DictionaryDHTValue`
/// payload, a `BatchTensorDescriptor` dict, an `rpc_info` dict); hivemind raises on these too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ShapeError(pub &'static str);

/// Decodes one msgpack value that fills all of `bytes`, like hivemind's `MSGPackSerializer.loads`, under
/// the default [`Limits`].
pub fn decode(bytes: &[u8]) -> Result<Value, DecodeError> {
    decode_with(bytes, &Limits::DEFAULT)
}

/// [`decode`] under the given limits.
pub fn decode_with(bytes: &[u8], limits: &Limits) -> Result<Value, DecodeError> {
    if bytes.len() > limits.max_input_len {
        return Err(DecodeError::TooLong {
            kind: LengthKind::Input,
            len: bytes.len(),
            max: limits.max_input_len,
        });
    }
    Decoder {
        buf: bytes,
        limits,
        items: 0,
        pos: 0,
        end: bytes.len(),
        stack: Vec::new(),
    }
    .run()
}

/// One open container while decoding (the decoder keeps its own stack, so nesting costs heap, not the
/// thread's stack).
enum Frame {
    Seq {
        items: Vec<Value>,
        left: usize,
    },
    Map {
        entries: Vec<(Value, Value)>,
        /// Python dict semantics: (is_bytes, key bytes) → slot.
        index: HashMap<(bool, Vec<u8>), usize>,
        left: usize,
        key: Option<(Value, (bool, Vec<u8>))>,
        /// Where the pending key starts (absolute).
        key_start: usize,
    },
    Ext {
        code: i8,
        /// Where the ext header starts (absolute).
        start: usize,
        /// Where its payload starts (absolute): the origin of offsets in errors inside it.
        payload_start: usize,
        /// One past its payload (absolute).
        end: usize,
        /// The bound in force around this ext, restored when it closes.
        outer_end: usize,
    },
}

/// What reading one value's header produced.
enum Step {
    Done(Value),
    Open(Frame),
}

struct Decoder<'a, 'l> {
    buf: &'a [u8],
    limits: &'l Limits,
    items: usize,
    pos: usize,
    /// Where the innermost open ext payload (or the input) ends: nothing is read past it.
    end: usize,
    stack: Vec<Frame>,
}

impl Decoder<'_, '_> {
    fn take(&mut self, n: usize, start: usize) -> Result<&[u8], DecodeError> {
        let rem = self.end - self.pos;
        if n > rem {
            return Err(DecodeError::Truncated {
                offset: start,
                needed: n - rem,
            });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn u8(&mut self, start: usize) -> Result<u8, DecodeError> {
        Ok(self.take(1, start)?[0])
    }

    fn array<const N: usize>(&mut self, start: usize) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, start)?);
        Ok(out)
    }

    fn len8(&mut self, start: usize) -> Result<usize, DecodeError> {
        Ok(usize::from(self.u8(start)?))
    }
    fn len16(&mut self, start: usize) -> Result<usize, DecodeError> {
        Ok(usize::from(u16::from_be_bytes(self.array(start)?)))
    }
    fn len32(&mut self, start: usize) -> Result<usize, DecodeError> {
        Ok(u32::from_be_bytes(self.array(start)?) as usize)
    }

    fn count_items(&mut self, n: usize) -> Result<(), DecodeError> {
        self.items = self.items.saturating_add(n);
        if self.items > self.limits.max_items {
            return Err(DecodeError::TooManyItems {
                max: self.limits.max_items,
            });
        }
        Ok(())
    }

    /// Decodes the whole input; errors come out with offsets relative to the innermost ext payload they
    /// occurred in, wrapped in [`DecodeError::ExtPayload`] once per enclosing ext.
    fn run(mut self) -> Result<Value, DecodeError> {
        match self.run_inner() {
            Ok(v) => Ok(v),
            Err(e) => Err(self.wrap(e)),
        }
    }

    fn wrap(&self, mut err: DecodeError) -> DecodeError {
        let exts: Vec<(i8, usize, usize)> = self
            .stack
            .iter()
            .filter_map(|f| match *f {
                Frame::Ext {
                    code,
                    start,
                    payload_start,
                    ..
                } => Some((code, start, payload_start)),
                _ => None,
            })
            .collect();
        // innermost first: relative to its payload, then wrapped with the ext's own offset relative to
        // the payload around it
        if let Some(&(_, _, innermost)) = exts.last() {
            err = err.shifted(innermost);
        }
        for (i, &(code, start, _)) in exts.iter().enumerate().rev() {
            let outer_base = if i == 0 { 0 } else { exts[i - 1].2 };
            err = DecodeError::ExtPayload {
                code,
                offset: start - outer_base,
                source: Box::new(err),
            };
        }
        err
    }

    fn run_inner(&mut self) -> Result<Value, DecodeError> {
        loop {
            let mut v = match self.read_header()? {
                Step::Done(v) => v,
                Step::Open(frame) => {
                    self.stack.push(frame);
                    continue;
                }
            };
            // hand the finished value to the containers above, closing those it completes
            loop {
                let Some(frame) = self.stack.last_mut() else {
                    if self.pos != self.buf.len() {
                        return Err(DecodeError::TrailingBytes {
                            offset: self.pos,
                            remaining: self.buf.len() - self.pos,
                        });
                    }
                    return Ok(v);
                };
                match frame {
                    Frame::Seq { items, left } => {
                        items.push(v);
                        *left -= 1;
                        if *left > 0 {
                            break;
                        }
                        let Some(Frame::Seq { items, .. }) = self.stack.pop() else {
                            unreachable!()
                        };
                        v = Value::List(items);
                    }
                    Frame::Map {
                        entries,
                        index,
                        left,
                        key,
                        key_start,
                    } => match key.take() {
                        None => {
                            let identity = match &v {
                                Value::Str(s) => (false, s.as_bytes().to_vec()),
                                Value::Bin(b) => (true, b.clone()),
                                // hivemind's ext_hook returns unknown exts as `bytes`, which
                                // strict_map_key accepts
                                Value::Ext(e) if e.code != TIMESTAMP_EXT_CODE => (true, e.data.clone()),
                                other => {
                                    return Err(DecodeError::InvalidMapKey {
                                        key_type: other.type_name(),
                                        offset: *key_start,
                                    });
                                }
                            };
                            *key = Some((v, identity));
                            break;
                        }
                        Some((k, identity)) => {
                            match index.get(&identity) {
                                Some(&i) => entries[i].1 = v,
                                None => {
                                    index.insert(identity, entries.len());
                                    entries.push((k, v));
                                }
                            }
                            *left -= 1;
                            if *left > 0 {
                                *key_start = self.pos;
                                break;
                            }
                            let Some(Frame::Map { entries, .. }) = self.stack.pop() else {
                                unreachable!()
                            };
                            v = Value::Map(entries);
                        }
                    },
                    Frame::Ext {
                        code,
                        start,
                        end,
                        outer_end,
                        ..
                    } => {
                        let (code, start, end, outer_end) = (*code, *start, *end, *outer_end);
                        if self.pos != end {
                            return Err(DecodeError::TrailingBytes {
                                offset: self.pos,
                                remaining: end - self.pos,
                            });
                        }
                        let converted = self.convert_ext(code, v);
                        // the ext is complete: shape errors belong to the payload around it
                        self.stack.pop();
                        self.end = outer_end;
                        v = converted.map_err(|reason| DecodeError::ExtShape {
                            code,
                            offset: start,
                            reason,
                        })?;
                    }
                }
            }
        }
    }

    /// Reads one value's header at the current position: a complete scalar (or empty container), or a
    /// container to fill.
    fn read_header(&mut self) -> Result<Step, DecodeError> {
        let start = self.pos;
        if self.stack.len() > self.limits.max_depth {
            return Err(DecodeError::DepthExceeded {
                max: self.limits.max_depth,
                offset: start,
            });
        }
        self.count_items(1)?;
        let b = self.u8(start)?;
        let v = match b {
            0x00..=0x7f => Value::Int(Int::from(b)),
            0x80..=0x8f => return self.open_map(usize::from(b & 0x0f), start),
            0x90..=0x9f => return self.open_seq(usize::from(b & 0x0f), start),
            0xa0..=0xbf => self.read_str(usize::from(b & 0x1f), start)?,
            0xc0 => Value::Nil,
            0xc1 => return Err(DecodeError::ReservedByte { offset: start }),
            0xc2 => Value::Bool(false),
            0xc3 => Value::Bool(true),
            0xc4 => {
                let n = self.len8(start)?;
                self.read_bin(n, start)?
            }
            0xc5 => {
                let n = self.len16(start)?;
                self.read_bin(n, start)?
            }
            0xc6 => {
                let n = self.len32(start)?;
                self.read_bin(n, start)?
            }
            0xc7 => {
                let n = self.len8(start)?;
                return self.open_ext(n, start);
            }
            0xc8 => {
                let n = self.len16(start)?;
                return self.open_ext(n, start);
            }
            0xc9 => {
                let n = self.len32(start)?;
                return self.open_ext(n, start);
            }
            0xca => Value::Float(f64::from(f32::from_be_bytes(self.array(start)?))),
            0xcb => Value::Float(f64::from_be_bytes(self.array(start)?)),
            0xcc => Value::Int(Int::from(self.u8(start)?)),
            0xcd => Value::Int(Int::from(u16::from_be_bytes(self.array(start)?))),
            0xce => Value::Int(Int::from(u32::from_be_bytes(self.array(start)?))),
            0xcf => Value::Int(Int::from(u64::from_be_bytes(self.array(start)?))),
            0xd0 => Value::Int(Int::from(i8::from_be_bytes(self.array(start)?))),
            0xd1 => Value::Int(Int::from(i16::from_be_bytes(self.array(start)?))),
            0xd2 => Value::Int(Int::from(i32::from_be_bytes(self.array(start)?))),
            0xd3 => Value::Int(Int::from(i64::from_be_bytes(self.array(start)?))),
            0xd4 => return self.open_ext(1, start),
            0xd5 => return self.open_ext(2, start),
            0xd6 => return self.open_ext(4, start),
            0xd7 => return self.open_ext(8, start),
            0xd8 => return self.open_ext(16, start),
            0xd9 => {
                let n = self.len8(start)?;
                self.read_str(n, start)?
            }
            0xda => {
                let n = self.len16(start)?;
                self.read_str(n, start)?
            }
            0xdb => {
                let n = self.len32(start)?;
                self.read_str(n, start)?
            }
            0xdc => {
                let n = self.len16(start)?;
                return self.open_seq(n, start);
            }
            0xdd => {
                let n = self.len32(start)?;
                return self.open_seq(n, start);
            }
            0xde => {
                let n = self.len16(start)?;
                return self.open_map(n, start);
            }
            0xdf => {
                let n = self.len32(start)?;
                return self.open_map(n, start);
            }
            0xe0..=0xff => Value::Int(Int::from(b as i8)),
        };
        Ok(Step::Done(v))
    }

    fn read_str(&mut self, n: usize, start: usize) -> Result<Value, DecodeError> {
        if n > self.limits.max_str_len {
            return Err(DecodeError::TooLong {
                kind: LengthKind::Str,
                len: n,
                max: self.limits.max_str_len,
            });
        }
        let raw = self.take(n, start)?;
        let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8 { offset: start })?;
        Ok(Value::Str(s.to_owned()))
    }

    fn read_bin(&mut self, n: usize, start: usize) -> Result<Value, DecodeError> {
        if n > self.limits.max_bin_len {
            return Err(DecodeError::TooLong {
                kind: LengthKind::Bin,
                len: n,
                max: self.limits.max_bin_len,
            });
        }
        Ok(Value::Bin(self.take(n, start)?.to_vec()))
    }

    fn open_seq(&mut self, n: usize, start: usize) -> Result<Step, DecodeError> {
        if n == 0 {
            return Ok(Step::Done(Value::List(Vec::new())));
        }
        // every item takes at least one byte: never reserve more than what remains
        let rem = self.end - self.pos;
        if n > rem {
            return Err(DecodeError::Truncated {
                offset: start,
                needed: n - rem,
            });
        }
        Ok(Step::Open(Frame::Seq {
            items: Vec::with_capacity(n),
            left: n,
        }))
    }

    fn open_map(&mut self, n: usize, start: usize) -> Result<Step, DecodeError> {
        if n == 0 {
            return Ok(Step::Done(Value::Map(Vec::new())));
        }
        let rem = self.end - self.pos;
        let min_len = n.saturating_mul(2);
        if min_len > rem {
            return Err(DecodeError::Truncated {
                offset: start,
                needed: min_len - rem,
            });
        }
        Ok(Step::Open(Frame::Map {
            entries: Vec::with_capacity(n),
            index: HashMap::new(),
            left: n,
            key: None,
            key_start: self.pos,
        }))
    }

    fn open_ext(&mut self, n: usize, start: usize) -> Result<Step, DecodeError> {
        if n > self.limits.max_ext_len {
            return Err(DecodeError::TooLong {
                kind: LengthKind::Ext,
                len: n,
                max: self.limits.max_ext_len,
            });
        }
        let code = self.u8(start)? as i8;
        let payload_start = self.pos;
        let data = self.take(n, start)?;
        match code {
            TUPLE_EXT_CODE | DICTIONARY_DHT_VALUE_EXT_CODE | BATCH_TENSOR_DESCRIPTOR_EXT_CODE => {
                // decode the payload in place: rewind into it, bounded by its end
                let end = self.pos;
                self.pos = payload_start;
                let outer_end = std::mem::replace(&mut self.end, end);
                Ok(Step::Open(Frame::Ext {
                    code,
                    start,
                    payload_start,
                    end,
                    outer_end,
                }))
            }
            TIMESTAMP_EXT_CODE => {
                check_timestamp(data).map_err(|reason| DecodeError::ExtShape {
                    code,
                    offset: start,
                    reason,
                })?;
                Ok(Step::Done(Value::Ext(Ext {
                    code,
                    data: data.to_vec(),
                })))
            }
            _ => Ok(Step::Done(Value::Ext(Ext {
                code,
                data: data.to_vec(),
            }))),
        }
    }

    /// Turns a decoded payload into the value of its ext type, as hivemind's `ext_hook` does.
    fn convert_ext(&mut self, code: i8, inner: Value) -> Result<Value, &'static str> {
        match code {
            TUPLE_EXT_CODE => Ok(Value::Tuple(self.python_tuple(inner)?)),
            DICTIONARY_DHT_VALUE_EXT_CODE => Ok(Value::DictionaryDhtValue(
                DictionaryDhtValue::from_value(inner).map_err(|e| e.0)?,
            )),
            _ => Ok(Value::TensorDescriptor(
                BatchTensorDescriptor::from_value(&inner).map_err(|e| e.0)?,
            )),
        }
    }

    /// Python's `tuple(x)` of a decoded tuple payload.
    fn python_tuple(&mut self, inner: Value) -> Result<Vec<Value>, &'static str> {
        let too_many = "too many items";
        match inner {
            Value::List(items) | Value::Tuple(items) => Ok(items),
            Value::Str(s) => {
                self.count_items(s.chars().count()).map_err(|_| too_many)?;
                Ok(s.chars().map(|c| Value::Str(c.to_string())).collect())
            }
            // an unknown ext is `bytes` to hivemind; a timestamp is not iterable
            Value::Bin(b)
            | Value::Ext(Ext {
                data: b,
                code: 0..=127 | -128..=-2,
            }) => {
                self.count_items(b.len()).map_err(|_| too_many)?;
                Ok(b.into_iter().map(|x| Value::Int(Int::from(x))).collect())
            }
            Value::Map(entries) => Ok(entries.into_iter().map(|(k, _)| k).collect()),
            _ => Err("tuple payload is not iterable"),
        }
    }
}

/// msgpack-python's checks on a timestamp (ext −1) payload.
fn check_timestamp(data: &[u8]) -> Result<(), &'static str> {
    let nanos = match data.len() {
        4 => 0,
        8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(data);
            u64::from_be_bytes(b) >> 34
        }
        12 => {
            let mut b = [0u8; 4];
            b.copy_from_slice(&data[..4]);
            u64::from(u32::from_be_bytes(b))
        }
        _ => return Err("timestamp payload must be 4, 8 or 12 bytes"),
    };
    if nanos >= 1_000_000_000 {
        return Err("timestamp nanoseconds out of range");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn int_widths() {
        let cases: &[(i128, &str)] = &[
            (0, "00"),
            (127, "7f"),
            (128, "cc80"),
            (255, "ccff"),
            (256, "cd0100"),
            (65535, "cdffff"),
            (65536, "ce00010000"),
            (4294967295, "ceffffffff"),
            (4294967296, "cf0000000100000000"),
            (u64::MAX as i128, "cfffffffffffffffff"),
            (-1, "ff"),
            (-32, "e0"),
            (-33, "d0df"),
            (-128, "d080"),
            (-129, "d1ff7f"),
            (-32768, "d18000"),
            (-32769, "d2ffff7fff"),
            (-(1 << 31), "d280000000"),
            (-(1 << 31) - 1, "d3ffffffff7fffffff"),
            (i64::MIN as i128, "d38000000000000000"),
        ];
        for &(v, h) in cases {
            let value = Value::Int(Int::try_from(v).unwrap());
            assert_eq!(hex(&encode(&value)), h, "{v}");
            assert_eq!(decode(&encode(&value)).unwrap(), value);
        }
        assert!(Int::try_from(u64::MAX as i128 + 1).is_err());
        assert!(Int::try_from(i64::MIN as i128 - 1).is_err());
    }

    #[test]
    fn tuple_and_declaration() {
        let v = Value::from(("ffn.0.5", "QmPeer"));
        assert_eq!(hex(&encode(&v)), "d84092a766666e2e302e35a6516d50656572");
        assert_eq!(hex(&encode(&Value::from(()))), "d44090");
        assert_eq!(encoded_len(&v), encode(&v).len());
    }

    #[test]
    fn lengths_and_headers() {
        for n in [0usize, 1, 15, 16, 31, 32, 255, 256, 65535, 65536] {
            let s = Value::Str("x".repeat(n));
            let b = Value::Bin(vec![7; n]);
            let l = Value::List(vec![Value::Nil; n]);
            for v in [s, b, l] {
                let enc = encode(&v);
                assert_eq!(enc.len(), encoded_len(&v));
                assert_eq!(decode(&enc).unwrap(), v);
            }
        }
    }

    #[test]
    fn strict_map_keys_and_duplicates() {
        // {1: 2}
        assert!(matches!(
            decode(&[0x81, 0x01, 0x02]),
            Err(DecodeError::InvalidMapKey { key_type: "int", .. })
        ));
        // {"a": 1, "a": 2} -> {"a": 2}
        let v = decode(&[0x82, 0xa1, b'a', 0x01, 0xa1, b'a', 0x02]).unwrap();
        assert_eq!(v, Value::map([("a", 2)]));
    }

    #[test]
    fn errors() {
        assert!(matches!(decode(&[]), Err(DecodeError::Truncated { .. })));
        assert!(matches!(
            decode(&[0x01, 0x01]),
            Err(DecodeError::TrailingBytes {
                offset: 1,
                remaining: 1
            })
        ));
        assert!(matches!(
            decode(&[0xc1]),
            Err(DecodeError::ReservedByte { offset: 0 })
        ));
        assert!(matches!(
            decode(&[0xa1, 0xff]),
            Err(DecodeError::InvalidUtf8 { offset: 0 })
        ));
        assert!(matches!(
            decode(&[0xdd, 0xff, 0xff, 0xff, 0xff]),
            Err(DecodeError::Truncated { .. })
        ));
        assert!(matches!(
            decode(&[0xd4, 0x40, 0x01]),
            Err(DecodeError::ExtShape { code: 0x40, .. })
        ));
        assert!(matches!(
            decode(&[0xd5, 0x40, 0x90, 0x01]),
            Err(DecodeError::ExtPayload { code: 0x40, .. })
        ));
        let deep = [vec![0x91; 1025], vec![0x00]].concat();
        assert!(matches!(
            decode(&deep),
            Err(DecodeError::DepthExceeded { max: 1024, .. })
        ));
        let ok = [vec![0x91; 1024], vec![0x00]].concat();
        assert!(decode(&ok).is_ok());
        let limits = Limits::DEFAULT.with_max_items(3);
        assert!(matches!(
            decode_with(&[0x93, 1, 2, 3], &limits),
            Err(DecodeError::TooManyItems { max: 3 })
        ));
        let limits = Limits::DEFAULT.with_max_str_len(2);
        assert!(matches!(
            decode_with(b"\xa3abc", &limits),
            Err(DecodeError::TooLong {
                kind: LengthKind::Str,
                ..
            })
        ));
        let limits = Limits::DEFAULT.with_max_input_len(1);
        assert!(matches!(
            decode_with(&[0x90, 0x90], &limits),
            Err(DecodeError::TooLong {
                kind: LengthKind::Input,
                ..
            })
        ));
    }

    #[test]
    fn errors_inside_ext_payloads_are_wrapped_with_relative_offsets() {
        // [0, (1, (0xc1,))]: the reserved byte sits in the inner tuple's payload
        let bytes = [
            0x92, 0x00, 0xc7, 0x07, 0x40, 0x92, 0x01, 0xc7, 0x02, 0x40, 0x91, 0xc1,
        ];
        let err = decode(&bytes).unwrap_err();
        let DecodeError::ExtPayload {
            code: 0x40,
            offset: 2,
            source,
        } = err
        else {
            panic!("{err:?}")
        };
        let DecodeError::ExtPayload {
            code: 0x40,
            offset: 2,
            source,
        } = *source
        else {
            panic!("{source:?}")
        };
        assert_eq!(*source, DecodeError::ReservedByte { offset: 1 });
        // a shape error is reported at the ext, relative to the payload around it
        let err = decode(&[0x91, 0xd4, 0x40, 0x01]).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::ExtShape {
                    code: 0x40,
                    offset: 1,
                    ..
                }
            ),
            "{err:?}"
        );
        // trailing bytes inside a payload
        let err = decode(&[0xd5, 0x40, 0x90, 0x01]).unwrap_err();
        let DecodeError::ExtPayload {
            offset: 0, source, ..
        } = err
        else {
            panic!("{err:?}")
        };
        assert_eq!(
            *source,
            DecodeError::TrailingBytes {
                offset: 1,
                remaining: 1
            }
        );
    }

    #[test]
    fn deep_nesting_uses_no_call_stack() {
        // 1024 levels of tuples inside lists decode (and drop) on a small thread
        let mut bytes = Vec::new();
        for _ in 0..512 {
            bytes.extend_from_slice(&[0x91]);
        }
        bytes.push(0x00);
        let handle = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || decode(&bytes).map(|v| matches!(v, Value::List(_))))
            .unwrap();
        assert!(handle.join().unwrap().unwrap());
    }

    #[test]
    fn python_tuple_of_iterables() {
        // tuple("ab"), tuple(b"\x01\x02"), tuple({"a": 1})
        assert_eq!(
            decode(&[0xc7, 0x03, 0x40, 0xa2, b'a', b'b']).unwrap(),
            Value::tuple(["a", "b"])
        );
        assert_eq!(
            decode(&[0xc7, 0x04, 0x40, 0xc4, 0x02, 0x01, 0x02]).unwrap(),
            Value::tuple([1, 2])
        );
        assert_eq!(
            decode(&[0xc7, 0x04, 0x40, 0x81, 0xa1, b'a', 0x01]).unwrap(),
            Value::tuple(["a"])
        );
    }

    #[test]
    fn float_equality_is_bitwise() {
        assert_eq!(Value::Float(f64::NAN), Value::Float(f64::NAN));
        assert_ne!(Value::Float(0.0), Value::Float(-0.0));
        assert!(Value::Float(1.0).py_eq(&Value::Int(1.into())));
        assert!(Value::Bool(true).py_eq(&Value::Int(1.into())));
        assert_eq!(decode(&[0xca, 0x3f, 0x80, 0, 0]).unwrap(), Value::Float(1.0));
    }

    #[test]
    fn int_float_comparison() {
        let cmp = |i: i64, f: f64| Number::from(i).numeric_cmp(&Number::Float(f));
        assert_eq!(cmp(1, 1.0), Some(Ordering::Equal));
        assert_eq!(cmp(1, 1.5), Some(Ordering::Less));
        assert_eq!(cmp(2, 1.5), Some(Ordering::Greater));
        assert_eq!(cmp(-2, -1.5), Some(Ordering::Less));
        assert_eq!(cmp(-1, -1.5), Some(Ordering::Greater));
        assert_eq!(cmp(i64::MAX, 9.223_372_036_854_776e18), Some(Ordering::Less));
        assert_eq!(cmp(0, f64::INFINITY), Some(Ordering::Less));
        assert_eq!(cmp(0, f64::NEG_INFINITY), Some(Ordering::Greater));
        assert_eq!(cmp(0, f64::NAN), None);
    }

    /// xorshift64*: a tiny deterministic generator for the garbage loops.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut ok = 0usize;
        for _ in 0..200_000 {
            let len = (rng.next() % 48) as usize;
            // bias towards format bytes that open containers and exts
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    let r = rng.next();
                    match r % 4 {
                        0 => [
                            0x90, 0x91, 0x92, 0x81, 0xd4, 0xd5, 0xc7, 0xd8, 0x40, 0x50, 0x51, 0xa1,
                        ][(r >> 8) as usize % 12],
                        _ => (r >> 16) as u8,
                    }
                })
                .collect();
            if let Ok(v) = decode(&buf) {
                ok += 1;
                // whatever decodes re-encodes, and decodes again to the same value
                let again = encode(&v);
                assert_eq!(decode(&again).unwrap(), v);
            }
        }
        assert!(ok > 0);
    }

    #[test]
    fn truncations_of_valid_values_are_errors() {
        let v = Value::map([
            ("a", Value::from(("ffn.0.5", "QmPeer"))),
            (
                "b",
                Value::list([
                    Value::Float(1.5),
                    Value::Int(Int::MIN),
                    Value::bin(vec![1u8; 300]),
                ]),
            ),
            ("c", Value::from(BatchTensorDescriptor::new([4]))),
        ]);
        let mut dict = DictionaryDhtValue::new();
        dict.store(Value::from(5), encode(&v), 1e9);
        let v = Value::list([v, Value::from(dict)]);
        let bytes = encode(&v);
        assert_eq!(decode(&bytes).unwrap(), v);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
        // flipping any single byte never panics
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                let _ = decode(&b);
            }
        }
    }
}
