"""Reading and writing artifact directories: verification, and atomic creation (temp sibling, manifest last, rename)."""

from __future__ import annotations

import datetime as _dt
import errno
import hashlib
import os
import platform
import re
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


def check_not_an_input(out: str | Path, sources, *, option: str = "the output") -> None:
    """Refuse an output that is, contains or lies inside one of this command's inputs (symlinks and hard links
    resolved): --force replaces an old output, never an input. A source may be (what, path): another output."""
    o = Path(out).resolve()
    for src in sources:
        what, src = src if isinstance(src, tuple) else ("the input", src)
        if src is None or str(src) == "-" or str(src).startswith("builtin:"):
            continue
        i = Path(src).resolve()
        where = "is" if o == i or _same_file(o, i) else "lies inside" if i in o.parents \
            else "contains" if o in i.parents else None
        if where:
            raise UsageProblem(f"{option} {where} {what} {src}", path=out,
                               hint="write to another path (--force replaces old outputs, never inputs)")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output(out: str | Path, *, force: bool, sources=(), file: bool = False, option: str = "the output",
                 parents: bool = False) -> None:
    """Validate an output path before any work (exit 2): not "", ".", ".." nor a directory holding the working
    directory; not an input, nor inside or around one (`sources`, paths); an existing one only with --force, and
    only of the kind written (a directory artifact, or with `file` a single file); its parent an existing (with
    `parents`: to be created), writable directory. Every option that writes a path goes through here (`option`
    names it in the message)."""
    out = Path(out)
    what = "a file" if file else "an artifact directory"
    if str(out) == "-":
        raise UsageProblem(f"{option} is {what} and cannot be written to stdout", path=out,
                           hint="pass a path")
    if out.name in ("", ".", ".."):
        raise UsageProblem(f"{option} needs a name, not {str(out)!r}", path=out,
                           hint=f"pass a new path for {what}, e.g. runs/out")
    try:
        here = Path.cwd().resolve()
    except OSError:  # the working directory was removed: nothing to hold
        here = None
    if here is not None and (out.resolve() == here or out.resolve() in here.parents):
        raise UsageProblem(f"{option} holds the working directory", path=out, hint="write to another path")
    check_not_an_input(out, sources, option=option)
    if out.exists() or out.is_symlink():
        if not force:
            raise UsageProblem(f"{option} exists" if option != "the output" else "output exists", path=out,
                               hint="use --force to replace it")
        if file and out.is_dir():
            raise UsageProblem(f"{option} is a directory, expected a file", path=out,
                               hint="pass a file path (--force replaces an old file, never a directory)")
        if not file and not out.is_dir():
            raise UsageProblem(f"{option} is a file, expected {what}", path=out,
                               hint="pass a directory path (--force replaces an old artifact, never a file)")
    parent = out.parent
    while parents and not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.exists():
        raise UsageProblem("parent directory does not exist", path=parent, hint="create it first")
    if not parent.is_dir():
        raise UsageProblem("is not a directory", path=parent, hint=f"{option} must go in a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UsageProblem("directory is not writable", path=parent, hint="write somewhere else")


# Our temporaries: ".NAME.tmp-PID-HEX" (being written) and ".NAME.old-PID-HEX" (an output being replaced), an
# optional suffix after them (matplotlib picks the format from it).
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)-[0-9a-f]{8}(?:\.\w+)?$")


def temp_sibling(out: Path, tag: str = "tmp", suffix: str = "") -> Path:
    """A hidden sibling of `out` named for this process, which `sweep_stale` removes once the process is gone."""
    return out.with_name(f".{out.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}")


def _started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), from /proc; None where there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def _owned(pid: int, tmp: Path) -> bool:
    """Whether a live process may still be writing `tmp`: its pid runs, and did not start after tmp last changed
    (a younger process only reuses the number)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, another user's
        return True
    started = _started(pid)
    try:
        changed = tmp.lstat().st_mtime
    except OSError:
        return True
    return started is None or started <= changed + 2  # /proc's boot time has whole seconds


def remove_path(path: Path) -> None:
    """Remove a file, link or directory tree, whichever it is; quietly when it is gone."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError:
            shutil.rmtree(path, ignore_errors=True)


