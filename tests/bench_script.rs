//! `scripts/bench --self-test`, which runs no load: every target in the
//! script's table names a load some part of the runner has, and a report of
//! every load shows every target. A renamed or dropped load fails here
//! instead of silently taking its target out of the next benchmark.

use std::path::Path;
use std::process::Command;

use crate::support::{RUN_TIMEOUT, run_bounded};

#[test]
fn every_bench_target_has_its_load() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/bench");
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .arg("--self-test")
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let (out, timed_out) = run_bounded(&mut cmd, None, RUN_TIMEOUT);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !timed_out,
        "{} --self-test hung:\n{stderr}",
        script.display()
    );
    assert!(out.status.success(), "{}:\n{stderr}", out.status);
    assert!(
        stderr.contains("self-test: ") && stderr.trim_end().ends_with(" ok"),
        "{stderr}"
    );
}
