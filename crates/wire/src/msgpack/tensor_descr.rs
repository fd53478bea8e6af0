//! hivemind's `BatchTensorDescriptor` (ext `0x51`, `hivemind/utils/tensor_descr.py`) and the `rpc_info`
//! dict built from them (`ModuleBackend.get_info()`).

use super::{BATCH_TENSOR_DESCRIPTOR_EXT_CODE, DecodeError, ShapeError, Value, decode, encode};

/// `str(dtype)` differs from `"torch." + name` for these torch attribute names (torch 2.x).
const DTYPE_ALIASES: &[(&str, &str)] = &[
    ("bit", "uint1"),
    ("cdouble", "complex128"),
    ("cfloat", "complex64"),
    ("chalf", "complex32"),
    ("double", "float64"),
    ("float", "float32"),
    ("half", "float16"),
    ("int", "int32"),
    ("long", "int64"),
    ("short", "int16"),
];

/// `str(getattr(torch, name.split(".")[-1]))`, as `_str_to_torch_type` + `packb` normalize a dtype or
/// layout name: `"float"`, `"float32"` and `"torch.float32"` all become `"torch.float32"`.
///
/// hivemind also rejects names that are no attribute of the peer's torch; Apiary accepts any non-empty
/// name (torch versions differ in the dtypes they know).
fn canonical_torch_name(name: &str, aliases: &[(&str, &str)]) -> Result<String, ShapeError> {
    let last = name.rsplit('.').next().unwrap_or(name);
    if last.is_empty() {
        return Err(ShapeError("empty torch type name"));
    }
    let canon = aliases
        .iter()
        .find(|(alias, _)| *alias == last)
        .map_or(last, |(_, c)| c);
    Ok(format!("torch.{canon}"))
}

/// A torch device as a descriptor carries it: `device_type` and `device_index`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Device {
    /// `"cpu"`, `"cuda"`, … (`torch.device.type`).
    pub device_type: String,
    /// The device ordinal, if any (`torch.device.index`).
    pub index: Option<u32>,
}

impl Device {
    /// The CPU device with no index, what `BatchTensorDescriptor.from_tensor` records for CPU tensors.
    pub fn cpu() -> Device {
        Device {
            device_type: "cpu".to_owned(),
            index: None,
        }
    }
}

/// A tensor with a variable batch dimension: hivemind's `BatchTensorDescriptor`, used in expert
/// schemas (`rpc_info`). Its size is `(None, *instance_size)`.
///
/// Its msgpack form (ext `0x51`) is a dict with exactly this key order: `size` (a tuple with `None` for
/// the batch dimension), `dtype` (`"torch.float32"` or `None`), `layout` (`"torch.strided"`),
/// `requires_grad`, `pin_memory`, `compression` (a `runtime.proto` `CompressionType` number),
/// `device_type` (`"cpu"`, `"cuda"` or `None`), `device_index`.
///
/// Decoding follows `BatchTensorDescriptor.unpackb`: the transmitted batch dimension is dropped (it
/// always comes back as `None`), dtype/layout names are normalized (`"float"` → `"torch.float32"`), a
/// missing `device_type` drops the index, `requires_grad`/`pin_memory`/`compression` default to
/// `False`/`False`/`0`, and unknown keys are rejected.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct BatchTensorDescriptor {
    /// The size without the batch dimension.
    pub instance_size: Vec<u64>,
    /// `str(torch.dtype)`, e.g. `"torch.float32"`; `None` when unspecified.
    pub dtype: Option<String>,
    /// `str(torch.layout)`, e.g. `"torch.strided"`.
    pub layout: Option<String>,
    /// The device, if specified.
    pub device: Option<Device>,
    /// Whether the tensor requires a gradient.
    pub requires_grad: bool,
    /// Whether the tensor is in pinned memory.
    pub pin_memory: bool,
    /// The `CompressionType` clients must use for this tensor (`0` = `NONE`).
    pub compression: i32,
}

