//! How values may be written: durations as seconds or humantime strings,
//! lists as YAML lists or one comma-separated string (handy in the
//! environment).

use serde::{Deserialize, Deserializer};

/// Accepts a YAML list or one comma-separated string (handy in env vars).
pub(super) fn string_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => s
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
        OneOrMany::Many(v) => v,
    })
}

/// Durations as integer seconds (the upstream form) or humantime strings
/// (`500ms`, `5s`, `5m`); written back as humantime strings.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(s) => Ok(Duration::from_secs(s)),
            Raw::Text(t) => {
                if let Ok(secs) = t.trim().parse::<u64>() {
                    return Ok(Duration::from_secs(secs));
                }
                humantime::parse_duration(t.trim()).map_err(|e| {
                    serde::de::Error::custom(format!(
                        "`{t}` is not a duration (use seconds or e.g. `500ms`, `5s`, `2m`): {e}"
                    ))
                })
            }
        }
    }
}
