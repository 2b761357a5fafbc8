"""A cluster of K hosts on this machine, made of network namespaces, to run MPI jobs across.

    sudo python launch/netns_cluster.py --ranks 2,2 [--rate 1gbit] -- python -m dpnet.train ...
    sudo python launch/netns_cluster.py --cleanup       # remove what crashed runs left behind

Each host is a network namespace with its own UTS namespace (its own host name), joined to
the others by a veth pair to one bridge in the root namespace. Addresses come from the
benchmarking range 198.18.0.0/15, a /24 no interface on this machine uses yet, and are
given to mpiexec as IP addresses, so nothing is looked up by name and no traffic leaves
the bridge. Hydra starts its proxies on the hosts without ssh: its launcher is a script
that enters the host's namespaces. MPICH's UCX is told to use TCP (UCX_TLS=tcp,self),
so the ranks of different hosts talk over the veths (the byte counters show it).

Everything a run makes (namespaces, links, its processes) is recorded in a state file
under /run/dpnet-cluster and removed when the run ends, however it ends; a later run, or
--cleanup, removes what a run that was killed left behind. Names carry a per-run id, so
concurrent runs do not collide. Needs root, iproute2 and util-linux's unshare.
"""

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

STATE_DIR = "/run/dpnet-cluster"
NETWORK = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range
FIRST_HOST = 10  # host i gets .(10 + i); the bridge (the mpiexec side) gets .1


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def available(reason=False):
    """True where clusters can be made here (root, ip, unshare, network namespaces); with
    reason=True, (ok, why not)."""
    why = None
    if os.geteuid() != 0:
        why = "needs root (network namespaces)"
    elif not (shutil.which("ip") and shutil.which("unshare") and shutil.which("tc")):
        why = "needs iproute2 (ip, tc) and util-linux (unshare)"
    else:
        probe = f"dpnet-probe-{os.getpid()}"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            why = f"cannot make a network namespace: {made.stderr.strip()}"
        else:
            _ip("netns", "del", probe, check=False)
    return (why is None, why) if reason else why is None


def _used_subnets():
    out = _ip("-o", "-4", "addr").stdout
    return {ipaddress.ip_interface(line.split()[3]).network for line in out.splitlines()}


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(state):
    """Remove every process, namespace and link a run recorded (each may already be gone)."""
    for ns in state["namespaces"]:
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), signal.SIGKILL)
    for ns in state["namespaces"]:
        for _ in range(50):  # the killed processes leave the namespace as they are reaped
            if not _ip("netns", "pids", ns, check=False).stdout.split():
                break
            time.sleep(0.1)
        _ip("netns", "del", ns, check=False)
    for link in state["links"]:
        _ip("link", "del", link, check=False)
    if state.get("workdir"):
        shutil.rmtree(state["workdir"], ignore_errors=True)


def cleanup_stale():
    """Remove what runs whose process has ended left behind. Returns the ids removed."""
    removed = []
    if not os.path.isdir(STATE_DIR):
        return removed
    for name in sorted(os.listdir(STATE_DIR)):
        if not name.endswith(".json"):
            continue
        path = os.path.join(STATE_DIR, name)
        try:
            with open(path) as fh:
                state = json.load(fh)
        except (OSError, ValueError):
            continue
        if _alive(state["owner"]):
            continue
        _remove(state)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)
        removed.append(state["id"])
    return removed


