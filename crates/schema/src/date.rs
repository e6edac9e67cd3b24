//! Date parsing and formatting.
//!
//! Dates arrive as ISO-8601 / RFC 3339 strings or epoch numbers and are stored either as
//! ISO-8601 UTC strings with milliseconds (`params.isoDates`) or as epoch milliseconds. This
//! module is the single place that converts between those forms, so every stored date has
//! exactly one spelling (which keeps templates, keys and comparisons stable).

use time::format_description::well_known::{Iso8601, Rfc3339};
use time::{Date, OffsetDateTime, PrimitiveDateTime};

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

/// Format epoch milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ`; None when out of range (outside
/// years 0 to 9999). Computed directly (days to civil date, H. Hinnant's algorithm): this runs
/// for every create and update, and for every date a read returns.
pub fn format_iso_ms(ms: i64) -> Option<String> {
    let bytes = format_iso_ms_bytes(ms)?;
    // Always ASCII digits and separators. The check costs ~90 instructions per date; the
    // schema crate keeps no `unsafe` for that.
    String::from_utf8(bytes.to_vec()).ok()
}

/// [`format_iso_ms`] into a fixed array (always ASCII), without allocating: for callers that
/// only compare the spelling (the database's codec checks every date-like string it stores).
pub fn format_iso_ms_bytes(ms: i64) -> Option<[u8; 24]> {
    let days = ms.div_euclid(86_400_000);
    // In 0..86_400_000, so the time of day is split with 32-bit divisions by constants.
    let rem = ms.rem_euclid(86_400_000) as u32;
    let z = days.checked_add(719_468)?;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if !(0..=9999).contains(&year) {
        return None;
    }
    let (year, month, day) = (year as u32, month as u32, day as u32);
    let mut out = *b"0000-00-00T00:00:00.000Z";
    // Two digits per step (every value here is below 100 where it is put).
    let mut two = |at: usize, v: u32| {
        out[at] = b'0' + (v / 10) as u8;
        out[at + 1] = b'0' + (v % 10) as u8;
    };
    two(0, year / 100);
    two(2, year % 100);
    two(5, month);
    two(8, day);
    two(11, rem / 3_600_000);
    two(14, rem / 60_000 % 60);
    two(17, rem / 1000 % 60);
    let milli = rem % 1000;
    two(20, milli / 10);
    out[22] = b'0' + (milli % 10) as u8;
    Some(out)
}

/// The former formatter (through the `time` crate), kept to check the direct one against.
#[cfg(test)]
fn format_iso_ms_time(ms: i64) -> Option<String> {
    let nanos = i128::from(ms).checked_mul(1_000_000)?;
    let dt = OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()?
        .to_offset(time::UtcOffset::UTC);
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

    #[test]
    fn direct_formatter_matches_the_time_crate() {
        let mut samples = vec![
            0,
            -1,
            1,
            i64::MIN,
            i64::MAX,
            -62_167_219_200_000, // 0000-01-01
            -62_167_219_200_001, // just before year 0
            253_402_300_799_999, // 9999-12-31T23:59:59.999
            253_402_300_800_000, // 10000-01-01
            951_782_400_000,     // 2000-02-29
            1_795_629_600_000,
        ];
        let mut x: i64 = 0x2545_f491_4f6c_dd1d;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push(x % 320_000_000_000_000);
        }
        for ms in samples {
            assert_eq!(format_iso_ms(ms), format_iso_ms_time(ms), "{ms}");
            // The stack form spells the same bytes.
            assert_eq!(
                format_iso_ms_bytes(ms).map(|b| b.to_vec()),
                format_iso_ms_time(ms).map(String::into_bytes),
                "{ms}"
            );
        }
    }

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
