//! axe-core, the accessibility rules engine, run inside a page that a real
//! browser shows.
//!
//! `scripts/install-deps` (its `test` set) installs one exact version from
//! npm into `target/axe-core/` (git-ignored); the version is the
//! `axe_core_version=` line there, and [`source`] refuses any other, so
//! every run applies the same rules.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::{Value, json};

use super::apache::repo;

/// WCAG 2.0 and 2.1, levels A and AA, and axe's best practices.
pub const TAGS: [&str; 5] = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa", "best-practice"];

/// Fewer rules than this in one run means axe did not really run.
pub const MIN_RULES: usize = 50;

/// Where `scripts/install-deps test` puts the package.
pub fn package_dir() -> PathBuf {
    repo().join("target/axe-core/node_modules/axe-core")
}

/// The version `scripts/install-deps` pins.
pub fn pinned_version() -> String {
    let script = repo().join("scripts/install-deps");
    let text =
        std::fs::read_to_string(&script).unwrap_or_else(|e| panic!("{}: {e}", script.display()));
    text.lines()
        .find_map(|l| l.trim().strip_prefix("axe_core_version="))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no axe_core_version= line in {}", script.display()))
}

/// The pinned version's `axe.min.js`; panics, saying how to install it,
/// when it is missing or another version.
pub fn source() -> String {
    let want = pinned_version();
    let dir = package_dir();
    let how = format!("run scripts/install-deps test (npm installs axe-core@{want} there)");
    let manifest = std::fs::read_to_string(dir.join("package.json"))
        .unwrap_or_else(|e| panic!("axe-core is not in {}: {e}; {how}", dir.display()));
    let manifest: Value = serde_json::from_str(&manifest)
        .unwrap_or_else(|e| panic!("{}/package.json: {e}; {how}", dir.display()));
    assert_eq!(
        manifest["version"].as_str(),
        Some(want.as_str()),
        "axe-core in {} is not the pinned version; {how}",
        dir.display()
    );
    let path = dir.join("axe.min.js");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}; {how}", path.display()))
}

/// A WebDriver `execute/sync` script that loads axe into the page and
/// returns its version.
pub fn inject_script(source: &str) -> String {
    format!("{source}\n;return window.axe ? window.axe.version : null;")
}

/// A WebDriver `execute/async` script that runs the [`TAGS`] rules on the
/// whole document and calls back with what [`Audit::from_value`] reads.
pub fn run_script() -> String {
    let options = json!({
        "runOnly": { "type": "tag", "values": TAGS },
        "resultTypes": ["violations", "incomplete"],
    });
    format!(
        "const done = arguments[arguments.length - 1];
         const nodes = (rule) => rule.nodes.map((n) => ({{
           target: n.target.join(' '), html: n.html, impact: n.impact, summary: n.failureSummary }}));
         const details = (rule) => ({{ id: rule.id, impact: rule.impact, help: rule.help, nodes: nodes(rule) }});
         window.axe.run(document, {options}).then(
           (r) => done({{
             version: window.axe.version,
             passes: r.passes.map((x) => x.id),
             inapplicable: r.inapplicable.map((x) => x.id),
             incomplete: r.incomplete.map(details),
             violations: r.violations.map(details),
           }}),
           (e) => done({{ error: String((e && e.stack) || e) }}));"
    )
}

/// One rule's findings on one page.
#[derive(Debug)]
pub struct Finding {
    pub id: String,
    pub impact: String,
    pub help: String,
    /// (target selector, html, axe's failure summary) of each element.
    pub nodes: Vec<(String, String, String)>,
}

/// What one axe run found.
#[derive(Debug)]
pub struct Audit {
    pub version: String,
    pub passes: Vec<String>,
    pub inapplicable: Vec<String>,
    pub incomplete: Vec<Finding>,
    pub violations: Vec<Finding>,
}

impl Audit {
    /// Reads [`run_script`]'s answer; panics on an error from axe.
    pub fn from_value(value: &Value) -> Audit {
        assert!(
            value["error"].is_null(),
            "axe.run failed: {}",
            value["error"]
        );
        let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
        let ids = |k: &str| -> Vec<String> {
            value[k]
                .as_array()
                .unwrap_or_else(|| panic!("no {k} in axe's answer: {value}"))
                .iter()
                .map(text)
                .collect()
        };
        let findings = |k: &str| -> Vec<Finding> {
            value[k]
                .as_array()
                .unwrap_or_else(|| panic!("no {k} in axe's answer: {value}"))
                .iter()
                .map(|rule| Finding {
                    id: text(&rule["id"]),
                    impact: text(&rule["impact"]),
                    help: text(&rule["help"]),
                    nodes: rule["nodes"]
                        .as_array()
                        .map(|nodes| {
                            nodes
                                .iter()
                                .map(|n| {
                                    (text(&n["target"]), text(&n["html"]), text(&n["summary"]))
                                })
                                .collect()
                        })
                        .unwrap_or_default(),
                })
                .collect()
        };
        Audit {
            version: text(&value["version"]),
            passes: ids("passes"),
            inapplicable: ids("inapplicable"),
            incomplete: findings("incomplete"),
            violations: findings("violations"),
        }
    }

    /// Every rule axe checked, whatever its result.
    pub fn rules(&self) -> BTreeSet<&str> {
        let found = self.incomplete.iter().chain(&self.violations);
        self.passes
            .iter()
            .chain(&self.inapplicable)
            .map(String::as_str)
            .chain(found.map(|f| f.id.as_str()))
            .collect()
    }

    /// The violations as a reader needs them: rule, impact, each element
    /// and axe's figures (contrast ratio, colours, …).
    pub fn violations_report(&self) -> String {
        report(&self.violations)
    }

    /// The rules axe could not decide, in the same form.
    pub fn incomplete_report(&self) -> String {
        report(&self.incomplete)
    }
}

fn report(findings: &[Finding]) -> String {
    let mut out = String::new();
    for f in findings {
        let _ = writeln!(out, "  rule {} (impact: {}): {}", f.id, f.impact, f.help);
        for (target, html, summary) in &f.nodes {
            let _ = writeln!(out, "    element {target}: {html}");
            for line in summary.lines() {
                let _ = writeln!(out, "      {line}");
            }
        }
    }
    out
}
