"""`scripts/bench --self-test`: the targets table, the report and the check
at start, exercised with made-up figures for every load and result, so a
target that can no longer find its load fails here rather than vanishing
from a real run's report; and the same with a baseline build
(--baseline-bin), whose figures must show up next to the current build's."""

import contextlib
import datetime
import io
import tempfile
from pathlib import Path
from types import SimpleNamespace

from . import targets
from .phases import MODE_LABEL, MODES, PARTS, Phase
from .report import report


def _load(phase):
    wrk = {"requests": 3000, "duration_us": 3_000_000, "status": 0, "connect": 0, "read": 0,
           "write": 0, "timeout": 0, "socket_errors": 0, "ok": 3000, "rps": 1000.0,
           "p50_us": 2000, "p90_us": 3000, "p99_us": 4000, "max_us": 9000, "cpu_ns": 10**9}
    record = {"name": phase.value, "conns": 16, "delay_ms": 0, "wrk": wrk, "served_ok": 3000,
              "cpu_us_per_req": {"relay": 90.0, "apache": 100.0, "wrk": 30.0},
              "relay_procs": 1, "other_cpu_share": 0.01, "time_wait_before": 0,
              "time_wait_after": 3000}
    if phase != Phase.STATIC:
        record["cpu_us_per_req"]["bot"] = 20.0
        record["bot"] = {"received": 3000, "distinct": 3000, "duplicates": 0, "malformed": 0}
        record["relay_outcomes"] = {"approved": 3000}
        record["codes_ok"] = True
    return record


def _results(cgi_us, calls):
    rss = {"max_kib": 3000, "median_kib": 2900, "count": 4}
    whole = {"total": calls, "calls": {"mmap": 2, "openat": 1}}
    return {
        "page_bytes": 1837,
        "fcgid_rss": {"instant": rss, "burst": rss},
        "proxy_rss": {"instant": rss, "burst": rss},
        "nginx_rss": {"burst": rss, "2000": rss},
        "nginx_once": {"requests": 2000, "errors": 0, "p50_us": 310_000, "p99_us": 400_000,
                       "max_us": 420_000, "codes_ok": True},
        "cgi": {"runs": 100, "true": {"median_us": 400, "p90_us": 500, "page_faults": 40,
                                      "syscalls": {"total": 30, "calls": {"mmap": 2}}},
                "cgi": {"median_us": cgi_us, "p90_us": 900, "page_faults": 120, "syscalls": whole}},
        "spawn": {"runs": 2, "static_first_ms": 1.0, "spawn_first_ms": 3.0, "second_ms": 1.0},
        "syscalls": {"requests": 200, **{mode: {kind: {
            "total": 14.0, "store_total": 5.0, "bot": {"connect": 1.0},
            "calls": {"accept4": 1.0, "pwrite64": 1.0}, "store": {"pwrite64": 1.0}}
            for kind in ("first", "replay")} for mode in ("fcgid", "proxy")}},
    }


def made_up_run(baseline=False):
    """A bench as a run of every part would leave it, with plausible
    figures; with a baseline build that ran every relay part too."""
    args = SimpleNamespace(threads=2, duration=3, state_dir=None, delay_ms=300, burst_conns=200,
                           only=set(PARTS), baseline_bin=Path("target/baseline/tourney-register"))
    base = None
    if baseline:
        phases = {}
        for p in Phase:
            if p != Phase.STATIC:
                phases[p] = _load(p)
                phases[p]["name"] += ", baseline"
                phases[p]["cpu_us_per_req"]["relay"] = 120.0
        base = SimpleNamespace(name="baseline", phases=phases, results=_results(987, 84))
    return SimpleNamespace(args=args, phases={p: _load(p) for p in Phase}, results=_results(700, 46),
                           baseline=base, checks=[("made up", True, "every code once")])


