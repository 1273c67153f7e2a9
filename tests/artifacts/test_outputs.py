"""Output paths: validated before any work, written through temporaries, a full disk is one line, and what a killed
process left behind is swept by the next run writing the same output."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gentool.artifacts import WriteFailed, atomic_file, check_output, create_artifact, replace_dir
from gentool.artifacts.store import sweep_stale
from gentool.errors import UsageProblem

SRC = str(Path(__file__).parents[2] / "src")


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid  # reaped: no process has it (until the number comes round again, long after this test)


@pytest.mark.parametrize("name", ["", ".", "..", "sub/.."])
def test_outputs_without_a_name_are_refused(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    for file in (False, True):
        with pytest.raises(UsageProblem, match="needs a name"):
            check_output(name, force=True, file=file)


def test_an_output_holding_the_working_directory_is_refused(tmp_path, monkeypatch):
    (tmp_path / "a" / "b").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a" / "b")
    for out in (tmp_path / "a" / "b", tmp_path / "a", tmp_path):
        with pytest.raises(UsageProblem, match="holds the working directory"):
            check_output(out, force=True)


def test_a_directory_where_a_file_is_expected_and_the_reverse(tmp_path):
    (tmp_path / "dir").mkdir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageProblem, match="is a directory, expected a file"):
        check_output(tmp_path / "dir", force=True, file=True)
    with pytest.raises(UsageProblem, match="is a file, expected an artifact directory"):
        check_output(tmp_path / "file", force=True)
    with pytest.raises(UsageProblem, match="output exists"):
        check_output(tmp_path / "file", force=False, file=True)
    with pytest.raises(UsageProblem, match="--plot exists"):
        check_output(tmp_path / "file", force=False, file=True, option="--plot")
    with pytest.raises(UsageProblem, match="is not a directory"):
        check_output(tmp_path / "file" / "x", force=True)
    with pytest.raises(UsageProblem, match="parent directory does not exist"):
        check_output(tmp_path / "nope" / "x", force=True)
    check_output(tmp_path / "file", force=True, file=True)
    check_output(tmp_path / "dir", force=True)
    check_output(tmp_path / "new" / "run", force=False, parents=True)  # a training run makes its parents
    with pytest.raises(UsageProblem, match="is not a directory"):
        check_output(tmp_path / "file" / "a" / "run", force=False, parents=True)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_an_unwritable_parent_is_refused(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(UsageProblem, match="not writable"):
        check_output(tmp_path / "ro" / "x", force=False)


def test_a_hard_link_of_an_input_is_the_input(tmp_path):
    (tmp_path / "eval.txt").write_text("text")
    os.link(tmp_path / "eval.txt", tmp_path / "link.txt")
    with pytest.raises(UsageProblem, match="--kl-tokens is the input"):
        check_output(tmp_path / "link.txt", force=True, sources=[tmp_path / "eval.txt"], file=True,
                     option="--kl-tokens")
    with pytest.raises(UsageProblem, match="--kl-tokens lies inside the output"):
        check_output(tmp_path / "q" / "kl.jsonl", force=True, sources=[("the output", tmp_path / "q")], file=True,
                     option="--kl-tokens")


def test_atomic_file_replaces_on_success_and_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "kl.jsonl"
    out.write_text("old")
    for exc in (RuntimeError("boom"), KeyboardInterrupt()):
        with pytest.raises(type(exc)):
            with atomic_file(out) as tmp:
                tmp.write_text("half")
                raise exc
        assert out.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["kl.jsonl"]
    with atomic_file(out, suffix=True) as tmp:
        assert tmp.suffix == ".jsonl" and tmp.parent == tmp_path
        tmp.write_text("new")
    assert out.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["kl.jsonl"]


def test_a_full_disk_names_the_directory_and_leaves_the_old_file(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_text("old")
    with pytest.raises(WriteFailed, match=f"no space left on {tmp_path}; free some space"):
        with atomic_file(out) as tmp:
            tmp.write_text("half")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_stale_temporary_files_and_old_copies_are_swept(tmp_path):
    dead = _dead_pid()
    stale = [tmp_path / f".m.gguf.tmp-{dead}-0123abcd", tmp_path / f".m.gguf.old-{dead}-0123abcd",
             tmp_path / f".art.old-{dead}-0123abcd"]
    stale[0].write_bytes(b"half a gguf")  # a file: the old sweep only removed directories
    stale[1].write_bytes(b"old")
    (stale[2]).mkdir()
    mine = tmp_path / f".m.gguf.tmp-{os.getpid()}-0123abcd"  # this process is alive: its temporary stays
    mine.write_bytes(b"in use")
    other = tmp_path / f".n.gguf.tmp-{dead}-0123abcd"        # another output's: left to the run writing that one
    other.write_bytes(b"x")
    with atomic_file(tmp_path / "m.gguf") as tmp:
        tmp.write_text("gguf")
    with create_artifact(tmp_path / "art", "tokenizer") as art:
        (art.dir / "x").write_text("x")
    assert not any(p.exists() for p in stale) and mine.exists() and other.exists()


def test_a_reused_pid_does_not_keep_a_stale_temporary(tmp_path):
    """The number of a dead writer may belong to a new process by now; one that started after the temporary was
    last written cannot be its owner."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        old = tmp_path / f".m.gguf.tmp-{sleeper.pid}-0123abcd"
        new = tmp_path / f".n.gguf.tmp-{sleeper.pid}-0123abcd"
        old.write_bytes(b"from a run long ago")
        new.write_bytes(b"being written")
        os.utime(old, (time.time() - 86400, time.time() - 86400))
        sweep_stale(tmp_path, every=True)
        assert not old.exists() and new.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_writer_killed_with_sigkill_is_cleaned_up_by_the_next_run(tmp_path):
    out = tmp_path / "m.gguf"
    code = (f"import sys, time; sys.path.insert(0, {SRC!r})\n"
            "from gentool.artifacts import atomic_file\n"
            f"with atomic_file({str(out)!r}) as tmp:\n"
            "    tmp.write_bytes(b'x' * 4096); print('writing', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "writing"
    finally:
        p.kill()  # SIGKILL: no cleanup runs
        p.wait()
    left = list(tmp_path.glob(".m.gguf.tmp-*"))
    assert len(left) == 1 and not out.exists()
    with atomic_file(out) as tmp:
        tmp.write_text("done")
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_force_replacing_a_hard_link_or_a_directory_leaves_nothing_behind(tmp_path):
    (tmp_path / "keep").write_text("other name of the same file")
    os.link(tmp_path / "keep", tmp_path / "out")
    new = tmp_path / "new"
    new.mkdir()
    replace_dir(new, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "out"] and (tmp_path / "out").is_dir()
    assert (tmp_path / "keep").read_text() == "other name of the same file"
    new.mkdir()
    (tmp_path / "out" / "x").write_text("x")
    replace_dir(new, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep", "out"] and not (tmp_path / "out" / "x").exists()


def test_a_failed_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("old")
    (tmp_path / "new").mkdir()
    real = os.replace

    def fail_second(src, dst):
        if Path(src).name == "new":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(src, dst)

    monkeypatch.setattr(os, "replace", fail_second)
    with pytest.raises(OSError):
        replace_dir(tmp_path / "new", tmp_path / "out")
    assert (tmp_path / "out" / "x").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (root only; skipped where mounting is not permitted)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_really_full_disk(tiny_disk):
    import numpy as np
    from safetensors.numpy import save_file

    with pytest.raises(WriteFailed, match=f"no space left on {tiny_disk}"):
        with create_artifact(tiny_disk / "art", "tokenizer") as art:
            save_file({"w": np.zeros(1 << 17, dtype=np.float32)}, str(art.dir / "model.safetensors"))
    with pytest.raises(WriteFailed, match=f"no space left on {tiny_disk}"):
        with atomic_file(tiny_disk / "m.gguf") as tmp:
            tmp.write_bytes(b"\0" * (1 << 19))
    assert list(tiny_disk.iterdir()) == []
