"""Reading and writing artifact directories: verification, and atomic creation (temp sibling, manifest last, rename)."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import shutil
import sys
import uuid
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Iterator

from gentool import __version__
from gentool.artifacts.kinds import KINDS, format_name
from gentool.artifacts.manifest import (MANIFEST, Manifest, content_id, expected_formats, fingerprint,
                                        parse_manifest)
from gentool.errors import GentoolError, UsageProblem

_CHUNK = 1 << 20
# What the running command was asked, set by the CLI (cli/_recipe.py) and recorded in every manifest it writes:
# {"command": "train-lm", "arguments": {...}, "options": {...}}.
INVOCATION: ContextVar[dict[str, Any] | None] = ContextVar("gentool_invocation", default=None)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_entry(path: Path) -> dict[str, Any]:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_artifact(path: str | Path, kind: str | tuple[str, ...] | None = None, *, verify: bool = True) -> Manifest:
    """Read and validate DIR/manifest.json; with `kind`, refuse other kinds; with `verify`, check every file's hash."""
    path = Path(path)
    wanted = expected_formats(kind)
    want_text = " or ".join(wanted) if wanted else "a gentool artifact"
    if not path.exists():
        partial = path.with_name(path.name + ".partial")
        if partial.is_dir():
            raise UsageProblem("incomplete run", path=path, hint=f"resume it with --resume or delete {partial}")
        raise UsageProblem("no such file or directory", path=path, hint=f"pass {want_text} directory")
    if not path.is_dir():
        raise UsageProblem(f"is a file, expected {want_text} directory", path=path)
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise UsageProblem(f"no {MANIFEST}: not a gentool artifact", path=path, hint=f"pass {want_text} directory")
    try:
        text = mpath.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise GentoolError(f"cannot read manifest ({e})", path=mpath) from None
    manifest = parse_manifest(text, path)
    if wanted and manifest.format not in wanted:
        raise UsageProblem(f"expected {want_text}, found {manifest.format}", path=path,
                           hint=f"pass {want_text} directory")
    verify_files(manifest, hashes=verify)
    return manifest


def verify_files(manifest: Manifest, *, hashes: bool = True) -> None:
    """Every listed file exists with its size (always) and sha256 (unless hashes=False). Resume state is skipped."""
    for name, entry in manifest.files.items():
        if entry.get("role") == "resume":
            continue
        f = manifest.path / name
        if not f.is_file():
            raise GentoolError(f"missing file {name} listed in the manifest", path=manifest.path,
                               hint="the artifact is incomplete; re-create it")
        size = f.stat().st_size
        if "bytes" in entry and size != entry["bytes"]:
            raise GentoolError(f"size {size} != {entry['bytes']} recorded in the manifest (truncated or modified)",
                               path=f, hint="re-create the artifact")
        if hashes and "sha256" in entry and sha256_file(f) != entry["sha256"]:
            raise GentoolError("sha256 differs from the manifest (corrupt or modified)", path=f,
                               hint="re-create the artifact, or pass --no-verify to skip hashing")


def input_ref(role: str, source: Manifest | str | Path) -> dict[str, Any]:
    """An `inputs` entry: another artifact by id, or a raw file/directory by sha256 + bytes (+ nfiles)."""
    if isinstance(source, Manifest):
        return {"role": role, "path": str(source.path), "format": source.format, "id": source.id}
    p = Path(source)
    if str(source) == "-":
        return {"role": role, "path": "-"}
    if p.is_dir():
        h, total, n = hashlib.sha256(), 0, 0
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            h.update(f.relative_to(p).as_posix().encode() + b"\0" + sha256_file(f).encode())
            total += f.stat().st_size
            n += 1
        return {"role": role, "path": str(p), "sha256": h.hexdigest(), "bytes": total, "nfiles": n}
    return {"role": role, "path": str(p), **file_entry(p)}


