"""A real multi-node Ray cluster on one machine, with the study in PostgreSQL.

A Ray head and a second Ray node run as separate `ray start` processes (each node in a process
group of its own, with its own ports), PostgreSQL runs as a server, and a separate
`ttl-search run --ray-address` process drives a study on that cluster (as a driver on the head's
machine does on a real one):

- trials run on both nodes (the node id each trial stores) and every result is in the database;
- a worker node lost in the middle of a study (its raylet and workers SIGKILLed, as when a
  machine dies) fails the trials it was running, and the study still finishes: the lost cuts are
  retried on the node that is left;
- the container driver (docker/ttl-search-driver.py: join the cluster as a node without CPUs, run
  ttl-search, leave) works from its own PID namespace, as in a container.

Every process the tests start is stopped at teardown, also on failure: only those processes
(their process groups, the workers their raylets spawned, anything holding files in the
cluster's own temp dir); never `ray stop`, which would stop every Ray on the machine.

PostgreSQL: $TTL_SEARCH_TEST_POSTGRES (.ci/run starts a server and sets it), else a throw-away
server started here (Debian's postgresql binaries), else the tests skip, except under CI.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
from pgserver import free_port, server_or_skip, skip_or_fail

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
DEBUG_STUDY = REPO / "studies" / "debug.yaml"
DRIVER_SCRIPT = REPO / "docker" / "ttl-search-driver.py"
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "TTL_SEARCH_STORAGE")}
    env.update(RAY_ENV)
    env.update(extra)
    return env


def _ray_cli() -> list[str]:
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("ray")
    if not found:
        pytest.skip("the `ray` command is not installed")
    return [found]


def free_port_range(size: int = 64) -> tuple[int, int]:
    """A run of free ports below the kernel's ephemeral range and above Ray's default worker
    ports (10002-19999), so that two nodes on one machine never hand out the same worker port."""
    for _ in range(200):
        base = random.randrange(20000, 32000 - size)
        try:
            for port in range(base, base + size):
                with socket.socket() as s:
                    s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return base, base + size - 1
    raise RuntimeError("no free port range")


# ---------------------------------------------------------------------------------------------
# Processes (Linux /proc)


@dataclass
class Proc:
    pid: int
    ppid: int
    pgid: int
    comm: str
    cmdline: str


def processes() -> list[Proc]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        if fields[0] == "Z":
            continue
        out.append(Proc(int(entry.name), int(fields[1]), int(fields[2]), comm, cmdline))
    return out


def _holds_path(pid: int, prefix: str) -> bool:
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd).startswith(prefix):
                    return True
            except OSError:
                continue
    except OSError:
        return False
    return False


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except OSError:
            pass


def _alive(pids: list[int]) -> list[int]:
    alive = {p.pid for p in processes()}
    return [p for p in pids if p in alive]


def kill_processes(pids: list[int], grace_s: float = 0.0) -> None:
    """SIGTERM (when grace_s > 0), then SIGKILL, and wait until they are gone."""
    if grace_s > 0:
        _kill(pids, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _alive(pids):
            time.sleep(0.1)
    _kill(_alive(pids), signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(pids):
        time.sleep(0.1)


@dataclass
class RayNode:
    """A node started by one `ray start` in a session of its own: its daemons (raylet, agents,
    and on the head the GCS) share the process group ``pgid``; the workers its raylet spawns
    run in process groups of their own, as children of the raylet."""

    pgid: int
    node_id: str
    raylet_pid: int
    log: Path

    def members(self) -> list[Proc]:
        return [p for p in processes() if p.pgid == self.pgid]

    def workers(self) -> list[Proc]:
        return [p for p in processes() if p.ppid == self.raylet_pid and p.pgid != self.pgid]

    def kill(self, grace_s: float = 0.0) -> None:
        """Stop this node only: its workers first (so none is orphaned), then its daemons."""
        pids = [p.pid for p in self.workers()] + [p.pid for p in self.members()]
        kill_processes(pids, grace_s)


def start_ray_node(args: list[str], log: Path, env: dict[str, str]) -> RayNode:
    with open(log, "ab") as handle:
        proc = subprocess.Popen([*_ray_cli(), "start", *args], stdout=handle, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
    pgid = proc.pid
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        rc = None
    raylets = [p for p in processes() if p.pgid == pgid and p.comm == "raylet"]
    if rc != 0 or not raylets:
        kill_processes([p.pid for p in processes() if p.pgid == pgid])
        raise RuntimeError(f"`ray start {' '.join(args)}` failed (exit {rc}):\n{log.read_text()[-3000:]}")
    raylet = raylets[0]
    node_id = next(a.split("=", 1)[1] for a in raylet.cmdline.split() if a.startswith("--node_id="))
    return RayNode(pgid, node_id, raylet.pid, log)


@dataclass
class Cluster:
    address: str
    temp_dir: Path
    logs: Path
    head: RayNode
    nodes: list[RayNode]

    def add_worker(self, cpus: int = 1) -> RayNode:
        low, high = free_port_range()
        node = start_ray_node([
            f"--address={self.address}", f"--num-cpus={cpus}", "--disable-usage-stats",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--min-worker-port={low}", f"--max-worker-port={high}",
        ], self.logs / f"ray-worker-{len(self.nodes)}.log", _env())
        self.nodes.append(node)
        return node

    def sweep(self) -> None:
        """Kill whatever still holds files in this cluster's temp dir (orphaned workers)."""
        prefix = str(self.temp_dir)
        me = os.getpid()
        left = [p.pid for p in processes() if p.pid != me and (prefix in p.cmdline or _holds_path(p.pid, prefix))]
        kill_processes(left, grace_s=2.0)


