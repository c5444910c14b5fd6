//! Date and time fields from the system clock (UTC): DE7, DE12, DE13.

use std::time::{SystemTime, UNIX_EPOCH};

/// DE7 `MMDDhhmmss`, DE12 `hhmmss` and DE13 `MMDD` for a Unix time in seconds (UTC).
///
/// Days to civil date by H. Hinnant's algorithm, hand-written to keep a date crate out of the
/// codec for three fixed formats.
#[must_use]
pub fn fields_at(unix_secs: u64) -> (String, String, String) {
    let days = i64::try_from(unix_secs / 86_400).unwrap_or(0);
    let rem = unix_secs % 86_400;
    let (h, m, s) = (rem / 3600, rem / 60 % 60, rem % 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (
        format!("{month:02}{day:02}{h:02}{m:02}{s:02}"),
        format!("{h:02}{m:02}{s:02}"),
        format!("{month:02}{day:02}"),
    )
}

/// DE7, DE12 and DE13 for now.
#[must_use]
pub fn now_fields() -> (String, String, String) {
    fields_at(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_dates() {
        // 2026-11-21 09:30:15 UTC
        assert_eq!(
            fields_at(1_795_253_415),
            ("1121093015".into(), "093015".into(), "1121".into())
        );
        // 2024-02-29 23:59:59 UTC (leap day)
        assert_eq!(fields_at(1_709_251_199).0, "0229235959");
        assert_eq!(fields_at(0).0, "0101000000");
    }
}
