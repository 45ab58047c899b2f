"""Benchmark: a study survives its infrastructure. Figures a user can hold us to.

Starts a throw-away PostgreSQL server (Debian's ``postgresql`` binaries, which ``.ci/run``
installs) and runs ``studies/debug.yaml`` on it through every failure of issue 15, each run as
a real ``ttl-search`` process on its own local Ray:

- ``reference``: one uninterrupted study; its completed (strategy, cut, seed) set is the plan
  every other scenario must end with (the two-stage search is seeded, so the plan is fixed);
- ``concurrent``: N studies at once on the one database;
- ``killed_driver``: the driver and its Ray killed with SIGKILL mid-study, then ``resume``;
- ``outage``: the server stopped (``pg_ctl stop -m fast``) for ``--outage-s`` seconds while trials
  train; the same driver must finish;
- ``full_disk``: the artifact folder on a 4 KiB tmpfs (needs root): the run must end with the
  reason, then ``resume`` on free space finishes;
- ``second_driver``: ``resume`` and ``resume --force`` while the driver lives: the first is
  refused, the forced one takes over (the first driver stops without writing) and finishes.

Per scenario it prints the runs' exit codes and wall seconds (each run is killed, and counted as
a hang, after ``--timeout`` seconds), the trainings planned and completed, trainings lost (planned
but not completed at the end), completed twice, failed and retrained, database errors (``ERROR``
lines of the server log, and database exceptions in the drivers' output) and tracebacks. A
scenario passes with 0 lost, 0 twice, 0 hangs, 0 database errors and the expected exit codes.
Last line: ``failures: K``.

    TTL_SEARCH_DATA=../shared/datasets python benchmarks/reliability.py
    python benchmarks/reliability.py --scenarios concurrent outage --concurrent 4 --outage-s 30
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from optuna.trial import TrialState
from tabulate import tabulate

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the tests' helpers: a driver process, a PostgreSQL server

from pgserver import PostgresServer, ServerUnavailable  # noqa: E402
from studyutil import DEBUG_STUDY, complete_keys, kill_group, start_driver, trials  # noqa: E402

SCENARIOS = ("concurrent", "killed_driver", "outage", "full_disk", "second_driver")
DATABASE_ERRORS = ("OperationalError", "IntegrityError", "StorageInternalError", "UpdateFinishedTrialError",
                   "DuplicatedStudyError", "deadlock detected", "could not serialize", "psycopg.")
"""What a database error looks like in a driver's output."""
RETRYING = "; retrying for"
"""The driver's notice that it retries a lost connection (the outage case expects it)."""


@dataclass
class Run:
    """One ``ttl-search`` process."""

    args: list[str]
    log: Path
    proc: subprocess.Popen = field(repr=False)
    started: float
    seconds: float | None = None
    rc: int | None = None
    hung: bool = False

    def wait(self, timeout: float) -> int:
        """Its exit status; killed (and marked hung) when it runs past ``timeout`` seconds in all."""
        try:
            self.rc = self.proc.wait(timeout=max(1.0, self.started + timeout - time.time()))
        except subprocess.TimeoutExpired:
            kill_group(self.proc)
            self.rc, self.hung = self.proc.returncode, True
        self.seconds = time.time() - self.started
        return self.rc

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@dataclass
class Scenario:
    """What one scenario did and left in the database."""

    name: str
    runs: list[Run] = field(default_factory=list)
    expected_rcs: list[int] = field(default_factory=list)
    planned: int = 0
    completed: int = 0
    lost: int = 0
    twice: int = 0
    retrained: int = 0
    running_left: int = 0
    db_errors: int = 0
    tracebacks: int = 0
    """Tracebacks anywhere in the drivers' output (database ones count as db errors too)."""
    checks: list[str] = field(default_factory=list)
    """Failed checks of this scenario's own behaviour (messages it must print, ...)."""
    skipped: str = ""

    @property
    def passed(self) -> bool:
        return not self.skipped and not self.checks and not (self.lost or self.twice or self.running_left or
                                                            self.db_errors or any(r.hung for r in self.runs)) \
            and [r.rc for r in self.runs] == self.expected_rcs

    def row(self) -> dict:
        if self.skipped:
            return {"scenario": self.name, "result": f"skipped: {self.skipped}"}
        return {
            "scenario": self.name, "runs": len(self.runs), "exit codes": " ".join(str(r.rc) for r in self.runs),
            "longest run (s)": round(max(r.seconds or 0 for r in self.runs), 1),
            "hangs": sum(r.hung for r in self.runs), "planned": self.planned, "completed": self.completed,
            "lost": self.lost, "twice": self.twice, "failed, retrained": self.retrained,
            "db errors": self.db_errors, "tracebacks": self.tracebacks,
            "result": "ok" if self.passed else "FAIL: " + "; ".join(
                self.checks or [f"expected exit codes {self.expected_rcs}"]),
        }


