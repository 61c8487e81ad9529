"""Small helpers every part of the benchmark uses: paths, logging, files."""

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
INSTANCE = REPO / "scripts" / "apache-instance"


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def die(msg):
    log(msg)
    sys.exit(1)


def run(cmd, timeout=600, **kw):
    return subprocess.run(cmd, check=True, timeout=timeout, **kw)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tmpfs_dir(path):
    """`path` if it is a directory on a tmpfs, else None."""
    path = Path(path)
    for line in read("/proc/self/mounts").splitlines():
        f = line.split()
        if len(f) >= 3 and f[2] == "tmpfs" and Path(f[1]) == path and path.is_dir():
            return path
    return None


def read(path, default=""):
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return default


def tail_from(path, offset):
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def size(path):
    try:
        return os.path.getsize(path)
    except OSError:
        return 0
