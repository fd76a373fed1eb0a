//! Reading JSON for a few fields without keeping the rest: object keys borrowed from the input
//! where they can be (an escaped key is unescaped into its own string), values skipped but
//! checked as a `serde_json::Value` would check them, and the visitor methods that take any
//! other value as "absent".
use std::{borrow::Cow, ops::Deref};

use serde::{de::Visitor, Deserialize, Deserializer};

/// An object key, matched as a `&str`.
pub struct Key<'de>(Cow<'de, str>);

impl Deref for Key<'_> {
    type Target = str;

    fn deref(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object key")
            }

            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }

            fn visit_str<E>(self, v: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

/// Visitor methods for null, booleans, strings and arrays, each consuming the value and
/// giving `$absent`; an array's elements are skipped as `$skip` ([`Skip`] unless named).
macro_rules! absent_unless_map {
    ($absent:expr) => {
        $crate::jsonkey::absent_unless_map!($absent, $crate::jsonkey::Skip);
    };
    ($absent:expr, $skip:ty) => {
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok($absent)
        }

        fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
            Ok($absent)
        }

        fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
            Ok($absent)
        }

        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            while seq.next_element::<$skip>()?.is_some() {}
            Ok($absent)
        }
    };
}

/// The same for numbers.
macro_rules! absent_numbers {
    ($absent:expr) => {
        fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
            Ok($absent)
        }

        fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
            Ok($absent)
        }

        fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
            Ok($absent)
        }
    };
}

pub(crate) use absent_numbers;
pub(crate) use absent_unless_map;

/// Any JSON value, parsed as a `serde_json::Value` would be (strings checked for UTF-8 and
/// lone surrogates, numbers in range, nesting within serde_json's limit) and kept nowhere.
/// Unlike `IgnoredAny`, which serde_json skips without those checks, so an input it accepts
/// would be refused by a `Value`.
pub struct Skip;

impl<'de> Deserialize<'de> for Skip {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Skip;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Skip, A::Error> {
                while map.next_entry::<Key<'de>, Skip>()?.is_some() {}
                Ok(Skip)
            }

            absent_unless_map!(Skip);
            absent_numbers!(Skip);
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_borrow_unless_escaped() {
        let json = br#"{"plain":1,"esc\u0061ped":2}"#;
        let mut de = serde_json::Deserializer::from_slice(json);
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = Vec<(String, bool)>;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some(k) = map.next_key::<Key<'de>>()? {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    out.push((k.to_string(), matches!(k.0, Cow::Borrowed(_))));
                }
                Ok(out)
            }
        }
        let keys = de.deserialize_map(Keys).expect("keys");
        assert_eq!(
            keys,
            [("plain".to_owned(), true), ("escaped".to_owned(), false)]
        );
    }
}
