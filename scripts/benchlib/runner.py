"""Runs the loads, the CGI runs and the fresh-spawn runs, and records what
each measured: Bench.phases (one record per load, keyed by its Phase),
Bench.results and Bench.checks. Judging the figures is the targets' job."""

import http.client
import os
import shutil
import statistics
import time

from . import syscalls
from .common import REPO, die, free_port, log, read, run, size, tail_from, tmpfs_dir
from .phases import DISK, MODES, NGINX_CONNS, UNIXBOT, Phase, phases_of
from .sampling import Groups, cpu_delta, cpu_totals, time_wait_sockets, vm_hwm_kib
from .services import (CODE_PAD, RUN_TAG, STATE, WRK_LUA, Apache, Bot, NginxFront, count_access,
                       count_gone, count_outcomes, one_shot, raise_files_limit, settle, timed_get,
                       wrk)


class Bench:
    def __init__(self, args):
        self.args = args
        self.out_dir = REPO / "target" / "bench"
        self.rundir = self.out_dir / "run"
        self.results = {}
        self.phases = {}  # Phase -> what its load measured, in run order
        self.checks = []
        self.state_dirs = []

    # -- setup
    def build(self):
        if not self.args.no_build:
            log("building release binaries")
            run(["cargo", "build", "--release", "--quiet", "--bin", "tourney-register",
                 "--example", "bench_bot"], cwd=REPO, timeout=1800)
        if self.rundir.exists():
            # Left by an interrupted run (a finished one removes its stores).
            shutil.rmtree(self.rundir)
        (self.rundir / "bin").mkdir(parents=True)
        # Apache's children (www-data) run the snapshot below: every
        # directory on the way must be theirs to traverse, whatever the umask.
        for d in (self.out_dir, self.rundir, self.rundir / "bin"):
            d.chmod(0o755)
        # Snapshots: a rebuild by someone else mid-run changes nothing here.
        self.relay_bin = self.rundir / "bin" / "tourney-register"
        self.bot_bin = self.rundir / "bin" / "bench_bot"
        shutil.copy2(self.args.relay_bin or REPO / "target" / "release" / "tourney-register",
                     self.relay_bin)
        shutil.copy2(REPO / "target" / "release" / "examples" / "bench_bot", self.bot_bin)
        self.lua = self.rundir / "codes.lua"
        self.lua.write_text(WRK_LUA)
        self.bot_port = free_port()

    def instance(self, mode, name, state_parent=None, bot_unix=False):
        d = self.rundir / name
        state_parent = state_parent or self.args.state_dir
        state = (state_parent / f"tourney-register-bench-{name}") if state_parent else d / "state"
        # A store left by an interrupted run would replay its answers.
        shutil.rmtree(state, ignore_errors=True)
        self.state_dirs.append(state)
        return Apache(d, free_port(), mode, self.relay_bin, self.bot_port, state,
                      relay_env=self.args.relay_env,
                      bot_unix=self.rundir / "bot.sock" if bot_unix else None)

    def finished(self, inst):
        """Stops an instance for good. A store on tmpfs goes at once (tens
        of thousands of files hold a page of memory each); one on disk
        stays until the end of the run (see cool_down)."""
        inst.stop()
        if tmpfs_dir(inst.state.parent) and inst.state in self.state_dirs:
            shutil.rmtree(inst.state, ignore_errors=True)
            self.state_dirs.remove(inst.state)

    def success_page(self, apache):
        conn = http.client.HTTPConnection("127.0.0.1", apache.port, timeout=15)
        conn.request("GET", f"/register?code=page-probe&state={STATE}")
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        if resp.status != 200 or b"Success" not in body:
            die(f"the relay did not answer the probe with the success page ({resp.status})")
        static = apache.dir / "htdocs" / "bench-static.html"
        static.write_bytes(body)
        self.results["page_bytes"] = len(body)
        return "/bench-static.html"

    # -- one load
    def load(self, phase, apache, path, delay_ms, conns, duration, warmup=0, relay_pid=None):
        # Only the loads phases.PARTS declares for the parts asked for: what
        # the targets were checked against at start.
        if phase not in phases_of(self.args.only):
            raise ValueError(f"load {phase!r} is not in phases.PARTS for --only {sorted(self.args.only)}")
        name = phase.value
        a = self.args
        dynamic = path.startswith("/register")
        bot_threads = getattr(apache, "bot_threads", None)
        bot = (Bot(self.bot_bin, self.bot_port, delay_ms, self.rundir, unix=apache.bot_unix,
                   threads=bot_threads)
               if dynamic else None)
        timeout = 30 if delay_ms else 10
        if warmup:
            wrk(path, f"{name}-warm", conns, a.threads, warmup, timeout, apache.port, self.lua,
                self.rundir)
            settle([apache.access_log()])
            if bot:
                bot.stop()
                bot = Bot(self.bot_bin, self.bot_port, delay_ms, self.rundir, unix=apache.bot_unix,
                          threads=bot_threads)
        groups = Groups(apache.pid, apache.relay_exe(), relay_pid, bot.proc.pid if bot else None)
        logs = [apache.access_log(), apache.relay_log()]
        offsets = [size(p) for p in logs]
        log(f"{name}: {conns} connections, {duration} s" + (f", bot {delay_ms} ms" if dynamic else ""))
        tw_before = time_wait_sockets()
        before = groups.sample()
        machine_before = cpu_totals()
        t0 = time.monotonic()
        # The burst: each request on its own connection, as 200 players'
        # browsers would (and a browser retries a GET on a kept connection
        # the server closed, which wrk counts as an error instead).
        close = delay_ms > 0
        w = wrk(path, name, conns, a.threads, duration, timeout, apache.port, self.lua, self.rundir,
                close=close)
        settled = settle(logs)
        after = groups.sample()
        machine_after = cpu_totals()
        wall = time.monotonic() - t0
        cpu, gone = cpu_delta(before, after)
        cpu["wrk"] = w["cpu_ns"]
        # Everything else the machine ran meanwhile (other people's work,
        # the kernel's own threads), as a share of all its CPUs.
        busy = machine_after[0] - machine_before[0]
        capacity = wall * 1e9 * (os.cpu_count() or 1)
        others = max(busy - sum(cpu.values()), 0) / capacity
        steal = (machine_after[1] - machine_before[1]) / capacity
        access_text = tail_from(logs[0], offsets[0])
        access_ok, access_other = count_access(access_text, path.split("?")[0])
        gone = count_gone(access_text, path.split("?")[0])
        served = access_ok + access_other
        record = {
            "name": name, "path": path, "delay_ms": delay_ms, "conns": conns, "new_conn_per_request": close,
            "duration": duration, "wrk": w, "served": served, "served_ok": access_ok,
            "cpu_ns": cpu, "exited_during": gone, "settled": settled, "wall_s": round(wall, 2),
            "relay_procs": len(after.get("relay", {})),
            "time_wait_before": tw_before, "time_wait_after": time_wait_sockets(),
            "other_cpu_share": others, "steal_share": steal,
        }
        # Per request: divided by what Apache served in the window (wrk's
        # count misses the requests in flight at its deadline).
        record["cpu_us_per_req"] = {g: ns / 1000 / max(served, 1) for g, ns in cpu.items()}
        if bot:
            summary = bot.stop()
            outcomes = count_outcomes(tail_from(logs[1], offsets[1]))
            record["bot"] = summary
            record["relay_outcomes"] = outcomes
            approved = outcomes.get("approved", 0)
            in_flight = access_ok - w["ok"]
            record["in_flight_at_end"] = in_flight
            record["gone_at_end"] = gone
            ok = (
                summary.get("duplicates", -1) == 0
                and summary.get("malformed", -1) == 0
                and summary.get("received") == access_ok + gone == approved
                and 0 <= in_flight <= conns
                and gone <= conns
            )
            record["codes_ok"] = ok
            self.checks.append((name, ok,
                                f"bot received {summary.get('received')} codes "
                                f"({summary.get('distinct')} distinct, {summary.get('duplicates')} duplicates), "
                                f"Apache answered 200 {access_ok} times"
                                + (f" (and {gone} more to clients gone at wrk's deadline, 499)" if gone else "")
                                + f", relay logged approved {approved}, "
                                f"wrk counted {w['ok']} ({in_flight} in flight at its deadline)"))
        self.phases[phase] = record
        return record

    def relay_rss(self, apache, relay_pid=None):
        groups = Groups(apache.pid, apache.relay_exe(), relay_pid)
        rss = [vm_hwm_kib(pid) for pid in groups.members()["relay"]]
        rss = [r for r in rss if r]
        return {"count": len(rss), "max_kib": max(rss, default=0),
                "median_kib": statistics.median(rss) if rss else 0}

    # -- the whole comparison
    def loads(self):
        a, only = self.args, self.args.only
        if only & {"static", "fcgid", "fcgid-burst"}:
            # Static and mod_fcgid share one Apache (the static file next to the relay).
            fcgid = self.instance("fcgid", "fcgid").start()
            bot = Bot(self.bot_bin, self.bot_port, 0, self.rundir)
            static_path = self.success_page(fcgid)
            bot.stop()
            if "static" in only:
                self.load(Phase.STATIC, fcgid, static_path, 0, a.conns, a.duration)
            if "fcgid" in only:
                self.load(Phase.FCGID_INSTANT, fcgid, "/register", 0, a.conns, a.duration,
                          warmup=a.warmup)
                self.results.setdefault("fcgid_rss", {})["instant"] = self.relay_rss(fcgid)
            fcgid.stop()
            if "fcgid-burst" in only:
                # From cold: mod_fcgid has to spawn its processes meanwhile.
                fcgid.start()
                self.load(Phase.FCGID_BURST_COLD, fcgid, "/register", a.delay_ms, a.burst_conns,
                          a.duration)
                self.load(Phase.FCGID_BURST_WARM, fcgid, "/register", a.delay_ms, a.burst_conns,
                          a.duration)
                self.results.setdefault("fcgid_rss", {})["burst"] = self.relay_rss(fcgid)
            self.finished(fcgid)
        if "proxy" in only:
            proxy = self.instance("proxy", "proxy").start()
            self.load(Phase.PROXY_INSTANT, proxy, "/register", 0, a.conns, a.duration,
                      warmup=a.warmup, relay_pid=proxy.relay_pid())
            self.results.setdefault("proxy_rss", {})["instant"] = self.relay_rss(
                proxy, proxy.relay_pid())
            self.finished(proxy)
        for mode in MODES:
            if f"{mode}-unixbot" not in only:
                continue
            # The same load with the bot on a Unix socket: what the relay's
            # loopback TCP exchange with the bot costs (BENCHMARKS.md).
            inst = self.instance(mode, f"{mode}-unixbot", bot_unix=True).start()
            self.load(UNIXBOT[mode], inst, "/register", 0, a.conns,
                      a.duration, warmup=a.warmup, relay_pid=inst.relay_pid())
            self.finished(inst)
        for mode in MODES:
            if f"{mode}-disk" not in only:
                continue
            if a.state_dir is None:
                continue  # the main loads already had their stores on disk
            # The same load with the replay store on the disk, as in
            # /var/lib: on some file systems creating a file per code is
            # most of the relay's cost (BENCHMARKS.md).
            inst = self.instance(mode, f"{mode}-disk", state_parent=self.rundir / "disk").start()
            self.load(DISK[mode], inst, "/register", 0, a.conns,
                      a.duration, warmup=a.warmup, relay_pid=inst.relay_pid())
            self.finished(inst)
        if "nginx-2000" in only:
            self.nginx()
        if "proxy-burst" in only:
            # From cold too: the relay's threads start as they are needed.
            proxy = self.instance("proxy", "proxy-burst").start()
            self.load(Phase.PROXY_BURST_COLD, proxy, "/register", a.delay_ms, a.burst_conns,
                      a.duration, relay_pid=proxy.relay_pid())
            self.results.setdefault("proxy_rss", {})["burst"] = self.relay_rss(
                proxy, proxy.relay_pid())
            self.finished(proxy)

    def nginx(self):
        """nginx in front of one --listen relay (started with a soft limit
        of 1024 open files, as systemd starts it), the slow bot: a burst of
        --burst-conns connections, then NGINX_CONNS, each against a fresh
        relay so that its peak RSS is that load's."""
        a = self.args
        hard = raise_files_limit()
        if hard < NGINX_CONNS + 256:
            die(f"the hard limit on open files ({hard}) is too low for wrk -c {NGINX_CONNS}")
        for phase, conns, key in ((Phase.NGINX_BURST, a.burst_conns, "burst"),
                                  (Phase.NGINX_2000, NGINX_CONNS, "2000")):
            name = f"nginx-{key}"
            state = (a.state_dir / f"tourney-register-bench-{name}") if a.state_dir else self.rundir / name / "state"
            shutil.rmtree(state, ignore_errors=True)
            self.state_dirs.append(state)
            front = NginxFront(self.rundir / name, free_port(), self.relay_bin, self.bot_port, state,
                               conns, relay_env=a.relay_env)
            try:
                front.start()
                if key == "2000":
                    self.nginx_once(front)
                self.load(phase, front, "/register", a.delay_ms, conns, a.duration,
                          relay_pid=front.relay_pid())
                self.results.setdefault("nginx_rss", {})[key] = self.relay_rss(front, front.relay_pid())
                errors = read(front.error_log())
                self.checks.append((f"{phase.value}: nginx error log", "[error]" not in errors
                                    and "[crit]" not in errors and "[alert]" not in errors,
                                    f"{errors.count('[error]')} errors, {errors.count('[crit]')} critical, "
                                    f"{errors.count('[alert]')} alerts"))
            finally:
                front.stop()

    def nginx_once(self, front):
        """NGINX_CONNS sign-ups at the same moment, once each, before the
        sustained load on the same relay."""
        a = self.args
        bot = Bot(self.bot_bin, self.bot_port, a.delay_ms, self.rundir, threads=front.bot_threads)
        log(f"nginx: {NGINX_CONNS} sign-ups at once, bot {a.delay_ms} ms")
        once = one_shot(front.port, NGINX_CONNS, f"{CODE_PAD}{RUN_TAG}-once")
        settle([front.relay_log()])
        summary = bot.stop()
        once["codes_ok"] = (summary.get("received") == NGINX_CONNS and summary.get("duplicates") == 0
                            and summary.get("malformed") == 0)
        self.checks.append(("nginx 2000 at once", once["codes_ok"],
                            f"bot received {summary.get('received')} codes "
                            f"({summary.get('duplicates')} duplicates) from {NGINX_CONNS} players"))
        self.results["nginx_once"] = once

    def cgi(self):
        """Whole-process wall time of one CGI request, next to /bin/true."""
        a = self.args
        bot = Bot(self.bot_bin, self.bot_port, 0, self.rundir)
        state = (self.args.state_dir / "tourney-register-bench-cgi") if self.args.state_dir else self.rundir / "cgi-state"
        shutil.rmtree(state, ignore_errors=True)
        self.state_dirs.append(state)
        base_env = {
            "PATH": "/usr/bin:/bin",
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "",
            "REGISTER_BOT_ADDR": f"127.0.0.1:{self.bot_port}",
            "REGISTER_STATE_DIR": str(state),
            **a.relay_env,
        }
        devnull = os.open(os.devnull, os.O_RDWR)
        actions = [(os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, devnull, 1),
                   (os.POSIX_SPAWN_DUP2, devnull, 2)]
        true_bin = shutil.which("true") or "/bin/true"
        times = {"true": [], "cgi": []}

        def once(path, argv, env):
            t = time.perf_counter_ns()
            pid = os.posix_spawn(path, argv, env, file_actions=actions)
            _, status = os.waitpid(pid, 0)
            dt = time.perf_counter_ns() - t
            if os.waitstatus_to_exitcode(status) != 0:
                die(f"{argv[0]} exited {status}")
            return dt

        log(f"CGI: {a.cgi_runs} runs each of /bin/true and one CGI request, interleaved")
        for i in range(a.cgi_warmup + a.cgi_runs):
            env = dict(base_env, QUERY_STRING=f"code={CODE_PAD}{RUN_TAG}-cgi-{i}&state={STATE}")
            t_true = once(true_bin, [true_bin], base_env)
            t_cgi = once(str(self.relay_bin), [str(self.relay_bin)], env)
            if i >= a.cgi_warmup:
                times["true"].append(t_true)
                times["cgi"].append(t_cgi)
        os.close(devnull)
        summary = bot.stop()
        runs = a.cgi_warmup + a.cgi_runs
        ok = summary.get("received") == runs and summary.get("duplicates") == 0
        self.checks.append(("cgi", ok, f"bot received {summary.get('received')} codes for {runs} CGI runs"))

        def stats(xs):
            xs = sorted(xs)
            return {"median_us": statistics.median(xs) / 1000,
                    "p90_us": xs[int(len(xs) * 0.9)] / 1000,
                    "mean_us": statistics.fmean(xs) / 1000}
        self.results["cgi"] = {"true": stats(times["true"]), "cgi": stats(times["cgi"]),
                               "runs": a.cgi_runs}

    def syscalls(self):
        """System calls per request under strace, fd-0 and --listen, first
        delivery and replay (see syscalls.py)."""
        a = self.args
        bot = Bot(self.bot_bin, self.bot_port, 0, self.rundir)
        parent = a.state_dir or self.rundir
        out = {}
        for mode in MODES:
            state = parent / f"tourney-register-bench-syscalls-{mode}"
            self.state_dirs.append(state)
            out[mode] = syscalls.measure(self.relay_bin, mode, self.rundir, self.bot_port, state,
                                         f"{CODE_PAD}{RUN_TAG}-sys", STATE, a.syscall_requests)
        bot.stop()
        self.results["syscalls"] = {"requests": a.syscall_requests, **out}

    def spawn(self):
        """First answer after a fresh Apache start: a static file's, then
        /register's (which makes mod_fcgid spawn the first relay process)."""
        a = self.args
        bot = Bot(self.bot_bin, self.bot_port, 0, self.rundir)
        fcgid = self.instance("fcgid", "spawn")
        static_t, spawn_t, second_t = [], [], []
        log(f"spawn: {a.spawn_runs} fresh Apache starts")
        for i in range(a.spawn_runs):
            fcgid.start()
            (fcgid.dir / "htdocs" / "bench-static.html").write_bytes(
                b"x" * self.results.get("page_bytes", 1837))
            static_t.append(timed_get(fcgid.port, f"/bench-static.html?i={i}"))
            spawn_t.append(timed_get(fcgid.port, f"/register?code={CODE_PAD}{RUN_TAG}-spawn-{i}&state={STATE}"))
            second_t.append(timed_get(fcgid.port, f"/register?code={CODE_PAD}{RUN_TAG}-spawn2-{i}&state={STATE}"))
            fcgid.stop()
        bot.stop()
        self.results["spawn"] = {
            "static_first_ms": statistics.median(static_t) * 1000,
            "spawn_first_ms": statistics.median(spawn_t) * 1000,
            "second_ms": statistics.median(second_t) * 1000,
            "runs": a.spawn_runs,
            "all_static_ms": [round(x * 1000, 2) for x in static_t],
            "all_spawn_ms": [round(x * 1000, 2) for x in spawn_t],
        }