class Bench:
    def __init__(self, args, server: PostgresServer, work: Path) -> None:
        self.args, self.server, self.work = args, server, work
        self.plan: list[tuple] = []

    def study_args(self, name: str, *extra: str) -> list[str]:
        return ["run", str(DEBUG_STUDY), "--storage", self.server.url, "--set", f"name={name}",
                "--set", f"trial.data.root={self.args.data}", "--set", f"trial.max_epochs={self.args.epochs}",
                "--set", "concurrency=2", "--quiet", *extra]

    def resume_args(self, name: str, *extra: str) -> list[str]:
        return ["resume", name, "--storage", self.server.url, "--quiet", *extra]

    def start(self, args: list[str], log_name: str) -> Run:
        log = self.work / f"{log_name}.log"
        return Run(args, log, start_driver(args, log), time.time())

    def run(self, args: list[str], log_name: str) -> Run:
        run = self.start(args, log_name)
        run.wait(self.args.timeout)
        return run

    def until(self, predicate, run: Run, what: str) -> bool:
        """Waits (within the run's time limit) until ``predicate()``; False if the run ended first."""
        while time.time() < run.started + self.args.timeout:
            if predicate():
                return True
            if run.proc.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def server_errors(self) -> list[str]:
        log = self.server.dir / "server.log"
        return [line for line in log.read_text(errors="replace").splitlines() if " ERROR: " in line] \
            if log.is_file() else []

    def tally(self, s: Scenario, names: list[str], plan: list[tuple], errors_before: int) -> Scenario:
        """Counts what the scenario's studies hold against the plan, and the database errors since
        ``errors_before`` server-log errors."""
        for name in names:
            ts = trials(name, self.server.url)
            keys = complete_keys(ts)
            s.planned += len(plan)
            s.completed += len(keys)
            s.lost += len(set(plan) - set(keys))
            if set(plan) != set(keys):
                print(f"  {s.name}: study {name} completed {sorted(set(keys))}, the plan is {sorted(set(plan))}",
                      flush=True)
            s.twice += len(keys) - len(set(keys))
            s.retrained += sum(t.state == TrialState.FAIL for t in ts)
            s.running_left += sum(t.state == TrialState.RUNNING for t in ts)
        errors = self.server_errors()[errors_before:]
        driver_errors = [line for r in s.runs for line in r.text().splitlines()
                         if any(e in line for e in DATABASE_ERRORS) and RETRYING not in line]
        s.db_errors = len(errors) + len(driver_errors)
        s.tracebacks = sum(r.text().count("Traceback (most recent call last)") for r in s.runs)
        for line in driver_errors[:5]:
            print(f"  {s.name}: driver: {line}", flush=True)
        for line in errors[:5]:
            print(f"  {s.name}: server log: {line}", flush=True)
        return s

    # -- scenarios -------------------------------------------------------------------------

    def reference(self) -> Scenario:
        s = Scenario("reference", expected_rcs=[0])
        before = len(self.server_errors())
        s.runs.append(self.run(self.study_args("reference"), "reference"))
        self.plan = complete_keys(trials("reference", self.server.url))
        return self.tally(s, ["reference"], self.plan, before)

    def concurrent(self) -> Scenario:
        n = self.args.concurrent
        s = Scenario(f"concurrent x{n}", expected_rcs=[0] * n)
        before = len(self.server_errors())
        names = [f"concurrent-{i}" for i in range(n)]
        s.runs = [self.start(self.study_args(name), name) for name in names]
        for run in s.runs:
            run.wait(self.args.timeout)
        return self.tally(s, names, self.plan, before)

    def killed_driver(self) -> Scenario:
        name = "killed"
        s = Scenario("killed_driver", expected_rcs=[-9, 0])
        before = len(self.server_errors())
        first = self.start(self.study_args(name), name)
        midway = self.until(lambda: {TrialState.COMPLETE, TrialState.RUNNING} <= {
            t.state for t in trials(name, self.server.url)}, first, "a trial complete and one running")
        kill_group(first.proc)
        first.rc, first.seconds = first.proc.returncode, time.time() - first.started
        if not midway:
            s.checks.append("the study ended before it could be killed mid-way")
        s.runs = [first, self.run(self.resume_args(name), f"{name}-resume")]
        return self.tally(s, [name], self.plan, before)

    def outage(self) -> Scenario:
        name = "outage"
        s = Scenario(f"outage {self.args.outage_s:g} s", expected_rcs=[0])
        before = len(self.server_errors())
        run = self.start(self.study_args(name), name)
        s.runs = [run]
        if not self.until(lambda: any(t.state == TrialState.RUNNING and t.intermediate_values
                                      for t in trials(name, self.server.url)), run, "a trial in training"):
            s.checks.append("the study ended before the outage")
        self.server.stop()
        time.sleep(self.args.outage_s)
        self.server.start()
        run.wait(self.args.timeout)
        if "unreachable for" not in run.text() or "reachable again after" not in run.text():
            s.checks.append("the driver did not say that the database was unreachable and back")
        return self.tally(s, [name], self.plan, before)

    def full_disk(self) -> Scenario:
        name = "fulldisk"
        s = Scenario("full_disk", expected_rcs=[2, 0])
        folder = self.work / "full-artifacts"
        folder.mkdir()
        mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs", str(folder)], capture_output=True,
                               text=True)
        if mount.returncode:
            s.skipped = f"cannot mount a 4 KiB tmpfs (needs root): {mount.stderr.strip()}"
            return s
        before = len(self.server_errors())
        try:
            s.runs.append(self.run(self.study_args(name, "--set", f"artifacts={folder}"), name))
        finally:
            subprocess.run(["umount", str(folder)], capture_output=True)
        text = s.runs[0].text()
        if "No space left on device" not in text or str(folder) not in text:
            s.checks.append("the run did not name the full folder and the reason")
        s.runs.append(self.run(self.resume_args(name), f"{name}-resume"))
        return self.tally(s, [name], self.plan, before)

    def second_driver(self) -> Scenario:
        name = "second"
        s = Scenario("second_driver", expected_rcs=[2, 2, 0])
        before = len(self.server_errors())
        # one trial at a time (how, not what, it trains): the study is still running when --force comes
        first = self.start(self.study_args(name, "--set", "concurrency=1", "--set", "driver.heartbeat_s=1",
                                           "--set", "driver.stale_after_s=30"), name)
        if not self.until(lambda: any(t.state == TrialState.RUNNING and t.intermediate_values
                                      for t in trials(name, self.server.url)), first, "a trial in training"):
            s.checks.append("the study ended before a second driver could start")
        # both at once: the study is still running when --force comes (either sees a live lease)
        refused = self.start(self.resume_args(name), f"{name}-refused")
        forced = self.start(self.resume_args(name, "--force"), f"{name}-forced")
        refused.wait(self.args.timeout)
        if "is being run by the driver on" not in refused.text():
            s.checks.append("the second driver was not refused with who holds the study")
        first.wait(self.args.timeout)
        forced.wait(self.args.timeout)
        if "was taken over by the driver on" not in first.text():
            s.checks.append("the first driver did not say it was taken over")
        s.runs = [refused, first, forced]
        return self.tally(s, [name], self.plan, before)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenarios", nargs="+", default=list(SCENARIOS), choices=SCENARIOS)
    parser.add_argument("--concurrent", type=int, default=3, help="studies at once on one database")
    parser.add_argument("--outage-s", type=float, default=15.0, help="seconds the database is down")
    parser.add_argument("--epochs", type=int, default=12,
                        help="epochs of the debug study's trials (long enough for a second driver to come mid-study)")
    parser.add_argument("--timeout", type=float, default=600.0,
                        help="seconds a run may take before it is killed and counts as a hang")
    parser.add_argument("--data", default=os.environ.get("TTL_SEARCH_DATA",
                                                         str(HERE.parents[1] / "shared" / "datasets")))
    parser.add_argument("--csv", default=str(HERE / "out" / "reliability.csv"))
    args = parser.parse_args(argv)
    # the drivers run in temporary folders: a relative data path must mean what it means here
    args.data = str(Path(args.data).expanduser().resolve())
    os.environ["TTL_SEARCH_DATA"] = args.data
    if not (Path(args.data) / "breastmnist.npz").is_file():
        parser.error(f"no breastmnist.npz under --data {args.data} (set --data or $TTL_SEARCH_DATA)")
    work = Path(tempfile.mkdtemp(prefix="ttl-reliability-"))
    try:
        server = PostgresServer("ttl_reliability")
    except ServerUnavailable as e:
        print(f"no PostgreSQL server: {e}", file=sys.stderr)
        return 2
    print(f"PostgreSQL on 127.0.0.1:{server.port}; driver logs in {work}", flush=True)
    bench = Bench(args, server, work)
    rows, failures = [], 0
    try:
        for scenario in ["reference", *args.scenarios]:
            t0 = time.time()
            result = getattr(bench, scenario)()
            print(f"{result.name}: {'skipped' if result.skipped else 'ok' if result.passed else 'FAILED'} "
                  f"in {time.time() - t0:.1f} s", flush=True)
            rows.append(result.row())
            failures += not result.passed and not result.skipped
            if scenario == "reference" and not result.passed:
                break  # nothing to compare the others with
    finally:
        server.close()
    print()
    print(tabulate(rows, headers="keys", tablefmt="github"))
    out = Path(args.csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    columns = list(collections.OrderedDict.fromkeys(k for r in rows for k in r))
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    print(f"\nwrote {out}")
    print(f"failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
