//! The JSON API's answers as the dashboard reads them: a tree whose numbers keep the exact
//! digits the API wrote (money and quantities are exact decimals written as JSON numbers; a
//! float would round them).

use std::collections::BTreeMap;

use rust_decimal::Decimal;
use serde_json::value::RawValue;

/// A JSON value with numbers as their text.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    /// The number exactly as written.
    Number(String),
    String(String),
    Array(Vec<Json>),
    Object(BTreeMap<String, Json>),
}

/// The null every missing member reads as.
static NULL: Json = Json::Null;

impl Json {
    /// Parses JSON text, keeping every number's digits.
    pub fn parse(text: &str) -> Result<Json, serde_json::Error> {
        let raw: &RawValue = serde_json::from_str(text)?;
        Json::from_raw(raw)
    }

    fn from_raw(raw: &RawValue) -> Result<Json, serde_json::Error> {
        let text = raw.get().trim();
        Ok(match text.as_bytes().first() {
            Some(b'{') => {
                let members: BTreeMap<String, &RawValue> = serde_json::from_str(text)?;
                let mut object = BTreeMap::new();
                for (name, value) in members {
                    object.insert(name, Json::from_raw(value)?);
                }
                Json::Object(object)
            }
            Some(b'[') => {
                let items: Vec<&RawValue> = serde_json::from_str(text)?;
                Json::Array(items.into_iter().map(Json::from_raw).collect::<Result<_, _>>()?)
            }
            Some(b'"') => Json::String(serde_json::from_str(text)?),
            Some(b't') => Json::Bool(true),
            Some(b'f') => Json::Bool(false),
            Some(b'n') => Json::Null,
            _ => Json::Number(text.to_owned()),
        })
    }

    /// The member `name` of an object (null when absent or not an object).
    pub fn get(&self, name: &str) -> &Json {
        match self {
            Json::Object(members) => members.get(name).unwrap_or(&NULL),
            _ => &NULL,
        }
    }

    /// The items of an array (none when not an array).
    pub fn items(&self) -> &[Json] {
        match self {
            Json::Array(items) => items,
            _ => &[],
        }
    }

    /// The members of an object, in name order.
    pub fn members(&self) -> impl Iterator<Item = (&String, &Json)> {
        let members = match self {
            Json::Object(members) => Some(members),
            _ => None,
        };
        members.into_iter().flatten()
    }

    pub fn is_null(&self) -> bool {
        matches!(self, Json::Null)
    }

    /// A string's text, or a number's or boolean's JSON text; empty for null, arrays, objects.
    pub fn text(&self) -> &str {
        match self {
            Json::String(text) | Json::Number(text) => text,
            Json::Bool(true) => "true",
            Json::Bool(false) => "false",
            _ => "",
        }
    }

    /// A number (or a numeric string) as an exact decimal.
    pub fn decimal(&self) -> Option<Decimal> {
        let text = match self {
            Json::Number(text) | Json::String(text) => text,
            _ => return None,
        };
        Decimal::from_str_exact(text).or_else(|_| Decimal::from_scientific(text)).ok()
    }

    /// A number as a float: for drawing only, never for a figure shown.
    pub fn float(&self) -> Option<f64> {
        match self {
            Json::Number(text) => text.parse().ok(),
            _ => None,
        }
    }

    /// A whole number.
    pub fn integer(&self) -> Option<i64> {
        match self {
            Json::Number(text) => text.parse().ok(),
            _ => None,
        }
    }

    /// The value as compact JSON text (numbers as written).
    pub fn to_json_text(&self) -> String {
        match self {
            Json::Null => "null".into(),
            Json::Bool(value) => value.to_string(),
            Json::Number(text) => text.clone(),
            Json::String(text) => serde_json::Value::String(text.clone()).to_string(),
            Json::Array(items) => {
                format!("[{}]", items.iter().map(Json::to_json_text).collect::<Vec<_>>().join(","))
            }
            Json::Object(members) => {
                let members: Vec<String> = members
                    .iter()
                    .map(|(name, value)| {
                        format!("{}:{}", serde_json::Value::String(name.clone()), value.to_json_text())
                    })
                    .collect();
                format!("{{{}}}", members.join(","))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_keep_their_digits() {
        let json = Json::parse(r#"{"cost": 12345678901234567.000001, "n": 3, "a": [null, "x", true]}"#)
            .expect("valid");
        assert_eq!(json.get("cost").text(), "12345678901234567.000001");
        assert_eq!(
            json.get("cost").decimal(),
            Some(Decimal::from_str_exact("12345678901234567.000001").expect("decimal"))
        );
        assert_eq!(json.get("n").integer(), Some(3));
        assert_eq!(json.get("a").items().len(), 3);
        assert!(json.get("missing").is_null());
        assert_eq!(json.get("a").to_json_text(), r#"[null,"x",true]"#);
    }
}