impl BatchTensorDescriptor {
    /// `BatchTensorDescriptor(*instance_size)`: no dtype, strided layout, no device, no grad, no
    /// compression.
    pub fn new(instance_size: impl Into<Vec<u64>>) -> Self {
        BatchTensorDescriptor {
            instance_size: instance_size.into(),
            dtype: None,
            layout: Some("torch.strided".to_owned()),
            device: None,
            requires_grad: false,
            pin_memory: false,
            compression: 0,
        }
    }

    /// Sets the dtype from a torch or numpy-style name (`"float32"`, `"torch.float32"`, `"float"`).
    pub fn with_dtype(mut self, dtype: &str) -> Self {
        self.dtype = canonical_torch_name(dtype, DTYPE_ALIASES).ok();
        self
    }

    /// Sets the layout from a torch name (`"strided"`, `"torch.strided"`).
    pub fn with_layout(mut self, layout: &str) -> Self {
        self.layout = canonical_torch_name(layout, &[]).ok();
        self
    }

    /// Sets the device.
    pub fn with_device(mut self, device: Device) -> Self {
        self.device = Some(device);
        self
    }

    /// Sets `requires_grad`.
    pub fn with_requires_grad(mut self, requires_grad: bool) -> Self {
        self.requires_grad = requires_grad;
        self
    }

    /// Sets `pin_memory`.
    pub fn with_pin_memory(mut self, pin_memory: bool) -> Self {
        self.pin_memory = pin_memory;
        self
    }

    /// Sets the `CompressionType` number.
    pub fn with_compression(mut self, compression: i32) -> Self {
        self.compression = compression;
        self
    }

    /// The full size, `None` for the batch dimension.
    pub fn size(&self) -> Vec<Option<u64>> {
        std::iter::once(None)
            .chain(self.instance_size.iter().copied().map(Some))
            .collect()
    }

    /// The dtype without its `torch.` prefix (`"float32"`), as `runtime.proto` tensors name it.
    pub fn dtype_name(&self) -> Option<&str> {
        self.dtype
            .as_deref()
            .map(|d| d.strip_prefix("torch.").unwrap_or(d))
    }

    /// The dict that `packb` serializes, keys in hivemind's order.
    pub fn to_value(&self) -> Value {
        let size = Value::Tuple(
            std::iter::once(Value::Nil)
                .chain(self.instance_size.iter().map(|&d| Value::from(d)))
                .collect(),
        );
        let (device_type, device_index) = match &self.device {
            Some(d) => (Value::from(d.device_type.as_str()), Value::from(d.index)),
            None => (Value::Nil, Value::Nil),
        };
        Value::Map(vec![
            (Value::from("size"), size),
            (Value::from("dtype"), Value::from(self.dtype.as_deref())),
            (Value::from("layout"), Value::from(self.layout.as_deref())),
            (Value::from("requires_grad"), Value::Bool(self.requires_grad)),
            (Value::from("pin_memory"), Value::Bool(self.pin_memory)),
            (Value::from("compression"), Value::from(self.compression)),
            (Value::from("device_type"), device_type),
            (Value::from("device_index"), device_index),
        ])
    }

    /// The ext `0x51` payload, as `packb` writes it.
    pub fn to_payload(&self) -> Vec<u8> {
        encode(&self.to_value())
    }

    /// Reads an ext `0x51` payload, as `unpackb` does (default [`super::Limits`]).
    pub fn from_payload(payload: &[u8]) -> Result<Self, DecodeError> {
        let v = decode(payload)?;
        Self::from_value(&v).map_err(|e| DecodeError::ExtShape {
            code: BATCH_TENSOR_DESCRIPTOR_EXT_CODE,
            offset: 0,
            reason: e.0,
        })
    }

