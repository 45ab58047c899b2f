"""optuna-dashboard for ttl-search studies: the answer where the dashboard shows it, every study's
own artifact folder, and no deletions unless asked for.

- :func:`publish_answer` stores a study's answer in the places optuna-dashboard draws: the metric
  name (``val_auroc``, not "Objective 0"), study attributes ``chosen_*`` (trial, cut, name,
  interval, rule, size), the study's note (the ranking as a Markdown table, and a line when the
  pick differs from Optuna's plain maximum) and a one-line note per completed trial. The search's
  trials are the study's own, so the dashboard's plots and best-so-far line show the search; the
  baselines live in the study ``NAME:baselines``, whose note and trial notes say so.
- :class:`StudyArtifactStores` serves each study's checkpoints and report files from that study's
  own ``artifacts`` folder (several studies, several folders, one dashboard).
- :func:`serve_dashboard` runs the dashboard bound to 127.0.0.1 by default and read-only: every
  DELETE request (studies, trials' artifacts) is refused unless ``allow_deletions``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Sequence

import optuna
from optuna.trial import FrozenTrial, TrialState

from ..errors import ConfigError, StudyError
from ..search.record import (SEARCH_STRATEGY, TrialRecord, ensemble_line, fmt_count, fmt_diff, fmt_interval,
                             fmt_value)
from ..storage import baselines_study, load_study, open_storage, storage_url, study_names, study_trials, trial_ref

log = logging.getLogger(__name__)

ANSWER_ATTR = "answer"
"""Study attribute with the answer in one line (the first attribute of a study, so that the first
page of optuna-dashboard's attribute table shows it): cut, name, interval, size, trial, rule."""
ANSWER_PENDING = "not chosen yet: the search is running (or has no completed trial)"
ANSWER_PREFIX = "chosen_"
"""Study attributes of the answer: ``chosen_trial``, ``chosen_cut``, ``chosen_cut_name``,
``chosen_val``, ``chosen_val_ci``, ``chosen_rule``, ``chosen_params``, ``chosen_indistinguishable``,
``chosen_model`` and ``chosen_strategy`` (the answer may be a frozen probe or a baseline)."""
STRATEGY_NAMES = {"ttl": "TTL", "full": "full fine-tuning", "linear_probe": "linear probe", "lwft": "LWFT",
                  "transfusion": "TransFusion", "scratch": "from scratch", "probe": "frozen probe"}
"""How a trial's note names its strategy."""


# ---------------------------------------------------------------------------------------------
# The answer, where the dashboard shows it


def publish_answer(study: optuna.Study, cfg, best: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """Store study ``study``'s answer for optuna-dashboard (see the module docstring); the
    ``chosen_cut`` summary (``best``, when the caller computed it already), or None while no search
    trial has completed. Writes only what changed."""
    from . import chosen_cut

    baselines = baselines_study(study)
    trials = study_trials(study, baselines or False)
    for part in (study, baselines):
        if part is not None:
            name_metric(part, cfg.metric)
    best = chosen_cut(study, cfg, trials) if best is None else best
    if best is None:
        return None
    attrs = {
        "chosen_trial": best["trial"], "chosen_model": best["model"], "chosen_strategy": best["strategy"],
        "chosen_cut": best["cut"], "chosen_cut_name": best["cut_name"],
        "chosen_val": best["val"].get(cfg.metric), "chosen_val_ci": best["val_ci"], "chosen_rule": best["rule"],
        "chosen_params": best["params"], "chosen_indistinguishable": best["indistinguishable"],
        "chosen_finished": best["finished"],
    }
    metric_label = cfg.metric.upper() if cfg.metric in ("auroc", "auprc") else cfg.metric
    attrs[ANSWER_ATTR] = (f"{best['model']} ({best['cut_name']}): val {metric_label} "
                          f"{fmt_value(best['val'].get(cfg.metric))} {fmt_interval(best['val_ci'])}, "
                          f"{fmt_count(best['params'])} params (full {fmt_count(best['full']['params'])}), "
                          f"trial {best['trial']}, rule {best['rule']}"
                          + ("" if best["finished"] else " (study not finished)"))
    stored = study.user_attrs
    for key, value in attrs.items():
        if stored.get(key) != value:
            study.set_user_attr(key, value)
    own = [t for t in trials if isinstance(trial_ref(t), int)]
    notes = {study: study_note(best, own, cfg, baselines.study_name if baselines is not None else None)}
    if baselines is not None:
        notes[baselines] = (f"# Baselines of study `{study.study_name}`\n\nThis study holds the baselines of study "
                            f"`{study.study_name}` (`ttl-search` calls its trials `baselines:N`). The search's trials, "
                            f"its plots and its answer are in study `{study.study_name}`; the answer, for "
                            "comparison:\n\n" + study_note(best, [], cfg))
    intervals = {(r["strategy"], r["cut"]): r for r in best["ranking"]}
    for part, note in notes.items():
        system_attrs = dict(part._storage.get_study_system_attrs(part._study_id))  # read once: notes live there
        _save_note(part, None, note, system_attrs)
        for trial in trials:
            if trial.state == TrialState.COMPLETE and isinstance(trial_ref(trial), str) == (part is baselines):
                _save_note(part, trial, trial_note(trial, intervals, cfg.metric, best["trial"], study.study_name),
                           system_attrs)
    log.debug("published the answer of %s: %s (trial %s)", study.study_name, best["model"], best["trial"])
    return best


def name_metric(study: optuna.Study, metric: str) -> None:
    """Name the objective ``val_<metric>`` (optuna-dashboard's plots say "Objective 0" otherwise)."""
    import warnings

    if study.metric_names != [f"val_{metric}"]:
        with warnings.catch_warnings():  # experimental in Optuna since 3.2, and what the dashboard reads
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([f"val_{metric}"])


def trial_note(trial: FrozenTrial, intervals: dict[tuple[str, int], dict], metric: str, chosen: int | str,
               study_name: str = "") -> str:
    """One line: ``TTL cut 5 (blocks.2.0), stage 3: val AUROC 0.841 [0.77, 0.90], test 0.723,
    29.5k params, CHOSEN`` (the interval is the cut's, over its seeds; ``chosen``: the chosen
    trial's number; ``study_name``: the study's, which a baselines trial's note names)."""
    r = TrialRecord.from_trial(trial)
    row = intervals.get((r.strategy, r.cut)) or {}
    name = STRATEGY_NAMES.get(r.strategy, r.strategy)
    stage = f", stage {r.stage}" if r.stage is not None else ""
    interval = f" {fmt_interval(row.get('val_ci'))}" if row.get("val_ci") else ""
    seed = f", seed {r.seed}" if r.seed is not None else ""
    line = (f"{name} cut {r.cut} ({r.cut_name}){stage}: val {metric.upper()} {fmt_value(trial.value)}{interval}, "
            f"test {fmt_value(r.test.get(metric))}, {fmt_count(r.params)} params{seed}")
    if r.reused_from is not None:
        source = r.reused_from if not r.part or isinstance(r.reused_from, str) else f"{r.reused_from} of study {study_name}"
        line += f", same model as trial {source}"
    if r.ref == chosen:
        line += ", CHOSEN"
    elif row.get("indistinguishable") and r.strategy == SEARCH_STRATEGY:
        line += ", indistinguishable from the best cut"
    return line


def study_note(best: dict[str, Any], trials: Sequence[FrozenTrial], cfg, baselines: str | None = None) -> str:
    """The study's note: the answer, the ranking as a table (baselines included), where the
    baselines are (``baselines``: the baselines study's name), and how the pick differs from
    Optuna's plain maximum of ``trials`` (the study's own: what optuna-dashboard calls "Best Trial")."""
    metric = cfg.metric
    level = f"{best['confidence']:.0%}"
    lines = [
        f"## Chosen: {best['model']} ({best['cut_name']}), trial {best['trial']}",
        "",
        f"Validation {metric} {fmt_value(best['val'].get(metric))}, {level} interval "
        f"{fmt_interval(best['val_ci'])}; test {metric} {fmt_value(best['test'].get(metric))}; "
        f"{fmt_count(best['params'])} parameters (full model {fmt_count(best['full']['params'])}). "
        f"Rule `{best['rule']}`: " + ("the smallest model among the candidates indistinguishable from the best "
                                      "(paired bootstrap)." if best["rule"] == "smallest_within_ci"
                                      else "the best mean validation metric.")
        + (" Candidates: the fine-tuned cuts, the frozen probe at every cut and the baselines."
           if best.get("candidates") == "all" else " Candidates: the fine-tuned cuts.")
        + (f" Guards: not significantly worse than the best on {', '.join(best['guards'])}, and an accuracy above "
           "the majority class's." if best.get("guards") else ""),
        "",
    ]
    if line := ensemble_line(best, metric):
        lines += [line, ""]
    if budget := best.get("budget"):
        over = [str(o["cut"]) for o in budget["over_budget"] if o["strategy"] == "ttl"]
        lines += [f"Budget `{budget['limits']}`: cuts over it, never trained nor chosen: {', '.join(over) or 'none'}"
                  " (`ttl-search best` lists every cut's cost).", ""]
    if baselines:
        lines += [f"This study holds the search's trials only, so its plots, history and \"Best Trial\" show the "
                  f"search. The baselines (and the frozen probe's model) are in study `{baselines}`; the table "
                  "below ranks them with the search's cuts (`baselines:N` are that study's trials).", ""]
    plain = _plain_maximum(trials, cfg.resolved_direction)
    if plain is not None and plain.number != best["trial"]:
        r = TrialRecord.from_trial(plain)
        lines += [f"**Optuna's \"Best Trial\" is trial {plain.number}** ({STRATEGY_NAMES.get(r.strategy, r.strategy)} "
                  f"cut {r.cut}, the plain maximum of val_{metric}, {fmt_value(plain.value)}): it is not the "
                  f"answer. ttl-search chooses trial {best['trial']} ({best['model']}) under rule "
                  f"`{best['rule']}`; indistinguishable from the best: {', '.join(best['close'])}.", ""]
    lines += ["| model | cut | name | params | seeds | val mean | interval | vs best (paired) | | trials |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in best["ranking"]:
        mark = "**chosen**" if r["chosen"] else ("excluded" if r.get("excluded") else
                                                 "same" if r["indistinguishable"] else "")
        lines.append(f"| {STRATEGY_NAMES.get(r['strategy'], r['strategy'])} | {r['cut']} | {r['cut_name']} | "
                     f"{fmt_count(r['params'])} | {r['repeats']} | {fmt_value(r['mean_val'])} | "
                     f"{fmt_interval(r['val_ci'])} | {fmt_diff(r['diff'], r['diff_ci'])} | {mark} | "
                     f"{', '.join(map(str, r['trials']))} |")
    return "\n".join(lines) + "\n"


def _plain_maximum(trials: Sequence[FrozenTrial], direction: str) -> FrozenTrial | None:
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if not done:
        return None
    sign = 1.0 if direction == "maximize" else -1.0
    return max(done, key=lambda t: (sign * t.value, -t.number))


def _save_note(study: optuna.Study, trial: FrozenTrial | None, body: str, system_attrs: dict[str, Any]) -> None:
    """Save an optuna-dashboard note of the study (``trial`` None) or of a finished trial, unless it
    already says ``body``. Notes live in the study's system attributes (``system_attrs``: a copy,
    kept up to date here), so a finished trial's can be written."""
    try:
        from optuna_dashboard._note import (get_note_from_system_attrs, note_str_key_prefix, note_ver_key,
                                            save_note_with_version, split_body)
    except ImportError:  # the dashboard extra is not installed: nothing draws notes
        return
    trial_id = trial._trial_id if trial is not None else None
    if get_note_from_system_attrs(system_attrs, trial_id)["body"] == body:
        return
    version = system_attrs.get(note_ver_key(trial_id), 0) + 1
    save_note_with_version(study._storage, study._study_id, trial_id, version, body)
    # the copy, as save_note_with_version left the storage: the new parts, older extra parts blanked
    prefix = note_str_key_prefix(trial_id)
    system_attrs.update({k: "" for k in system_attrs if k.startswith(prefix)})
    system_attrs.update(split_body(body, trial_id))
    system_attrs[note_ver_key(trial_id)] = version


# ---------------------------------------------------------------------------------------------
# Serving


class StudyArtifactStores:
    """Optuna's artifact store over several folders: each study's own (``artifacts:`` in its file,
    or ``ttl-artifacts/`` beside a SQLite database). Reads and deletions find the artifact in
    whichever folder holds it; uploads from the dashboard go to the first folder."""

    def __init__(self, folders: Iterable[Path], refresh: Callable[[], Iterable[Path]] | None = None) -> None:
        self.refresh = refresh
        """Lists the folders again when an artifact is in none of them (a study created since)."""
        self._set(folders)
        if not self.folders:
            raise ConfigError("no artifact folder to serve")

    def _set(self, folders: Iterable[Path]) -> None:
        from optuna.artifacts import FileSystemArtifactStore

        self.folders = list(dict.fromkeys(Path(f).resolve() for f in folders))
        self._stores = [FileSystemArtifactStore(f / "store") for f in self.folders]

    def _find(self, artifact_id: str):
        for attempt in range(2):
            for folder, store in zip(self.folders, self._stores):
                if (folder / "store" / artifact_id).is_file():
                    return store
            if attempt == 0 and self.refresh is not None:
                self._set(self.refresh())
        from optuna.artifacts.exceptions import ArtifactNotFound

        raise ArtifactNotFound(f"artifact {artifact_id} is in none of {', '.join(map(str, self.folders))}")

    def open_reader(self, artifact_id: str) -> BinaryIO:
        return self._find(artifact_id).open_reader(artifact_id)

    def write(self, artifact_id: str, content_body: BinaryIO) -> None:
        (self.folders[0] / "store").mkdir(parents=True, exist_ok=True)
        self._stores[0].write(artifact_id, content_body)

    def remove(self, artifact_id: str) -> None:
        self._find(artifact_id).remove(artifact_id)


def study_artifact_folders(url: str, extra: str | None = None) -> list[Path]:
    """The artifact folder of every ttl-search study in the database (and ``extra``), then the
    default one beside a SQLite database."""
    from . import artifacts_dir, default_artifacts_dir, stored_config

    rdb = open_storage(url)
    folders = [Path(extra)] if extra else []
    for name in study_names(rdb):
        try:
            folders.append(artifacts_dir(stored_config(load_study(name, rdb)), url))
        except (StudyError, ConfigError) as exc:  # not a ttl-search study, or an unreadable config
            log.debug("study %s: no artifact folder of its own (%s)", name, exc)
    folders.append(default_artifacts_dir(url))
    return list(dict.fromkeys(f.resolve() for f in folders))


def read_only(app: Callable, allow_deletions: bool) -> Callable:
    """WSGI middleware: refuse every DELETE with HTTP 403 unless ``allow_deletions``."""
    if allow_deletions:
        return app

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD", "GET").upper() == "DELETE":
            body = json.dumps({"reason": "this dashboard is read-only: start it with `ttl-search dashboard "
                                         "--allow-deletions` to delete studies, trials or artifacts"}).encode()
            start_response("403 Forbidden", [("Content-Type", "application/json"),
                                             ("Content-Length", str(len(body)))])
            return [body]
        return app(environ, start_response)

    return guarded


def dashboard_app(storage: str | None = None, artifacts: str | None = None, allow_deletions: bool = False) -> Callable:
    """The WSGI app of optuna-dashboard on the study database, serving every study's artifacts."""
    try:
        from optuna_dashboard import wsgi
    except ImportError as exc:
        raise ConfigError("the dashboard needs optuna-dashboard: pip install 'ttl-search[dashboard]'") from exc
    url = storage_url(storage)
    stores = StudyArtifactStores(study_artifact_folders(url, artifacts),
                                 refresh=lambda: study_artifact_folders(url, artifacts))
    log.info("serving the artifacts of %s", ", ".join(map(str, stores.folders)))
    return read_only(wsgi(open_storage(url), artifact_store=stores), allow_deletions)


def serve_dashboard(storage: str | None = None, host: str = "127.0.0.1", port: int = 8080,
                    artifacts: str | None = None, allow_deletions: bool = False) -> None:
    """Serve optuna-dashboard on the study database (blocks): see :func:`dashboard_app`."""
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.debug("%s %s", self.address_string(), format % args)

    app = dashboard_app(storage, artifacts, allow_deletions)
    with make_server(host, port, app, server_class=Server, handler_class=Quiet) as server:
        server.serve_forever()
