"""The loads a run can have, named once: the runner records each load under
its Phase, the report and the targets look them up by the same Phase, so a
renamed load keeps its target (and a target whose load no part runs fails
the check at start, see targets.check)."""

import enum


class Phase(str, enum.Enum):
    """One load. The value is its name in the report and in latest.json."""

    STATIC = "static"
    FCGID_INSTANT = "fcgid instant"
    FCGID_BURST_COLD = "fcgid burst cold"
    FCGID_BURST_WARM = "fcgid burst warm"
    PROXY_INSTANT = "proxy instant"
    PROXY_BURST_COLD = "proxy burst cold"
    FCGID_UNIXBOT = "fcgid instant, bot on a Unix socket"
    PROXY_UNIXBOT = "proxy instant, bot on a Unix socket"
    FCGID_DISK = "fcgid instant, store on disk"
    PROXY_DISK = "proxy instant, store on disk"
    NGINX_BURST = "nginx burst"
    NGINX_2000 = "nginx 2000"


MODES = ("fcgid", "proxy")
# How the report names each mode.
MODE_LABEL = {"fcgid": "mod_fcgid", "proxy": "--listen"}
INSTANT = {"fcgid": Phase.FCGID_INSTANT, "proxy": Phase.PROXY_INSTANT}
UNIXBOT = {"fcgid": Phase.FCGID_UNIXBOT, "proxy": Phase.PROXY_UNIXBOT}
DISK = {"fcgid": Phase.FCGID_DISK, "proxy": Phase.PROXY_DISK}

# The instant loads: relay CPU per request is compared across these.
INSTANT_LOADS = (
    (Phase.FCGID_INSTANT, "mod_fcgid"),
    (Phase.PROXY_INSTANT, "--listen"),
    (Phase.FCGID_DISK, "mod_fcgid, store on disk"),
    (Phase.PROXY_DISK, "--listen, store on disk"),
    (Phase.FCGID_UNIXBOT, "mod_fcgid, bot on a Unix socket"),
    (Phase.PROXY_UNIXBOT, "--listen, bot on a Unix socket"),
)
BURSTS = (Phase.FCGID_BURST_COLD, Phase.FCGID_BURST_WARM, Phase.PROXY_BURST_COLD)
# nginx in front of one --listen relay (the shipped snippet), the 300 ms
# bot: --burst-conns connections, then this many, each on a fresh relay.
NGINX_CONNS = 2000
NGINX_BURSTS = (Phase.NGINX_BURST, Phase.NGINX_2000)

# --only parts, in run order: the loads each runs and the results (keys of
# Bench.results) each produces.
PARTS = {
    "static": ((Phase.STATIC,), ("page_bytes",)),
    "fcgid": ((Phase.FCGID_INSTANT,), ("page_bytes", "fcgid_rss")),
    "fcgid-burst": ((Phase.FCGID_BURST_COLD, Phase.FCGID_BURST_WARM), ("page_bytes", "fcgid_rss")),
    "proxy": ((Phase.PROXY_INSTANT,), ("proxy_rss",)),
    "proxy-burst": ((Phase.PROXY_BURST_COLD,), ("proxy_rss",)),
    "fcgid-disk": ((Phase.FCGID_DISK,), ()),
    "proxy-disk": ((Phase.PROXY_DISK,), ()),
    "fcgid-unixbot": ((Phase.FCGID_UNIXBOT,), ()),
    "proxy-unixbot": ((Phase.PROXY_UNIXBOT,), ()),
    "nginx-2000": (NGINX_BURSTS, ("nginx_rss", "nginx_once")),
    "cgi": ((), ("cgi",)),
    "spawn": ((), ("spawn",)),
    "syscalls": ((), ("syscalls",)),
}


def phases_of(parts, table=PARTS):
    """The loads the given parts run."""
    return {phase for part in parts for phase in table[part][0]}


def results_of(parts, table=PARTS):
    """The result keys the given parts produce."""
    return {key for part in parts for key in table[part][1]}
