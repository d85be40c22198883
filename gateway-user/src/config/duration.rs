//! Durations written the way people write them: `500ms`, `10s`, `5m`, `1h 30m`.

use std::{fmt, time::Duration as StdDuration};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A duration in a configuration or policy file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Duration(pub StdDuration);

impl Duration {
    pub const fn from_secs(s: u64) -> Self {
        Self(StdDuration::from_secs(s))
    }
    pub const fn from_millis(ms: u64) -> Self {
        Self(StdDuration::from_millis(ms))
    }
    pub const fn get(self) -> StdDuration {
        self.0
    }
}

impl std::str::FromStr for Duration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        humantime::parse_duration(s)
            .map(Self)
            .map_err(|e| format!("`{s}` is not a duration ({e}); write e.g. `500ms`, `10s`, `5m`"))
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_human_durations() {
        assert_eq!("500ms".parse::<Duration>(), Ok(Duration::from_millis(500)));
        assert_eq!("1h 30m".parse::<Duration>(), Ok(Duration::from_secs(5400)));
        assert!("ten seconds".parse::<Duration>().is_err());
        assert_eq!(Duration::from_secs(90).to_string(), "1m 30s");
    }
}
