"""The Markdown report of a run: the loads' table, the other figures, the
targets (as targets.evaluate judged them) and the code checks."""

from . import targets
from .phases import INSTANT_LOADS, MODE_LABEL, MODES, Phase
from .targets import mib


def fmt_ms(us):
    return f"{us / 1000:.1f} ms" if us >= 10000 else f"{us / 1000:.2f} ms"


def report(bench, info, load_before, load_after, started, elapsed):
    r, a = bench.results, bench.args
    phases = bench.phases
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
    for p in bench.phases.values():
        w, c = p["wrk"], p["cpu_us_per_req"]
        errors = w["status"] + w["socket_errors"]
        err_text = str(errors) if errors == 0 else (
            f"{errors} (non-2xx {w['status']}, connect {w['connect']}, read {w['read']}, "
            f"write {w['write']}, timeout {w['timeout']})")
        dyn = "bot" in p
        if dyn:
            b = p["bot"]
            codes = (f"{'ok' if p['codes_ok'] else '**FAILED**'}: {b['received']} = {p['served_ok']} = "
                     f"{p['relay_outcomes'].get('approved', 0)}, dup {b['duplicates']}"
                     f" (wrk: {w['ok']})")
        ratio = f"{w['rps'] / static_rps:.2f}" if static_rps else "–"
        dash = "–"
        cells = [
            p["name"], p["conns"], f"{p['delay_ms']} ms" if dyn else dash, f"{w['rps']:.0f}", ratio,
            fmt_ms(w["p50_us"]), fmt_ms(w["p99_us"]), err_text, codes if dyn else dash,
            f"{c.get('relay', 0):.0f}" if dyn else dash, f"{c.get('apache', 0):.0f}",
            f"{c.get('bot', 0):.0f}" if dyn else dash, f"{c.get('wrk', 0):.0f}",
            p["relay_procs"] if dyn else dash,
            f"{p['other_cpu_share'] * 100:.0f} %",
            f"{p['time_wait_before'] / 1000:.0f}k→{p['time_wait_after'] / 1000:.0f}k",
        ]
        add("| " + " | ".join(str(x) for x in cells) + " |")
    if bench.phases:
        add("")

    other = []
    fr, pr = r.get("fcgid_rss", {}), r.get("proxy_rss", {})
    for when, x in fr.items():
        other.append((f"relay peak RSS (VmHWM), mod_fcgid, after {when}",
                      f"max {mib(x['max_kib'])} over {x['count']} processes (median {mib(x['median_kib'])})"))
    for when, x in pr.items():
        what = f"the {a.burst_conns}-connection burst" if when == "burst" else when
        other.append((f"relay peak RSS (VmHWM), --listen, after {what}", mib(x["max_kib"])))
    cg, sp = r.get("cgi"), r.get("spawn")
    if cg:
        other += [
            (f"one CGI request, whole process (median of {cg['runs']})",
             f"{cg['cgi']['median_us']:.0f} µs (p90 {cg['cgi']['p90_us']:.0f})"),
            (f"/bin/true, whole process (median of {cg['runs']})",
             f"{cg['true']['median_us']:.0f} µs (p90 {cg['true']['p90_us']:.0f})"),
            ("CGI request − /bin/true", f"{cg['cgi']['median_us'] - cg['true']['median_us']:.0f} µs"),
        ]
    if sp:
        other += [
            (f"first answer after a fresh Apache start: static file (median of {sp['runs']})",
             f"{sp['static_first_ms']:.2f} ms"),
            (f"first answer after a fresh Apache start: /register, mod_fcgid spawns (median of {sp['runs']})",
             f"{sp['spawn_first_ms']:.2f} ms (the next request: {sp['second_ms']:.2f} ms)"),
            ("spawn to first answer − static first answer",
             f"{sp['spawn_first_ms'] - sp['static_first_ms']:.2f} ms"),
        ]
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
        for mode in MODES:
            for kind in ("first", "replay"):
                x = sc[mode][kind]
                calls = ", ".join(f"{k} {v:g}" for k, v in sorted(x["calls"].items(), key=lambda kv: -kv[1]))
                store = ", ".join(f"{k} {v:g}" for k, v in x["store"].items()) or "–"
                bot = ", ".join(f"{k} {v:g}" for k, v in x["bot"].items()) or "–"
                add(f"| {MODE_LABEL[mode]} | {kind} | {x['total']:.1f} | {store} | {bot} | {calls} |")
        add("")
    if other:
        add("| other figure | value |")
        add("|---|---|")
        for k, v in other:
            add(f"| {k} | {v} |")
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
