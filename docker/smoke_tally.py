"""docker/smoke.sh's look into the study database, run inside a ttl-search container (the
`search` service with this file mounted): one JSON object on stdout.

    python smoke_tally.py STUDY [PLAN_STUDY]

For STUDY: every trial (number, state, (strategy, cut, repeat), Ray node id, failure reason), the
completed keys, how many were completed twice, left RUNNING, failed; with PLAN_STUDY (an
uninterrupted run of the same study), the keys of the plan that STUDY never completed ("lost").
The counting is benchmarks/reliability.py's.
"""

from __future__ import annotations

import json
import os
import sys

import optuna
from optuna.trial import TrialState

from ttl_search.search.record import TrialRecord
from ttl_search.search.samplers import trial_key


def keys_and_trials(name: str, url: str):
    study = optuna.load_study(study_name=name, storage=url)
    rows, keys = [], []
    for t in study.get_trials(deepcopy=False):
        k = trial_key(t)
        key = [k.strategy, k.cut, k.repeat] if k else None
        r = TrialRecord.from_trial(t)
        rows.append({"number": t.number, "state": t.state.name, "key": key, "node_id": r.node_id,
                     "fail_reason": r.fail_reason, "value": t.value if t.state == TrialState.COMPLETE else None,
                     "checkpoint": bool(r.checkpoint)})
        if t.state == TrialState.COMPLETE and key:
            keys.append(tuple(key))
    return rows, keys


def main(argv: list[str]) -> int:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = os.environ["TTL_SEARCH_STORAGE"]
    name = argv[0]
    rows, keys = keys_and_trials(name, url)
    out = {
        "study": name, "trials": rows, "completed": len(keys), "distinct": len(set(keys)),
        "twice": len(keys) - len(set(keys)),
        "failed": sum(r["state"] == "FAIL" for r in rows),
        "running_left": sum(r["state"] == "RUNNING" for r in rows),
    }
    if len(argv) > 1:
        _, plan = keys_and_trials(argv[1], url)
        out["planned"] = len(set(plan))
        out["lost"] = len(set(plan) - set(keys))
        out["extra"] = len(set(keys) - set(plan))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
