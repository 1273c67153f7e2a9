"""manifest.json: canonical JSON, reading with validation, identity (`id`) and recipe (`fingerprint`) hashes."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gentool import console
from gentool.artifacts.kinds import KINDS, PREFIX, format_name, kind_of
from gentool.errors import GentoolError, UsageProblem

MANIFEST = "manifest.json"
# invocation: the command's resolved arguments and options, so `--config OUT/manifest.json` re-runs it exactly
_SECTIONS = ("config", "contents", "metrics", "environment", "invocation")
_KNOWN_KEYS = {"format", "format_version", "id", "fingerprint", "gentool_version", "created_at", "command", "inputs",
               "files", *_SECTIONS}


def canonical_json(obj: Any) -> str:
    return json.dumps(console.jsonable(obj), sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


def sha256_text(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def content_id(files: dict[str, Any]) -> str:
    return sha256_text(canonical_json(files))


def fingerprint(format_: str, format_version: int, config: dict, inputs: list[dict]) -> str:
    ids = [i.get("id") or i.get("sha256") for i in inputs]
    return sha256_text(canonical_json({"format": format_, "format_version": format_version, "config": config,
                                       "inputs": ids}))


@dataclass
class Manifest:
    path: Path                      # the artifact directory
    format: str
    format_version: int
    id: str = ""
    fingerprint: str = ""
    gentool_version: str = ""
    created_at: str = ""
    command: list[str] = field(default_factory=list)
    inputs: list[dict] = field(default_factory=list)
    files: dict[str, dict] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    contents: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)
    invocation: dict = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return kind_of(self.format)

    def file(self, name: str) -> Path:
        return self.path / name

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("format", "format_version", "id", "fingerprint", "gentool_version",
                                               "created_at", "command", "inputs", "files", *_SECTIONS)}

    def to_json(self) -> str:
        return canonical_json(self.to_dict())


def parse_manifest(text: str, path: Path) -> Manifest:
    """Validate the envelope. Unknown keys are tolerated with a warning (a newer gentool may add some)."""
    where = path / MANIFEST
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GentoolError(f"manifest is not valid JSON ({e})", path=where,
                           hint="the artifact is corrupt; re-create it") from None
    if not isinstance(data, dict):
        raise GentoolError("manifest is not a JSON object", path=where, hint="the artifact is corrupt; re-create it")
    fmt = data.get("format")
    version = data.get("format_version")
    if not isinstance(fmt, str) or not fmt.startswith(PREFIX):
        raise UsageProblem("not a gentool manifest (no gentool.* format)", path=where)
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise GentoolError("manifest has no valid format_version", path=where, hint="the artifact is corrupt")
    if kind_of(fmt) in KINDS and version > KINDS[kind_of(fmt)]:
        raise UsageProblem(f"{fmt} format_version {version} is newer than this gentool supports "
                           f"({KINDS[kind_of(fmt)]})", path=where, hint="upgrade gentool")
    files = data.get("files", {})
    if not isinstance(files, dict) or not all(
            isinstance(k, str) and isinstance(v, dict) and isinstance(v.get("bytes", 0), int) for k, v in files.items()):
        raise GentoolError("manifest 'files' is malformed", path=where, hint="the artifact is corrupt")
    for name in files:
        if name.startswith("/") or ".." in Path(name).parts:
            raise GentoolError(f"manifest names a file outside the artifact: {name!r}", path=where)
    if unknown := sorted(set(data) - _KNOWN_KEYS):
        console.warn(f"{where}: unknown manifest field(s) {', '.join(map(repr, unknown))} ignored (written by a "
                     f"newer gentool?)")
    kwargs: dict[str, Any] = {"path": path, "format": fmt, "format_version": version, "files": files}
    for key, typ in (("id", str), ("fingerprint", str), ("gentool_version", str), ("created_at", str),
                     ("command", list), ("inputs", list), *((s, dict) for s in _SECTIONS)):
        value = data.get(key)
        if value is None:
            continue
        if not isinstance(value, typ):
            raise GentoolError(f"manifest field {key!r} should be a {typ.__name__}", path=where,
                               hint="the artifact is corrupt")
        kwargs[key] = value
    return Manifest(**kwargs)


def expected_formats(kind: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if kind is None:
        return ()
    kinds = (kind,) if isinstance(kind, str) else kind
    return tuple(format_name(k) for k in kinds)
