//! Parsing memory sizes given on the command line ("64M", "1GiB", "4096").

/// Parses a size in bytes: a number with an optional K/M/G/T suffix (binary units; "KiB",
/// "MB" and the like are accepted too).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let (number, suffix) = split_number(text);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a size: expected a number such as 64M or 1G"))?;
    let shift = match suffix.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => {
            return Err(format!(
                "{text:?} has an unknown unit {suffix:?}: use K, M, G or T"
            ))
        }
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// `text` cut where its leading digits end: the number and what follows it (a unit).
pub(crate) fn split_number(text: &str) -> (&str, &str) {
    let digits_end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    text.split_at(digits_end)
}

/// Formats a byte count the way [`parse_size`] reads it.
pub fn format_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{}{unit}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("512KB"), Ok(512 << 10));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_size("").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("12Q").unwrap_err().contains("unknown unit"));
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .contains("too large"));
    }

    #[test]
    fn formats_round_trip() {
        for size in [4096, 64 << 20, 1 << 30, 12345] {
            assert_eq!(parse_size(&format_size(size)), Ok(size));
        }
    }
}
