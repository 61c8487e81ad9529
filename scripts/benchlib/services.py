"""The processes a load runs against: the bench bot, a private Apache (with
the relay under mod_fcgid or --listen behind mod_proxy_fcgi), and wrk."""

import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from .common import INSTANCE, REPO, die, read, size, tail_from

# A realistic osu! code (about 1 KB, as Passport issues them) and Fernet state.
CODE_PAD = ("def50200" + "0123456789abcdef" * 60)[:960]
STATE = "gAAAAABnR2VhdGVzdF9zdGF0ZV9mb3JfYmVuY2htYXJraW5nX3B1cnBvc2VzX29ubHlfMDEyMzQ1Njc4OWFiY2RlZmdoaWprbG1ub3BxcnN0dXZ3eHl6%3D%3D"

WRK_LUA = r"""
-- Distinct codes: each wrk thread has an id and a counter.
local threads = {}
local counter = 0
function setup(thread)
  thread:set("tid", #threads + 1)
  table.insert(threads, thread)
end
function init(args)
  base = args[1] .. "?code=" .. args[2] .. "-" .. tid .. "-"
  tail = "&state=" .. args[3]
  -- "close": every request on a new connection, as each player's browser.
  headers = {}
  if args[4] == "close" then headers["Connection"] = "close" end
end
function request()
  counter = counter + 1
  return wrk.format("GET", base .. counter .. tail, headers)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""


class Bot:
    live = set()

    def __init__(self, binary, port, delay_ms, rundir, unix=None, threads=None):
        """A bench_bot on 127.0.0.1:port, or on the Unix socket `unix`;
        `threads`: connections it serves at once (its default otherwise)."""
        self.summary_path = rundir / f"bot-{port}-{delay_ms}-{time.monotonic_ns()}.json"
        self.errlog = open(rundir / "bot.log", "ab")
        where = ["--unix", str(unix)] if unix else ["--addr", f"127.0.0.1:{port}"]
        self.proc = subprocess.Popen(
            [str(binary), *where, "--delay-ms", str(delay_ms), "--summary", str(self.summary_path),
             *(["--threads", str(threads)] if threads else [])],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self.errlog,
        )
        Bot.live.add(self)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if unix:
                    with socket.socket(socket.AF_UNIX) as probe:
                        probe.settimeout(0.2)
                        probe.connect(str(unix))
                    # Relays under mod_fcgid run as Apache's user.
                    os.chmod(unix, 0o666)
                else:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if self.proc.poll() is not None:
                    die(f"bench_bot exited ({self.proc.returncode}); see {rundir / 'bot.log'}")
                time.sleep(0.02)
        else:
            die("bench_bot did not start listening")
        # The probe connection above sent nothing: it is counted as malformed.
        self.probes = 1

    def stop(self):
        Bot.live.discard(self)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            die("bench_bot did not stop on SIGTERM")
        self.errlog.close()
        summary = json.loads(read(self.summary_path) or "{}")
        summary["malformed"] = summary.get("malformed", 0) - self.probes
        return summary


class Apache:
    """One private Apache from scripts/apache-instance."""

    live = set()

    def __init__(self, d, port, mode, binary, bot_port, state, relay_env=None, bot_unix=None):
        self.dir, self.port, self.mode = d, port, mode
        self.binary, self.state, self.bot_unix = binary, state, bot_unix
        self.bot_addr = f"unix:{bot_unix}" if bot_unix else f"127.0.0.1:{bot_port}"
        self.args = [
            "--port", str(port), "--mode", mode, "--bin", str(binary),
            "--bot-addr", self.bot_addr,
            "--state-dir", str(state),
        ]
        # apache-instance starts a --listen relay with only the REGISTER_*
        # variables; with extra ones (--relay-env) the relay is started
        # here and apache-instance is pointed at its socket.
        self.relay_env = relay_env if mode == "proxy" else None
        self.backend = None
        if mode == "proxy" and not self.relay_env:
            self.args.append("--backend-start")
        elif mode == "proxy":
            self.args += ["--backend", f"unix:{self.dir / 'run' / 'fcgi.sock'}"]
        self.pid = None

    def start(self):
        if self.relay_env:
            self.start_backend()
        out = subprocess.run([sys.executable, str(INSTANCE), "start", str(self.dir), *self.args],
                             capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            die(f"apache-instance start {self.dir} failed ({out.returncode}):\n{out.stderr}")
        self.pid = int(out.stdout.strip().splitlines()[-1])
        Apache.live.add(self)
        return self

    def start_backend(self):
        for sub in ("run", "logs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        sock = self.dir / "run" / "fcgi.sock"
        relay_log = self.dir / "logs" / "relay.log"
        env = {"PATH": "/usr/bin:/bin", "REGISTER_BOT_ADDR": self.bot_addr,
               "REGISTER_STATE_DIR": str(self.state), **self.relay_env}
        offset = size(relay_log)
        with open(relay_log, "ab") as out:
            self.backend = subprocess.Popen(
                [str(self.binary), "--listen", f"unix:{sock}"], env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + 15
        while "listening on" not in tail_from(relay_log, offset):
            if self.backend.poll() is not None or time.monotonic() > deadline:
                die(f"the --listen relay did not start:\n{tail_from(relay_log, offset)}")
            time.sleep(0.05)
        # Apache's children (www-data) connect to it.
        os.chmod(sock, 0o666)

    def stop(self):
        Apache.live.discard(self)
        subprocess.run([sys.executable, str(INSTANCE), "stop", str(self.dir)],
                       capture_output=True, timeout=60)
        self.pid = None
        if self.backend:
            self.backend.terminate()
            try:
                self.backend.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.backend.kill()
                self.backend.wait()
            self.backend = None

    def relay_pid(self):
        if self.mode != "proxy":
            return None
        if self.backend:
            return self.backend.pid
        try:
            return int(read(self.dir / "run" / "relay.pid").strip())
        except ValueError:
            return None

    def relay_exe(self):
        # apache-instance may run a copy of the binary (DIR/bin) that
        # Apache's user can reach; whichever it is, it is the one in the
        # Define line of the generated configuration.
        m = re.search(r'^Define TOURNEY_REGISTER_BIN "(.*)"$', read(self.dir / "httpd.conf"), re.M)
        return Path(m.group(1)) if m else None

    def relay_log(self):
        return self.dir / "logs" / ("relay.log" if self.mode == "proxy" else "error.log")

    def access_log(self):
        return self.dir / "logs" / "access.log"


class NginxFront:
    """A private nginx (its own prefix, configuration and logs under `d`)
    in front of one --listen relay, through the shipped snippet
    apache/nginx-tourney-register.conf with only its fastcgi_pass pointed
    at the relay's socket. The relay starts as systemd starts a service:
    with a soft limit of 1024 open files, and no variable but the bot's
    address and the store. Offers what a load needs of an Apache."""

    SHIPPED_PASS = "fastcgi_pass unix:/run/tourney-register/fcgi.sock;"

    def __init__(self, d, port, binary, bot_port, state, conns, relay_env=None):
        self.dir, self.port, self.binary, self.state = d, port, binary, state
        self.bot_addr = f"127.0.0.1:{bot_port}"
        self.bot_unix = None
        self.conns = conns
        # The bench bot serves this many connections at once: all of them.
        self.bot_threads = conns + 64
        self.relay_env = relay_env or {}
        self.pid = None
        self.nginx = self.backend = None

    def start(self):
        for sub in ("run", "logs", "tmp"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.start_relay()
        snippet = (REPO / "apache" / "nginx-tourney-register.conf").read_text()
        if self.SHIPPED_PASS not in snippet:
            die("the shipped nginx snippet no longer passes to the packaged socket")
        (self.dir / "tourney-register.conf").write_text(
            snippet.replace(self.SHIPPED_PASS, f"fastcgi_pass unix:{self.sock};"))
        tmp, logs = self.dir / "tmp", self.dir / "logs"
        # As root nginx's workers would be nobody's; the relay's socket is
        # open to all (0666) anyway.
        user = "user root root;\n" if os.geteuid() == 0 else ""
        (self.dir / "nginx.conf").write_text(
            f"{user}worker_processes auto;\n"
            f"worker_rlimit_nofile {4 * self.conns + 512};\n"
            f"pid {self.dir}/run/nginx.pid;\n"
            f"error_log {logs}/error.log;\n"
            # A client holds two connections (its own and one to the
            # relay); short of about 2.1 each nginx closes some unanswered.
            f"events {{ worker_connections {3 * self.conns + 256}; }}\n"
            "http {\n"
            f"  access_log {logs}/access.log;\n"
            f"  client_body_temp_path {tmp}/body;\n  fastcgi_temp_path {tmp}/fastcgi;\n"
            f"  proxy_temp_path {tmp}/proxy;\n  uwsgi_temp_path {tmp}/uwsgi;\n"
            f"  scgi_temp_path {tmp}/scgi;\n"
            f"  server {{\n    listen 127.0.0.1:{self.port} backlog=4096;\n    server_name localhost;\n"
            f"    include {self.dir}/tourney-register.conf;\n  }}\n"
            "}\n")
        nginx = shutil.which("nginx") or "/usr/sbin/nginx"
        self.nginx = subprocess.Popen(
            [nginx, "-p", str(self.dir), "-e", str(logs / "error.log"), "-c", str(self.dir / "nginx.conf"),
             "-g", "daemon off;"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # Its own group, so that its workers go with it on a kill.
            start_new_session=True)
        self.pid = self.nginx.pid
        NginxFront.live.add(self)
        deadline = time.monotonic() + 15
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                break
            except OSError:
                if self.nginx.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    die(f"nginx did not start:\n{read(logs / 'error.log')}")
                time.sleep(0.05)
        return self

    live = set()

    def start_relay(self):
        self.sock = self.dir / "run" / "fcgi.sock"
        relay_log = self.relay_log()
        env = {"PATH": "/usr/bin:/bin", "REGISTER_BOT_ADDR": self.bot_addr,
               "REGISTER_STATE_DIR": str(self.state), **self.relay_env}
        offset = size(relay_log)

        def as_a_service():
            _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, hard), hard))

        with open(relay_log, "ab") as out:
            self.backend = subprocess.Popen(
                [str(self.binary), "--listen", f"unix:{self.sock}"], env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                preexec_fn=as_a_service)
        deadline = time.monotonic() + 15
        while "listening on" not in tail_from(relay_log, offset):
            if self.backend.poll() is not None or time.monotonic() > deadline:
                die(f"the --listen relay did not start:\n{tail_from(relay_log, offset)}")
            time.sleep(0.05)
        os.chmod(self.sock, 0o666)

    def stop(self):
        NginxFront.live.discard(self)
        for proc in (self.nginx, self.backend):
            if proc and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    # The whole group: nginx's master killed alone would
                    # leave its workers running.
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait()
        self.nginx = self.backend = None
        self.pid = None

    def relay_pid(self):
        return self.backend.pid if self.backend else None

    def relay_exe(self):
        return self.binary

    def relay_log(self):
        return self.dir / "logs" / "relay.log"

    def access_log(self):
        return self.dir / "logs" / "access.log"

    def error_log(self):
        return self.dir / "logs" / "error.log"


def one_shot(port, n, code_prefix, timeout=30):
    """n players at the same moment, each one GET /register with a code of
    its own on a connection of its own, once (wrk keeps its connections
    busy instead). The connections are opened first (a Python client
    opening 2000 takes most of a second itself), then every request is
    sent at once; the latency of each is from its request to the end of
    its answer. An error is anything but a 200 success page."""
    import asyncio

    async def player(i, start):
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", port), timeout)
        except (OSError, asyncio.TimeoutError):
            await start.wait()
            return 0.0, False
        await start.wait()
        t = time.perf_counter()
        try:
            writer.write(f"GET /register?code={code_prefix}-{i}&state={STATE} HTTP/1.1\r\n"
                         "Host: localhost\r\nConnection: close\r\n\r\n".encode())
            await asyncio.wait_for(writer.drain(), timeout)
            data = await asyncio.wait_for(reader.read(), timeout)
            writer.close()
            ok = data.startswith(b"HTTP/1.1 200") and b"Success" in data
        except (OSError, asyncio.TimeoutError):
            ok = False
        return time.perf_counter() - t, ok

    async def burst():
        start = asyncio.Event()
        tasks = [asyncio.create_task(player(i, start)) for i in range(n)]
        # Until every connection is open (bounded).
        for _ in range(100):
            await asyncio.sleep(0.1)
            if len(_open_to(port)) >= n:
                break
        start.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(burst())
    times = sorted(t for t, _ in results)
    return {"requests": n, "errors": sum(1 for _, ok in results if not ok),
            "p50_us": times[len(times) // 2] * 1e6, "p99_us": times[int(len(times) * 0.99)] * 1e6,
            "max_us": times[-1] * 1e6}


def _open_to(port):
    """Established TCP connections to 127.0.0.1:port, from /proc."""
    hex_port = f":{port:04X}"
    found = set()
    for line in read("/proc/net/tcp").splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and f[1].endswith(hex_port) and f[3] == "01":
            found.add(f[2])
    return found


def raise_files_limit():
    """This process's soft limit on open files to its hard limit, for the
    wrk it starts (one descriptor per connection)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


