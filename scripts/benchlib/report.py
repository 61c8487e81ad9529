"""The Markdown report of a run: the loads' table, the other figures, the
targets (as targets.evaluate judged them) and the code checks."""

from . import targets
from .phases import INSTANT_LOADS, MODE_LABEL, MODES, Phase
from .targets import mib


def fmt_ms(us):
    return f"{us / 1000:.1f} ms" if us >= 10000 else f"{us / 1000:.2f} ms"


def bench_baseline(bench):
    """The baseline build's records, or None (also for a bench made before
    --baseline-bin existed)."""
    return getattr(bench, "baseline", None)


def load_row(p, static_rps):
    """One line of the loads' table (a baseline's name says so)."""
    w, c = p["wrk"], p["cpu_us_per_req"]
    errors = w["status"] + w["socket_errors"]
    err_text = str(errors) if errors == 0 else (
        f"{errors} (non-2xx {w['status']}, connect {w['connect']}, read {w['read']}, "
        f"write {w['write']}, timeout {w['timeout']})")
    dyn = "bot" in p
    dash = "–"
    codes = dash
    if dyn:
        b = p["bot"]
        codes = (f"{'ok' if p['codes_ok'] else '**FAILED**'}: {b['received']} = {p['served_ok']} = "
                 f"{p['relay_outcomes'].get('approved', 0)}, dup {b['duplicates']}"
                 f" (wrk: {w['ok']})")
    ratio = f"{w['rps'] / static_rps:.2f}" if static_rps else dash
    cells = [
        p["name"], p["conns"], f"{p['delay_ms']} ms" if dyn else dash, f"{w['rps']:.0f}", ratio,
        fmt_ms(w["p50_us"]), fmt_ms(w["p99_us"]), err_text, codes,
        f"{c.get('relay', 0):.0f}" if dyn else dash, f"{c.get('apache', 0):.0f}",
        f"{c.get('bot', 0):.0f}" if dyn else dash, f"{c.get('wrk', 0):.0f}",
        p["relay_procs"] if dyn else dash,
        f"{p['other_cpu_share'] * 100:.0f} %",
        f"{p['time_wait_before'] / 1000:.0f}k→{p['time_wait_after'] / 1000:.0f}k",
    ]
    return "| " + " | ".join(str(x) for x in cells) + " |"


def other_figures(r, a, build=""):
    """The figures outside the loads' table: (name, value) pairs. `build`
    (", baseline") goes into each name."""
    other = []
    fr, pr = r.get("fcgid_rss", {}), r.get("proxy_rss", {})
    for when, x in fr.items():
        other.append((f"relay peak RSS (VmHWM), mod_fcgid, after {when}{build}",
                      f"max {mib(x['max_kib'])} over {x['count']} processes (median {mib(x['median_kib'])})"))
    for when, x in pr.items():
        what = f"the {a.burst_conns}-connection burst" if when == "burst" else when
        other.append((f"relay peak RSS (VmHWM), --listen, after {what}{build}", mib(x["max_kib"])))
    cg, sp = r.get("cgi"), r.get("spawn")
    if cg:
        c, t = cg["cgi"], cg["true"]
        other.append((f"one CGI request{build}, whole process (median of {cg['runs']})",
                      f"{c['median_us']:.0f} µs (p90 {c['p90_us']:.0f})"))
        if not build:  # the same /bin/true runs for both builds
            other.append((f"/bin/true, whole process (median of {cg['runs']})",
                          f"{t['median_us']:.0f} µs (p90 {t['p90_us']:.0f})"))
        other += [
            (f"CGI request{build} − /bin/true",
             f"{c['median_us'] - t['median_us']:.0f} µs ({c['median_us'] / max(t['median_us'], 1):.2f} × /bin/true)"),
        ]
        if "page_faults" in c:
            calls = ", ".join(f"{k} {v}" for k, v in list(c["syscalls"]["calls"].items())[:6])
            other.append((f"CGI request{build}: page faults (median), system calls "
                          f"(/bin/true: {t['page_faults']:g}, {t['syscalls']['total']})",
                          f"{c['page_faults']:g}, {c['syscalls']['total']} ({calls}, …)"))
    if sp:
        other += [
            (f"first answer after a fresh Apache start: static file{build} (median of {sp['runs']})",
             f"{sp['static_first_ms']:.2f} ms"),
            (f"first answer after a fresh Apache start: /register, mod_fcgid spawns{build} "
             f"(median of {sp['runs']})",
             f"{sp['spawn_first_ms']:.2f} ms (the next request: {sp['second_ms']:.2f} ms)"),
            (f"spawn to first answer − static first answer{build}",
             f"{sp['spawn_first_ms'] - sp['static_first_ms']:.2f} ms"),
        ]
    return other


