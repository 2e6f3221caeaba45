//! The regression guard: the ratios of a report (batch against serial and
//! against the floor, per sweep size and on the mix) saved as a baseline,
//! and a later report compared with it. Only ratios are compared: absolute
//! figures vary between machines, ratios measured side by side in one run
//! much less. A ratio more than [`TOLERANCE`] below its baseline fails.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{BenchReport, Machine};

/// How far below its baseline a ratio may fall: 20%.
pub const TOLERANCE: f64 = 0.2;

/// What `docs/bench-baseline.json` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Baseline {
    /// The command that produced it.
    pub command: String,
    pub machine: serde_json::Value,
    pub ratios: BTreeMap<String, f64>,
}

impl Baseline {
    pub fn of(report: &BenchReport, command: String) -> Self {
        Self {
            command,
            machine: serde_json::to_value::<&Machine>(&report.machine)
                .expect("the machine serializes"),
            ratios: ratios(report),
        }
    }

    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading the baseline {}: {e}", path.display()))?;
        serde_json::from_str(&text)
            .map_err(|e| format!("the baseline {} is not a baseline: {e}", path.display()))
    }

    pub fn save(&self, path: &Path) -> Result<(), String> {
        let text = serde_json::to_string_pretty(self).expect("a baseline serializes") + "\n";
        std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))
    }
}

/// Every ratio of the report, by a dotted name.
pub fn ratios(report: &BenchReport) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    let mut put = |name: String, value: Option<f64>| {
        if let Some(v) = value.filter(|v| v.is_finite()) {
            out.insert(name, v);
        }
    };
    let size = report.group_size;
    put(format!("{size}.batch_vs_serial"), report.batch_vs_serial);
    put(format!("{size}.batch_vs_stream"), report.batch_vs_stream);
    put(format!("{size}.batch_vs_floor"), report.batch_vs_floor);
    for p in report.sweep.iter().flatten() {
        let g = p.group_size;
        put(format!("sweep.{g}.batch_vs_floor"), Some(p.batch_vs_floor));
        put(
            format!("sweep.{g}.batch_vs_serial"),
            Some(p.batch_vs_serial),
        );
    }
    if let Some(m) = &report.mix {
        put("mix.batch_vs_serial".into(), Some(m.batch_vs_serial));
        put("mix.batch_vs_floor".into(), Some(m.batch_vs_floor));
    }
    if let Some(t) = &report.tls {
        put("tls.mtls_vs_plain".into(), Some(t.mtls_vs_plain));
    }
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Holds,
    /// More than [`TOLERANCE`] below the baseline.
    Regressed,
    /// In the baseline, not in this report (its phase did not run).
    NotMeasured,
}

#[derive(Debug, Clone)]
pub struct Row {
    pub name: String,
    pub baseline: f64,
    pub now: Option<f64>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone)]
pub struct Comparison {
    pub rows: Vec<Row>,
}

impl Comparison {
    pub fn regressed(&self) -> Vec<&Row> {
        self.rows
            .iter()
            .filter(|r| r.verdict == Verdict::Regressed)
            .collect()
    }

    pub fn to_text(&self) -> String {
        let mut out = format!(
            "{:<28} {:>9} {:>9} {:>8}  verdict\n",
            "ratio", "baseline", "now", "change"
        );
        for r in &self.rows {
            let (now, change) = match r.now {
                Some(n) => (
                    format!("{n:.2}"),
                    format!("{:+.0}%", (n / r.baseline - 1.0) * 100.0),
                ),
                None => ("-".into(), "-".into()),
            };
            let verdict = match r.verdict {
                Verdict::Holds => "ok",
                Verdict::Regressed => "REGRESSED",
                Verdict::NotMeasured => "not measured",
            };
            out.push_str(&format!(
                "{:<28} {:>9.2} {:>9} {:>8}  {verdict}\n",
                r.name, r.baseline, now, change
            ));
        }
        out
    }
}

/// Each baseline ratio beside the report's.
pub fn compare(baseline: &Baseline, report: &BenchReport) -> Comparison {
    let now = ratios(report);
    let rows = baseline
        .ratios
        .iter()
        .map(|(name, &base)| {
            let value = now.get(name).copied();
            let verdict = match value {
                None => Verdict::NotMeasured,
                Some(v) if v < base * (1.0 - TOLERANCE) => Verdict::Regressed,
                Some(_) => Verdict::Holds,
            };
            Row {
                name: name.clone(),
                baseline: base,
                now: value,
                verdict,
            }
        })
        .collect();
    Comparison { rows }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn baseline(ratios: &[(&str, f64)]) -> Baseline {
        Baseline {
            command: "bench".into(),
            machine: serde_json::Value::Null,
            ratios: ratios.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    fn report(batch_vs_floor: f64) -> BenchReport {
        BenchReport {
            machine: Machine {
                cpus: 2,
                cpu_model: "test".into(),
                memory_gib: 1.0,
            },
            group_size: 1000,
            sessions: 8,
            gateways: 4,
            modes: BTreeMap::new(),
            batch_vs_serial: Some(25.0),
            batch_vs_stream: None,
            batch_vs_floor: Some(batch_vs_floor),
            latency_at_half_peak: None,
            sweep: None,
            mix: None,
            storm: None,
            priority: None,
            tls: None,
            cluster: None,
            cluster_vs_single: None,
        }
    }

    #[test]
    fn a_ratio_more_than_a_fifth_below_its_baseline_regresses() {
        let base = baseline(&[
            ("1000.batch_vs_floor", 0.5),
            ("1000.batch_vs_serial", 25.0),
            ("mix.batch_vs_serial", 5.0),
        ]);
        let held = compare(&base, &report(0.41));
        assert!(held.regressed().is_empty(), "{}", held.to_text());
        let fell = compare(&base, &report(0.39));
        let names: Vec<_> = fell.regressed().iter().map(|r| r.name.clone()).collect();
        assert_eq!(names, ["1000.batch_vs_floor"]);
        assert!(fell.to_text().contains("REGRESSED"), "{}", fell.to_text());
        let mix = fell
            .rows
            .iter()
            .find(|r| r.name == "mix.batch_vs_serial")
            .unwrap();
        assert_eq!(mix.verdict, Verdict::NotMeasured, "the mix did not run");
    }

    #[test]
    fn a_saved_baseline_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baseline.json");
        let saved = Baseline::of(&report(0.5), "bench --json".into());
        saved.save(&path).unwrap();
        let loaded = Baseline::load(&path).unwrap();
        assert_eq!(loaded.ratios, saved.ratios);
        assert_eq!(loaded.ratios["1000.batch_vs_floor"], 0.5);
        std::fs::write(&path, "{}").unwrap();
        let err = Baseline::load(&path).unwrap_err();
        assert!(err.contains("not a baseline"), "{err}");
    }
}
