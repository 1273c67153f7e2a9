"""Encoding throughput and memory: `gentool tokenize encode` with 1 worker and all cores vs a plain SentencePiece loop.

    python bench/tokenize_bench.py             # 200 MB generated corpus, all cores
    python bench/tokenize_bench.py --mb 1000   # bigger corpus: peak memory should not grow with it
    python bench/tokenize_bench.py --parquet   # also the same documents as Parquet shards (one row each)

The corpus is the bundled Shakespeare, its blank-line documents shuffled into 16 MB files until --mb is reached.
A tokenizer (BPE, --vocab-size) is trained on the bundled corpus. Every run is its own process, timed wall-clock,
and the runs are interleaved over --repeats rounds (best and median of each are printed);
CPU seconds (user + system, workers included) give "MB per CPU-s", which a busy shared machine disturbs less than
MB/s. Memory is sampled every 50 ms over the process and its children: peak RSS of the main process, and peak total PSS
(proportional set size: shared pages split between the processes, so forked workers are not double-counted).
The plain loop reads one file at a time, encodes each document with `sp.encode` in one process and appends the
ids to a raw file; its token count (+1 EOS per document) must equal gentool's. Tokenization is CPU work:
`--device` is accepted for symmetry with the other benches and ignored.
"""

from __future__ import annotations

import os
import sys

# This file is named like the standard library's `tokenize` (which `inspect`, `linecache`... import): take its
# folder off the import path before importing anything else.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import argparse
import datetime as _dt
import json
import random
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from gentool.data.text import bundled_corpus
from gentool.tokenize import train_tokenizer

PLAIN = r"""
import sys, numpy as np, sentencepiece as spm
from pathlib import Path
sp = spm.SentencePieceProcessor(model_file=sys.argv[1])
tokens = docs = 0
with open(sys.argv[3], "wb") as out:
    for f in sorted(Path(sys.argv[2]).glob("*.txt")):
        for doc in f.read_text(encoding="utf-8").split("\n\n"):
            if doc.strip():
                ids = sp.encode(doc.strip("\n"))
                np.asarray(ids, dtype=np.uint16).tofile(out)
                tokens += len(ids)
                docs += 1
print(tokens + docs)
"""


def make_corpus(directory: Path, megabytes: float, file_mb: float = 16.0) -> int:
    docs = [d for f in sorted(bundled_corpus().rglob("*.txt")) for d in f.read_text().split("\n\n") if d.strip()]
    total, i = 0, 0
    while total < megabytes * 1e6:
        rng = random.Random(i)
        parts, size = [], 0
        while size < file_mb * 1e6 and total + size < megabytes * 1e6:
            rng.shuffle(docs)
            for d in docs:
                parts.append(d)
                size += len(d.encode()) + 2
        data = "\n\n".join(parts) + "\n"
        (directory / f"part-{i:04d}.txt").write_text(data, encoding="utf-8")
        total += len(data.encode())
        i += 1
    return total


