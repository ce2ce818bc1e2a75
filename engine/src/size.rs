//! Sizes: parsing what people type, printing it back, and resolving a CSI capacity range.

use crate::error::{Error, Result};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// Parses "1GiB", "512Mi", "10G" (decimal), "4096". Rejects anything ambiguous or overflowing.
pub fn parse_size(text: &str) -> std::result::Result<u64, String> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    if digits.is_empty() {
        return Err(format!("{text:?} is not a size: expected e.g. 1GiB, 512Mi or 10G"));
    }
    let multiplier = match unit.trim() {
        "" | "B" => 1,
        "K" | "k" | "KB" | "kB" => 1000,
        "M" | "MB" => 1000u64.pow(2),
        "G" | "GB" => 1000u64.pow(3),
        "T" | "TB" => 1000u64.pow(4),
        "Ki" | "KiB" => KIB,
        "Mi" | "MiB" => MIB,
        "Gi" | "GiB" => GIB,
        "Ti" | "TiB" => TIB,
        other => {
            return Err(format!("unknown size unit {other:?}: use KiB, MiB, GiB, TiB (or Ki, Mi, Gi, Ti)"));
        }
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(multiplier))
        .filter(|&n| n <= i64::MAX as u64)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// "1.5 GiB"-style, for tables.
pub fn format_size(bytes: u64) -> String {
    let units = [(TIB, "TiB"), (GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")];
    for (unit, name) in units {
        if bytes >= unit {
            let value = bytes as f64 / unit as f64;
            return if bytes.is_multiple_of(unit) {
                format!("{} {name}", bytes / unit)
            } else {
                format!("{value:.1} {name}")
            };
        }
    }
    format!("{bytes} B")
}

pub fn round_up(bytes: u64, granularity: u64) -> u64 {
    bytes.div_ceil(granularity).saturating_mul(granularity)
}

/// The size to allocate for a CSI capacity range: at least `required` (or `default` when none is
/// given), at least `minimum` (the filesystem's), rounded up to whole MiB, never above `limit`.
pub fn resolve_capacity(required: i64, limit: i64, default: u64, minimum: u64) -> Result<u64> {
    if required < 0 || limit < 0 {
        return Err(Error::InvalidArgument(format!(
            "capacity_range must not be negative (required_bytes {required}, limit_bytes {limit})"
        )));
    }
    let (required, limit) = (required as u64, limit as u64);
    if limit > 0 && limit < required {
        return Err(Error::OutOfRange(format!(
            "capacity_range limit_bytes {limit} is below required_bytes {required}"
        )));
    }
    let wanted = match (required, limit) {
        (0, 0) => default,
        (0, limit) => default.min(limit),
        (required, _) => required,
    };
    let size = round_up(wanted.max(minimum), MIB);
    if limit > 0 && size > limit {
        return Err(Error::OutOfRange(format!(
            "cannot fit a volume under limit_bytes {limit}: the smallest plinth can make here is {size} bytes \
             (1 MiB granularity, filesystem minimum {minimum} bytes)"
        )));
    }
    if size > i64::MAX as u64 {
        return Err(Error::OutOfRange(format!("{size} bytes is larger than CSI can express")));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_human_sizes() {
        assert_eq!(parse_size("1GiB"), Ok(GIB));
        assert_eq!(parse_size("512Mi"), Ok(512 * MIB));
        assert_eq!(parse_size("2 TiB"), Ok(2 * TIB));
        assert_eq!(parse_size("10G"), Ok(10_000_000_000));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["", "GiB", "1.5GiB", "1XB", "-1", "99999999999999999999", "9000000TiB"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn formats_sizes() {
        assert_eq!(format_size(GIB), "1 GiB");
        assert_eq!(format_size(3 * GIB / 2), "1.5 GiB");
        assert_eq!(format_size(100), "100 B");
    }

    #[test]
    fn resolves_capacity_ranges() {
        assert_eq!(resolve_capacity(0, 0, GIB, MIB).unwrap(), GIB);
        assert_eq!(resolve_capacity(1, 0, GIB, MIB).unwrap(), MIB);
        assert_eq!(resolve_capacity((MIB + 1) as i64, 0, GIB, MIB).unwrap(), 2 * MIB);
        assert_eq!(resolve_capacity(0, (10 * MIB) as i64, GIB, MIB).unwrap(), 10 * MIB);
        assert_eq!(resolve_capacity((10 * MIB) as i64, 0, GIB, 300 * MIB).unwrap(), 300 * MIB);
        assert_eq!(resolve_capacity((10 * MIB) as i64, (400 * MIB) as i64, GIB, 300 * MIB).unwrap(), 300 * MIB);
    }

    #[test]
    fn rejects_impossible_ranges() {
        assert!(matches!(resolve_capacity(-1, 0, GIB, MIB), Err(Error::InvalidArgument(_))));
        assert!(matches!(resolve_capacity(10, 5, GIB, MIB), Err(Error::OutOfRange(_))));
        assert!(matches!(resolve_capacity(1, 1000, GIB, MIB), Err(Error::OutOfRange(_))));
        assert!(matches!(resolve_capacity(0, (200 * MIB) as i64, GIB, 300 * MIB), Err(Error::OutOfRange(_))));
        assert!(matches!(resolve_capacity(i64::MAX, 0, GIB, MIB), Err(Error::OutOfRange(_))));
    }
}