def comparison(bench, static_rps):
    """Before/after rows, (figure, baseline, current, current / baseline),
    for what both builds ran: the relay's cost and what the targets read."""
    base = bench_baseline(bench)
    if not base:
        return []
    rows = []
    for phase, p in bench.phases.items():
        q = base.phases.get(phase)
        if not q or "bot" not in p:
            continue
        pc, qc = p["cpu_us_per_req"].get("relay", 0), q["cpu_us_per_req"].get("relay", 0)
        rows.append((f"{phase.value}: relay µs/req", f"{qc:.0f}", f"{pc:.0f}", _ratio(qc, pc)))
        if static_rps:
            pr, qr = p["wrk"]["rps"] / static_rps, q["wrk"]["rps"] / static_rps
            rows.append((f"{phase.value}: × static req/s", f"{qr:.2f}", f"{pr:.2f}", _ratio(qr, pr)))
        rows.append((f"{phase.value}: p99", fmt_ms(q["wrk"]["p99_us"]), fmt_ms(p["wrk"]["p99_us"]),
                     _ratio(q["wrk"]["p99_us"], p["wrk"]["p99_us"])))
    r, b = bench.results, base.results
    for key, label in (("fcgid_rss", "mod_fcgid"), ("proxy_rss", "--listen")):
        for when in r.get(key, {}):
            if when in b.get(key, {}):
                x, y = b[key][when]["max_kib"], r[key][when]["max_kib"]
                rows.append((f"peak RSS, {label}, after {when}", mib(x), mib(y), _ratio(x, y)))
    if "cgi" in r and "cgi" in b:
        bc, rc, t = b["cgi"]["cgi"], r["cgi"]["cgi"], r["cgi"]["true"]
        x, y = bc["median_us"] - t["median_us"], rc["median_us"] - t["median_us"]
        rows.append(("one CGI request − /bin/true (median)", f"{x:.0f} µs", f"{y:.0f} µs", _ratio(x, y)))
        x, y = bc["median_us"] / t["median_us"], rc["median_us"] / t["median_us"]
        rows.append(("one CGI request, × /bin/true", f"{x:.2f}", f"{y:.2f}", _ratio(x, y)))
        if "page_faults" in rc and "page_faults" in bc:
            x, y = bc["page_faults"], rc["page_faults"]
            rows.append(("one CGI request: page faults", f"{x:g}", f"{y:g}", _ratio(x, y)))
            x, y = bc["syscalls"]["total"], rc["syscalls"]["total"]
            rows.append(("one CGI request: system calls", f"{x}", f"{y}", _ratio(x, y)))
    if "spawn" in r and "spawn" in b:
        x = b["spawn"]["spawn_first_ms"] - b["spawn"]["static_first_ms"]
        y = r["spawn"]["spawn_first_ms"] - r["spawn"]["static_first_ms"]
        rows.append(("spawn to first answer − static first answer", f"{x:.2f} ms", f"{y:.2f} ms",
                     _ratio(x, y)))
    rs, bs = r.get("syscalls", {}), b.get("syscalls", {})
    for mode in MODES:
        if mode in rs and mode in bs:
            for kind in ("first", "replay"):
                x, y = bs[mode][kind]["total"], rs[mode][kind]["total"]
                rows.append((f"system calls per request, {MODE_LABEL[mode]}, {kind}",
                             f"{x:.1f}", f"{y:.1f}", _ratio(x, y)))
    return rows


def _ratio(before, after):
    return f"{after / before:.2f}" if before else "–"