class Cluster:
    """K hosts in network namespaces (a context manager: made on entry, removed on exit).

    Inputs: hosts (how many), rate (e.g. '1gbit': a token-bucket limit on every host's link,
    both ways; None: unlimited).
    Attributes: addresses (each host's IP), namespaces, bridge_address (where mpiexec runs).
    """

    def __init__(self, hosts, rate=None):
        if hosts < 1:
            raise ValueError(f"a cluster needs at least one host, got {hosts}")
        self.hosts, self.rate = hosts, rate
        self.id = f"{os.getpid() % 0x10000:04x}{random.randrange(0x100):02x}"
        self.namespaces = [f"dpnet-{self.id}-{i}" for i in range(hosts)]
        self.bridge = f"dpb{self.id}"
        self.veths = [f"dpv{self.id}{i:x}" for i in range(hosts)]
        self.state_path = os.path.join(STATE_DIR, f"{self.id}.json")
        self.workdir = None

    def __enter__(self):
        os.makedirs(STATE_DIR, exist_ok=True)
        cleanup_stale()
        try:
            self.workdir = tempfile.mkdtemp(prefix=f"dpnet-cluster-{self.id}-")
            with open(os.path.join(STATE_DIR, "lock"), "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # choosing a free subnet and taking it is one step
                self._choose_subnet()
                self._record()
                self._make()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        _remove({"namespaces": self.namespaces, "links": [self.bridge, *self.veths], "workdir": self.workdir})
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.state_path)
        return False

    def _choose_subnet(self):
        used = _used_subnets()
        subnets = list(NETWORK.subnets(new_prefix=24))
        random.shuffle(subnets)
        free = next((s for s in subnets if not any(s.overlaps(u) for u in used)), None)
        if free is None:
            raise RuntimeError(f"every /24 of {NETWORK} is in use on this machine")
        self.subnet = free
        hosts = list(free.hosts())
        self.bridge_address = str(hosts[0])
        self.addresses = [str(hosts[FIRST_HOST - 1 + i]) for i in range(self.hosts)]

    def _record(self):
        state = {"id": self.id, "owner": os.getpid(), "namespaces": self.namespaces,
                 "links": [self.bridge, *self.veths], "subnet": str(self.subnet), "workdir": self.workdir}
        tmp = self.state_path + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(state, fh)
        os.replace(tmp, self.state_path)

    def _make(self):
        prefix = self.subnet.prefixlen
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.bridge_address}/{prefix}", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for ns, veth, address in zip(self.namespaces, self.veths, self.addresses):
            _ip("netns", "add", ns)
            _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("link", "set", veth, "master", self.bridge)
            _ip("link", "set", veth, "up")
            _ip("-n", ns, "addr", "add", f"{address}/{prefix}", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
            if self.rate:
                limit = ["root", "tbf", "rate", self.rate, "burst", "256kb", "latency", "50ms"]
                subprocess.run(["tc", "qdisc", "add", "dev", veth, *limit], check=True)
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "eth0", *limit],
                               check=True)
        self.launcher = os.path.join(self.workdir, "enter-host")
        cases = "\n".join(f"  {a}) ns={ns} ;;" for a, ns in zip(self.addresses, self.namespaces))
        with open(self.launcher, "w") as fh:  # Hydra calls it as ssh: [-x] HOST COMMAND...
            fh.write(f"""#!/bin/sh
[ "$1" = "-x" ] && shift
host=$1; shift
case $host in
{cases}
  *) echo "enter-host: $host is not a host of cluster {self.id}" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts -- sh -c "hostname $ns && exec $*"
""")
        os.chmod(self.launcher, 0o755)

    def link_bytes(self):
        """Bytes that crossed each host's link so far, as (received, sent) seen from the host."""
        counts = []
        for veth in self.veths:
            stats = "/sys/class/net/{}/statistics/{}_bytes"
            with open(stats.format(veth, "tx")) as rx, open(stats.format(veth, "rx")) as tx:
                counts.append((int(rx.read()), int(tx.read())))
        return counts

    def mpiexec(self, ranks, command, env=None, mpiexec="mpiexec"):
        """The mpiexec command line that runs `command` with ranks[i] ranks on host i."""
        if len(ranks) != self.hosts:
            raise ValueError(f"ranks {ranks} must name one count per host ({self.hosts})")
        hosts = ",".join(f"{a}:{n}" for a, n in zip(self.addresses, ranks))
        return [*self.mpiexec_prefix(env, mpiexec), "-hosts", hosts, "-n", str(sum(ranks)), *command]

    def mpiexec_prefix(self, env=None, mpiexec="mpiexec"):
        """mpiexec with the options that reach this cluster's hosts (no hosts or ranks yet): what
        `python -m dpnet.launch --launcher-command` takes."""
        genv = []
        for key, value in {"UCX_TLS": "tcp,self", **(env or {})}.items():
            genv += ["-genv", key, str(value)]
        return [mpiexec, "-launcher", "ssh", "-launcher-exec", self.launcher, "-localhost", self.bridge_address,
                *genv]


def _mpiexec_beside_python():
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.path.exists(here) else (shutil.which("mpiexec") or "mpiexec")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     usage="%(prog)s [--ranks 2,2] [--rate RATE] -- COMMAND ... | --cleanup")
    parser.add_argument("--ranks", default="2,2", help="ranks per host, comma-separated (default: 2,2)")
    parser.add_argument("--rate", help="limit every host's link to this rate, both ways (tc tbf: 1gbit, 100mbit)")
    parser.add_argument("--cleanup", action="store_true", help="remove what ended runs left behind, and exit")
    parser.add_argument("--timeout", type=float, default=None, help="seconds before the job is killed")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command each rank runs (after --)")
    args = parser.parse_args(argv)
    if args.cleanup:
        print(f"removed {len(cleanup_stale())} run(s) left behind")
        return 0
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    try:
        ranks = [int(n) for n in args.ranks.split(",")]
        if min(ranks) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--ranks must be positive integers separated by commas, got {args.ranks!r}")
    ok, why = available(reason=True)
    if not ok:
        print(f"netns_cluster: {why}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds through Cluster.__exit__
    with Cluster(len(ranks), args.rate) as cluster:
        before = cluster.link_bytes()
        job = subprocess.Popen(cluster.mpiexec(ranks, command, mpiexec=_mpiexec_beside_python()),
                               start_new_session=True)
        try:
            code = job.wait(timeout=args.timeout)
        except subprocess.TimeoutExpired:
            code = 124
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
        crossed = sum(map(sum, cluster.link_bytes())) - sum(map(sum, before))
        print(f"netns_cluster: {len(ranks)} hosts x {args.ranks} ranks; {crossed / 2**20:.1f} MiB crossed the links; "
              f"exit {code}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
