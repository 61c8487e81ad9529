"""The command line: arguments, the tools a run needs, and the run itself."""

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

from . import selftest, targets
from .common import REPO, die, log, read, run, tmpfs_dir
from .phases import PARTS
from .report import report
from .runner import Bench
from .sampling import loadavg, machine
from .services import Apache, Bot


def parse_args(argv, usage=None):
    p = argparse.ArgumentParser(prog="bench", description=usage,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per load [10]")
    p.add_argument("--warmup", type=int, default=3, help="seconds of warm-up before an instant load [3]")
    p.add_argument("--conns", type=int, default=16,
                   help="connections for the instant loads: enough to keep 2 cores busy [16]")
    p.add_argument("--burst-conns", type=int, default=200, help="connections for the burst [200]")
    p.add_argument("--delay-ms", type=int, default=300, help="the slow bot's delay [300]")
    p.add_argument("--threads", type=int, default=2, help="wrk threads [2]")
    p.add_argument("--cgi-runs", type=int, default=500, help="CGI and /bin/true runs each [500]")
    p.add_argument("--cgi-warmup", type=int, default=20)
    p.add_argument("--syscall-requests", type=int, default=200,
                   help="requests per mode and kind counted under strace [200]")
    p.add_argument("--spawn-runs", type=int, default=5, help="fresh Apache starts [5]")
    p.add_argument("--quick", action="store_true", help="3 s loads, fewer runs (a smoke test)")
    p.add_argument("--self-test", action="store_true",
                   help="check the targets against the loads and render a report from made-up "
                        "figures; runs nothing")
    p.add_argument("--no-build", action="store_true", help="use the binaries already built")
    p.add_argument("--relay-bin", type=Path,
                   help="benchmark this tourney-register binary instead of scripts/build-release's")
    p.add_argument("--baseline-bin", type=Path, metavar="PATH",
                   help="also run every relay part (all but static, which runs once and is added "
                        "to --only when a load runs) for this older build, back to back with the "
                        "current one, and report the two side by side (scripts/build-baseline REV "
                        "builds one)")
    p.add_argument("--state-dir", type=Path,
                   help="parent directory for the replay stores [/dev/shm when it is a tmpfs, "
                        "else target/bench/run]; the *-disk loads put theirs in target/bench/run")
    p.add_argument("--relay-env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for the --listen relay and the CGI runs "
                        "(e.g. GLIBC_TUNABLES=glibc.malloc.tcache_count=0)")
    p.add_argument("--only", default=",".join(PARTS),
                   help=f"comma-separated parts to run [{','.join(PARTS)}]")
    p.add_argument("--out", type=Path, default=REPO / "target" / "bench" / "latest.md")
    args = p.parse_args(argv)
    args.only = set(filter(None, args.only.split(",")))
    if args.state_dir is None:
        args.state_dir = tmpfs_dir("/dev/shm")
    elif not args.state_dir.is_dir():
        p.error(f"--state-dir {args.state_dir}: not a directory")
    env = {}
    for item in args.relay_env:
        name, sep, value = item.partition("=")
        if not sep or not name:
            p.error(f"--relay-env {item!r}: use NAME=VALUE")
        env[name] = value
    args.relay_env = env
    for name in ("relay_bin", "baseline_bin"):
        path = getattr(args, name)
        if path is not None and not (path.is_file() and os.access(path, os.X_OK)):
            p.error(f"--{name.replace('_', '-')} {path}: not an executable file")
    if args.only - set(PARTS):
        p.error(f"--only: unknown {', '.join(sorted(args.only - set(PARTS)))}")
    if args.baseline_bin and any(PARTS[part][0] for part in args.only):
        # The two builds' loads are read against the limit measured in the
        # same run.
        args.only.add("static")
    if args.quick:
        args.duration, args.warmup, args.cgi_runs, args.spawn_runs = 3, 1, 100, 2
    for name in ("duration", "conns", "burst_conns", "threads", "cgi_runs", "spawn_runs",
                 "syscall_requests"):
        if not 1 <= getattr(args, name) <= 100000:
            p.error(f"--{name.replace('_', '-')} out of range")
    if args.duration > 60 or args.warmup > 30:
        p.error("loads are bounded: --duration at most 60 s, --warmup at most 30 s")
    return args


def need_tools():
    missing = [t for t in ("wrk", "cargo", "strace") if not shutil.which(t)]
    if not (shutil.which("apache2") or Path("/usr/sbin/apache2").exists()):
        missing.append("apache2")
    for mod in ("mod_fcgid.so", "mod_proxy_fcgi.so"):
        if not Path("/usr/lib/apache2/modules", mod).exists():
            missing.append(mod)
    if missing:
        log(f"missing {', '.join(missing)}: running scripts/install-deps bench")
        run([str(REPO / "scripts" / "install-deps"), "bench"], timeout=1800)


COOL_DOWN_MARK = REPO / "target" / "bench" / "stores-removed-at"
# ext4 without a journal (this project's VM images) skips inodes deleted in
# the last ~30 s when it allocates new ones, reading inode tables to do so:
# right after a run removes its stores, creating files is several times
# slower. Cheap to wait out.
COOL_DOWN_S = 35


def cool_down():
    try:
        removed_at = float(read(COOL_DOWN_MARK).strip() or 0)
    except ValueError:
        removed_at = 0
    wait = removed_at + COOL_DOWN_S - time.time()
    if 0 < wait <= COOL_DOWN_S:
        log(f"waiting {wait:.0f} s: the last run's stores were removed just now")
        time.sleep(wait)


def main(argv, usage=None):
    args = parse_args(argv, usage)
    problems = targets.check()
    if args.self_test:
        problems += selftest.run(args)
        for problem in problems:
            log(f"self-test: {problem}")
        if problems:
            sys.exit(1)
        log(f"self-test: {len(targets.TARGETS)} targets over {len(PARTS)} parts ok")
        return
    if problems:
        die("the targets do not match the loads:\n  " + "\n  ".join(problems))
    need_tools()
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.monotonic()
    load_before = loadavg()
    info = machine()
    if float(load_before[0]) > 0.5:
        log(f"note: load average is {' '.join(load_before)}; other work on the machine disturbs the figures")
    bench = Bench(args)
    bench.build()
    cool_down()
    try:
        bench.loads()
        if "cgi" in args.only:
            bench.cgi()
        if "spawn" in args.only:
            bench.spawn()
        if "syscalls" in args.only:
            bench.syscalls()
    finally:
        for bot in list(Bot.live):
            bot.proc.kill()
            bot.proc.wait()
        for inst in list(Apache.live):
            inst.stop()
        # The stores hold a file per code: tens of thousands. Removed after
        # the run, not before the next, so deleting them disturbs no load;
        # the next run waits a little (see cool_down).
        removed = False
        for state in bench.state_dirs:
            if state.exists():
                shutil.rmtree(state, ignore_errors=True)
                removed = True
        if removed:
            COOL_DOWN_MARK.parent.mkdir(parents=True, exist_ok=True)
            COOL_DOWN_MARK.write_text(f"{time.time()}\n")
    load_after = loadavg()
    text, rows = report(bench, info, load_before, load_after, started, time.monotonic() - t0)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    raw = {"machine": info, "load_before": load_before, "load_after": load_after,
           "args": {k: str(v) for k, v in vars(args).items()}, "phases": list(bench.phases.values()),
           "results": bench.results,
           "targets": [{"target": n, "figure": f, "met": ok} for n, f, ok in rows]}
    if bench.baseline:
        raw["baseline"] = {"bin": str(args.baseline_bin),
                           "phases": list(bench.baseline.phases.values()),
                           "results": bench.baseline.results}
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1))
    log(f"written to {args.out} (raw figures in {args.out.with_suffix('.json')})")
    failed = [name for name, ok, _ in bench.checks if not ok]
    if failed:
        log(f"code checks failed: {', '.join(failed)}")
        sys.exit(1)
