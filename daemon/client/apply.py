"""``apply``: make the daemon's services match a file (see :mod:`~daemon.client.applyfile`).

A service of the file is the daemon's service of the same project and name (a service deployed
without a name counts by its model name). :func:`compute_plan`, a pure function, says what to do
with each: ``create`` what is missing, ``replace`` what changed (in place: same uuid, URL and
port, through the deploy's replace), leave ``unchanged`` what did not (same pids, no restart),
and with ``prune`` ``delete`` the services of the same project that the file no longer has.
:func:`run_apply` carries the plan out service by service: deletes first (they free ports and
room), then the file's services in its order; one that fails is reported and the others go on.
One apply of a home at a time: the plan and its steps hold ``apply.lock`` (see
:mod:`~daemon.client.applylock`), so a second apply plans against the state the first left.

What is compared: every field the file sets, and the defaults of those it leaves out, except
``python``, ``working_dir`` and ``search_path`` when the file leaves them unset (the applying
client's own; a replace keeps the service's), and ``port`` when the file leaves it 0 (the daemon
picked one and keeps it). The daemon never shows a secret env value, so the client reads those
from the service's record in its home to compare them (a service whose record it cannot read
counts as changed in ``env``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field

from ..config import REDACTED, ServiceConfig
from ..exceptions import ModeldError, ServiceNotFound
from ..models import BaseService
from ..paths import Paths
from . import operations as op
from .applyfile import (
    CLIENT_DEFAULTS,
    ApplyFileError,
    Desired,
    anchored,
    export_text,
    read_desired,
    service_key,
)
from .applylock import ApplyLock
from .transport import Request

if TYPE_CHECKING:
    from .calls import DaemonClient  # (for readers and mypy only: calls imports this module when it applies)

Action = Literal["create", "replace", "delete", "unchanged"]


class Step(BaseModel):
    """What apply does (or did) with one service."""

    action: Action
    name: str
    uuid: str | None = Field(None, description="the daemon's service (none for a create not done yet)")
    changed: list[str] = Field(default_factory=list, description="the fields that differ (a replace)")
    status: Literal["planned", "done", "failed"] = "planned"
    error: str | None = None


class ApplyReport(BaseModel):
    """The plan (``dry_run``: nothing was changed) or the result of an apply: a step per service."""

    source: str
    project: str
    dry_run: bool = False
    prune: bool = False
    steps: list[Step] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list, description="what the plan decided beside the steps")

    @property
    def ok(self) -> bool:
        return not any(s.status == "failed" for s in self.steps)

    def of(self, *actions: Action) -> list[Step]:
        return [s for s in self.steps if s.action in actions]


def compute_plan(
    desired: Desired,
    current: Sequence[Mapping[str, Any]],
    prune: bool = False,
    secrets: Mapping[str, Mapping[str, str]] | None = None,
) -> ApplyReport:
    """The steps that make ``current`` (the daemon's services as JSON, as find answers them: secret env
    values masked) match ``desired``.

    ``secrets``: the real env values of services, by uuid, where the daemon showed them masked.
    (JSON rather than ``BaseService`` objects: reading 100 services back as models would cost more
    than the whole plan; see ``apply_noop_ms`` in scripts/bench_apply.py.)
    """
    report = ApplyReport(source=desired.source, project=desired.project, prune=prune)
    mine: dict[str, list[Mapping[str, Any]]] = {}
    for svc in current:
        config = svc["config"]
        if config.get("project", "") == desired.project:
            mine.setdefault(config.get("name") or config.get("model_name", ""), []).append(svc)
    for name, same in mine.items():
        same.sort(key=lambda s: float(s.get("created_at", 0)), reverse=True)
        if len(same) > 1 and name in desired.services:
            others = ", ".join(str(s["uuid"])[:8] for s in same[1:])
            report.notes.append(f"{name}: {len(same)} services have this name; the newest is applied, not {others}")
    for name, config in desired.services.items():
        found = mine.get(name)
        if not found:
            report.steps.append(Step(action="create", name=name))
            continue
        uuid = str(found[0]["uuid"])
        changed = changed_fields(config, desired.given.get(name, set()), found[0]["config"], (secrets or {}).get(uuid))
        report.steps.append(Step(action="replace" if changed else "unchanged", name=name, uuid=uuid, changed=changed))
    if prune:
        for name, same in mine.items():
            left = same if name not in desired.services else same[1:]
            report.steps += [Step(action="delete", name=name, uuid=str(s["uuid"])) for s in left]
    return report


def changed_fields(
    config: ServiceConfig, given: set[str], have: Mapping[str, Any], secrets: Mapping[str, str] | None = None
) -> list[str]:
    """The fields of ``config`` (from a file that set ``given``) that differ from ``have`` (a service's
    config as JSON), dotted (``restart.max_restarts``); [] when it is unchanged."""
    want = config.model_dump(mode="json")
    out: list[str] = []
    for key, value in want.items():
        if key in ("name", "project") or (key in CLIENT_DEFAULTS and key not in given):
            continue
        if key == "port" and value == 0:
            continue
        current = have.get(key)
        if key == "model_uri" and isinstance(current, str) and have.get("working_dir"):
            current = anchored(current, str(have.get("model_type", "")), str(have["working_dir"]))  # (as its server reads it)
        if key == "env":
            if _env_differs(config, value, current if isinstance(current, dict) else {}, secrets):
                out.append(key)
        elif isinstance(value, dict) and isinstance(current, dict):
            out += [f"{key}.{k}" for k in value if value[k] != current.get(k)]
        elif value != current:
            out.append(key)
    return out


def _env_differs(config: ServiceConfig, want: dict[str, str], have: dict[str, str], secrets: Mapping[str, str] | None) -> bool:
    if set(want) != set(have):
        return True
    for key, value in want.items():
        shown = have[key]
        if shown == REDACTED and config.is_secret(key):
            if secrets is None or secrets.get(key) != value:
                return True
        elif shown != value:
            return True
    return False


def recorded_secrets(paths: Paths, services: Sequence[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """The real env values of the services that show a masked one, read from their records in the
    home (the client runs as the daemon's user: the 0700 home is its own); a record it cannot
    read is left out, so its service counts as changed."""
    out: dict[str, dict[str, str]] = {}
    for svc in services:
        if REDACTED not in (svc["config"].get("env") or {}).values():
            continue
        uuid = str(svc["uuid"])
        try:
            with open(paths.service_json(uuid), "rb") as f:
                env = json.load(f)["config"]["env"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if isinstance(env, dict):
            out[uuid] = {str(k): str(v) for k, v in env.items()}
    return out


def desired_of(source: str | os.PathLike[str] | Mapping[str, Any], prune: bool, environ: Mapping[str, str] | None) -> Desired:
    """The file, validated whole (``ApplyFileError`` naming the file, the service and the field)."""
    desired = read_desired(source, environ)
    if prune and not desired.project:
        raise ApplyFileError(
            f"{desired.source}: --prune needs a top-level project: it deletes that project's services the file does not "
            "have, and a file without one would delete every service deployed without a project"
        )
    return desired


def listing(desired: Desired) -> op.Call[list[dict[str, Any]]]:
    """The services of the file's project, as JSON (see compute_plan); the same request as find(project=...)."""
    return op.Call(Request("GET", "/v1/services", {"project": desired.project}), lambda data: list(data["services"]))


def calls_of(
    report: ApplyReport, desired: Desired, current: Sequence[Mapping[str, Any]], timeout: float
) -> list[tuple[Step, op.Call[Any]]]:
    """The requests that carry the plan out, in order: deletes first (a stable sort: then the file's order).
    The clients run them one by one (``record`` each result) and mark a step that raises as failed."""
    by_uuid = {str(s["uuid"]): s["config"] for s in current}
    calls: list[tuple[Step, op.Call[Any]]] = []
    for step in sorted(report.steps, key=lambda s: s.action != "delete"):
        if step.action == "unchanged":
            step.status = "done"
        elif step.action == "delete":
            assert step.uuid is not None
            calls.append((step, op.delete(step.uuid, timeout, False)))
        elif step.action == "create":
            calls.append((step, op.deploy(desired.services[step.name], False, timeout, None)))
        else:
            assert step.uuid is not None
            old = by_uuid[step.uuid]
            keep = {k: old[k] for k in CLIENT_DEFAULTS if k in old}
            config = desired.services[step.name].model_copy(
                update={k: v for k, v in keep.items() if k not in desired.given.get(step.name, set())}
            )
            calls.append((step, op.deploy(config, True, timeout, step.uuid)))
    return calls


def record(step: Step, result: Any) -> None:
    step.status = "done"
    if isinstance(result, BaseService):
        step.uuid = str(result.uuid)


def failed(step: Step, exc: ModeldError) -> None:
    step.status, step.error = "failed", exc.message


def run_apply(
    client: DaemonClient,
    source: str | os.PathLike[str] | Mapping[str, Any],
    prune: bool = False,
    dry_run: bool = False,
    timeout: float = 300.0,
    environ: Mapping[str, str] | None = None,
) -> ApplyReport:
    """Validate ``source`` whole, plan, and (unless ``dry_run``) carry the plan out; see the module.
    The plan and its steps hold the home's apply lock (daemon/client/applylock.py): another apply
    waits. (``AsyncDaemonClient.apply`` is the same steps, awaited.)"""
    desired = desired_of(source, prune, environ)
    lock = ApplyLock(client.paths)
    if not dry_run:
        lock.acquire()
    try:
        current = client._run(listing(desired))
        report = planned(desired, current, prune, dry_run, client.paths, lock)
        for step, call in [] if dry_run else calls_of(report, desired, current, timeout):
            try:
                record(step, client._run(call))
            except ModeldError as exc:
                failed(step, exc)
    finally:
        lock.release()
    return report


def planned(
    desired: Desired, current: Sequence[Mapping[str, Any]], prune: bool, dry_run: bool, paths: Paths, lock: ApplyLock
) -> ApplyReport:
    """compute_plan, with the secrets of the records in ``paths`` and a note when the apply waited for another."""
    report = compute_plan(desired, current, prune, recorded_secrets(paths, current))
    report.dry_run = dry_run
    if note := lock.note():
        report.notes.append(note)
    return report


def describe(report: ApplyReport) -> list[str]:
    """The report as lines for people: one a service, then the notes and a summary."""
    lines = []
    for step in report.steps:
        what = f"{step.action:<9} {step.name}"
        if step.uuid:
            what += f" ({step.uuid[:8]})"
        if step.changed:
            what += ": " + ", ".join(step.changed)
        if step.status == "failed":
            what += f"  FAILED: {step.error}"
        lines.append(what)
    lines += [f"note: {n}" for n in report.notes]
    where = f"project {report.project!r}" if report.project else "no project"
    if report.dry_run:
        counts = {a: len(report.of(a)) for a in ACTIONS}
        summary = ", ".join(f"{n} {a}" for a, n in counts.items() if n) or "no services"
        lines.append(f"plan for {report.source} ({where}): {summary}; nothing changed (--dry-run)")
    else:
        failed = [s.name for s in report.steps if s.status == "failed"]
        done = [s.name for s in report.steps if s.status == "done" and s.action != "unchanged"]
        lines.append(f"applied {report.source} ({where}): {outcome(report)}")
        if failed:
            lines.append(f"failed: {', '.join(failed)}; applied: {', '.join(done) or 'none'}")
    return lines


ACTIONS: tuple[Action, ...] = ("create", "replace", "delete", "unchanged")
_DONE = {"create": "created", "replace": "replaced", "delete": "deleted", "unchanged": "unchanged"}


def outcome(report: ApplyReport) -> str:
    """What was done and what failed, per action (``3 created, 1 create failed, 2 unchanged``)."""
    parts = []
    for action in ACTIONS:
        steps = report.of(action)
        done, failed = sum(s.status == "done" for s in steps), sum(s.status == "failed" for s in steps)
        parts += [f"{done} {_DONE[action]}"] if done else []
        parts += [f"{failed} {action} failed"] if failed else []
    return ", ".join(parts) or "no services"


def export_services(client: DaemonClient, project: str | None = None) -> str:
    """The TOML of the daemon's services of ``project`` (None: all, which must be of one project);
    ServiceNotFound when ``project`` has none."""
    found = client.find(project=project)
    if project is not None and not found:
        raise no_such_project(project, client.find())
    return export_of(found, project)


def no_such_project(project: str, everything: Sequence[BaseService]) -> ServiceNotFound:
    """The error of an export of a project without services (a typo, most likely), naming those there are."""
    there = sorted({s.config.project for s in everything})
    shown = ", ".join(repr(p) for p in there) if there else "none: the daemon has no services"
    return ServiceNotFound(f"no service of project {project!r}: nothing to export (the projects there are: {shown})")


def export_of(found: Sequence[BaseService], project: str | None) -> str:
    """The TOML of these services (found with ``project``); a service that cannot be written (no name,
    or a name another has) is named in a comment."""
    services = sorted(found, key=lambda s: s.created_at)
    projects = sorted({s.config.project for s in services})
    if len(projects) > 1:
        shown = ", ".join(repr(p) for p in projects)
        raise ApplyFileError(f"the services are of several projects ({shown}): export one with --project")
    chosen: dict[str, BaseService] = {}
    left: list[str] = []
    for svc in services:
        name = service_key(svc.config)
        if not name:
            left.append(f"{svc.uuid}: it has neither a name nor a model name")
            continue
        if name in chosen:
            left.append(f"{chosen[name].uuid}: {svc.uuid} of the same name is newer")
        chosen[name] = svc
    configs = [absolute_model(s.config) for s in chosen.values()]
    text = export_text(projects[0] if projects else (project or ""), configs)
    return text + "".join(f"\n# not exported: {why}" for why in left) + ("\n" if left else "")


def absolute_model(config: ServiceConfig) -> ServiceConfig:
    """``config`` with the file its model_uri names absolute (a relative one is read in its working_dir,
    as its server reads it), so that the export means the same file from wherever it is applied."""
    if not config.model_uri or not config.working_dir:
        return config
    uri = anchored(config.model_uri, config.model_type, config.working_dir)
    return config if uri == config.model_uri else config.model_copy(update={"model_uri": uri})
