//! One truth for the settings: the variables `--help`, the man page
//! (`docs/tourney-register.8`) and the README's configuration table list
//! are exactly the ones the program reads (`config::VARIABLES`), in the
//! same order, and no document mentions a `REGISTER_*` variable that does
//! not exist; and where a default is a plain value, all three give the
//! same one.

use std::path::Path;
use std::process::Command;

use tourney_register::config::VARIABLES;

use crate::support::*;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn help() -> String {
    let out = Command::new(bin())
        .arg("--help")
        .env_clear()
        .output()
        .expect("running --help");
    assert!(out.status.success());
    String::from_utf8(out.stdout).expect("UTF-8 help")
}

/// Every `REGISTER_…` name in `text` (whole words only: not the Apache
/// confs' `TOURNEY_REGISTER_…` Defines).
fn mentioned(text: &str) -> Vec<String> {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut found = Vec::new();
    let mut i = 0;
    while let Some(at) = text[i..].find("REGISTER_") {
        let start = i + at;
        let mut end = start + "REGISTER_".len();
        while end < bytes.len() && word(bytes[end]) {
            end += 1;
        }
        // `REGISTER_*` (all of them) is no name.
        if (start == 0 || !word(bytes[start - 1])) && end > start + "REGISTER_".len() {
            found.push(text[start..end].to_string());
        }
        i = end;
    }
    found
}

fn assert_lists(doc: &str, listed: Vec<String>, text: &str) {
    assert_eq!(listed, VARIABLES, "{doc}: the settings it lists");
    for name in mentioned(text) {
        assert!(
            VARIABLES.contains(&name.as_str()),
            "{doc} mentions {name}, which the program does not read"
        );
    }
}

#[test]
fn help_lists_every_setting() {
    let text = help();
    let (_, settings) = text
        .split_once("Settings (environment):\n")
        .expect("a settings section in --help");
    let listed = settings
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    assert_lists("--help", listed, &text);
}

#[test]
fn readme_table_lists_every_setting() {
    let text = read("README.md");
    let (_, section) = text
        .split_once("\n## Configuration\n")
        .expect("a Configuration section in the README");
    let section = section.split("\n## ").next().unwrap_or_default();
    let listed = section
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split_once('`'))
        .map(|(name, _)| name.to_string())
        .collect();
    assert_lists("README.md", listed, &text);
}

#[test]
fn man_page_lists_every_setting() {
    let text = read("docs/tourney-register.8");
    let (_, section) = text
        .split_once("\n.SH ENVIRONMENT\n")
        .expect("an ENVIRONMENT section in the man page");
    // The settings come first; the service manager's variables follow.
    let (settings, _) = section
        .split_once("Set by the service manager")
        .expect("the service manager's variables after the settings");
    let lines: Vec<&str> = settings.lines().collect();
    let listed = lines
        .windows(2)
        .filter(|w| w[0] == ".TP")
        .filter_map(|w| w[1].strip_prefix(".B "))
        .map(str::to_string)
        .collect();
    assert_lists("the man page", listed, &text);
    for var in [
        "LISTEN_FDS",
        "LISTEN_PID",
        "LISTEN_FDNAMES",
        "NOTIFY_SOCKET",
    ] {
        assert!(text.contains(var), "the man page should explain {var}");
    }
}

#[test]
fn man_page_version_is_the_package_version() {
    let text = read("docs/tourney-register.8");
    let th = text
        .lines()
        .find(|l| l.starts_with(".TH "))
        .expect(".TH line");
    assert!(
        th.contains(&format!(
            "\"tourney-register {}\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{th}"
    );
}

/// Each setting's default as `--help` (`[30]`), the README's table
/// (`` `30` ``) and the man page (`Default: .BR 30 .`) give it, where it
/// is a plain value rather than words ("built in", a path made from
/// `$TMPDIR`).
#[test]
fn defaults_agree() {
    let help = help();
    let readme = read("README.md");
    let man = read("docs/tourney-register.8");
    let man_env = man
        .split_once("\n.SH ENVIRONMENT\n")
        .map(|(_, s)| s)
        .expect("an ENVIRONMENT section in the man page");
    let mut compared = 0;
    for var in VARIABLES {
        let from_help = help
            .lines()
            .find(|l| l.split_whitespace().next() == Some(var))
            .and_then(|l| l.rsplit_once('[').map(|(_, d)| d.trim_end_matches(']')))
            .unwrap_or_else(|| panic!("--help: no default for {var}"));
        let plain = |d: &str| {
            d.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".:".contains(c))
        };
        if !plain(from_help) {
            continue;
        }
        let row = format!("| `{var}` | ");
        let from_readme = readme
            .lines()
            .find_map(|l| l.strip_prefix(row.as_str()))
            .and_then(|rest| rest.split(" | ").next())
            .map(|d| d.trim_matches('`'))
            .unwrap_or_else(|| panic!("README: no row for {var}"));
        let entry = man_env
            .split(".TP\n")
            .find(|e| e.starts_with(&format!(".B {var}\n")))
            .unwrap_or_else(|| panic!("man page: no entry for {var}"));
        let from_man = entry
            .split_once("Default:\n.BR ")
            .and_then(|(_, d)| d.split_whitespace().next())
            .unwrap_or_else(|| panic!("man page: no default for {var}:\n{entry}"));
        assert_eq!(
            (from_readme, from_man),
            (from_help, from_help),
            "{var}: the default in the README and the man page vs --help"
        );
        compared += 1;
    }
    assert!(compared >= 8, "only {compared} defaults compared");
}