def to_parquet(text_dir: Path, out_dir: Path) -> None:
    """The same documents, one Parquet file per text file, one row per blank-line document."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out_dir.mkdir()
    for f in sorted(text_dir.glob("*.txt")):
        docs = [d.strip("\n") for d in f.read_text(encoding="utf-8").split("\n\n") if d.strip()]
        pq.write_table(pa.table({"text": docs}), out_dir / f"{f.stem}.parquet", row_group_size=8192)


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _kb(pid: int, path: str, key: str) -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def measure(cmd: list[str]) -> dict:
    """Run cmd; wall seconds, peak RSS of the main process and peak PSS of the whole tree (MB), and stdout."""
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    rss = pss = 0
    while proc.poll() is None:
        rss = max(rss, _kb(proc.pid, "status", "VmRSS:"))
        pss = max(pss, sum(_kb(p, "smaps_rollup", "Pss:") for p in _tree(proc.pid)))
        time.sleep(0.05)
    out, err = proc.communicate()
    seconds = time.perf_counter() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err}")
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime  # the workers' too: they were waited for
    return {"seconds": seconds, "cpu": cpu, "rss_mb": rss / 1024, "pss_mb": pss / 1024, "stdout": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=200.0, help="corpus size in MB (at least 200 for the record)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="the all-cores run's worker count")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--device", default="cpu", help="ignored: tokenization runs on the CPU")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (best and median are reported)")
    p.add_argument("--parquet", action="store_true", help="also encode the corpus as Parquet shards (all cores)")
    p.add_argument("--tmp", default=None, help="where to put the corpus (default: the system temp dir)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        tmp = Path(tmp)
        (tmp / "corpus").mkdir()
        t0 = time.perf_counter()
        n_bytes = make_corpus(tmp / "corpus", args.mb)
        print(f"corpus: {n_bytes / 1e6:.0f} MB in {len(os.listdir(tmp / 'corpus'))} files "
              f"({time.perf_counter() - t0:.1f} s to generate); {os.cpu_count()} cores", file=sys.stderr)
        train_tokenizer(["builtin:shakespeare"], tmp / "tok", vocab_size=args.vocab_size)
        gentool = [sys.executable, "-m", "gentool", "--quiet", "tokenize", "encode", str(tmp / "corpus"),
                   "--tokenizer", str(tmp / "tok"), "--json"]
        plain = [sys.executable, "-c", PLAIN, str(tmp / "tok" / "tokenizer.model"), str(tmp / "corpus"),
                 str(tmp / "plain.bin")]
        runs = [("plain sentencepiece loop", 1, plain)]
        runs.append(("gentool encode", 1, gentool + ["-o", str(tmp / "w1"), "--workers", "1"]))
        if args.workers > 1:
            runs.append(("gentool encode", args.workers,
                         gentool + ["-o", str(tmp / f"w{args.workers}"), "--workers", str(args.workers)]))
        if args.parquet:
            to_parquet(tmp / "corpus", tmp / "parquet")
            runs.append(("gentool encode parquet", args.workers,
                         [*gentool[:6], str(tmp / "parquet"), *gentool[7:], "--glob", "*.parquet", "-o",
                          str(tmp / "wp"), "--workers", str(args.workers)]))
        results: dict[int, list[dict]] = {i: [] for i in range(len(runs))}
        tokens = {}
        for rnd in range(args.repeats):  # interleaved: a shared machine's load falls on every run alike
            for i, (name, workers, cmd) in enumerate(runs):
                print(f"round {rnd + 1}/{args.repeats}: {name}, {workers} worker(s) (load average "
                      f"{os.getloadavg()[0]:.1f})", file=sys.stderr)
                r = measure(cmd)
                if name.startswith("plain"):
                    tokens[name, workers] = int(r["stdout"])
                else:
                    splits = json.loads(r["stdout"])["contents"]["splits"]
                    tokens[name, workers] = sum(s["tokens"] for s in splits.values())
                results[i].append(r)
                for d in ("w1", f"w{args.workers}", "wp"):  # free the disk between runs
                    shutil.rmtree(tmp / d, ignore_errors=True)
                (tmp / "plain.bin").unlink(missing_ok=True)
        rows = []
        for i, (name, workers, _) in enumerate(runs):
            rs = results[i]
            secs = sorted(r["seconds"] for r in rs)
            cpus = sorted(r["cpu"] for r in rs)
            rows.append({"run": name, "workers": workers, "MB/s best": n_bytes / 1e6 / secs[0],
                         "MB/s median": n_bytes / 1e6 / statistics.median(secs), "CPU-s best": cpus[0],
                         "MB per CPU-s": n_bytes / 1e6 / cpus[0],
                         "peak RSS main (MB)": max(r["rss_mb"] for r in rs),
                         "peak PSS all (MB)": max(r["pss_mb"] for r in rs), "Mtokens": tokens[name, workers] / 1e6,
                         "_secs": secs})
        base = rows[0]
        for r in rows:
            r["vs plain (best)"] = r["MB/s best"] / base["MB/s best"]
            r["vs plain (median)"] = r["MB/s median"] / base["MB/s median"]
            r["CPU vs plain"] = r["CPU-s best"] / base["CPU-s best"]
        if len(rows) > 2:
            rows[2]["vs 1 worker"] = rows[2]["MB/s best"] / rows[1]["MB/s best"]
        if args.parquet:
            text_all = next(r for r in rows[1:] if r["workers"] == args.workers and "parquet" not in r["run"])
            rows[-1]["vs text, same workers (best)"] = rows[-1]["MB/s best"] / text_all["MB/s best"]
        for r in rows:
            del r["_secs"]
        same = len(set(tokens.values())) == 1

    date = _dt.date.today().isoformat()
    print(f"\n## tokenize encode ({date}; {n_bytes / 1e6:.0f} MB generated Shakespeare corpus, BPE vocab "
          f"{args.vocab_size}, {os.cpu_count()} cores, {args.repeats} interleaved rounds, load average now "
          f"{os.getloadavg()[0]:.1f})\n")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    for r in rows:
        print("| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |")
    print(f"\nsame token count in every run: {same}")
    if not same:
        raise SystemExit("token counts differ between runs")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


if __name__ == "__main__":
    main()