RUN_TAG = f"{os.getpid():x}{int(time.time()) % 100000:x}"


def wrk(url_path, prefix, conns, threads, duration, timeout, port, lua, rundir, close=False):
    prefix = re.sub(r"[^A-Za-z0-9]+", "-", prefix)
    out_path = rundir / f"wrk-{prefix}.out"
    cmd = [
        "wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", f"--timeout={timeout}s",
        "--latency", "-s", str(lua), f"http://127.0.0.1:{port}/",
        "--", url_path, CODE_PAD + RUN_TAG + "-" + prefix, STATE, "close" if close else "keep-alive",
    ]
    with open(out_path, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + duration + timeout + 30
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                proc.kill()
                pid, status, usage = os.wait4(proc.pid, 0)
                die(f"wrk did not finish in time: {cmd}")
            time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = read(out_path)
    m = re.search(r"^WRKJSON (\{.*\})$", text, re.M)
    if proc.returncode != 0 or not m:
        die(f"wrk failed ({proc.returncode}):\n{text}")
    result = json.loads(m.group(1))
    result["cpu_ns"] = int((usage.ru_utime + usage.ru_stime) * 1e9)
    result["rps"] = result["requests"] / (result["duration_us"] / 1e6)
    result["socket_errors"] = sum(result[k] for k in ("connect", "read", "write", "timeout"))
    result["ok"] = result["requests"] - result["status"]
    return result


def settle(paths, limit=40.0, quiet=1.0):
    """Waits until none of `paths` has grown for `quiet` seconds (requests
    wrk left in flight at its deadline finishing), at most `limit`."""
    deadline = time.monotonic() + limit
    last = [size(p) for p in paths]
    still_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = [size(p) for p in paths]
        if now != last:
            last, still_since = now, time.monotonic()
        elif time.monotonic() - still_since >= quiet:
            return True
    return False


ACCESS_RE = re.compile(r'"(\S+) (\S+) [^"]*" (\d{3}) ')


def count_access(text, path_prefix):
    ok = other = 0
    for m in ACCESS_RE.finditer(text):
        if not m.group(2).startswith(path_prefix):
            continue
        if m.group(3).startswith("2"):
            ok += 1
        else:
            other += 1
    return ok, other


def count_gone(text, path_prefix):
    """Requests nginx logged 499: the client left before the answer (wrk
    closing its connections at its deadline). nginx hands the relay's
    answer to no one then, where Apache logs it as served."""
    return sum(1 for m in ACCESS_RE.finditer(text)
               if m.group(2).startswith(path_prefix) and m.group(3) == "499")


def count_outcomes(text):
    counts = {}
    for m in re.finditer(r"outcome=(\S+) status=", text):
        counts[m.group(1)] = counts.get(m.group(1), 0) + 1
    return counts


def timed_get(port, path):
    """Seconds from connect to the whole answer of one GET (Connection: close)."""
    t = time.perf_counter()
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    dt = time.perf_counter() - t
    if not data.startswith(b"HTTP/1.1 200"):
        die(f"GET {path[:40]}...: {data[:80]!r}")
    return dt