def sweep_stale(out: Path, *, every: bool = False) -> None:
    """Remove temporaries of `out` (with `every`: of anything in directory `out`) that a killed gentool left
    behind: files or directories of our naming whose process is gone."""
    directory = out if every else out.parent
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for tmp in entries:
        m = _TEMP.match(tmp.name)
        if m and (every or m["name"] == out.name) and not _owned(int(m["pid"]), tmp):
            remove_path(tmp)


class WriteFailed(GentoolError):
    """Writing failed for a reason outside gentool: the disk is full, a quota, permissions, an I/O error."""


def write_failure(e: BaseException, out: str | Path, *, hint: str | None = None) -> WriteFailed | None:
    """The one-line error for an exception raised while writing `out`, or None when it is not a write failure;
    safetensors wraps the operating system's error in its own type."""
    code, text = getattr(e, "errno", None), str(e)
    if type(e).__name__ == "SafetensorError":
        found = re.search(r"os error (\d+)|code: (\d+)", text)
        code = int(found[1] or found[2]) if found else errno.ENOSPC if "StorageFull" in text else None
        if code is None and "I/O error" not in text and "IoError" not in text:
            return None  # about the tensors, not the disk
        reason = os.strerror(code) if code else text
    elif isinstance(e, OSError):
        reason = e.strerror or text
    else:
        return None
    directory = os.path.abspath(Path(out).parent)
    if code in (errno.ENOSPC, errno.EDQUOT):
        what = "no space left on" if code == errno.ENOSPC else "disk quota exceeded on"
        return WriteFailed(f"{what} {directory}", path=out,
                           hint=hint or "free some space (or write elsewhere) and run the command again")
    return WriteFailed(f"cannot write in {directory} ({reason})", path=out,
                       hint=hint or "check free disk space and permissions")


@contextmanager
def atomic_file(out: str | Path, *, suffix: bool = False) -> Iterator[Path]:
    """Write a single file through a temporary sibling that is renamed into place on success and removed on any
    failure; stale temporaries of `out` are swept first. Yields the temporary's path (with `suffix`, it keeps the
    output's extension)."""
    out = Path(out)
    sweep_stale(out)
    tmp = temp_sibling(out, suffix=out.suffix if suffix else "")
    try:
        yield tmp
        os.replace(tmp, out)
    except Exception as e:
        remove_path(tmp)
        if failed := write_failure(e, out):
            raise failed from e
        raise
    except BaseException:
        remove_path(tmp)
        raise


def write_manifest(builder: ArtifactBuilder, directory: Path, final_path: Path) -> Manifest:
    manifest = builder.build_manifest(final_path)
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, directory / MANIFEST)
    return manifest


def replace_dir(src: Path, dst: Path) -> None:
    """Move a finished directory into place; with an existing dst (a directory, a file, a link), move it aside
    first (two renames), then remove it."""
    old = None
    if dst.exists() or dst.is_symlink():
        old = temp_sibling(dst, "old")
        os.replace(dst, old)
    try:
        os.replace(src, dst)
    except BaseException:
        if old is not None:  # put the old output back
            os.replace(old, dst)
        raise
    _fsync_dir(dst.parent)
    if old is not None:
        remove_path(old)


@contextmanager
def create_artifact(out: str | Path, kind: str, *, force: bool = False, config: dict | None = None,
                    inputs: list[dict] | None = None, command: list[str] | None = None) -> Iterator[ArtifactBuilder]:
    """Build an artifact in a temporary sibling of `out`; on success write manifest.json last and rename into place.

    On any exception (KeyboardInterrupt included) the temporary directory is removed and `out` is untouched.
    """
    out = Path(out)
    check_output(out, force=force, sources=[i.get("path") for i in inputs or ()])
    sweep_stale(out)
    tmp = temp_sibling(out)
    try:
        tmp.mkdir()
    except OSError as e:
        raise write_failure(e, out) from e
    builder = ArtifactBuilder(out, kind, tmp, dict(config or {}), list(inputs or []),
                              command if command is not None else ["gentool", *sys.argv[1:]])
    try:
        yield builder
        builder.manifest = write_manifest(builder, tmp, out)
        _fsync_dir(tmp)
        replace_dir(tmp, out)
    except Exception as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if failed := write_failure(e, out):
            raise failed from e
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