def run(_args):
    """Problems found; empty when the targets, the loads and the report agree."""
    problems = []
    bench = made_up_run()
    info = {"nproc": 2, "cpu": "?", "mem_gib": 1, "kernel": "?", "apache": "?", "mod_fcgid": "?"}
    started = datetime.datetime.now(datetime.timezone.utc)
    text, rows = report(bench, info, ["0"] * 3, ["0"] * 3, started, 1.0)
    if len(rows) != len(targets.TARGETS):
        problems.append(f"{len(targets.TARGETS)} targets, but a run of every part reports {len(rows)}")
    for name, figure, _ in rows:
        if f"| {name} | {figure} |" not in text:
            problems.append(f"target {name!r} is missing from the report")
    for phase in Phase:
        if f"| {phase.value} |" not in text:
            problems.append(f"load {phase.value!r} is missing from the report")
    problems += _baseline_report(info, started)
    problems += _baseline_option()
    # The check itself: a load that leaves its part must be noticed.
    gone = Phase.PROXY_BURST_COLD
    parts = {k: (tuple(p for p in v[0] if p != gone), v[1]) for k, v in PARTS.items()}
    if not any(gone.value in problem for problem in targets.check(parts=parts)):
        problems.append(f"targets.check did not notice {gone.value!r} leaving every part")
    return problems


def _baseline_report(info, started):
    """With a baseline, each load it ran has its row under the current
    build's, and the before/after table pairs the two."""
    problems = []
    text, rows = report(made_up_run(baseline=True), info, ["0"] * 3, ["0"] * 3, started, 1.0)
    if len(rows) != len(targets.TARGETS):
        problems.append("with a baseline, the targets judged are not the current build's alone")
    for phase in Phase:
        if phase == Phase.STATIC:
            if f"| {phase.value}, baseline |" in text:
                problems.append("the static file has a baseline row: it is measured once")
        elif f"| {phase.value}, baseline |" not in text:
            problems.append(f"load {phase.value!r} has no baseline row")
    expected = [
        f"| {Phase.FCGID_INSTANT.value}: relay µs/req | 120 | 90 | 0.75 |",
        "| one CGI request − /bin/true (median) | 587 µs | 300 µs | 0.51 |",
        "| one CGI request: system calls | 84 | 46 | 0.55 |",
        "| one CGI request, baseline, whole process (median of 100) | 987 µs (p90 900) |",
        *(f"| {MODE_LABEL[mode]}, baseline | {kind} |" for mode in MODES for kind in ("first", "replay")),
        "| spawn to first answer − static first answer, baseline | 2.00 ms |",
    ]
    for line in expected:
        if line not in text:
            problems.append(f"the report with a baseline lacks {line!r}")
    return problems


def _baseline_option():
    """--baseline-bin takes an executable file and nothing else."""
    from .cli import parse_args  # cli imports this module

    problems = []
    with tempfile.TemporaryDirectory() as d:
        exe, plain = Path(d) / "exe", Path(d) / "plain"
        exe.write_bytes(b"#!/bin/sh\n")
        exe.chmod(0o755)
        plain.write_bytes(b"")
        plain.chmod(0o644)
        args = parse_args(["--baseline-bin", str(exe), "--only", "cgi"])
        if args.baseline_bin != exe or args.only != {"cgi"}:
            problems.append(f"--baseline-bin with --only cgi: {args.baseline_bin}, {args.only}")
        args = parse_args(["--baseline-bin", str(exe), "--only", "fcgid"])
        if args.only != {"fcgid", "static"}:
            problems.append(f"--baseline-bin with a load and no static file to read it by: {args.only}")
        for bad in (plain, Path(d) / "missing", Path(d)):
            try:
                # argparse says why on stderr: quiet while it is expected.
                with contextlib.redirect_stderr(io.StringIO()):
                    parse_args(["--baseline-bin", str(bad)])
                problems.append(f"--baseline-bin {bad.name} was accepted")
            except SystemExit:
                pass
    return problems

