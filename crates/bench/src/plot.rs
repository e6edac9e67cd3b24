//! `plot`: the PNGs of docs/benchmarks.md, drawn from the JSON files the benchmarks write, so a
//! figure in the docs is always a rerun away from its data.
//!
//! - `sync-latency.png`: the distribution (CDF) of the up and down latency samples of one or
//!   more `bench sync --json` files.
//! - `fleet-curve.png`: the fleet curve from fleet reports (one JSON per simulator run, fields
//!   `devices`, `rate_per_device`, `up_lag_ms{p50,p99}`, `cloud{rss_peak_mib}`): devices against
//!   the up p99 (and p50) lag, and against the cloud's peak RSS, one line per rate per device.
//!
//! Text is drawn by plotters' `ab_glyph` backend from a font compiled into the program
//! (`assets/DejaVuSans-subset.ttf`, its license beside it): no system font, fontconfig or
//! freetype is needed, so the plots come out the same on a fresh machine.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context};
use plotters::coord::Shift;
use plotters::prelude::*;
use serde_json::Value;

/// DejaVu Sans cut to Latin-1 and a few symbols (17 KiB).
const FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
/// The family every text of the plots asks for (plotters' default).
const FAMILY: &str = "sans-serif";

const WIDTH: u32 = 960;
const HEIGHT: u32 = 600;

/// The file names written into `--out-dir`.
pub const SYNC_PNG: &str = "sync-latency.png";
pub const FLEET_PNG: &str = "fleet-curve.png";

#[derive(clap::Args, Debug)]
pub struct PlotArgs {
    /// `bench sync --json` files: their latency distributions go into sync-latency.png.
    #[arg(long, num_args = 1..)]
    sync: Vec<PathBuf>,
    /// Fleet reports (JSON, one per simulator run): the fleet curve goes into fleet-curve.png.
    #[arg(long, num_args = 1..)]
    fleet: Vec<PathBuf>,
    /// Where the PNGs go.
    #[arg(long, default_value = "docs/img")]
    out_dir: PathBuf,
}

pub fn run(args: &PlotArgs) -> anyhow::Result<()> {
    if args.sync.is_empty() && args.fleet.is_empty() {
        bail!("nothing to plot: give --sync FILE... and/or --fleet FILE...");
    }
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    register_font()?;
    println!("| plot | from | file |\n|---|---|---|");
    if !args.sync.is_empty() {
        let series = args
            .sync
            .iter()
            .map(|p| read_sync_report(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let out = args.out_dir.join(SYNC_PNG);
        draw_latency_cdf(&out, &series)?;
        println!(
            "| latency CDF | {} sync report(s) | {} |",
            series.len(),
            out.display()
        );
    }
    if !args.fleet.is_empty() {
        let points = args
            .fleet
            .iter()
            .map(|p| read_fleet_report(p))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let out = args.out_dir.join(FLEET_PNG);
        draw_fleet_curve(&out, &points)?;
        println!(
            "| fleet curve | {} fleet report(s) | {} |",
            points.len(),
            out.display()
        );
    }
    Ok(())
}

fn register_font() -> anyhow::Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if !ok {
        bail!("the compiled-in font cannot be read");
    }
    Ok(())
}

fn read_json(path: &Path) -> anyhow::Result<Value> {
    let text = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))
}

/// One sync report's latency samples, in ms, sorted.
struct SyncSeries {
    label: String,
    up_ms: Vec<f64>,
    down_ms: Vec<f64>,
}