    /// Builds a descriptor from the decoded payload dict, as `unpackb` does (see the type docs).
    pub fn from_value(v: &Value) -> Result<Self, ShapeError> {
        let entries = v.as_map().ok_or(ShapeError("descriptor payload is not a dict"))?;
        let mut size = None;
        let mut dtype = None;
        let mut layout = None;
        let mut device_type = None;
        let mut device_index = None;
        let mut out = BatchTensorDescriptor::new(Vec::new());
        for (k, v) in entries {
            let k = k.as_str().ok_or(ShapeError("descriptor key is not a str"))?;
            match k {
                "size" => size = Some(v),
                "dtype" => dtype = Some(v),
                "layout" => layout = Some(v),
                "device_type" => device_type = Some(v),
                "device_index" => device_index = Some(v),
                // a `device` entry is a valid keyword that unpackb overwrites from device_type/index
                "device" => {}
                "requires_grad" => {
                    out.requires_grad = v.as_bool().ok_or(ShapeError("requires_grad is not a bool"))?
                }
                "pin_memory" => out.pin_memory = v.as_bool().ok_or(ShapeError("pin_memory is not a bool"))?,
                "compression" => {
                    out.compression = v
                        .as_i64()
                        .and_then(|c| i32::try_from(c).ok())
                        .ok_or(ShapeError("compression is not a CompressionType number"))?;
                }
                _ => return Err(ShapeError("unknown descriptor field")),
            }
        }
        let size = size.ok_or(ShapeError("descriptor has no size"))?;
        let dims = size.as_seq().ok_or(ShapeError("size is not a tuple"))?;
        out.instance_size = dims
            .iter()
            .skip(1)
            .map(|d| {
                d.as_u64()
                    .ok_or(ShapeError("a size dimension is not a non-negative int"))
            })
            .collect::<Result<_, _>>()?;
        out.dtype = match dtype.ok_or(ShapeError("descriptor has no dtype"))? {
            Value::Nil => None,
            Value::Str(s) => Some(canonical_torch_name(s, DTYPE_ALIASES)?),
            _ => return Err(ShapeError("dtype is not a str")),
        };
        out.layout = match layout.ok_or(ShapeError("descriptor has no layout"))? {
            Value::Nil => None,
            Value::Str(s) => Some(canonical_torch_name(s, &[])?),
            _ => return Err(ShapeError("layout is not a str")),
        };
        let device_type = device_type.ok_or(ShapeError("descriptor has no device_type"))?;
        let device_index = device_index.ok_or(ShapeError("descriptor has no device_index"))?;
        out.device = match device_type {
            Value::Nil => None,
            Value::Str(t) => {
                let index = match device_index {
                    Value::Nil => None,
                    Value::Int(i) => Some(
                        i.as_u64()
                            .and_then(|i| u32::try_from(i).ok())
                            .ok_or(ShapeError("bad device_index"))?,
                    ),
                    _ => return Err(ShapeError("device_index is not an int")),
                };
                // torch.device(type, index) refuses "cuda:1" because an index (even None) is passed
                if t.contains(':') {
                    return Err(ShapeError("device_type must not include an index"));
                }
                Some(Device {
                    device_type: t.clone(),
                    index,
                })
            }
            _ => return Err(ShapeError("device_type is not a str")),
        };
        Ok(out)
    }
}

/// What a hivemind expert server answers to `rpc_info` (`ModuleBackend.get_info()`), decoded from or
/// encoded to `ExpertInfo.serialized_info`:
/// `{"forward_schema": (args_schema, kwargs_schema), "outputs_schema": …, "keyword_names": (…)}`.
///
/// Schemas are [`Value`]s because hivemind allows nested structures of descriptors (tuples, lists,
/// dicts); for ordinary experts every leaf is a [`Value::TensorDescriptor`].
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RpcInfo {
    /// Descriptors of the positional inputs (a tuple on the wire).
    pub args_schema: Vec<Value>,
    /// Descriptors of the keyword inputs (a dict on the wire), in order.
    pub kwargs_schema: Vec<(String, Value)>,
    /// The outputs: one descriptor, or a nested structure of them.
    pub outputs_schema: Value,
    /// `tuple(kwargs_schema.keys())`.
    pub keyword_names: Vec<String>,
    /// Any further entries a custom backend adds, written after the standard three.
    pub extra: Vec<(Value, Value)>,
}

