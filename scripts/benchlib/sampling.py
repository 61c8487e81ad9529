"""What the machine and each process group spent, from /proc."""

import os
import platform
import shutil
import subprocess

from .common import read

HZ = os.sysconf("SC_CLK_TCK")


def loadavg():
    return read("/proc/loadavg").split()[:3]


def machine():
    cpu = "?"
    for line in read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    apache = "?"
    try:
        out = subprocess.run(
            [shutil.which("apache2") or "/usr/sbin/apache2", "-v"],
            capture_output=True, text=True, timeout=10,
        ).stdout
        apache = out.splitlines()[0].split(":", 1)[1].strip()
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    fcgid = "?"
    try:
        fcgid = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "libapache2-mod-fcgid"],
            capture_output=True, text=True, timeout=10,
        ).stdout or "?"
    except (OSError, subprocess.SubprocessError):
        pass
    mem_kb = 0
    for line in read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "kernel": platform.release(),
        "apache": apache,
        "mod_fcgid": fcgid,
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
    }


def proc_table():
    """pid -> (ppid, exe) for every process we can see."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        stat = read(f"/proc/{pid}/stat")
        if not stat:
            continue
        try:
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (IndexError, ValueError):
            continue
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            exe = ""
        table[pid] = (ppid, exe.removesuffix(" (deleted)"))
    return table


def descendants(table, root):
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        for pid, (ppid, _) in table.items():
            if ppid == p and pid not in out:
                out.add(pid)
                todo.append(pid)
    return out


def cpu_ns(pid):
    """CPU time of a process in ns: its threads' schedstat, or stat's
    utime+stime when that is larger (threads that already ended)."""
    precise = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            s = read(f"/proc/{pid}/task/{tid}/schedstat").split()
            if s:
                precise += int(s[0])
    except OSError:
        pass
    stat = read(f"/proc/{pid}/stat")
    coarse = 0
    if stat:
        f = stat.rsplit(")", 1)[1].split()
        coarse = (int(f[11]) + int(f[12])) * 1_000_000_000 // HZ
    return max(precise, coarse)


def cpu_totals():
    """(busy, steal) CPU time of the whole machine so far, in ns."""
    f = read("/proc/stat").splitlines()[0].split()
    user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in f[1:9])
    tick = 1_000_000_000 // HZ
    return (user + nice + system + irq + softirq) * tick, steal * tick


def time_wait_sockets():
    """TCP sockets in TIME_WAIT: each relay-to-bot connection leaves one
    for 60 s, and a port range nearly full of them slows connect()."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in read(table).splitlines()[1:]:
            f = line.split()
            if len(f) > 3 and f[3] == "06":
                n += 1
    return n


def vm_hwm_kib(pid):
    for line in read(f"/proc/{pid}/status").splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return None


class Groups:
    """Which pids belong to which group right now."""

    def __init__(self, apache_pid=None, relay_exe=None, relay_pid=None, bot_pid=None):
        self.apache_pid = apache_pid
        self.relay_exe = str(relay_exe) if relay_exe else None
        self.relay_pid = relay_pid
        self.bot_pid = bot_pid

    def members(self):
        groups = {"relay": set(), "apache": set(), "bot": set()}
        table = proc_table()
        if self.apache_pid and self.apache_pid in table:
            for pid in descendants(table, self.apache_pid) | {self.apache_pid}:
                exe = table.get(pid, (0, ""))[1]
                if self.relay_exe and exe == self.relay_exe:
                    groups["relay"].add(pid)
                else:
                    groups["apache"].add(pid)
        if self.relay_pid and self.relay_pid in table:
            groups["relay"].add(self.relay_pid)
        if self.bot_pid and self.bot_pid in table:
            groups["bot"].add(self.bot_pid)
        return groups

    def sample(self):
        return {g: {pid: cpu_ns(pid) for pid in pids} for g, pids in self.members().items()}


def cpu_delta(before, after):
    """ns per group between two samples; a process new in `after` counts from 0."""
    out = {}
    for g in after:
        total = 0
        for pid, ns in after[g].items():
            total += ns - before.get(g, {}).get(pid, 0)
        out[g] = total
    gone = sum(1 for g in before for pid in before[g] if pid not in after.get(g, {}))
    return out, gone
