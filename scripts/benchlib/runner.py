"""Runs the loads, the CGI runs and the fresh-spawn runs, and records what
each measured: Bench.phases (one record per load, keyed by its Phase),
Bench.results and Bench.checks. Judging the figures is the targets' job.

With --baseline-bin every relay part runs twice, once for each build, back
to back in the same run (the CGI runs and the fresh starts alternate run by
run): the baseline's records go to Bench.baseline.phases and
Bench.baseline.results, next to the current build's, and only the current
build is judged by the targets."""

import http.client
import os
import shutil
import statistics
import subprocess
import time

from . import syscalls
from .common import REPO, die, free_port, log, read, run, size, tail_from, tmpfs_dir
from .phases import DISK, MODES, NGINX_CONNS, UNIXBOT, Phase, phases_of
from .sampling import Groups, cpu_delta, cpu_totals, time_wait_sockets, vm_hwm_kib
from .services import (CODE_PAD, RUN_TAG, STATE, WRK_LUA, Apache, Bot, NginxFront, count_access,
                       count_gone, count_outcomes, one_shot, raise_files_limit, settle, timed_get,
                       wrk)


class Build:
    """One relay binary a run measures, and what each of its parts measured."""

    def __init__(self, name, relay_bin):
        self.name = name  # "current" or "baseline"
        self.relay_bin = relay_bin  # the snapshot the run uses
        self.phases = {}  # Phase -> what its load measured, in run order
        self.results = {}

    @property
    def suffix(self):
        """Appended to what a run names after the build (instances, code
        prefixes, files): nothing for the current build."""
        return "" if self.name == "current" else f"-{self.name}"

    @property
    def label(self):
        """Appended to a load's name in the report and the code checks."""
        return "" if self.name == "current" else f", {self.name}"