# ---------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    url = os.environ.get("TTL_SEARCH_TEST_POSTGRES")
    if url:
        yield url
        return
    server = server_or_skip("ttl_mn")
    try:
        yield server.url
    finally:
        server.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """A Ray head with 1 CPU; tests add worker nodes. Everything is stopped at the end."""
    logs = tmp_path_factory.mktemp("ray-logs")
    # Short and unique: Ray's unix sockets live below it (107-byte limit), and the sweep at the
    # end finds this cluster's processes by it.
    temp_dir = Path(tempfile.mkdtemp(prefix="ttl-ray-", dir="/tmp"))
    port = free_port()
    low, high = free_port_range()
    head = None
    cl = None
    try:
        head = start_ray_node([
            "--head", f"--port={port}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
            f"--temp-dir={temp_dir}", f"--dashboard-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--min-worker-port={low}", f"--max-worker-port={high}",
        ], logs / "ray-head.log", _env())
        cl = Cluster(f"127.0.0.1:{port}", temp_dir, logs, head, [head])
        yield cl
    finally:
        if cl is not None:
            for node in reversed(cl.nodes):
                node.kill(grace_s=3.0)
            cl.sweep()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def worker_node(cluster: Cluster) -> Iterator[RayNode]:
    node = cluster.add_worker(cpus=1)
    try:
        yield node
    finally:
        node.kill(grace_s=3.0)


# ---------------------------------------------------------------------------------------------
# The driver and the database


@dataclass
class Driver:
    proc: subprocess.Popen
    log: Path

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"the driver did not finish within {timeout:.0f} s; its output:\n{self.output()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait(timeout=60)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]


@pytest.fixture
def drivers() -> Iterator[list[Driver]]:
    started: list[Driver] = []
    try:
        yield started
    finally:
        for d in started:
            d.stop()


def start_driver(drivers: list[Driver], cmd: list[str], cwd: Path, env: dict[str, str]) -> Driver:
    log = cwd / "driver.log"
    with open(log, "ab") as handle:
        proc = subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=str(cwd), env=env,
                                start_new_session=True)
    driver = Driver(proc, log)
    drivers.append(driver)
    return driver


def study_args(name: str, data_dir: Path, *overrides: str) -> list[str]:
    """studies/debug.yaml (test_cnn on BreastMNIST at 28 px, 7 cuts; two-stage search: the 3
    stage-end cuts, then the other cuts of the best stage), two trials at a time."""
    return ["run", str(DEBUG_STUDY), "--quiet", "--set", f"name={name}", "--set", f"trial.data.root={data_dir}",
            "--set", "concurrency=2", *(a for o in overrides for a in ("--set", o))]


def load_trials(name: str, url: str):
    from studyutil import trials

    return trials(name, url)  # one connection pool per URL, however often a test polls