def environment() -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "platform": sys.platform}
    if "torch" in sys.modules:
        torch = sys.modules["torch"]
        env["torch"] = torch.__version__
        if torch.cuda.is_available():
            env["device"] = f"cuda:{torch.cuda.get_device_name()}"
    return env


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ArtifactBuilder:
    """Collects what a command produces; `create_artifact` turns it into a manifest and renames it into place."""

    def __init__(self, out: Path, kind: str, dir: Path, config: dict, inputs: list[dict], command: list[str]):
        self.out, self.kind, self.dir = out, kind, dir
        self.config = config
        self.inputs = inputs
        self.command = command
        self.contents: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        self.file_roles: dict[str, str] = {}
        self.manifest: Manifest | None = None

    def add_input(self, role: str, source: Manifest | str | Path) -> None:
        self.inputs.append(input_ref(role, source))

    def build_manifest(self, final_path: Path) -> Manifest:
        files = {}
        for f in sorted(p for p in self.dir.rglob("*") if p.is_file()):
            name = f.relative_to(self.dir).as_posix()
            if name == MANIFEST:
                continue
            files[name] = file_entry(f)
            if name in self.file_roles:
                files[name]["role"] = self.file_roles[name]
        fmt = format_name(self.kind)
        return Manifest(
            path=final_path, format=fmt, format_version=KINDS[self.kind], id=content_id(files),
            fingerprint=fingerprint(fmt, KINDS[self.kind], self.config, self.inputs), gentool_version=__version__,
            created_at=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), command=self.command,
            inputs=self.inputs, files=files, config=self.config, contents=self.contents, metrics=self.metrics,
            environment=environment(), invocation=INVOCATION.get() or {})


def check_not_an_input(out: str | Path, sources) -> None:
    """Refuse an output that is, contains or lies inside one of this command's inputs (symlinks resolved):
    --force replaces an old output, never an input."""
    o = Path(out).resolve()
    for src in sources:
        if src is None or str(src) == "-" or str(src).startswith("builtin:"):
            continue
        i = Path(src).resolve()
        where = "is" if o == i else "lies inside" if i in o.parents else "contains" if o in i.parents else None
        if where:
            raise UsageProblem(f"the output {where} the input {src}", path=out,
                               hint="write to another path (--force replaces old outputs, never inputs)")


def check_output(out: str | Path, *, force: bool, sources=()) -> None:
    """Refuse (exit 2) an existing output unless --force, and an output that is or overlaps an input (`sources`,
    paths); call before any work."""
    out = Path(out)
    if str(out) == "-":
        raise UsageProblem("an artifact is a directory and cannot be written to stdout", path=out,
                           hint="pass a directory with -o")
    check_not_an_input(out, sources)
    if out.exists() and not force:
        raise UsageProblem("output exists", path=out, hint="use --force to replace it")
    if not out.parent.exists():
        raise UsageProblem("parent directory does not exist", path=out.parent, hint="create it first")


def sweep_stale(out: Path) -> None:
    """Remove temporary siblings of `out` that a killed gentool left behind (their process is gone)."""
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        try:
            pid = int(tmp.name[len(f".{out.name}.tmp-"):].split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except (ValueError, PermissionError, OSError):
            continue


def write_failure(e: BaseException) -> str | None:
    """Why writing failed, when it failed for a reason outside gentool (disk full, permissions, I/O); safetensors
    raises its own error type for those."""
    if isinstance(e, OSError):
        return e.strerror or str(e)
    if type(e).__name__ == "SafetensorError":
        text = str(e)
        return "No space left on device" if "No space left" in text or "StorageFull" in text else text
    return None


def write_manifest(builder: ArtifactBuilder, directory: Path, final_path: Path) -> Manifest:
    manifest = builder.build_manifest(final_path)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; with an existing dst, move it aside first (two renames)."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, old)
    os.replace(src, dst)
    _fsync_dir(dst.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def create_artifact(out: str | Path, kind: str, *, force: bool = False, config: dict | None = None,
                    inputs: list[dict] | None = None, command: list[str] | None = None) -> Iterator[ArtifactBuilder]:
    """Build an artifact in a temporary sibling of `out`; on success write manifest.json last and rename into place.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and `out` is untouched.
    """
    out = Path(out)
    check_output(out, force=force, sources=[i.get("path") for i in inputs or ()])
    sweep_stale(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    builder = ArtifactBuilder(out, kind, tmp, dict(config or {}), list(inputs or []),
                              command if command is not None else ["gentool", *sys.argv[1:]])
    try:
        yield builder
        builder.manifest = write_manifest(builder, tmp, out)
        _fsync_dir(tmp)
        replace_dir(tmp, out)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if reason := write_failure(e):
            raise GentoolError(f"cannot write output ({reason})", path=out,
                               hint="check free disk space and permissions") from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
