"""Shards of one matrix (``--lora-shard=K/N`` on several machines) joined into one run.

``pytest-lora merge A.json B.json ... -o RUN.json`` refuses what would make the joined run a lie:
documents of another schema version, a config measured in two shards, shards of different
library versions, hardware or code (unless ``allow_mixed`` says the user means it: the joined
run then lists each shard's machine). The joined run's status is the worst of the shards', its
times span theirs, and ``run.shards`` says which shard came from which run.
"""

from __future__ import annotations

from typing import Any

from . import provenance
from .identity import HARDWARE_FIELDS, config_key, config_name
from .store import SCHEMA_VERSION

VERSION_FIELDS = ("torch", "transformers", "peft", "bitsandbytes", "python")
STATUS_RANK = ("passed", "failed", "interrupted", "running")  # the joined status is the last of these a shard has


class MergeError(Exception):
    """Shards that can't be one run; the message says why and what would be accepted."""


def joined_builds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The shards' base builds, counted together: a base two shards both built shows as built twice."""
    joined: dict[tuple[str, str, str], dict[str, Any]] = {}
    for build in (build for run in runs for build in run.get("builds") or ()):
        key = (build["model"], build["quant"], build["device"])
        joined.setdefault(key, {**build, "count": 0})["count"] += build["count"]
    return list(joined.values())


def merge(documents: list[dict[str, Any]], names: list[str], allow_mixed: bool = False) -> dict[str, Any]:
    """One results document from the shards' documents (``names``: where each came from, for errors)."""
    for document, name in zip(documents, names):
        if document.get("schema_version") != SCHEMA_VERSION:
            raise MergeError(f"{name}: schema_version {document.get('schema_version')!r}; allowed: {SCHEMA_VERSION} in every shard")
    _check_duplicates(documents, names)
    differences = _differences(documents, names)
    if differences and not allow_mixed:
        raise MergeError("the shards differ: " + "; ".join(differences) + " (--allow-mixed joins them anyway, and lists each shard's machine)")
    runs = [document["run"] for document in documents]
    run = {
        "id": provenance.new_run_id(),
        "started": min(r.get("started") or "" for r in runs),
        "finished": max(r.get("finished") or "" for r in runs),
        "argv": ["pytest-lora", "merge", *names],
        "git": runs[0].get("git"),
        "status": max((r.get("status") or "running" for r in runs), key=lambda s: STATUS_RANK.index(s) if s in STATUS_RANK else len(STATUS_RANK)),
        "shards": [{"id": r.get("id"), "shard": r.get("shard"), "status": r.get("status"), "from": name} for r, name in zip(runs, names)],
        "builds": joined_builds(runs),
    }
    merged = {"schema_version": SCHEMA_VERSION, "run": run, "machine": dict(documents[0]["machine"]),
              "records": [record for document in documents for record in document["records"]]}
    if differences:
        merged["run"]["machines"] = [document["machine"] for document in documents]
    return merged


def _check_duplicates(documents: list[dict[str, Any]], names: list[str]) -> None:
    seen: dict[tuple, str] = {}
    for document, name in zip(documents, names):
        for record in document["records"]:
            key = config_key(record)
            if key in seen:
                raise MergeError(f"{config_name(record)} is in {seen[key]} and in {name}; allowed: each config in one shard "
                                 f"(the shards of one --lora-shard=K/N matrix never overlap)")
            seen[key] = name


def _differences(documents: list[dict[str, Any]], names: list[str]) -> list[str]:
    first, found = documents[0], []
    for document, name in zip(documents[1:], names[1:]):
        for field in (*VERSION_FIELDS, *HARDWARE_FIELDS):
            if document["machine"].get(field) != first["machine"].get(field):
                found.append(f"{field} {first['machine'].get(field)} in {names[0]}, {document['machine'].get(field)} in {name}")
        commit, other = (first["run"].get("git") or {}).get("commit"), (document["run"].get("git") or {}).get("commit")
        if commit != other:
            found.append(f"commit {commit} in {names[0]}, {other} in {name}")
    return list(dict.fromkeys(found))
