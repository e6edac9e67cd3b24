//! Date parsing and formatting.
//!
//! Dates arrive as ISO-8601 / RFC 3339 strings or epoch numbers and are stored either as
//! ISO-8601 UTC strings with milliseconds (`params.isoDates`) or as epoch milliseconds. This
//! module is the single place that converts between those forms, so every stored date has
//! exactly one spelling (which keeps templates, keys and comparisons stable).

use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{Date, OffsetDateTime, PrimitiveDateTime, UtcOffset};

/// Parse an ISO-8601 / RFC 3339 date string into epoch milliseconds.
///
/// Accepts full RFC 3339 (`2026-11-25T18:00:00.000Z`, offsets), ISO-8601 without an offset
/// (taken as UTC) and a bare date (`2026-11-25`, midnight UTC).
pub(crate) fn parse_iso_ms(text: &str) -> Option<i64> {
    let text = text.trim();
    if text.is_empty() || text.len() > 64 {
        return None;
    }
    let dt = OffsetDateTime::parse(text, &Rfc3339)
        .or_else(|_| OffsetDateTime::parse(text, &Iso8601::DEFAULT))
        .or_else(|_| PrimitiveDateTime::parse(text, &Iso8601::DEFAULT).map(|p| p.assume_utc()))
        .or_else(|_| Date::parse(text, &Iso8601::DEFAULT).map(|d| d.midnight().assume_utc()))
        .ok()?;
    i64::try_from(dt.unix_timestamp_nanos() / 1_000_000).ok()
}

/// Format epoch milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`; None when out of range.
pub(crate) fn format_iso_ms(ms: i64) -> Option<String> {
    let nanos = i128::from(ms).checked_mul(1_000_000)?;
    let dt = OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()?
        .to_offset(UtcOffset::UTC);
    let year = dt.year();
    if !(0..=9999).contains(&year) {
        return None;
    }
    Some(format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        year,
        u8::from(dt.month()),
        dt.day(),
        dt.hour(),
        dt.minute(),
        dt.second(),
        dt.millisecond()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str, expected: Option<i64>) {
        assert_eq!(parse_iso_ms(text), expected, "{text}");
    }

    #[test]
    fn parses_rfc3339_with_millis() {
        check("2026-11-25T18:00:00.000Z", Some(1_795_629_600_000));
    }

    #[test]
    fn parses_rfc3339_without_millis_and_offsets() {
        check("2026-11-25T18:00:00Z", Some(1_795_629_600_000));
        check("2026-11-25T19:00:00+01:00", Some(1_795_629_600_000));
    }

    #[test]
    fn parses_local_and_date_only_as_utc() {
        check("2026-11-25T18:00:00", Some(1_795_629_600_000));
        check("2026-11-25", Some(1_795_564_800_000));
    }

    #[test]
    fn rejects_garbage() {
        check("", None);
        check("yesterday", None);
        check("2026-13-45", None);
    }

    #[test]
    fn formats_with_millis() {
        assert_eq!(
            format_iso_ms(1_795_629_600_123).as_deref(),
            Some("2026-11-25T18:00:00.123Z")
        );
        assert_eq!(
            format_iso_ms(0).as_deref(),
            Some("1970-01-01T00:00:00.000Z")
        );
    }

    #[test]
    fn format_out_of_range_is_none() {
        assert_eq!(format_iso_ms(i64::MAX), None);
    }

    #[test]
    fn round_trip() {
        let ms = 1_700_000_000_321;
        assert_eq!(format_iso_ms(ms).and_then(|s| parse_iso_ms(&s)), Some(ms));
    }
}
