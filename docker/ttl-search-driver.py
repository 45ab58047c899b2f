#!/usr/bin/env python3
"""Run a ttl-search command as a Ray driver from a container that is not a Ray node.

A Ray driver must run on a node of its cluster: ``ray.init(address="head:6379")`` on a machine
without a raylet waits a minute and fails ("No node info found ... when trying to resolve node to
connect to"). This entrypoint therefore

1. joins the cluster at ``$RAY_ADDRESS`` as a node with no CPUs and no GPUs (no trial runs here),
2. waits until the cluster has ``$TTL_SEARCH_WAIT_CPUS`` CPUs (default 1) and
   ``$TTL_SEARCH_WAIT_GPUS`` GPUs (default 0) for the trials, at most ``$TTL_SEARCH_WAIT_S``
   seconds (default 300), so that a driver started together with the workers does not fail its
   resource check before they have joined,
3. runs ``ttl-search ARGS...`` (``run``, ``resume``...), forwarding SIGINT and SIGTERM,
4. leaves the cluster: it stops exactly the node it started (its process group), nothing else,

and exits with ttl-search's exit status. Ray's token (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``)
and the study database (``TTL_SEARCH_STORAGE``) come from the environment.

Usage: ttl-search-driver run /work/studies/debug.yaml --set trial.max_epochs=3
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

USAGE = "usage: ttl-search-driver TTL_SEARCH_ARGS...  (with RAY_ADDRESS=host:port of the Ray head)"


def log(message: str) -> None:
    print(f"ttl-search-driver: {message}", file=sys.stderr, flush=True)


def _proc_children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid:
            children.append(int(entry.name))
    return children


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) == pgid:
                    members.append(int(entry.name))
            except OSError:
                continue
    return members


def stop_node(pgid: int, grace_s: float = 10.0) -> None:
    """Stop the Ray node started in process group ``pgid`` and the workers its raylet spawned
    (those run in process groups of their own)."""
    members = _group_members(pgid)
    workers = [c for pid in members for c in _proc_children(pid) if c not in members]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in workers:
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        try:
            os.killpg(pgid, sig)
        except OSError:
            return
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _group_members(pgid):
            time.sleep(0.2)
        if not _group_members(pgid):
            return


def wait_for_resources(address: str, cpus: float, gpus: float, timeout_s: float) -> None:
    import ray

    ray.init(address=address, log_to_driver=False, logging_level="WARNING")
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            total = ray.cluster_resources()
            have = f"{total.get('CPU', 0.0):g} CPUs and {total.get('GPU', 0.0):g} GPUs"
            if total.get("CPU", 0.0) >= cpus and total.get("GPU", 0.0) >= gpus:
                log(f"the cluster has {have}")
                return
            if time.monotonic() > deadline:
                log(f"the cluster has {have} after {timeout_s:g} s (waited for {cpus:g} and {gpus:g}); going on")
                return
            time.sleep(2)
    finally:
        ray.shutdown()


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        print(__doc__)
        return 0 if argv else 2
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if not address or address == "auto":
        log("RAY_ADDRESS must be the head's host:port, e.g. ray-head:6379")
        return 2
    wait_cpus = float(os.environ.get("TTL_SEARCH_WAIT_CPUS", "1"))
    wait_gpus = float(os.environ.get("TTL_SEARCH_WAIT_GPUS", "0"))
    wait_s = float(os.environ.get("TTL_SEARCH_WAIT_S", "300"))

    start = [
        "ray", "start", f"--address={address}", "--num-cpus=0", "--num-gpus=0", "--disable-usage-stats",
        *os.environ.get("TTL_SEARCH_RAY_START_ARGS", "").split(),
    ]
    log(f"joining the Ray cluster at {address} as a node without CPUs or GPUs")
    # Its own session: the node's daemons stay in this process group, which stop_node() ends.
    starter = subprocess.Popen(start, start_new_session=True)
    pgid = starter.pid
    child: subprocess.Popen | None = None

    def forward(signum, _frame):
        if child is not None and child.poll() is None:
            child.send_signal(signum)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    try:
        if starter.wait() != 0:
            log(f"`{' '.join(start)}` failed with exit status {starter.returncode}")
            return 1
        if wait_cpus > 0 or wait_gpus > 0:
            wait_for_resources(address, wait_cpus, wait_gpus, wait_s)
        child = subprocess.Popen(["ttl-search", *argv])
        while True:
            try:
                return child.wait()
            except KeyboardInterrupt:  # a signal arrived in between: ttl-search got it too
                continue
    except KeyboardInterrupt:
        return 130
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
        log("leaving the Ray cluster")
        stop_node(pgid)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