def wait_until(predicate: Callable[[], bool], driver: Driver, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if driver.proc.poll() is not None:
            pytest.fail(f"the driver exited ({driver.proc.returncode}) before {what}; its output:\n{driver.output()}")
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}; driver output:\n{driver.output()}")


def plan_of(name: str, url: str, trials):
    """What the study's own sampler says about the stored trials (``finished`` when done)."""
    from ttl_search.results import open_study
    from ttl_search.search.study import make_sampler

    _, cfg = open_study(name, url)
    return make_sampler(cfg).plan(trials)


# ---------------------------------------------------------------------------------------------
# Tests


def test_trials_run_on_both_nodes_and_results_are_in_postgres(cluster, worker_node, postgres_url, shared_datasets_dir,
                                                               drivers, tmp_path):
    from optuna.trial import TrialState

    from ttl_search.results import best_cut

    name = f"mn-{uuid.uuid4().hex[:12]}"
    cmd = [sys.executable, "-m", "ttl_search", *study_args(name, shared_datasets_dir, "trial.max_epochs=2"),
           "--storage", postgres_url, "--ray-address", cluster.address]
    started = time.monotonic()
    driver = start_driver(drivers, cmd, tmp_path, _env())
    rc = driver.wait(timeout=300)
    elapsed = time.monotonic() - started
    assert rc == 0, driver.output()

    trials = load_trials(name, postgres_url)
    table = [(t.number, t.state.name, t.params, (t.user_attrs.get("node_id") or "")[:8]) for t in trials]
    plan = plan_of(name, postgres_url, trials)
    assert plan.action == "finished", table
    # every training the search planned completed, once, and nothing is left RUNNING
    assert all(t.state == TrialState.COMPLETE for t in trials), table
    assert len({t.params["cut"] for t in trials}) == len(trials) == plan.expected_total, table
    for t in trials:
        # the metrics, size and provenance of every training are in the database
        assert t.value is not None and 0.0 <= t.value <= 1.0
        for key in ("val_auroc", "test_auroc", "params", "macs", "epochs", "node_id", "cut_name", "seed", "phase"):
            assert key in t.user_attrs, (t.number, key, sorted(t.user_attrs))
        assert t.user_attrs["epochs"] == 2

    nodes = {t.user_attrs["node_id"] for t in trials}
    assert nodes == {cluster.head.node_id, worker_node.node_id}, (
        f"trials ran on {nodes}; the cluster's nodes are head {cluster.head.node_id} and worker {worker_node.node_id}")

    best = best_cut(name, postgres_url)
    assert best["finished"] and best["cut"] in {t.params["cut"] for t in trials}
    print(f"\n{len(trials)} trials on 2 nodes in {elapsed:.1f} s: "
          f"{sum(t.user_attrs['node_id'] == cluster.head.node_id for t in trials)} on the head, "
          f"{sum(t.user_attrs['node_id'] == worker_node.node_id for t in trials)} on the worker")


