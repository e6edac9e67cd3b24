//! What every benchmark's report shares: number formatting for the Markdown tables,
//! percentiles of latency samples, and the `--json` file writer.

use std::path::Path;

use anyhow::Context;
use serde_json::{json, Value};

/// An integer with thousands separators (`12,345`); `?` for a missing figure.
pub fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "?".into();
    }
    let s = format!("{:.0}", v.round());
    let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (k, c) in digits.chars().enumerate() {
        if k > 0 && (digits.len() - k) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    format!("{sign}{out}")
}

/// Three significant digits, at most two decimals.
pub fn short(v: f64) -> String {
    if !v.is_finite() {
        "?".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// `10k` for 10,000; `1,500` otherwise.
pub fn size_label(n: usize) -> String {
    if n >= 1000 && n % 1000 == 0 {
        format!("{}k", n / 1000)
    } else {
        thousands(n as f64)
    }
}

/// The `p`-quantile (0..=1) of sorted samples, nearest rank; NaN without samples.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// `{p50, p90, p99, max}` of sorted samples, the shape of every latency summary in the JSON.
pub fn quantiles(sorted: &[f64]) -> Value {
    json!({
        "p50": percentile(sorted, 0.5),
        "p90": percentile(sorted, 0.9),
        "p99": percentile(sorted, 0.99),
        "max": percentile(sorted, 1.0),
    })
}

/// Writes `value` as pretty JSON to `path` (NaN, which JSON cannot hold, becomes `null`).
pub fn write_json(path: &Path, value: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_vec_pretty(value)?;
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
    eprintln!("JSON written to {}", path.display());
    Ok(())
}

/// `a / b`, or NaN when `b` is not a positive number.
pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 && b.is_finite() {
        a / b
    } else {
        f64::NAN
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats() {
        assert_eq!(thousands(1234567.4), "1,234,567");
        assert_eq!(thousands(-1000.0), "-1,000");
        assert_eq!(thousands(f64::NAN), "?");
        assert_eq!(short(0.4213), "0.421");
        assert_eq!(short(12.34), "12.3");
        assert_eq!(size_label(100_000), "100k");
        assert_eq!(size_label(1_500), "1,500");
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert!(percentile(&[], 0.5).is_nan());
        assert_eq!(quantiles(&v)["p90"], 90.0);
    }
}
