"""System calls per request, counted under strace over a fixed load.

A count does not depend on the machine or its load, unlike a time. The
relay is run under `strace -f -yy` three times over one connection per
request (as mod_fcgid and mod_proxy_fcgi connect): a few warm-up requests;
the same plus N first deliveries (distinct codes); the same plus the same N
codes again (replayed answers). Differences between the runs divided by N
are the calls per request, so start and stop cancel out. Calls on a file
in the replay store (strace -yy names each descriptor's file) are counted
apart, as "store"; so are the calls on the connection to the bot."""

import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections import Counter

from .common import die, log, read

WARMUP = 5
# strace -f -o: "PID  name(args...) = result"; "<... name resumed>" is the
# end of a call already counted at its start.
CALL = re.compile(r"^\d+\s+([a-z0-9_]+)\(")

BEGIN_REQUEST, END_REQUEST, PARAMS, STDIN, STDOUT = 1, 3, 4, 5, 6


def _record(kind, content, request_id=1):
    pad = -len(content) % 8
    return struct.pack(">BBHHBB", 1, kind, request_id, len(content), pad, 0) + content + b"\0" * pad


def _pair(name, value):
    def length(n):
        return bytes([n]) if n < 128 else struct.pack(">I", n | 0x80000000)
    return length(len(name)) + length(len(value)) + name + value


def fastcgi_get(sock_path, query, timeout=10):
    """One GET over a fresh Unix connection (keep_conn off, as the web
    servers send it); returns the CGI response's bytes."""
    params = b"".join(_pair(k, v) for k, v in (
        (b"REQUEST_METHOD", b"GET"), (b"QUERY_STRING", query.encode()),
        (b"SCRIPT_NAME", b"/register"), (b"SERVER_PROTOCOL", b"HTTP/1.1"),
        (b"HTTP_HOST", b"localhost"), (b"REMOTE_ADDR", b"127.0.0.1")))
    msg = (_record(BEGIN_REQUEST, struct.pack(">HB5x", 1, 0)) + _record(PARAMS, params)
           + _record(PARAMS, b"") + _record(STDIN, b""))
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        s.sendall(msg)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    out, pos = b"", 0
    while pos + 8 <= len(data):
        _, kind, _, clen, pad, _ = struct.unpack(">BBHHBB", data[pos:pos + 8])
        if kind == STDOUT:
            out += data[pos + 8:pos + 8 + clen]
        pos += 8 + clen + pad
    return out


def _trace(relay_bin, mode, env, rundir, name, queries):
    """Runs the relay under strace over `queries`; returns the trace's lines."""
    sock_path = rundir / f"{name}.sock"
    trace = rundir / f"{name}.strace"
    for p in (sock_path, trace):
        if p.exists():
            p.unlink()
    stdin = subprocess.DEVNULL
    argv = [str(relay_bin)]
    listener = None
    if mode == "fcgid":
        # What mod_fcgid and spawn-fcgi hand over: a listening Unix socket as fd 0.
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(sock_path))
        listener.listen(64)
        stdin = listener.fileno()
    else:
        argv += ["--listen", f"unix:{sock_path}"]
    proc = subprocess.Popen(["strace", "-f", "-qq", "-yy", "-s", "0", "-o", str(trace), *argv],
                            env=env, stdin=stdin, stdout=subprocess.DEVNULL,
                            stderr=open(rundir / f"{name}.log", "wb"))
    if listener:
        listener.close()
    try:
        deadline = time.monotonic() + 20
        while not sock_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        for q in queries:
            body = fastcgi_get(sock_path, q)
            if b"Status: 200" not in body and b"200 OK" not in body and b"Success" not in body:
                die(f"syscalls: the relay did not answer {q!r} with the success page: {body[:200]!r}")
    finally:
        # SIGTERM to the relay (strace's child): its graceful stop, then strace ends.
        children = read(f"/proc/{proc.pid}/task/{proc.pid}/children").split()
        for child in children:
            os.kill(int(child), signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return read(trace).splitlines()


def _count(lines, store_dir, bot_port):
    """Calls by name, with those on the store's files and on the bot's
    connection also counted under 'store' and 'bot'."""
    total, store, bot = Counter(), Counter(), Counter()
    bot_mark = f":{bot_port}]"
    for line in lines:
        m = CALL.match(line)
        if not m:
            continue
        name = m.group(1)
        total[name] += 1
        if str(store_dir) in line:
            store[name] += 1
        elif bot_mark in line:
            bot[name] += 1
    return total, store, bot


def _per_request(after, before, n):
    return {k: round((after[k] - before[k]) / n, 2) for k in sorted(set(after) | set(before))
            if after[k] != before[k]}


def measure(relay_bin, mode, rundir, bot_port, state_dir, code_prefix, state, n, name="current"):
    """Calls per request for a first delivery and a replay in `mode`
    ("fcgid": fd 0; "proxy": --listen); `name` tells the builds' traces apart."""
    env = {"PATH": "/usr/bin:/bin", "REGISTER_BOT_ADDR": f"127.0.0.1:{bot_port}",
           "REGISTER_STATE_DIR": str(state_dir)}
    warm = [f"code={code_prefix}-{mode}-w{i}&state={state}" for i in range(WARMUP)]
    first = [f"code={code_prefix}-{mode}-{i}&state={state}" for i in range(n)]
    runs = []
    for i, queries in enumerate((warm, warm + first, warm + first + first)):
        # Each run starts from an empty store: the first N are first deliveries.
        shutil.rmtree(state_dir, ignore_errors=True)
        code_run = [q.replace(code_prefix, f"{code_prefix}r{i}") for q in queries]
        runs.append(_count(_trace(relay_bin, mode, env, rundir, f"sys-{name}-{mode}-{i}", code_run),
                           state_dir, bot_port))
    out = {}
    for key, (a, b) in (("first", (runs[1], runs[0])), ("replay", (runs[2], runs[1]))):
        total = _per_request(a[0], b[0], n)
        out[key] = {"total": round(sum(total.values()), 2), "calls": total,
                    "store": _per_request(a[1], b[1], n), "bot": _per_request(a[2], b[2], n)}
        out[key]["store_total"] = round(sum(out[key]["store"].values()), 2)
    log(f"syscalls {mode}, {name}: {out['first']['total']} per first delivery, "
        f"{out['replay']['total']} per replay")
    return out


def whole_process(argv, env, rundir, name):
    """Every system call of one whole process (a CGI request, /bin/true),
    by name, from exec to exit, stdin and stdout on /dev/null."""
    trace = rundir / f"sys-whole-{name}.strace"
    with open(os.devnull, "r+b") as null:
        subprocess.run(["strace", "-f", "-qq", "-s", "0", "-o", str(trace), *argv], env=env,
                       stdin=null, stdout=null, stderr=null, check=True, timeout=60)
    calls = Counter()
    for line in read(trace).splitlines():
        m = CALL.match(line)
        if m:
            calls[m.group(1)] += 1
    return {"total": sum(calls.values()), "calls": dict(calls.most_common())}
