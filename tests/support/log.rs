//! What the relay logs: one `outcome=` line per request, never a secret.

use super::secrets::fingerprint;

/// The relay's per-request (`outcome=`) lines in `log`.
pub fn outcome_lines(log: &str) -> Vec<&str> {
    log.lines().filter(|l| l.contains("outcome=")).collect()
}

/// The warnings and errors in a relay's log: none, after a run where
/// nothing should have gone wrong.
pub fn complaints(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect()
}

/// Checks a relay's log after `n` requests: exactly `n` `outcome=` lines,
/// the last an INFO line with `status=STATUS`, `ms=N` and `code=` the
/// [`fingerprint`] of `code` (without a code: `-` or some fingerprint);
/// and none of the `secrets`, nor the last 24 bytes of one, anywhere in `log`.
pub fn assert_log(log: &str, n: usize, status: u16, code: Option<&str>, secrets: &[&str]) {
    let lines = outcome_lines(log);
    assert_eq!(
        lines.len(),
        n,
        "want exactly {n} outcome= line(s); log:\n{log}"
    );
    let line = *lines.last().expect("no outcome= line");
    assert!(line.contains(" INFO "), "not an info line: {line}");
    assert!(
        line.split_whitespace()
            .any(|w| w == format!("status={status}")),
        "want status={status}: {line}"
    );
    assert!(
        line.split_whitespace().any(|w| w
            .strip_prefix("ms=")
            .is_some_and(|ms| !ms.is_empty() && ms.bytes().all(|b| b.is_ascii_digit()))),
        "no ms=N: {line}"
    );
    let logged = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("code="))
        .unwrap_or_else(|| panic!("no code= field: {line}"));
    match code {
        Some(code) => {
            assert_eq!(logged.len(), 8, "code= is not 8 hex digits: {line}");
            assert!(
                logged
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
                "code= is not 8 hex digits: {line}"
            );
            assert_eq!(logged, fingerprint(code), "fingerprint of the code: {line}");
        }
        None => assert!(
            logged == "-" || logged.len() == 8,
            "code= neither - nor a fingerprint: {line}"
        ),
    }
    for secret in secrets {
        assert!(!secret.is_empty());
        assert!(
            !log.contains(secret),
            "the log contains a secret {secret:?}:\n{log}"
        );
        // A truncated copy would be just as bad.
        let tail = &secret[secret.len().saturating_sub(24)..];
        assert!(
            !log.contains(tail),
            "the log contains part of a secret {tail:?}:\n{log}"
        );
    }
}