impl RpcInfo {
    /// The info of a `ModuleBackend` with these schemas; `keyword_names` are the kwargs' names.
    pub fn new(
        args_schema: impl IntoIterator<Item = BatchTensorDescriptor>,
        kwargs_schema: impl IntoIterator<Item = (String, BatchTensorDescriptor)>,
        outputs_schema: impl Into<Value>,
    ) -> Self {
        let kwargs_schema: Vec<(String, Value)> = kwargs_schema
            .into_iter()
            .map(|(k, d)| (k, Value::TensorDescriptor(d)))
            .collect();
        RpcInfo {
            args_schema: args_schema.into_iter().map(Value::TensorDescriptor).collect(),
            keyword_names: kwargs_schema.iter().map(|(k, _)| k.clone()).collect(),
            kwargs_schema,
            outputs_schema: outputs_schema.into(),
            extra: Vec::new(),
        }
    }

    /// The dict `get_info()` returns.
    pub fn to_value(&self) -> Value {
        let forward_schema = Value::Tuple(vec![
            Value::Tuple(self.args_schema.clone()),
            Value::Map(
                self.kwargs_schema
                    .iter()
                    .map(|(k, v)| (Value::from(k), v.clone()))
                    .collect(),
            ),
        ]);
        let mut entries = vec![
            (Value::from("forward_schema"), forward_schema),
            (Value::from("outputs_schema"), self.outputs_schema.clone()),
            (
                Value::from("keyword_names"),
                Value::Tuple(self.keyword_names.iter().map(Value::from).collect()),
            ),
        ];
        entries.extend(self.extra.iter().cloned());
        Value::Map(entries)
    }

    /// `MSGPackSerializer.dumps(get_info())`: the bytes of `ExpertInfo.serialized_info`.
    pub fn to_msgpack(&self) -> Vec<u8> {
        encode(&self.to_value())
    }

