"""``python -m core jobs``: submit, list, show, wait, cancel and retry jobs, and manage the embedded cluster.

Kept apart from ``services.cli`` so that ``jobs`` commands start without loading torch (``core/__main__.py``
dispatches them here directly); only ``submit`` loads what its kind's parameter check needs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from db.session import init_db

__all__ = ["add_parser", "main", "run"]


class UsageError(ValueError):
    """A problem the user can fix; printed as ``error: ...``, exit status 2."""


def _job_params(tokens: Sequence[str]) -> dict[str, object]:
    """``--key value [value ...]`` pairs as parameters: hyphens become underscores, numbers are numbers, a flag
    without a value is true, several values are a list (``--counts 40 10 20``)."""

    def value(text: str) -> object:
        try:
            return json.loads(text)
        except ValueError:
            return text

    params: dict[str, object] = {}
    key = None
    for token in tokens:
        if token.startswith("--") and len(token) > 2:
            key = token[2:].replace("-", "_")
            key = {"policy": "threshold_policy"}.get(key, key)
            params[key] = True
        elif key is None:
            raise UsageError(f"expected --name value pairs, not {token!r}")
        elif params[key] is True:
            params[key] = value(token)
        elif isinstance(params[key], list):
            params[key].append(value(token))
        else:
            params[key] = [params[key], value(token)]
    return params


def run(args: argparse.Namespace) -> int:
    from services.jobs import service, store

    init_db()
    if args.action == "submit":
        if not args.target:
            raise UsageError("give the kind: python -m core jobs submit KIND --option value ...")
        params = _job_params(args.rest)
        if args.params:
            params = {**json.loads(args.params), **params}
        try:
            job_id = service.submit(args.target, params, user_id=None)
        except service.JobNotLaunched as error:
            print(f"warning: {error}", file=sys.stderr)
            job_id = error.job_id
        print(json.dumps({"id": job_id}))
        return 0
    if args.rest:
        raise UsageError(f"unexpected arguments: {' '.join(args.rest)}")
    if args.action == "list":
        jobs = store.list_jobs(limit=args.limit)
        if args.json:
            print(json.dumps([j.to_json() for j in jobs], indent=2))
            return 0
        for job in jobs:
            seconds = "" if job.seconds is None else f"{job.seconds:7.1f} s"
            print(f"{job.id:>5}  {job.state:<11} {job.progress:4.0%}  {seconds:>9}  {job.kind:<18} {job.title}")
        return 0
    if args.action == "cluster":
        from services.jobs import engine

        if args.stop:
            print("stopped" if engine.stop_embedded() else "no embedded cluster was running")
            return 0
        info = engine.cluster_info()
        print(json.dumps(info.__dict__))
        return 0
    if args.action == "reconcile":
        from services.jobs import engine

        print(json.dumps(engine.reconcile()))
        return 0
    if not args.target or not args.target.isdigit():
        raise UsageError(f"give the job id: python -m core jobs {args.action} ID")
    job_id = int(args.target)
    job = store.get_job(job_id)
    if job is None:
        raise UsageError(f"no job {job_id}; see python -m core jobs list")
    if args.action == "show":
        if args.json:
            print(json.dumps(job.to_json(), indent=2))
        else:
            for key, value in job.to_json().items():
                if key != "log_tail":
                    print(f"{key:>12}: {value}")
            print(job.log_tail)
        return 0
    if args.action == "cancel":
        state = service.cancel(job_id, user_id=None)
        print(json.dumps({"id": job_id, "state": state}))
        return 0 if state == "cancelled" else 2
    if args.action == "retry":
        print(json.dumps({"id": service.retry(job_id, user_id=None), "retry_of": job_id}))
        return 0
    # wait
    job = service.wait(job_id, timeout=args.timeout)
    print(json.dumps({"id": job.id, "state": job.state, "result": job.result, "error": job.error}))
    if job.state == "succeeded":
        return 0
    return 3 if job.state in ("queued", "running") else 1


def add_parser(sub: Any) -> argparse.ArgumentParser:
    jobs = sub.add_parser(
        "jobs",
        help="long work on the cluster: submit, list, show, wait, cancel, retry",
        description="submit KIND [--option value ...] | list [--json] | show ID [--json] | wait ID [--timeout S] | "
        "cancel ID | retry ID | cluster [--stop] | reconcile. Kinds: train (the train command's options), import "
        "(--folder DIR | --zip FILE), localization-study (--study S), mosaic, scorecam, study-ai (--study ID), demo.",
    )
    jobs.add_argument("action", choices=["submit", "list", "show", "wait", "cancel", "retry", "cluster", "reconcile"])
    jobs.add_argument("target", nargs="?", metavar="KIND|ID")
    jobs.add_argument("--json", action="store_true", help="list, show: JSON")
    jobs.add_argument("--timeout", type=float, help="wait: give up after S seconds (exit 3)")
    jobs.add_argument("--limit", type=int, default=50, help="list: newest N")
    jobs.add_argument("--params", help="submit: parameters as a JSON object (options given after it win)")
    jobs.add_argument("--stop", action="store_true", help="cluster: stop the workspace's embedded cluster")
    jobs.set_defaults(run=run)
    return jobs


def main(argv: Sequence[str]) -> int:
    """``python -m core jobs ...`` (``argv`` starts with ``jobs``)."""
    parser = argparse.ArgumentParser(prog="python -m core")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args, rest = parser.parse_known_args(argv)
    args.rest = rest
    try:
        return run(args)
    except (UsageError, ValueError, FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
