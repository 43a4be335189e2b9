//! Parsing helpers of the node configuration: value checks run while deserializing (so that
//! toml knows the value's position), and the mapping of toml's errors and of cross-field
//! checks to `file:line:col: field: problem`.

use std::path::Path;

use serde::{Deserialize, Deserializer};

use crate::bundle::{DtypeChoice, Precision};
use crate::error::{one_line, ConfigError, Error};

fn custom<E: serde::de::Error>(msg: impl std::fmt::Display) -> E {
    E::custom(msg)
}

pub(super) fn precision<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Precision>, D::Error> {
    String::deserialize(d)?.parse().map(Some).map_err(custom)
}

pub(super) fn dtype<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DtypeChoice>, D::Error> {
    String::deserialize(d)?.parse().map(Some).map_err(custom)
}

/// Numbers that must be greater than zero.
fn positive<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default + PartialEq,
{
    let v = T::deserialize(d)?;
    if v == T::default() {
        return Err(custom("must be greater than 0"));
    }
    Ok(v)
}

pub(super) fn positive_u64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    positive(d)
}
pub(super) fn positive_u32<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    positive(d)
}
pub(super) fn positive_usize<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    positive(d)
}
pub(super) fn positive_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if !(v.is_finite() && v > 0.0) {
        return Err(custom("must be a number greater than 0"));
    }
    Ok(v)
}
pub(super) fn unit_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    let v = f64::deserialize(d)?;
    if !(0.0..=1.0).contains(&v) {
        return Err(custom("must be between 0 and 1"));
    }
    Ok(v)
}
pub(super) fn qos<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
    let v = u8::deserialize(d)?;
    if v > 2 {
        return Err(custom("must be 0, 1 or 2"));
    }
    Ok(v)
}
pub(super) fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
    let v = u16::deserialize(d)?;
    if v == 0 {
        return Err(custom("must be 1..65535"));
    }
    Ok(v)
}
pub(super) fn keep_alive<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    let v = u64::deserialize(d)?;
    if !(5..=3600).contains(&v) {
        return Err(custom("must be 5..3600 seconds"));
    }
    Ok(v)
}
pub(super) fn non_empty<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = String::deserialize(d)?;
    if v.trim().is_empty() {
        return Err(custom("must not be empty"));
    }
    Ok(v)
}
pub(super) fn non_empty_opt<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    non_empty(d).map(Some)
}
/// A topic level: no wildcards, no slashes at the ends.
pub(super) fn topic_part<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let v = String::deserialize(d)?;
    if v.is_empty() || v.contains(['+', '#', '\0']) || v.starts_with('/') || v.ends_with('/') {
        return Err(custom(format!("`{v}`: must be non-empty, without + # or a leading/trailing /")));
    }
    Ok(v)
}

/// An error about the whole file (it cannot be read): `file: problem`.
pub(super) fn unpositioned(path: &Path, msg: String) -> Error {
    Error::Config(ConfigError { file: path.display().to_string(), line: None, col: None, field: None, msg: one_line(&msg) })
}

/// toml's error with the position of the value and the dotted field it belongs to.
pub(super) fn toml_error(text: &str, name: &str, e: &toml::de::Error) -> ConfigError {
    let msg = one_line(e.message());
    let mut err = ConfigError { file: name.to_string(), line: None, col: None, field: None, msg };
    if let Some(span) = e.span() {
        let (line, col) = line_col(text, span.start);
        err.line = Some(line);
        err.col = Some(col);
        // toml names unknown fields itself (`unknown field `colour``): do not repeat them.
        err.field = field_at(text, span.start).filter(|f| !err.msg.contains(&format!("`{f}`")));
    }
    err
}

/// A cross-field check's error, placed on the line of `field` (or of its table) when present.
pub(super) fn field_error(text: &str, name: &str, field: &str, msg: String) -> ConfigError {
    ConfigError { file: name.to_string(), line: find_field(text, field), col: None, field: Some(field.to_string()), msg }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset.min(text.len())).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    (line, col)
}

/// The dotted key of the `key = value` line holding `offset`, with its table's name.
fn field_at(text: &str, offset: usize) -> Option<String> {
    let offset = offset.min(text.len());
    let start = text.get(..offset)?.rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line = text.get(start..)?.lines().next().unwrap_or("");
    let key = line.split('=').next()?.trim();
    let key = if line.contains('=') && !key.is_empty() && !key.starts_with('[') { Some(key) } else { None };
    let table = text.get(..start)?.lines().rev().find_map(|l| {
        let l = l.trim();
        (l.starts_with('[') && l.ends_with(']')).then(|| l.trim_matches(['[', ']']).trim().to_string())
    });
    match (table, key) {
        (Some(t), Some(k)) => Some(format!("{t}.{k}")),
        (None, Some(k)) => Some(k.to_string()),
        (Some(t), None) if line.trim().starts_with('[') => Some(t),
        _ => None,
    }
}

/// The line of `table.key` (or of its table when the key is absent).
fn find_field(text: &str, field: &str) -> Option<usize> {
    let (table, key) = field.rsplit_once('.').unwrap_or(("", field));
    let mut current = String::new();
    let mut table_line = None;
    for (i, l) in text.lines().enumerate() {
        let l = l.trim();
        if l.starts_with('[') && l.ends_with(']') {
            current = l.trim_matches(['[', ']']).trim().to_string();
            if current == table {
                table_line = Some(i + 1);
            }
            continue;
        }
        if current == table && l.split('=').next().map(str::trim) == Some(key) && l.contains('=') {
            return Some(i + 1);
        }
    }
    table_line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_and_fields() {
        let text = "[model]\ndir = \"m\"\n\n[mqtt]\nqos = 7\n";
        assert_eq!(line_col(text, text.find("7").unwrap()), (5, 7));
        assert_eq!(field_at(text, text.find("7").unwrap()).as_deref(), Some("mqtt.qos"));
        assert_eq!(find_field(text, "mqtt.qos"), Some(5));
        assert_eq!(find_field(text, "mqtt.port"), Some(4), "absent key: its table's line");
        assert_eq!(find_field(text, "spool.dir"), None);
    }
}