fn samples(v: &Value, field: &str, path: &Path) -> anyhow::Result<Vec<f64>> {
    let list = v[field].as_array().with_context(|| {
        format!(
            "{}: no `{field}` array (a `bench sync --json` file?)",
            path.display()
        )
    })?;
    let mut out: Vec<f64> = list.iter().filter_map(Value::as_f64).collect();
    if out.len() != list.len() {
        bail!("{}: `{field}` holds non-numbers", path.display());
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

fn read_sync_report(path: &Path) -> anyhow::Result<SyncSeries> {
    let v = read_json(path)?;
    Ok(SyncSeries {
        label: path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        up_ms: samples(&v, "up_ms", path)?,
        down_ms: samples(&v, "down_ms", path)?,
    })
}

/// What the fleet curve takes from one fleet report.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetPoint {
    /// Connected devices of the run.
    pub devices: f64,
    /// Pushes per second each device made (the curve's series).
    pub rate_per_device: f64,
    /// Up lag (device write to visible in the cloud), ms.
    pub up_lag_p50_ms: f64,
    pub up_lag_p99_ms: f64,
    /// The cloud process's peak RSS, MiB.
    pub cloud_rss_peak_mib: f64,
}

/// Reads one fleet report (the simulator's JSON: `devices`, `rate_per_device`,
/// `up_lag_ms{p50,p99}`, `cloud{rss_peak_mib}`; other fields are ignored).
pub fn read_fleet_report(path: &Path) -> anyhow::Result<FleetPoint> {
    let v = read_json(path)?;
    let field = |pointer: &str| {
        v.pointer(pointer)
            .and_then(Value::as_f64)
            .ok_or_else(|| anyhow!("{}: no number at {pointer}", path.display()))
    };
    Ok(FleetPoint {
        devices: field("/devices")?,
        rate_per_device: field("/rate_per_device")?,
        up_lag_p50_ms: field("/up_lag_ms/p50")?,
        up_lag_p99_ms: field("/up_lag_ms/p99")?,
        cloud_rss_peak_mib: field("/cloud/rss_peak_mib")?,
    })
}

fn drawing_error<E: std::fmt::Display>(e: E) -> anyhow::Error {
    anyhow!("drawing failed: {e}")
}

const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn draw_latency_cdf(out: &Path, series: &[SyncSeries]) -> anyhow::Result<()> {
    let all = series
        .iter()
        .flat_map(|s| s.up_ms.iter().chain(&s.down_ms))
        .copied();
    let (lo, hi) = all.fold((f64::INFINITY, 0f64), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() {
        bail!("the sync reports hold no latency samples");
    }
    let lo = (lo * 0.8).max(0.01);
    let hi = (hi * 1.25).max(lo * 2.0);
    let root = BitMapBackend::new(out, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing_error)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Replication latency, one device on loopback (CDF)",
            (FAMILY, 24),
        )
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(60)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(log_ticks(lo, hi)),
            0f64..1f64,
        )
        .map_err(drawing_error)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms, log scale)")
        .y_desc("fraction of samples at or below")
        .x_label_formatter(&|v| crate::report::short(*v))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style((FAMILY, 14))
        .axis_desc_style((FAMILY, 16))
        .draw()
        .map_err(drawing_error)?;
    let mut color = COLORS.iter().cycle();
    for s in series {
        for (direction, v) in [("device → cloud", &s.up_ms), ("cloud → device", &s.down_ms)] {
            let c = *color.next().unwrap_or(&BLACK);
            let n = v.len() as f64;
            let points = v
                .iter()
                .enumerate()
                .map(|(i, &x)| (x.max(lo), (i + 1) as f64 / n));
            let label = if series.len() > 1 {
                format!("{direction} ({}, {} samples)", s.label, v.len())
            } else {
                format!("{direction} ({} samples)", v.len())
            };
            chart
                .draw_series(LineSeries::new(points, c.stroke_width(2)))
                .map_err(drawing_error)?
                .label(label)
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2))
                });
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .label_font((FAMILY, 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(drawing_error)?;
    root.present().map_err(drawing_error)?;
    Ok(())
}

/// One figure of a fleet point that a panel draws as a line.
type FleetFigure = fn(&FleetPoint) -> f64;

/// Ticks of a log axis: 1, 2 and 5 times each power of ten within `lo..=hi`, and 1.5, 3 and 7
/// too when the range spans less than a decade and a half.
fn log_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let steps: &[f64] = if hi / lo < 30.0 {
        &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0]
    } else {
        &[1.0, 2.0, 5.0]
    };
    let mut ticks = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for &m in steps {
            let t = decade * m;
            if (lo..=hi).contains(&t) {
                ticks.push(t);
            }
        }
        decade *= 10.0;
    }
    ticks
}

/// The points of each rate per device, ordered by devices.
fn by_rate(points: &[FleetPoint]) -> BTreeMap<String, Vec<FleetPoint>> {
    let mut groups: BTreeMap<String, Vec<FleetPoint>> = BTreeMap::new();
    for p in points {
        groups
            .entry(format!("{}", p.rate_per_device))
            .or_default()
            .push(p.clone());
    }
    for g in groups.values_mut() {
        g.sort_by(|a, b| a.devices.total_cmp(&b.devices));
    }
    groups
}

