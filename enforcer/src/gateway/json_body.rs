//! Request bodies as the gateway judges them: JSON that means one thing only.
//!
//! `serde_json::Value` keeps the last of repeated object keys without a word, while some
//! upstream parsers keep the first. `{"quantity": 500, "quantity": 1}` would then pass a
//! `max = 2` constraint here and place an order for 500 there. A body whose objects repeat
//! a key is therefore not judged as JSON at all: to the rules it is opaque, and a
//! constraint or spend rule that needs to read it refuses the request.
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Number, Value};

/// The body as JSON, or `None` if it is not JSON or any of its objects repeats a key.
pub fn parse_unambiguous(bytes: &[u8]) -> Option<Value> {
    serde_json::from_slice::<Unambiguous>(bytes)
        .ok()
        .map(|u| u.0)
}

struct Unambiguous(Value);

impl<'de> Deserialize<'de> for Unambiguous {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UnambiguousVisitor).map(Unambiguous)
    }
}

struct UnambiguousVisitor;

impl<'de> Visitor<'de> for UnambiguousVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JSON in which no object repeats a key")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("not a finite number"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(Unambiguous(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            if object.contains_key(&key) {
                return Err(de::Error::custom(format_args!(
                    "the key `{}` appears twice in one object",
                    key.escape_default()
                )));
            }
            let Unambiguous(value) = map.next_value()?;
            object.insert(key, value);
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn repeated_keys_at_any_depth_make_a_body_opaque() {
        for body in [
            r#"{"quantity": 500, "quantity": 1}"#,
            r#"{"order": {"qty": 1, "qty": 9}}"#,
            r#"[{"a": 1}, {"b": 2, "b": 2}]"#,
            r#"{"a\u0062": 1, "ab": 2}"#,
        ] {
            assert_eq!(parse_unambiguous(body.as_bytes()), None, "{body}");
        }
        assert_eq!(parse_unambiguous(b"not json"), None);
        assert_eq!(parse_unambiguous(b"{\"a\": 1} trailing"), None);
    }

    proptest! {
        /// Without repeated keys it reads exactly what `serde_json::Value` reads.
        #[test]
        fn agrees_with_serde_json_on_unambiguous_documents(
            doc in json_value(3)
        ) {
            let text = doc.to_string();
            let plain: Value = serde_json::from_str(&text).expect("serde_json reads its own output");
            prop_assert_eq!(parse_unambiguous(text.as_bytes()), Some(plain));
        }
    }

    fn json_value(depth: u32) -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(|n| Value::Number(n.into())),
            any::<u64>().prop_map(|n| Value::Number(n.into())),
            (-1e12f64..1e12).prop_map(|f| Number::from_f64(f).map_or(Value::Null, Value::Number)),
            ".{0,12}".prop_map(Value::String),
        ];
        leaf.prop_recursive(depth, 64, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                proptest::collection::btree_map(".{0,8}", inner, 0..6)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }
}