    /// Reads the decoded `rpc_info` dict, as `RemoteExpert.info` consumers do.
    pub fn from_value(v: &Value) -> Result<Self, ShapeError> {
        let entries = v.as_map().ok_or(ShapeError("expert info is not a dict"))?;
        let mut forward = None;
        let mut outputs = None;
        let mut keyword_names = None;
        let mut extra = Vec::new();
        for (k, v) in entries {
            match k.as_str() {
                Some("forward_schema") => forward = Some(v),
                Some("outputs_schema") => outputs = Some(v),
                Some("keyword_names") => keyword_names = Some(v),
                _ => extra.push((k.clone(), v.clone())),
            }
        }
        let forward = forward
            .and_then(Value::as_seq)
            .ok_or(ShapeError("forward_schema is not (args, kwargs)"))?;
        let [args, kwargs] = forward else {
            return Err(ShapeError("forward_schema is not (args, kwargs)"));
        };
        let args_schema = args
            .as_seq()
            .ok_or(ShapeError("args schema is not a tuple"))?
            .to_vec();
        let kwargs_schema = kwargs
            .as_map()
            .ok_or(ShapeError("kwargs schema is not a dict"))?
            .iter()
            .map(|(k, v)| {
                Ok((
                    k.as_str()
                        .ok_or(ShapeError("a kwargs name is not a str"))?
                        .to_owned(),
                    v.clone(),
                ))
            })
            .collect::<Result<_, ShapeError>>()?;
        let outputs_schema = outputs.ok_or(ShapeError("no outputs_schema"))?.clone();
        let keyword_names = match keyword_names {
            None => return Err(ShapeError("no keyword_names")),
            Some(v) => v
                .as_seq()
                .ok_or(ShapeError("keyword_names is not a tuple"))?
                .iter()
                .map(|n| {
                    n.as_str()
                        .map(str::to_owned)
                        .ok_or(ShapeError("a keyword name is not a str"))
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(RpcInfo {
            args_schema,
            kwargs_schema,
            outputs_schema,
            keyword_names,
            extra,
        })
    }
}

/// The `rpc_info` dict of a `ModuleBackend` with these schemas, ready for [`super::encode`]:
/// `{"forward_schema": ((args…), {kwargs}), "outputs_schema": outputs, "keyword_names": (names…)}`.
///
/// ```
/// use apiary_wire::msgpack::{self, BatchTensorDescriptor, Device, expert_info};
///
/// // ModuleBackend("ffn.0.5", FeedforwardBlock(4), args_schema=(BatchTensorDescriptor(4),))
/// let output = BatchTensorDescriptor::new([4]).with_dtype("float32").with_device(Device::cpu()).with_requires_grad(true);
/// let info = expert_info([BatchTensorDescriptor::new([4])], [], output);
/// let bytes = msgpack::encode(&info);
/// assert_eq!(&bytes[..19], b"\x83\xaeforward_schema\xc7\x74\x40");
/// assert_eq!(bytes.len(), 293); // Appendix B of hivemind-wire.md
/// ```
pub fn expert_info(
    args_schema: impl IntoIterator<Item = BatchTensorDescriptor>,
    kwargs_schema: impl IntoIterator<Item = (String, BatchTensorDescriptor)>,
    outputs_schema: impl Into<Value>,
) -> Value {
    RpcInfo::new(args_schema, kwargs_schema, outputs_schema).to_value()
}

impl From<RpcInfo> for Value {
    fn from(v: RpcInfo) -> Self {
        v.to_value()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_bytes_match_hivemind() {
        // MSGPackSerializer.dumps(BatchTensorDescriptor(3, dtype=torch.float)) in hivemind 1.1.12
        let expected = "c7785188a473697a65c7034092c003a56474797065ad746f7263682e666c6f61743332a66c61796f7574ad746f7263682e73747269646564ad72657175697265735f67726164c2aa70696e5f6d656d6f7279c2ab636f6d7072657373696f6e00ab6465766963655f74797065c0ac6465766963655f696e646578c0";
        let d = BatchTensorDescriptor::new([3]).with_dtype("float");
        let got: String = encode(&Value::from(d.clone()))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert_eq!(got, expected);
        assert_eq!(BatchTensorDescriptor::from_payload(&d.to_payload()).unwrap(), d);
        assert_eq!(d.dtype_name(), Some("float32"));
        assert_eq!(d.size(), vec![None, Some(3)]);
    }

    /// The payload dict of `BatchTensorDescriptor(2, 3)`, edited.
    fn edited(edit: impl FnOnce(&mut Vec<(Value, Value)>)) -> Value {
        let mut map = BatchTensorDescriptor::new([2, 3]).to_value();
        if let Value::Map(entries) = &mut map {
            edit(entries);
        }
        map
    }

    #[test]
    fn unpackb_normalization() {
        let map = edited(|e| {
            e[0].1 = Value::tuple([7, 2, 3]); // the batch dimension 7 is dropped
            e[1].1 = Value::from("double");
            e[6].1 = Value::from("cuda");
            e[7].1 = Value::from(1);
        });
        let d = BatchTensorDescriptor::from_value(&map).unwrap();
        assert_eq!(d.instance_size, vec![2, 3]);
        assert_eq!(d.dtype.as_deref(), Some("torch.float64"));
        assert_eq!(
            d.device,
            Some(Device {
                device_type: "cuda".into(),
                index: Some(1)
            })
        );
        // device_type None drops the index
        let d = BatchTensorDescriptor::from_value(&edited(|e| e[7].1 = Value::from(3))).unwrap();
        assert_eq!(d.device, None);
        for bad in [
            edited(|e| e[6].1 = Value::from("cuda:1")),
            edited(|e| e.push((Value::from("bogus"), Value::Nil))),
            edited(|e| {
                e.remove(1);
            }),
            edited(|e| e[1].1 = Value::from(5)),
            edited(|e| e[0].1 = Value::tuple([Value::Nil, Value::from(-1)])),
        ] {
            assert!(BatchTensorDescriptor::from_value(&bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rpc_info_round_trip() {
        let out = BatchTensorDescriptor::new([4])
            .with_dtype("float32")
            .with_device(Device::cpu())
            .with_requires_grad(true);
        let info = RpcInfo::new(
            [BatchTensorDescriptor::new([4])],
            [(
                "mask".to_owned(),
                BatchTensorDescriptor::new([4]).with_dtype("bool"),
            )],
            out,
        );
        let v = crate::msgpack::decode(&info.to_msgpack()).unwrap();
        assert_eq!(RpcInfo::from_value(&v).unwrap(), info);
        assert_eq!(info.keyword_names, vec!["mask".to_owned()]);
    }
}