fn draw_fleet_panel(
    area: &DrawingArea<BitMapBackend<'_>, Shift>,
    caption: &str,
    y_desc: &str,
    groups: &BTreeMap<String, Vec<FleetPoint>>,
    lines: &[(&str, FleetFigure)],
) -> anyhow::Result<()> {
    let all = groups.values().flatten();
    let x_max = all.clone().map(|p| p.devices).fold(0f64, f64::max).max(1.0) * 1.05;
    let y_max = all
        .flat_map(|p| lines.iter().map(move |(_, f)| f(p)))
        .filter(|v| v.is_finite())
        .fold(0f64, f64::max)
        .max(1e-3)
        * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FAMILY, 20))
        .margin(12)
        .x_label_area_size(44)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..x_max, 0f64..y_max)
        .map_err(drawing_error)?;
    chart
        .configure_mesh()
        .x_desc("connected devices")
        .y_desc(y_desc)
        .x_label_formatter(&|v| crate::report::thousands(*v))
        .y_label_formatter(&|v| crate::report::short(*v))
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 15))
        .draw()
        .map_err(drawing_error)?;
    let mut color = COLORS.iter().cycle();
    for (rate, points) in groups {
        for (k, (what, f)) in lines.iter().enumerate() {
            let c = *color.next().unwrap_or(&BLACK);
            let style = c.stroke_width(if k == 0 { 2 } else { 1 });
            let data: Vec<(f64, f64)> = points.iter().map(|p| (p.devices, f(p))).collect();
            chart
                .draw_series(LineSeries::new(data.clone(), style))
                .map_err(drawing_error)?
                .label(format!("{what}, {rate} pushes/s per device"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], style));
            chart
                .draw_series(data.into_iter().map(|p| Circle::new(p, 4, c.filled())))
                .map_err(drawing_error)?;
        }
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FAMILY, 13))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(drawing_error)?;
    Ok(())
}

fn draw_fleet_curve(out: &Path, points: &[FleetPoint]) -> anyhow::Result<()> {
    let groups = by_rate(points);
    let root = BitMapBackend::new(out, (WIDTH, HEIGHT * 2 - HEIGHT / 3)).into_drawing_area();
    root.fill(&WHITE).map_err(drawing_error)?;
    let (top, bottom) = root.split_vertically(root.dim_in_pixel().1 / 2);
    draw_fleet_panel(
        &top,
        "Fleet: device → cloud lag against connected devices",
        "up lag (ms)",
        &groups,
        &[("p99", |p| p.up_lag_p99_ms), ("p50", |p| p.up_lag_p50_ms)],
    )?;
    draw_fleet_panel(
        &bottom,
        "Fleet: cloud memory against connected devices",
        "cloud peak RSS (MiB)",
        &groups,
        &[("peak RSS", |p| p.cloud_rss_peak_mib)],
    )?;
    root.present().map_err(drawing_error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(dir: &Path, name: &str, v: Value) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, serde_json::to_vec(&v).expect("json")).expect("write");
        p
    }

    #[test]
    fn a_fleet_report_is_read_by_its_field_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = fixture(
            dir.path(),
            "fleet.json",
            serde_json::json!({
                "devices": 2000, "rate_per_device": 0.5, "up_per_s": 1000.0,
                "up_lag_ms": {"p50": 1.5, "p90": 4.0, "p99": 30.0, "max": 80.0},
                "down_lag_ms": {"p50": 2.0, "p90": 5.0, "p99": 9.0, "max": 20.0},
                "cloud": {"cpu_pct_avg": 46.0, "rss_peak_mib": 120.5, "rss_per_device_kib": 20.5},
                "errors": {"connect": 0},
            }),
        );
        assert_eq!(
            read_fleet_report(&p).expect("read"),
            FleetPoint {
                devices: 2000.0,
                rate_per_device: 0.5,
                up_lag_p50_ms: 1.5,
                up_lag_p99_ms: 30.0,
                cloud_rss_peak_mib: 120.5,
            }
        );
        let missing = fixture(
            dir.path(),
            "bad.json",
            serde_json::json!({"devices": 10, "rate_per_device": 1, "up_lag_ms": {"p50": 1}}),
        );
        let err = read_fleet_report(&missing).expect_err("no p99").to_string();
        assert!(err.contains("/up_lag_ms/p99"), "{err}");
    }

    #[test]
    fn log_ticks_are_one_two_five_per_decade_inside_the_range() {
        assert_eq!(log_ticks(0.8, 60.0), [1.0, 2.0, 5.0, 10.0, 20.0, 50.0]);
        assert_eq!(log_ticks(1.2, 4.0), [1.5, 2.0, 3.0]);
        assert_eq!(log_ticks(3.1, 3.2), Vec::<f64>::new());
    }

    #[test]
    fn fleet_points_group_by_rate_in_device_order() {
        let p = |devices: f64, rate: f64| FleetPoint {
            devices,
            rate_per_device: rate,
            up_lag_p50_ms: 1.0,
            up_lag_p99_ms: 2.0,
            cloud_rss_peak_mib: 3.0,
        };
        let groups = by_rate(&[p(100.0, 1.0), p(10.0, 1.0), p(50.0, 0.1)]);
        assert_eq!(groups.len(), 2);
        let ones: Vec<f64> = groups["1"].iter().map(|p| p.devices).collect();
        assert_eq!(ones, [10.0, 100.0]);
    }
}