class Bench:
    def __init__(self, args):
        self.args = args
        self.out_dir = REPO / "target" / "bench"
        self.rundir = self.out_dir / "run"
        self.current = Build("current", None)
        # The current build's records: what the targets and the report read.
        self.results = self.current.results
        self.phases = self.current.phases
        self.baseline = None  # a Build when --baseline-bin is given
        self.checks = []
        self.state_dirs = []
        # Which build runs first in the next relay part: it alternates, so
        # what drifts during a run (TIME_WAIT sockets, other people's
        # work) does not always favour the same build.
        self._baseline_first = False

    def builds(self):
        """The builds to run a relay part for, in this part's order."""
        if not self.baseline:
            return [self.current]
        pair = [self.baseline, self.current] if self._baseline_first else [self.current, self.baseline]
        self._baseline_first = not self._baseline_first
        return pair

    # -- setup
    def build(self):
        if not self.args.no_build:
            log("building release binaries")
            # The relay as it ships (linked statically on glibc Linux).
            run([str(REPO / "scripts" / "build-release"), "--quiet"], cwd=REPO, timeout=1800,
                stdout=subprocess.DEVNULL)
            run(["cargo", "build", "--release", "--quiet", "--example", "bench_bot"], cwd=REPO,
                timeout=1800)
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
        shutil.copy2(self.args.relay_bin or REPO / "target" / "dist" / "tourney-register",
                     self.relay_bin)
        self.current.relay_bin = self.relay_bin
        if self.args.baseline_bin:
            # In a directory of its own: Apache's process groups are told
            # apart by their executable's path.
            (self.rundir / "bin" / "baseline").mkdir(mode=0o755)
            self.baseline = Build("baseline", self.rundir / "bin" / "baseline" / "tourney-register")
            shutil.copy2(self.args.baseline_bin, self.baseline.relay_bin)
        shutil.copy2(REPO / "target" / "release" / "examples" / "bench_bot", self.bot_bin)
        self.lua = self.rundir / "codes.lua"
        self.lua.write_text(WRK_LUA)
        self.bot_port = free_port()

    def instance(self, mode, name, state_parent=None, bot_unix=False, build=None):
        build = build or self.current
        name += build.suffix
        d = self.rundir / name
        state_parent = state_parent or self.args.state_dir
        state = (state_parent / f"tourney-register-bench-{name}") if state_parent else d / "state"
        # A store left by an interrupted run would replay its answers.
        shutil.rmtree(state, ignore_errors=True)
        self.state_dirs.append(state)
        return Apache(d, free_port(), mode, build.relay_bin, self.bot_port, state,
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
    def load(self, phase, apache, path, delay_ms, conns, duration, warmup=0, relay_pid=None,
             build=None):
        # Only the loads phases.PARTS declares for the parts asked for: what
        # the targets were checked against at start.
        if phase not in phases_of(self.args.only):
            raise ValueError(f"load {phase!r} is not in phases.PARTS for --only {sorted(self.args.only)}")
        build = build or self.current
        name = phase.value + build.label
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
        build.phases[phase] = record
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
        if only & {"fcgid", "fcgid-burst"}:
            for build in self.builds():
                self.fcgid_loads(build)
        elif "static" in only:
            self.fcgid_loads(self.current)
        if "proxy" in only:
            for build in self.builds():
                # mod_proxy_fcgi to a --listen relay.
                proxy = self.instance("proxy", "proxy", build=build).start()
                self.load(Phase.PROXY_INSTANT, proxy, "/register", 0, a.conns, a.duration,
                          warmup=a.warmup, relay_pid=proxy.relay_pid(), build=build)
                build.results.setdefault("proxy_rss", {})["instant"] = self.relay_rss(
                    proxy, proxy.relay_pid())
                self.finished(proxy)
        for mode in MODES:
            if f"{mode}-unixbot" not in only:
                continue
            # The same load with the bot on a Unix socket: what the relay's
            # loopback TCP exchange with the bot costs (BENCHMARKS.md).
            for build in self.builds():
                inst = self.instance(mode, f"{mode}-unixbot", bot_unix=True, build=build).start()
                self.load(UNIXBOT[mode], inst, "/register", 0, a.conns,
                          a.duration, warmup=a.warmup, relay_pid=inst.relay_pid(), build=build)
                self.finished(inst)
        for mode in MODES:
            if f"{mode}-disk" not in only:
                continue
            if a.state_dir is None:
                continue  # the main loads already had their stores on disk
            # The same load with the replay store on the disk, as in
            # /var/lib: on some file systems creating a file per code is
            # most of the relay's cost (BENCHMARKS.md).
            for build in self.builds():
                inst = self.instance(mode, f"{mode}-disk", state_parent=self.rundir / "disk",
                                     build=build).start()
                self.load(DISK[mode], inst, "/register", 0, a.conns,
                          a.duration, warmup=a.warmup, relay_pid=inst.relay_pid(), build=build)
                self.finished(inst)
        if "nginx-2000" in only:
            # The current build only: the event loop is what it measures.
            self.nginx()
        if "proxy-burst" in only:
            for build in self.builds():
                # From cold too: the relay's threads start as they are needed.
                proxy = self.instance("proxy", "proxy-burst", build=build).start()
                self.load(Phase.PROXY_BURST_COLD, proxy, "/register", a.delay_ms, a.burst_conns,
                          a.duration, relay_pid=proxy.relay_pid(), build=build)
                build.results.setdefault("proxy_rss", {})["burst"] = self.relay_rss(
                    proxy, proxy.relay_pid())
                self.finished(proxy)

    def fcgid_loads(self, build):
        """Static (once, the current build's Apache) and the mod_fcgid loads."""
        a, only = self.args, self.args.only
        # Static and mod_fcgid share one Apache (the static file next to the relay).
        fcgid = self.instance("fcgid", "fcgid", build=build).start()
        if build is self.current:
            bot = Bot(self.bot_bin, self.bot_port, 0, self.rundir)
            static_path = self.success_page(fcgid)
            bot.stop()
            if "static" in only:
                self.load(Phase.STATIC, fcgid, static_path, 0, a.conns, a.duration)
        if "fcgid" in only:
            self.load(Phase.FCGID_INSTANT, fcgid, "/register", 0, a.conns, a.duration,
                      warmup=a.warmup, build=build)
            build.results.setdefault("fcgid_rss", {})["instant"] = self.relay_rss(fcgid)
        fcgid.stop()
        if "fcgid-burst" in only:
            # From cold: mod_fcgid has to spawn its processes meanwhile.
            fcgid.start()
            self.load(Phase.FCGID_BURST_COLD, fcgid, "/register", a.delay_ms, a.burst_conns,
                      a.duration, build=build)
            self.load(Phase.FCGID_BURST_WARM, fcgid, "/register", a.delay_ms, a.burst_conns,
                      a.duration, build=build)
            build.results.setdefault("fcgid_rss", {})["burst"] = self.relay_rss(fcgid)
        self.finished(fcgid)

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
        """Whole-process wall time of one CGI request, next to /bin/true;
        with a baseline, its request too, in the same rounds."""
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
        builds = [self.current] + ([self.baseline] if self.baseline else [])
        times = {"true": [], **{b.name: [] for b in builds}}
        faults = {name: [] for name in times}

        def once(path, argv, env):
            t = time.perf_counter_ns()
            pid = os.posix_spawn(path, argv, env, file_actions=actions)
            _, status, usage = os.wait4(pid, 0)
            dt = time.perf_counter_ns() - t
            if os.waitstatus_to_exitcode(status) != 0:
                die(f"{argv[0]} exited {status}")
            return dt, usage.ru_minflt + usage.ru_majflt

        log(f"CGI: {a.cgi_runs} runs each of /bin/true and one CGI request"
            f"{' of each build' if self.baseline else ''}, interleaved")
        contenders = [None, *builds]  # None: /bin/true
        for i in range(a.cgi_warmup + a.cgi_runs):
            # Each round runs /bin/true and every build once, in an order
            # that rotates round by round: a process pays for what the one
            # before it left behind (its exit, the caches), and by as much as
            # a build's whole difference to /bin/true.
            k = i % len(contenders)
            round_times = {}
            for build in contenders[k:] + contenders[:k]:
                if build is None:
                    round_times["true"] = once(true_bin, [true_bin], base_env)
                    continue
                env = dict(base_env,
                           QUERY_STRING=f"code={CODE_PAD}{RUN_TAG}-cgi{build.suffix}-{i}&state={STATE}")
                round_times[build.name] = once(str(build.relay_bin), [str(build.relay_bin)], env)
            if i >= a.cgi_warmup:
                for name, (dt, flt) in round_times.items():
                    times[name].append(dt)
                    faults[name].append(flt)
        os.close(devnull)
        # Once more each under strace: what a request asks of the kernel.
        calls = {"true": syscalls.whole_process([true_bin], base_env, self.rundir, "true")}
        for build in builds:
            env = dict(base_env,
                       QUERY_STRING=f"code={CODE_PAD}{RUN_TAG}-cgi{build.suffix}-strace&state={STATE}")
            calls[build.name] = syscalls.whole_process([str(build.relay_bin)], env, self.rundir,
                                                       f"cgi-{build.name}")
        summary = bot.stop()
        runs = (a.cgi_warmup + a.cgi_runs + 1) * len(builds)
        ok = summary.get("received") == runs and summary.get("duplicates") == 0
        self.checks.append(("cgi", ok, f"bot received {summary.get('received')} codes for {runs} CGI runs"))

        def stats(name):
            xs = sorted(times[name])
            return {"median_us": statistics.median(xs) / 1000,
                    "p90_us": xs[int(len(xs) * 0.9)] / 1000,
                    "mean_us": statistics.fmean(xs) / 1000,
                    "page_faults": statistics.median(faults[name]),
                    "syscalls": calls[name]}
        for build in builds:
            build.results["cgi"] = {"true": stats("true"), "cgi": stats(build.name),
                                    "runs": a.cgi_runs}

    def syscalls(self):
        """System calls per request under strace, fd-0 and --listen, first
        delivery and replay (see syscalls.py)."""
        a = self.args
        bot = Bot(self.bot_bin, self.bot_port, 0, self.rundir)
        parent = a.state_dir or self.rundir
        for mode in MODES:
            for build in self.builds():
                state = parent / f"tourney-register-bench-syscalls-{mode}{build.suffix}"
                self.state_dirs.append(state)
                build.results.setdefault("syscalls", {"requests": a.syscall_requests})[mode] = (
                    syscalls.measure(build.relay_bin, mode, self.rundir, self.bot_port, state,
                                     f"{CODE_PAD}{RUN_TAG}-sys{build.suffix}", STATE,
                                     a.syscall_requests, name=build.name))
        bot.stop()

    def spawn(self):
        """First answer after a fresh Apache start: a static file's, then
        /register's (which makes mod_fcgid start the first relay process);
        with a baseline, its Apache's starts alternate with the current's."""
        a = self.args
        bot = Bot(self.bot_bin, self.bot_port, 0, self.rundir)
        builds = [self.current] + ([self.baseline] if self.baseline else [])
        instances = {b.name: self.instance("fcgid", "spawn", build=b) for b in builds}
        times = {b.name: ([], [], []) for b in builds}
        log(f"spawn: {a.spawn_runs} fresh Apache starts" + (" per build" if self.baseline else ""))
        for i in range(a.spawn_runs):
            for build in (builds if i % 2 == 0 else builds[::-1]):
                fcgid = instances[build.name]
                static_t, spawn_t, second_t = times[build.name]
                code = f"{CODE_PAD}{RUN_TAG}{build.suffix}"
                fcgid.start()
                (fcgid.dir / "htdocs" / "bench-static.html").write_bytes(
                    b"x" * self.results.get("page_bytes", 1837))
                static_t.append(timed_get(fcgid.port, f"/bench-static.html?i={i}"))
                spawn_t.append(timed_get(fcgid.port, f"/register?code={code}-spawn-{i}&state={STATE}"))
                second_t.append(timed_get(fcgid.port, f"/register?code={code}-spawn2-{i}&state={STATE}"))
                fcgid.stop()
        bot.stop()
        for build in builds:
            static_t, spawn_t, second_t = times[build.name]
            build.results["spawn"] = {
                "static_first_ms": statistics.median(static_t) * 1000,
                "spawn_first_ms": statistics.median(spawn_t) * 1000,
                "second_ms": statistics.median(second_t) * 1000,
                "runs": a.spawn_runs,
                "all_static_ms": [round(x * 1000, 2) for x in static_t],
                "all_spawn_ms": [round(x * 1000, 2) for x in spawn_t],
            }
