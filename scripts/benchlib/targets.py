"""The targets the relay is held to, as a table: what each promises, the
loads and results it needs, and how its figure is read from them. The report
prints a row for each target whose loads ran; check() makes sure every load
and result a target names is one some part of the runner produces."""

from dataclasses import dataclass
from typing import Callable

from .phases import (BURSTS, MODE_LABEL, MODES, INSTANT_LOADS, NGINX_BURSTS, NGINX_CONNS, PARTS, Phase,
                     phases_of, results_of)


@dataclass(frozen=True)
class Figures:
    """What a run measured, as the targets read it."""

    phases: dict  # Phase -> the runner's record of that load
    results: dict  # Bench.results
    delay_ms: int  # the slow bot's delay
    burst_conns: int

    @property
    def static_rps(self):
        static = self.phases.get(Phase.STATIC)
        return static["wrk"]["rps"] if static else None

    def errors(self, phase):
        w = self.phases[phase]["wrk"]
        return w["status"] + w["socket_errors"]


@dataclass(frozen=True)
class Target:
    text: Callable[[Figures], str]  # what is promised (may quote the run's settings)
    phases: tuple  # loads it needs, all of them
    results: tuple  # (key, sub-key or None) in Bench.results it needs
    measure: Callable[[Figures], tuple]  # -> (figure text, met: True/False, or None if reported only)

    def applies(self, f):
        return all(p in f.phases for p in self.phases) and all(
            key in f.results and (sub is None or sub in f.results[key]) for key, sub in self.results)


def mib(kib):
    return f"{kib / 1024:.1f} MiB"


def _relay_cpu(phase, label):
    """Relay CPU per request against Apache's CPU for one static-file
    request in the same run: microseconds do not carry between machines."""
    def measure(f):
        v = f.phases[phase]["cpu_us_per_req"]["relay"]
        apache = f.phases[Phase.STATIC]["cpu_us_per_req"].get("apache")
        if not apache:
            return f"{v:.0f} µs", None
        return f"{v:.0f} µs = {v / apache:.2f} × Apache's {apache:.0f} µs", v <= 1.2 * apache
    return Target(lambda f: f"relay CPU/request ≤ 1.2 × Apache's for a static file, {label} (instant bot)",
                  (phase, Phase.STATIC), (), measure)


def _rate(phase, label, floor):
    def measure(f):
        if not f.static_rps:
            return "–", None
        v = f.phases[phase]["wrk"]["rps"] / f.static_rps
        return f"{v:.2f}", v >= floor
    return Target(lambda f: f"instant bot ≥ {floor:.2f} × static req/s, {label}",
                  (phase, Phase.STATIC), (), measure)


def _burst_clean(phase):
    def measure(f):
        ok = f.phases[phase]["codes_ok"]
        return f"{f.errors(phase)} errors, codes {'ok' if ok else 'FAILED'}", f.errors(phase) == 0 and ok
    return Target(lambda f: f"{phase.value}: zero errors, every code once", (phase,), (), measure)


def _p99(phase, factor=None):
    def measure(f):
        v = f.phases[phase]["wrk"]["p99_us"]
        delay_us = f.delay_ms * 1000
        return f"{v / 1000:.0f} ms ({v / delay_us:.2f} ×)", (v <= factor * delay_us if factor else None)
    if factor:
        return Target(lambda f: f"proxy burst: p99 ≤ {factor} × the bot's {f.delay_ms} ms",
                      (phase,), (), measure)
    return Target(lambda f: f"{phase.value}: p99 (reported)", (phase,), (), measure)


def _latency(phase, key, factor=None):
    """wrk's `key` percentile of `phase` as a multiple of the bot's delay;
    held to `factor` × when given."""
    def measure(f):
        v = f.phases[phase]["wrk"][key]
        delay_us = f.delay_ms * 1000
        return f"{v / 1000:.0f} ms ({v / delay_us:.2f} ×)", (v <= factor * delay_us if factor else None)
    name = key.removesuffix("_us")
    if factor:
        return Target(lambda f: f"{phase.value}: {name} ≤ {factor} × the bot's {f.delay_ms} ms",
                      (phase,), (), measure)
    return Target(lambda f: f"{phase.value}: {name} (reported)", (phase,), (), measure)


def _nginx_rss(key, most_kib):
    def measure(f):
        v = f.results["nginx_rss"][key]["max_kib"]
        return mib(v), v <= most_kib

    def text(f):
        conns = f.burst_conns if key == "burst" else NGINX_CONNS
        return (f"peak RSS ≤ {mib(most_kib)}, --listen behind nginx at {conns} connections "
                "(no environment variable)")
    return Target(text, (), (("nginx_rss", key),), measure)


