//! Record validators (`hivemind/dht/validation.py`, `crypto.py`, `schema.py`).
//!
//! A [`RecordValidator`] validates records that peers ask us to store or that they return to us, signs
//! the values we store and strips signatures before values reach the application. A
//! [`CompositeValidator`] orders validators by [`priority`](RecordValidator::priority): it signs in
//! ascending order and validates and strips in descending order, stripping between validations so that
//! a lower-priority validator (a schema) sees the value without the higher one's signature.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use apiary_wire::dhtid::DhtId;
use apiary_wire::msgpack::{self, Value};
use apiary_wire::signature::{
    DhtRecord, IS_DICTIONARY, IS_REGULAR_VALUE, RsaSignatureValidator, SignError, ValidationError,
};

/// A validator failed in a way hivemind raises on (rather than returning `False`): the request that
/// carried the record fails as a whole.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ValidatorError {
    /// A protected record names an owner key that does not parse.
    #[error("malformed owner key in a protected record")]
    MalformedOwnerKey(#[source] ValidationError),
    /// Signing failed.
    #[error("could not sign a record")]
    Sign(#[from] SignError),
}

/// hivemind's `RecordValidatorBase`.
pub trait RecordValidator: Send + Sync + fmt::Debug {
    /// Whether `record` is valid (`Ok(false)`: rejected; `Err`: hivemind raises).
    fn validate(&self, record: &DhtRecord) -> Result<bool, ValidatorError>;

    /// `record.value` extended with this validator's signature, if it signs.
    fn sign_value(&self, record: &DhtRecord) -> Result<Vec<u8>, ValidatorError> {
        Ok(record.value.clone())
    }

    /// `record.value` without this validator's signature (called only on valid records).
    fn strip_value(&self, record: &DhtRecord) -> Vec<u8> {
        record.value.clone()
    }

    /// Signing runs in ascending, validating and stripping in descending priority.
    fn priority(&self) -> i32 {
        0
    }

    /// Absorbs `other` into `self` if this kind of validator combines with it (then `other` is not added
    /// separately). hivemind: an RSA validator swallows other RSA validators; schema validators unite.
    fn merge_with(&mut self, other: &dyn RecordValidator) -> bool {
        let _ = other;
        false
    }

    /// Downcasting support for [`merge_with`](Self::merge_with).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// hivemind's `CompositeValidator`: every validator must accept.
#[derive(Debug, Default)]
pub struct CompositeValidator {
    validators: Vec<Box<dyn RecordValidator>>,
}

impl CompositeValidator {
    /// A composite of `validators` (merged and sorted as [`extend`](Self::extend) does).
    pub fn new(validators: impl IntoIterator<Item = Box<dyn RecordValidator>>) -> Self {
        let mut out = CompositeValidator::default();
        out.extend(validators);
        out
    }

    /// `CompositeValidator.extend`: each new validator merges into the first existing one that takes it,
    /// or is appended; then validators are sorted by priority (stably).
    pub fn extend(&mut self, validators: impl IntoIterator<Item = Box<dyn RecordValidator>>) {
        for new in validators {
            if !self.validators.iter_mut().any(|v| v.merge_with(new.as_ref())) {
                self.validators.push(new);
            }
        }
        self.validators.sort_by_key(|v| v.priority());
    }

    /// How many validators remain after merging.
    pub fn len(&self) -> usize {
        self.validators.len()
    }

    /// Whether there are none (then every record is valid).
    pub fn is_empty(&self) -> bool {
        self.validators.is_empty()
    }

    /// `CompositeValidator.validate`: highest priority first, stripping before each next validator.
    pub fn validate(&self, record: &DhtRecord) -> Result<bool, ValidatorError> {
        let mut record = record.clone();
        let n = self.validators.len();
        for (i, v) in self.validators.iter().rev().enumerate() {
            if !v.validate(&record)? {
                return Ok(false);
            }
            if i + 1 < n {
                record.value = v.strip_value(&record);
            }
        }
        Ok(true)
    }

    /// `CompositeValidator.sign_value`: lowest priority first, each signing the previous output.
    pub fn sign_value(&self, record: &DhtRecord) -> Result<Vec<u8>, ValidatorError> {
        let mut record = record.clone();
        for v in &self.validators {
            record.value = v.sign_value(&record)?;
        }
        Ok(record.value)
    }

    /// `CompositeValidator.strip_value`: highest priority first.
    pub fn strip_value(&self, record: &DhtRecord) -> Vec<u8> {
        let mut record = record.clone();
        for v in self.validators.iter().rev() {
            record.value = v.strip_value(&record);
        }
        record.value
    }
}

/// [`RsaSignatureValidator`] (priority 10) as a [`RecordValidator`].
#[derive(Debug, Clone)]
pub struct RsaOwnerValidator(pub RsaSignatureValidator);

impl RecordValidator for RsaOwnerValidator {
    fn validate(&self, record: &DhtRecord) -> Result<bool, ValidatorError> {
        match self.0.validate(record) {
            Ok(()) => Ok(true),
            Err(e @ ValidationError::MalformedOwnerKey(_)) => Err(ValidatorError::MalformedOwnerKey(e)),
            Err(e) => {
                tracing::debug!(error = %e, "record rejected by the RSA owner validator");
                Ok(false)
            }
        }
    }

    fn sign_value(&self, record: &DhtRecord) -> Result<Vec<u8>, ValidatorError> {
        Ok(self.0.sign_value(record)?)
    }

    fn strip_value(&self, record: &DhtRecord) -> Vec<u8> {
        self.0.strip_value(record)
    }

    fn priority(&self) -> i32 {
        RsaSignatureValidator::PRIORITY
    }

    fn merge_with(&mut self, other: &dyn RecordValidator) -> bool {
        // one RSA validator is enough: others are ignored, reported as merged
        other.as_any().is::<RsaOwnerValidator>()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

/// What a schema field check sees: the deserialized record.
#[derive(Debug, Clone, Copy)]
pub enum FieldValue<'a> {
    /// A regular value (`{field: value}` in hivemind).
    Regular(&'a Value),
    /// One sub-key entry (`{field: {subkey: value}}`).
    Entry {
        /// The deserialized sub-key.
        subkey: &'a Value,
        /// The deserialized value.
        value: &'a Value,
    },
}

/// A type check for one schema field; must not coerce (hivemind's strict pydantic types).
pub type FieldCheck = Arc<dyn Fn(FieldValue<'_>) -> bool + Send + Sync>;

/// hivemind's `SchemaValidator` (priority 0) with the pydantic model replaced by per-field checks:
/// keys `DHTID(field)` (or `DHTID(f"{prefix}_{field}")`) must deserialize and pass their field's check;
/// other keys pass iff `allow_extra_keys`. Merging unites fields; a field defined by several schemas
/// passes when any of them accepts (as each pydantic model is tried in turn).
#[derive(Clone, Default)]
pub struct SchemaValidator {
    fields: HashMap<DhtId, (String, Vec<FieldCheck>)>,
    allow_extra_keys: bool,
}

impl fmt::Debug for SchemaValidator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SchemaValidator")
            .field(
                "fields",
                &self.fields.values().map(|(n, _)| n).collect::<Vec<_>>(),
            )
            .field("allow_extra_keys", &self.allow_extra_keys)
            .finish()
    }
}

impl SchemaValidator {
    /// An empty schema; keys outside it pass iff `allow_extra_keys`.
    pub fn new(allow_extra_keys: bool) -> Self {
        SchemaValidator {
            fields: HashMap::new(),
            allow_extra_keys,
        }
    }

    /// Adds field `name` (key `DHTID(name)`, or `DHTID(f"{prefix}_{name}")`) checked by `check`.
    pub fn field(
        mut self,
        name: &str,
        prefix: Option<&str>,
        check: impl Fn(FieldValue<'_>) -> bool + Send + Sync + 'static,
    ) -> Self {
        let raw_key = match prefix {
            Some(p) => format!("{p}_{name}"),
            None => name.to_owned(),
        };
        let key = DhtId::from_key(&Value::from(raw_key));
        self.fields
            .entry(key)
            .or_insert_with(|| (name.to_owned(), Vec::new()))
            .1
            .push(Arc::new(check));
        self
    }
}

impl RecordValidator for SchemaValidator {
    fn validate(&self, record: &DhtRecord) -> Result<bool, ValidatorError> {
        let Some((_, checks)) = DhtId::from_bytes(&record.key)
            .ok()
            .and_then(|k| self.fields.get(&k))
        else {
            return Ok(self.allow_extra_keys);
        };
        let Ok(value) = msgpack::decode(&record.value) else {
            return Ok(false);
        };
        let ok = if record.subkey == IS_REGULAR_VALUE || record.subkey == IS_DICTIONARY {
            if value.as_map().is_some() {
                return Ok(false); // a `dict` where a DictionaryDHTValue belongs
            }
            checks.iter().any(|c| c(FieldValue::Regular(&value)))
        } else {
            let Ok(subkey) = msgpack::decode(&record.subkey) else {
                return Ok(false);
            };
            checks.iter().any(|c| {
                c(FieldValue::Entry {
                    subkey: &subkey,
                    value: &value,
                })
            })
        };
        Ok(ok)
    }

    fn merge_with(&mut self, other: &dyn RecordValidator) -> bool {
        let Some(other) = other.as_any().downcast_ref::<SchemaValidator>() else {
            return false;
        };
        for (k, (name, checks)) in &other.fields {
            self.fields
                .entry(*k)
                .or_insert_with(|| (name.clone(), Vec::new()))
                .1
                .extend(checks.iter().cloned());
        }
        self.allow_extra_keys |= other.allow_extra_keys;
        true
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apiary_wire::signature::RsaPrivateKey;

    fn schema() -> SchemaValidator {
        SchemaValidator::new(true)
            .field("epoch", None, |v| matches!(v, FieldValue::Regular(Value::Int(_))))
            .field("peers", Some("exp"), |v| {
                matches!(
                    v,
                    FieldValue::Entry {
                        subkey: Value::Str(_),
                        value: Value::Float(_)
                    }
                )
            })
    }

    #[test]
    fn schema_checks_typed_fields_and_allows_extra_keys() {
        let s = schema();
        let epoch = DhtId::from_key(&Value::from("epoch"));
        let ok = DhtRecord::regular(epoch, msgpack::encode(&Value::from(5)), 10.0);
        assert!(s.validate(&ok).unwrap());
        let coerced = DhtRecord::regular(epoch, msgpack::encode(&Value::from(5.0)), 10.0);
        assert!(!s.validate(&coerced).unwrap());
        let garbage = DhtRecord::regular(epoch, vec![0xc1], 10.0);
        assert!(!s.validate(&garbage).unwrap());
        let peers = DhtId::from_key(&Value::from("exp_peers"));
        let sub = DhtRecord::new(
            peers,
            msgpack::encode(&Value::from("peer")),
            msgpack::encode(&Value::from(1.5)),
            10.0,
        );
        assert!(s.validate(&sub).unwrap());
        let other = DhtRecord::regular(DhtId::from_key(&Value::from("x")), vec![0xc1], 10.0);
        assert!(s.validate(&other).unwrap());
        assert!(!SchemaValidator::new(false).validate(&other).unwrap());
    }

    #[test]
    fn composite_signs_validates_and_strips_in_priority_order() {
        let key = RsaPrivateKey::generate().unwrap();
        let rsa = RsaSignatureValidator::new(key);
        let marker = rsa.local_public_key().to_vec();
        let composite = CompositeValidator::new([
            Box::new(schema()) as Box<dyn RecordValidator>,
            Box::new(RsaOwnerValidator(rsa.clone())),
            Box::new(RsaOwnerValidator(rsa)),      // merged away
            Box::new(SchemaValidator::new(false)), // merged into the first schema
        ]);
        assert_eq!(composite.len(), 2);
        let epoch = DhtId::from_key(&Value::from("epoch"));
        let subkey = msgpack::encode(&Value::Bin(marker));
        let mut record = DhtRecord::new(epoch, subkey, msgpack::encode(&Value::from(7)), 10.0);
        // unsigned protected record: rejected by RSA before the schema sees it
        assert!(!composite.validate(&record).unwrap());
        record.value = composite.sign_value(&record).unwrap();
        // the schema (priority 0) sees the stripped value: an int entry, not a regular value → its check
        // for "epoch" expects a regular value, so it fails; RSA alone passes
        assert!(!composite.validate(&record).unwrap());
        let rsa_only = CompositeValidator::new([Box::new(RsaOwnerValidator(RsaSignatureValidator::new(
            RsaPrivateKey::generate().unwrap(),
        ))) as Box<dyn RecordValidator>]);
        assert!(rsa_only.validate(&record).unwrap());
        assert_eq!(composite.strip_value(&record), msgpack::encode(&Value::from(7)));
        // tampering breaks the signature
        let mut forged = record.clone();
        forged.expiration_time = 11.0;
        assert!(!rsa_only.validate(&forged).unwrap());
    }
}