def report(bench, info, load_before, load_after, started, elapsed):
    r, a = bench.results, bench.args
    phases = bench.phases
    base = bench_baseline(bench)
    figures = targets.Figures(phases, r, a.delay_ms, a.burst_conns)
    static_rps = figures.static_rps
    lines = []
    add = lines.append
    add(f"# tourney-register benchmark, {started:%Y-%m-%d %H:%M} UTC")
    add("")
    add(f"Machine: {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, kernel {info['kernel']}, "
        f"{info['apache']}, mod_fcgid {info['mod_fcgid']}. Load average (1/5/15 min) before: "
        f"{' '.join(load_before)}, after: {' '.join(load_after)}. Run took {elapsed:.0f} s.")
    add("")
    if bench.phases:
        add(f"Loopback; wrk -t{a.threads}, {a.duration} s per load, a distinct ~1 KB code per request; "
            f"the static file is the success page ({r.get('page_bytes', '?')} bytes). "
            f"Replay stores in {a.state_dir or 'target/bench/run (disk)'} unless the load says otherwise. "
            f"CPU µs/req = the group's CPU time during the load / requests Apache answered in it. "
            f"Codes: received by the bot = answered 200 by Apache = logged approved by the relay, "
            f"duplicates; wrk's own count misses the requests in flight at its deadline. "
            f"Other CPU: what the rest of the machine used during the load, as a share of all "
            f"its CPUs (other people's work disturbs every figure). TIME_WAIT: TCP sockets in "
            f"TIME_WAIT before and after the load; each relay-to-bot connection leaves one for "
            f"60 s, and with the 28k-port range nearly full, connect() costs more.")
        add("")
        add("| load | conns | bot | req/s | × static | p50 | p99 | errors | codes: bot = 200s = approved, dup "
            "| relay µs/req | Apache µs/req | bot µs/req | wrk µs/req | relay procs | other CPU | TIME_WAIT |")
        add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for phase, p in bench.phases.items():
        add(load_row(p, static_rps))
        if base and phase in base.phases:
            add(load_row(base.phases[phase], static_rps))
    if bench.phases:
        add("")

    other = other_figures(r, a)
    if base:
        other += other_figures(base.results, a, ", baseline")
    # What the relay controls: on a saturated machine req/s goes as 1 / the
    # CPU all processes spend per request, so a relay that cost nothing
    # would reach static CPU/req / (dynamic CPU/req - the relay's).
    if Phase.STATIC in phases:
        static_cpu = sum(phases[Phase.STATIC]["cpu_us_per_req"].values())
        for n, _ in INSTANT_LOADS:
            if n in phases:
                c = phases[n]["cpu_us_per_req"]
                total = sum(c.values())
                other.append((
                    f"{n.value}: × static if the relay cost no CPU",
                    f"{static_cpu / max(total - c['relay'], 1):.2f} (all processes: {total:.0f} µs/req, "
                    f"{c['relay']:.0f} of them the relay's; static: {static_cpu:.0f} µs/req)"))
    sc = r.get("syscalls")
    if sc:
        add(f"System calls per request (strace -f over {sc['requests']} requests, one connection "
            "each; store = calls on the replay store's files, bot = on the connected socket to the bot, "
            "its socket and connect not included):")
        add("")
        add("| mode | kind | total | store | bot | every call |")
        add("|---|---|---|---|---|---|")
        bsc = base.results.get("syscalls", {}) if base else {}
        for mode in MODES:
            for kind in ("first", "replay"):
                for label, table in (("", sc), (", baseline", bsc)):
                    if mode not in table:
                        continue
                    x = table[mode][kind]
                    calls = ", ".join(f"{k} {v:g}" for k, v in sorted(x["calls"].items(), key=lambda kv: -kv[1]))
                    store = ", ".join(f"{k} {v:g}" for k, v in x["store"].items()) or "–"
                    bot = ", ".join(f"{k} {v:g}" for k, v in x["bot"].items()) or "–"
                    add(f"| {MODE_LABEL[mode]}{label} | {kind} | {x['total']:.1f} | {store} | {bot} | {calls} |")
        add("")
    if other:
        add("| other figure | value |")
        add("|---|---|")
        for k, v in other:
            add(f"| {k} | {v} |")
        add("")

    pairs = comparison(bench, static_rps)
    if pairs:
        add(f"Before and after, from this run: baseline {a.baseline_bin}. Each relay part ran for "
            "both builds back to back (which one first alternates part by part; the fresh starts "
            "alternate run by run, and each CGI round runs /bin/true and both builds in an order "
            "that rotates round by round); × static and × /bin/true divide by the limit "
            "measured in this run. A relay CPU difference under about 20 µs is within one run's "
            "noise (BENCHMARKS.md).")
        add("")
        add("| figure | baseline | current | current / baseline |")
        add("|---|---|---|---|")
        for name, before, after, ratio in pairs:
            add(f"| {name} | {before} | {after} | {ratio} |")
        add("")

    # The targets, for the parts that ran.
    rows = targets.evaluate(figures)
    if rows:
        add("| target | figure | met |")
        add("|---|---|---|")
        for name, figure, ok in rows:
            add(f"| {name} | {figure} | {'–' if ok is None else ('yes' if ok else '**no**')} |")
        add("")
    if bench.checks:
        add("Code checks:")
        add("")
        for name, ok, detail in bench.checks:
            add(f"- {name}: {'ok' if ok else 'FAILED'}: {detail}")
        add("")
    return "\n".join(lines), rows
