//! Parsing durations given on the command line ("100us", "1ms", "2s").

use std::time::Duration;

use crate::size::split_number;

/// Parses a duration: a whole number followed by a unit, `ns`, `us` (or `µs`), `ms` or `s`.
/// A unit is required, so that "100" is never read in the wrong one.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = split_number(text);
    let number: u64 = number.parse().map_err(|_| {
        format!("{text:?} is not a duration: expected a number and a unit, such as 100us or 1ms")
    })?;
    let nanos_per_unit: u64 = match unit.trim() {
        "ns" => 1,
        "us" | "µs" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "" => return Err(format!("{text:?} has no unit: use ns, us, ms or s")),
        other => {
            return Err(format!(
                "{text:?} has an unknown unit {other:?}: use ns, us, ms or s"
            ))
        }
    };
    number
        .checked_mul(nanos_per_unit)
        .map(Duration::from_nanos)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_duration("100us"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("100µs"), Ok(Duration::from_micros(100)));
        assert_eq!(parse_duration("1ms"), Ok(Duration::from_millis(1)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("0ns"), Ok(Duration::ZERO));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_duration("").is_err());
        assert!(parse_duration("ms").is_err());
        assert!(parse_duration("100").unwrap_err().contains("no unit"));
        assert!(parse_duration("5h").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("99999999999999999999s").is_err());
    }
}