def test_lost_worker_node_fails_its_trials_and_the_study_finishes(cluster, worker_node, postgres_url,
                                                                  shared_datasets_dir, drivers, tmp_path):
    from optuna.trial import TrialState

    name = f"mn-loss-{uuid.uuid4().hex[:12]}"
    # The exhaustive search (7 cuts, no stage barrier) keeps both nodes busy, so the worker trains
    # again after the first trial completed; 8 epochs: a trial trains long enough to be caught.
    cmd = [sys.executable, "-m", "ttl_search",
           *study_args(name, shared_datasets_dir, "trial.max_epochs=8", "search.method=exhaustive"),
           "--storage", postgres_url, "--ray-address", cluster.address]
    started = time.monotonic()
    driver = start_driver(drivers, cmd, tmp_path, _env())

    def training_on_worker() -> list[str]:
        # Ray titles an actor's process `ray::<class>.<method>` while the method runs.
        return [p.cmdline for p in worker_node.workers() if p.cmdline.startswith("ray::ImplicitFunc.train")]

    def ready() -> bool:
        # a trial completed, both slots hold a running trial (one CPU per node: one of them is on the
        # worker), and the worker's actor is training; not the moment after a trial there completed,
        # when its actor still cleans up under the same title with no trial of the study on it
        trials = load_trials(name, postgres_url)
        return (any(t.state == TrialState.COMPLETE for t in trials)
                and sum(t.state == TrialState.RUNNING for t in trials) >= 2 and bool(training_on_worker()))

    wait_until(ready, driver, timeout=180, what="a completed trial and a trial training on the worker node")
    time.sleep(1.0)  # the running trial is well into its epochs, not handed over
    wait_until(ready, driver, timeout=60, what="a trial still training on the worker node")
    training = training_on_worker()
    worker_node.kill()  # SIGKILL, workers and daemons: the machine is gone
    killed_at = time.monotonic()
    assert not worker_node.members() and not worker_node.workers()

    rc = driver.wait(timeout=300)
    elapsed = time.monotonic() - started
    assert rc == 0, driver.output()

    trials = load_trials(name, postgres_url)
    table = [(t.number, t.state.name, t.params.get("cut"), (t.user_attrs.get("node_id") or "")[:8],
              t.user_attrs.get("fail_reason")) for t in trials]
    plan = plan_of(name, postgres_url, trials)
    assert plan.action == "finished", table
    assert not [t for t in trials if t.state == TrialState.RUNNING], table
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert len(complete) + len(failed) == len(trials), table
    # every planned training completed, each cut once
    assert len({t.params["cut"] for t in complete}) == len(complete) == plan.expected_total, table
    assert failed, f"no trial failed although the worker node died while {training} ran there: {table}"
    for t in failed:
        assert t.user_attrs.get("fail_reason"), table
        # the lost cut was retried, and completed
        assert any(c.params["cut"] == t.params["cut"] and c.number > t.number for c in complete), table
    # after the loss only the head was left to train
    late = [t for t in complete if t.number > max(f.number for f in failed)]
    assert late and all(t.user_attrs["node_id"] == cluster.head.node_id for t in late), table
    print(f"\nworker node killed {killed_at - started:.1f} s into the study; {len(failed)} trial(s) failed and were "
          f"retried; the study finished in {elapsed:.1f} s: {json.dumps(table)}")


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True)
    return probe.returncode == 0


def test_container_driver_joins_runs_and_leaves(cluster, postgres_url, shared_datasets_dir, drivers, tmp_path):
    """docker/ttl-search-driver.py in a PID namespace of its own (as in the compose `search`
    container, where no raylet is visible): it joins the cluster as a 0-CPU node, runs the study
    with RAY_ADDRESS and TTL_SEARCH_STORAGE from the environment, and leaves the cluster."""
    if not _can_unshare():
        skip_or_fail("`unshare --pid --fork --mount-proc` is not permitted here (needs root or user namespaces)")
    from optuna.trial import TrialState

    name = f"mn-drv-{uuid.uuid4().hex[:12]}"
    low, high = free_port_range()
    env = _env(RAY_ADDRESS=cluster.address, TTL_SEARCH_STORAGE=postgres_url, TTL_SEARCH_WAIT_CPUS="1",
               TTL_SEARCH_RAY_START_ARGS=f"--min-worker-port={low} --max-worker-port={high} "
                                         f"--dashboard-agent-listen-port={free_port()} --metrics-export-port={free_port()}")
    # One training: a TPE search with a budget of 1.
    args = ["run", str(DEBUG_STUDY), "--quiet", "--set", f"name={name}", "--set", f"trial.data.root={shared_datasets_dir}",
            "--set", "search.method=tpe", "--set", "search.budget=1", "--set", "trial.max_epochs=1"]
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, str(DRIVER_SCRIPT), *args]
    driver = start_driver(drivers, cmd, tmp_path, env)
    rc = driver.wait(timeout=240)
    out = driver.output()
    assert rc == 0, out
    assert "joining the Ray cluster" in out and "leaving the Ray cluster" in out, out

    trials = load_trials(name, postgres_url)
    assert [t.state for t in trials] == [TrialState.COMPLETE], [(t.number, t.state.name) for t in trials]
    assert trials[0].user_attrs["node_id"] == cluster.head.node_id  # the driver's node has no CPUs
    # the driver's node is gone: the head's is the only raylet of this cluster left
    raylets = [p.pid for p in processes() if p.comm == "raylet" and str(cluster.temp_dir) in p.cmdline]
    assert raylets == [cluster.head.raylet_pid], raylets
