//! JSON on the command line ⇄ hivemind's msgpack values.
//!
//! Strings, numbers, booleans, `null` and lists map to msgpack's `str`, int/`float64`, `bool`, `nil` and
//! list; `{"tuple": […]}` is a msgpack tuple (ext 0x40) and `{"bytes": "<hex>"}` a `bytes` value, so every
//! value hivemind stores can be written and read back without loss. Any other object is a map.

use anyhow::{Context, Result, bail};
use apiary_wire::msgpack::Value;
use serde_json::{Map, Value as Json, json};

/// Parses a command-line JSON argument into a msgpack value.
pub fn parse(text: &str) -> Result<Value> {
    let json: Json = serde_json::from_str(text).with_context(|| format!("not valid JSON: {text}"))?;
    from_json(&json)
}

pub fn from_json(json: &Json) -> Result<Value> {
    Ok(match json {
        Json::Null => Value::Nil,
        Json::Bool(b) => Value::Bool(*b),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                Value::Float(n.as_f64().context("number out of range")?)
            }
        }
        Json::String(s) => Value::Str(s.clone()),
        Json::Array(items) => Value::List(items.iter().map(from_json).collect::<Result<_>>()?),
        Json::Object(map) => match (map.len(), map.get("tuple"), map.get("bytes")) {
            (1, Some(Json::Array(items)), _) => {
                Value::Tuple(items.iter().map(from_json).collect::<Result<_>>()?)
            }
            (1, _, Some(Json::String(hex))) => Value::Bin(unhex(hex)?),
            _ => Value::Map(
                map.iter()
                    .map(|(k, v)| Ok((Value::Str(k.clone()), from_json(v)?)))
                    .collect::<Result<_>>()?,
            ),
        },
    })
}

/// The JSON form of a msgpack value (the inverse of [`from_json`] where one exists).
pub fn to_json(value: &Value) -> Json {
    match value {
        Value::Nil => Json::Null,
        Value::Bool(b) => Json::Bool(*b),
        Value::Int(i) => i
            .as_i64()
            .map(Json::from)
            .or_else(|| i.as_u64().map(Json::from))
            .unwrap_or(Json::Null),
        Value::Float(f) => {
            serde_json::Number::from_f64(*f).map_or_else(|| Json::String(f.to_string()), Json::Number)
        }
        Value::Str(s) => Json::String(s.clone()),
        Value::Bin(b) => json!({ "bytes": hex(b) }),
        Value::List(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Tuple(items) => json!({ "tuple": items.iter().map(to_json).collect::<Vec<_>>() }),
        Value::Map(entries) => Json::Object(
            entries
                .iter()
                .map(|(k, v)| (key_string(k), to_json(v)))
                .collect::<Map<_, _>>(),
        ),
        other => json!({ "msgpack": hex(&apiary_wire::msgpack::encode(other)) }),
    }
}

/// A msgpack value as a JSON object key: strings as they are, anything else as its JSON text.
pub fn key_string(key: &Value) -> String {
    match key {
        Value::Str(s) => s.clone(),
        other => to_json(other).to_string(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Result<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{{\"bytes\": …}} needs an even number of hex digits, got {text:?}");
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).context("hex digit"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_every_kind() {
        for text in [
            r#"null"#,
            r#"true"#,
            r#"-5"#,
            r#"18446744073709551615"#,
            r#"2.5"#,
            r#""ffn.0.5""#,
            r#"[1, "a", [2.5, null]]"#,
            r#"{"tuple": ["ffn.0.5", "QmPeer"]}"#,
            r#"{"bytes": "00ff10"}"#,
            r#"{"a": 1, "b": {"tuple": []}}"#,
        ] {
            let value = parse(text).unwrap();
            let back = to_json(&value);
            assert_eq!(back, serde_json::from_str::<Json>(text).unwrap(), "{text}");
        }
    }

    #[test]
    fn tuples_and_lists_stay_distinct_on_the_wire() {
        let tuple = apiary_wire::msgpack::encode(&parse(r#"{"tuple": ["ffn.0.5", "QmPeer"]}"#).unwrap());
        let list = apiary_wire::msgpack::encode(&parse(r#"["ffn.0.5", "QmPeer"]"#).unwrap());
        assert_eq!(tuple[0], 0xd8, "ext 0x40 tuple");
        assert_eq!(list[0], 0x92, "fixarray");
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(parse("{not json").is_err());
        assert!(parse(r#"{"bytes": "abc"}"#).is_err());
    }
}
