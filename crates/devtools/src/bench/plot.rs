//! The sweep's per-delivery cost curve: microseconds per delivery against
//! group size (both axes logarithmic), for the upstream algorithm, the
//! batch mode, the floor behind JetStream and the bare floor, as SVG.

use std::path::Path;

use plotters::prelude::*;
use serde::Serialize;

use super::{BenchError, ModeResult};

#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    pub group_size: usize,
    pub serial: ModeResult,
    pub batch: ModeResult,
    pub floor_js: ModeResult,
    pub floor: ModeResult,
    /// Batch throughput over the floor's, and over the serial algorithm's.
    pub batch_vs_floor: f64,
    pub batch_vs_serial: f64,
}

impl SweepPoint {
    pub fn new(
        group_size: usize,
        serial: ModeResult,
        batch: ModeResult,
        floor_js: ModeResult,
        floor: ModeResult,
    ) -> Self {
        let over = |a: &ModeResult, b: &ModeResult| {
            super::round(a.deliveries_per_sec / b.deliveries_per_sec.max(1e-9), 2)
        };
        Self {
            group_size,
            batch_vs_floor: over(&batch, &floor),
            batch_vs_serial: over(&batch, &serial),
            serial,
            batch,
            floor_js,
            floor,
        }
    }

    fn series(&self) -> [f64; 4] {
        [
            self.serial.per_delivery_us,
            self.batch.per_delivery_us,
            self.floor_js.per_delivery_us,
            self.floor.per_delivery_us,
        ]
    }
}

/// The curves, in the order of [`SweepPoint::series`].
const SERIES: [(&str, RGBColor); 4] = [
    ("serial (upstream)", RGBColor(120, 120, 120)),
    ("batch (service)", BLUE),
    ("floor-js (I/O + JetStream)", RGBColor(200, 0, 200)),
    ("floor (I/O only)", RED),
];

/// Largest over smallest per-delivery cost of the batch mode over the sweep.
pub fn flatness(points: &[SweepPoint]) -> Option<f64> {
    let costs = points.iter().map(|p| p.batch.per_delivery_us);
    let max = costs.clone().fold(f64::NAN, f64::max);
    let min = costs.fold(f64::NAN, f64::min);
    (min > 0.0).then(|| max / min)
}

pub fn draw(points: &[SweepPoint], path: &Path) -> Result<(), BenchError> {
    let failed = |e: &dyn std::fmt::Display| BenchError::Write {
        path: path.to_path_buf(),
        cause: std::io::Error::other(e.to_string()),
    };
    if points.is_empty() {
        return Err(failed(&"no sweep points"));
    }
    let sizes = || points.iter().map(|p| p.group_size as f64);
    let costs = || points.iter().flat_map(SweepPoint::series);
    let x_max = sizes().fold(1.0, f64::max) * 2.0;
    let y_min = costs().fold(f64::INFINITY, f64::min).max(0.01) / 2.0;
    let y_max = costs().fold(0.0, f64::max) * 2.0;

    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Cost per delivery by group size", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d((1.0..x_max).log_scale(), (y_min..y_max).log_scale())
        .map_err(|e| failed(&e))?;
    chart
        .configure_mesh()
        .x_desc("members per session")
        .y_desc("microseconds per delivery")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.2}"))
        .draw()
        .map_err(|e| failed(&e))?;
    for (i, (label, color)) in SERIES.into_iter().enumerate() {
        let series: Vec<(f64, f64)> = points
            .iter()
            .map(|p| (p.group_size as f64, p.series()[i]))
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))
            .map_err(|e| failed(&e))?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart
            .draw_series(
                series
                    .into_iter()
                    .map(|p| Circle::new(p, 4, color.filled())),
            )
            .map_err(|e| failed(&e))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(|e| failed(&e))?;
    root.present().map_err(|e| failed(&e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::Mode;

    fn result(mode: Mode, group_size: usize, per_delivery_us: f64) -> ModeResult {
        ModeResult {
            mode,
            group_size,
            events: 1,
            deliveries: group_size as u64,
            elapsed_s: 1.0,
            events_per_sec: 1.0,
            deliveries_per_sec: 1e6 / per_delivery_us,
            per_delivery_us,
            p50_ms: 1.0,
            p99_ms: 2.0,
        }
    }

    #[test]
    fn the_curve_is_an_svg_with_labels_and_every_series() {
        let points: Vec<SweepPoint> = [(2, 8.0), (100, 1.5), (100_000, 1.2)]
            .into_iter()
            .map(|(g, c)| {
                SweepPoint::new(
                    g,
                    result(Mode::Serial, g, c * 20.0),
                    result(Mode::Batch, g, c),
                    result(Mode::FloorJs, g, c / 1.5),
                    result(Mode::Floor, g, c / 2.0),
                )
            })
            .collect();
        assert_eq!(flatness(&points), Some(8.0 / 1.2));
        assert_eq!(points[0].batch_vs_floor, 0.5);
        assert_eq!(points[0].batch_vs_serial, 20.0);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("curve.svg");
        draw(&points, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..40.min(svg.len())]);
        for text in [
            "members per session",
            "microseconds per delivery",
            "serial (upstream)",
            "batch (service)",
            "floor-js (I/O + JetStream)",
            "floor (I/O only)",
        ] {
            assert!(svg.contains(text), "missing {text}");
        }
        assert!(svg.matches("<circle").count() >= 12, "a marker per point");
    }
}