def _nginx_once(f):
    x = f.results["nginx_once"]
    delay_us = f.delay_ms * 1000
    return (f"{x['errors']} errors, codes {'ok' if x['codes_ok'] else 'FAILED'}; p50 {x['p50_us'] / 1000:.0f} ms "
            f"({x['p50_us'] / delay_us:.2f} ×), p99 {x['p99_us'] / 1000:.0f} ms ({x['p99_us'] / delay_us:.2f} ×)",
            x["errors"] == 0 and x["codes_ok"] and x["p99_us"] <= 1.5 * delay_us)


def _fcgid_rss(f):
    v = max(x["max_kib"] for x in f.results["fcgid_rss"].values())
    return mib(v), v <= 4096


def _proxy_burst_rss(f):
    v = f.results["proxy_rss"]["burst"]["max_kib"]
    return mib(v), v <= 8192


def _cgi(f):
    cg = f.results["cgi"]
    v = cg["cgi"]["median_us"] - cg["true"]["median_us"]
    return f"+{v / 1000:.2f} ms", v <= 600


def _spawn(f):
    sp = f.results["spawn"]
    v = sp["spawn_first_ms"] - sp["static_first_ms"]
    return f"+{v:.2f} ms", v <= 5


def _syscalls(mode, kind, most):
    label = MODE_LABEL[mode]

    def measure(f):
        x = f.results["syscalls"][mode][kind]
        return f"{x['total']:.1f} ({x['store_total']:.1f} of them the store's)", x["total"] <= most
    what = "first delivery" if kind == "first" else "replayed answer"
    return Target(lambda f: f"system calls per request ≤ {most}, {label}, {what}", (),
                  (("syscalls", mode),), measure)


TARGETS = (
    *(_relay_cpu(phase, label) for phase, label in INSTANT_LOADS),
    _rate(Phase.FCGID_INSTANT, "mod_fcgid", 0.40),
    _rate(Phase.PROXY_INSTANT, "--listen", 0.30),
    *(_burst_clean(phase) for phase in BURSTS),
    _p99(Phase.PROXY_BURST_COLD, factor=1.5),
    _p99(Phase.FCGID_BURST_COLD),
    _p99(Phase.FCGID_BURST_WARM),
    Target(lambda f: "peak RSS ≤ 4 MiB per mod_fcgid process", (), (("fcgid_rss", None),), _fcgid_rss),
    Target(lambda f: f"peak RSS ≤ 8 MiB, --listen at {f.burst_conns} connections", (),
           (("proxy_rss", "burst"),), _proxy_burst_rss),
    Target(lambda f: "one CGI request within 0.5 ms of /bin/true", (), (("cgi", None),), _cgi),
    Target(lambda f: "spawn to first answer within 5 ms of a static file's", (), (("spawn", None),), _spawn),
    *(_syscalls(mode, kind, most) for mode in MODES for kind, most in (("first", 16), ("replay", 10))),
    *(_burst_clean(phase) for phase in NGINX_BURSTS),
    _latency(Phase.NGINX_2000, "p50_us"),
    _latency(Phase.NGINX_2000, "p99_us", factor=1.5),
    _latency(Phase.NGINX_BURST, "p99_us"),
    Target(lambda f: f"{NGINX_CONNS} sign-ups at once through nginx: zero errors, every code once, "
           f"p99 ≤ 1.5 × the bot's {f.delay_ms} ms", (), (("nginx_once", None),), _nginx_once),
    _nginx_rss("burst", 8192),
    _nginx_rss("2000", 16384),
)


def evaluate(figures):
    """(target, figure, met) for every target whose loads and results are in."""
    rows = []
    for target in TARGETS:
        if target.applies(figures):
            figure, met = target.measure(figures)
            rows.append((target.text(figures), figure, met))
    return rows


def check(targets=TARGETS, parts=PARTS):
    """Problems with the table: a load a target needs that is no Phase or
    that no part runs, a result no part produces. Empty when all is well."""
    runs, produced = phases_of(parts, parts), results_of(parts, parts)
    problems = []
    for i, target in enumerate(targets):
        for phase in target.phases:
            if not isinstance(phase, Phase):
                problems.append(f"target {i} names {phase!r}, which is not a Phase")
            elif phase not in runs:
                problems.append(f"target {i} needs load {phase.value!r}, which no part runs")
        for key, _ in target.results:
            if key not in produced:
                problems.append(f"target {i} needs result {key!r}, which no part produces")
    for phase in Phase:
        if phase not in runs:
            problems.append(f"load {phase.value!r} is in no part")
    return problems
