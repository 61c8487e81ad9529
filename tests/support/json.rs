//! JSON as the bot peer writes it (its replies, its record of what it
//! received): serde_json's `Value`, under the names the tests use.

/// A parsed JSON value.
pub type Json = serde_json::Value;

/// Parses one JSON document.
pub fn parse_json(text: &str) -> Result<Json, String> {
    serde_json::from_str(text).map_err(|e| e.to_string())
}
