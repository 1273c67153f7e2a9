"""Downstream tasks as local files: the subset of lm-evaluation-harness's task YAML (0.4.x) that gentool's four task
kinds need, over local JSON lines or Parquet, so one file runs in `gentool evaluate` and in `lm_eval`.

Keys read: task, output_type (multiple_choice | loglikelihood | loglikelihood_rolling | generate_until),
dataset_path (json | parquet) with dataset_kwargs.data_files ({split: path or [paths]}; relative paths are looked
up beside the task file, then in the working directory), test_split / validation_split / training_split /
fewshot_split, doc_to_text, doc_to_target, doc_to_choice, description, target_delimiter (" "),
fewshot_delimiter ("\\n\\n"), num_fewshot, generation_kwargs (until, max_gen_toks), metric_list and filter_list
(regex and take_first). A field is a column name or a Jinja template rendered as lm-eval renders it
(StrictUndefined, keep_trailing_newline, the regex_replace filter). TOML files with the same keys work too.

Prompts are lm-eval's text exactly: description, then `k` examples drawn by one `random.Random(seed)` (seed 1234
by default) consumed document by document in order (`rnd.sample(fewshot_docs, k)`, or k + 1 with the evaluated
document removed when the few-shot split is the evaluated split), each `text + target_delimiter + answer +
fewshot_delimiter`, then the document's text. The few-shot split is fewshot_split, else training, else
validation, else the evaluated split.
"""

from __future__ import annotations

import ast
import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gentool.errors import UsageProblem

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")
DEFAULT_METRICS = {"multiple_choice": ["acc", "acc_norm"], "loglikelihood": ["perplexity", "acc"],
                   "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
                   "generate_until": ["exact_match"]}
DEFAULT_SEED = 1234


@dataclass
class Task:
    name: str
    path: Path
    sha256: str
    output_type: str
    doc_to_text: Any
    doc_to_target: Any
    doc_to_choice: Any = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    num_fewshot: int = 0
    eval_split: str = "test"
    fewshot_split: str | None = None
    generation_kwargs: dict = field(default_factory=dict)
    metrics: list[dict] = field(default_factory=list)
    filters: list[dict] = field(default_factory=list)
    splits: dict[str, list[dict]] = field(default_factory=dict)
    features: set[str] = field(default_factory=set)

    def where(self, split: str, i: int) -> str:
        return f"{self.path} ({split} row {i + 1})"


def _environment():
    import jinja2

    def regex_replace(string, pattern, repl, count: int = 0):
        return re.sub(pattern, repl, string, count=count)

    env = jinja2.Environment(loader=jinja2.BaseLoader, undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    env.filters["regex_replace"] = regex_replace
    return env


_ENV = None


def render(template: str, doc: dict) -> str:
    global _ENV
    _ENV = _ENV or _environment()
    return _ENV.from_string(template).render(**doc)


def _read_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UsageProblem(f"not valid TOML ({e})", path=path) from None
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        what = "uses a Python !function tag, which gentool does not run" if "!function" in str(e) else \
            f"is not valid YAML ({str(e).splitlines()[0]})"
        raise UsageProblem(f"the task file {what}", path=path, hint="write the fields as Jinja templates") from None
    if not isinstance(data, dict):
        raise UsageProblem("the task file is not a mapping of keys", path=path)
    return data


def _rows(path: Path, kind: str, task_path: Path) -> list[dict]:
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ModuleNotFoundError:
            raise UsageProblem("Parquet data needs pyarrow", path=path, hint="pip install pyarrow, or use JSON lines")
        return pq.read_table(path).to_pylist()
    rows = []
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):  # one JSON array, as `datasets` also reads
        data = json.loads(text)
        return [r for r in data if isinstance(r, dict)]
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise UsageProblem(f"line {i + 1} is not valid JSON ({e})", path=path) from None
        if not isinstance(rec, dict):
            raise UsageProblem(f"line {i + 1} is not a JSON object", path=path)
        rows.append(rec)
    return rows


def _data_files(cfg: dict, path: Path) -> dict[str, list[Path]]:
    kind = cfg.get("dataset_path")
    if kind not in ("json", "parquet"):
        raise UsageProblem(f"dataset_path {kind!r} is not local data", path=path,
                           hint="use dataset_path: json (or parquet) with dataset_kwargs: data_files: {test: FILE}; "
                                "nothing is downloaded")
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, (str, list)):
        files = {"train": files}
    if not isinstance(files, dict) or not files:
        raise UsageProblem("the task file has no dataset_kwargs.data_files", path=path,
                           hint="add dataset_kwargs: data_files: {test: data.jsonl}")
    out = {}
    for split, names in files.items():
        found = []
        for name in [names] if isinstance(names, str) else list(names):
            p = Path(name)
            cand = p if p.is_absolute() else (path.parent / p if (path.parent / p).is_file() else p)
            if not cand.is_file():
                raise UsageProblem(f"data file of split {split!r} not found", path=name,
                                   hint="relative paths are looked up beside the task file, then here")
            found.append(cand)
        out[str(split)] = found
    return out


def load_task(path: str | Path) -> Task:
    path = Path(path)
    if not path.is_file():
        raise UsageProblem("no such task file", path=path, hint="pass a task YAML or TOML file")
    raw = path.read_bytes()
    cfg = _read_file(path)
    otype = cfg.get("output_type")
    if otype not in OUTPUT_TYPES:
        raise UsageProblem(f"output_type {otype!r} is missing or unknown", path=path, hint="use " + ", ".join(OUTPUT_TYPES))
    need = ["doc_to_target"] + (["doc_to_text"] if otype != "loglikelihood_rolling" else []) + \
        (["doc_to_choice"] if otype == "multiple_choice" else [])
    for key in need:
        if cfg.get(key) is None:
            raise UsageProblem(f"the task file has no {key}", path=path, hint=f"add {key} (a column or a template)")
    files = _data_files(cfg, path)
    kind = cfg["dataset_path"]
    splits = {s: [r for f in fs for r in _rows(f, kind, path)] for s, fs in files.items()}
    features = {k for rows in splits.values() for r in rows for k in r}
    for rows in splits.values():  # as `datasets` reads JSON: every row has every column, None when absent
        for r in rows:
            for k in features - r.keys():
                r[k] = None
    eval_split = cfg.get("test_split") or cfg.get("validation_split")
    if not eval_split:
        raise UsageProblem("the task file names no test_split or validation_split", path=path)
    for key in ("test_split", "validation_split", "training_split", "fewshot_split"):
        if cfg.get(key) and cfg[key] not in splits:
            raise UsageProblem(f"{key} {cfg[key]!r} is not in data_files", path=path,
                               hint="data_files has " + ", ".join(splits))
    fs = cfg.get("fewshot_split") or cfg.get("training_split") or cfg.get("validation_split") or eval_split
    metrics = cfg.get("metric_list") or [{"metric": m} for m in DEFAULT_METRICS[otype]]
    gen = dict(cfg.get("generation_kwargs") or {})
    if otype == "generate_until":
        gen.setdefault("until", [cfg.get("fewshot_delimiter", "\n\n")])
        if isinstance(gen["until"], str):
            gen["until"] = [gen["until"]]
    task = Task(str(cfg.get("task") or path.stem), path, "sha256:" + hashlib.sha256(raw).hexdigest(), otype,
                cfg.get("doc_to_text"), cfg.get("doc_to_target"), cfg.get("doc_to_choice"),
                cfg.get("description") or "", cfg.get("target_delimiter", " "), cfg.get("fewshot_delimiter", "\n\n"),
                int(cfg.get("num_fewshot") or 0), eval_split, fs, gen, metrics, cfg.get("filter_list") or [],
                splits, features)
    if not splits[eval_split]:
        raise UsageProblem(f"the {eval_split} split is empty", path=path, hint="give a data file with rows")
    return task


# --- fields of a document (lm-eval's ConfigurableTask.doc_to_*) ------------------------------------------------------

def _field(task: Task, spec: Any, doc: dict, what: str, where: str) -> Any:
    if isinstance(spec, (int, list, dict)) and not isinstance(spec, bool):
        return spec
    if not isinstance(spec, str):
        raise UsageProblem(f"{what} must be a column name or a template", path=task.path)
    if spec in task.features:
        return doc[spec]
    try:
        return render(spec, doc)
    except Exception as e:  # jinja2's errors: undefined names, bad syntax, a filter failing on the row
        raise UsageProblem(f"the {what} template fails on {where}: {type(e).__name__}: {e}",
                           hint="fix the template or the row") from None


def doc_to_text(task: Task, doc: dict, where: str) -> Any:
    text = _field(task, task.doc_to_text, doc, "doc_to_text", where)
    if isinstance(text, str) and text.isdigit() and task.doc_to_choice is not None and \
            task.doc_to_text not in task.features:
        return ast.literal_eval(text)
    return text


def doc_to_target(task: Task, doc: dict, where: str) -> Any:
    spec = task.doc_to_target
    out = _field(task, spec, doc, "doc_to_target", where)
    if isinstance(spec, str) and spec not in task.features and isinstance(out, str):
        if out.isdigit() and task.doc_to_choice is not None:
            return ast.literal_eval(out)
        if len(out) >= 2 and out[0] == "[" and out[-1] == "]":
            try:
                return ast.literal_eval(out)
            except (SyntaxError, ValueError):
                return out
    return out


def doc_to_choice(task: Task, doc: dict, where: str) -> list[str]:
    spec = task.doc_to_choice
    if isinstance(spec, dict):
        choices = list(spec.values())
    elif isinstance(spec, str) and spec not in task.features:
        text = _field(task, spec, doc, "doc_to_choice", where)
        try:
            choices = ast.literal_eval(text)
        except (SyntaxError, ValueError):
            raise UsageProblem(f"doc_to_choice does not give a list on {where}: {text[:60]!r}",
                               hint="the template must render a Python list literal") from None
    else:
        choices = _field(task, spec, doc, "doc_to_choice", where)
    if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
        raise UsageProblem(f"doc_to_choice gives {choices!r:.60} on {where}, not a list of at least two strings",
                           hint="every multiple-choice row needs two or more choices")
    return choices


def answer_text(task: Task, doc: dict, where: str) -> str:
    """The few-shot answer: the target, a choice by index, or the first of several targets."""
    a = doc_to_target(task, doc, where)
    if isinstance(a, int) and not isinstance(a, bool) and task.doc_to_choice is not None:
        choices = doc_to_choice(task, doc, where)
        if not 0 <= a < len(choices):
            raise UsageProblem(f"target index {a} is outside the {len(choices)} choices on {where}")
        return choices[a]
    if isinstance(a, list):
        return str(a[0])
    return str(a)


def gold_index(task: Task, doc: dict, choices: list[str], where: str) -> int | list[int]:
    """lm-eval's gold for multiple choice: an index, a list of indices, or a choice's text looked up (-100 when
    out of range or absent: never correct)."""
    gold = doc_to_target(task, doc, where)
    if isinstance(gold, list):
        return [g if isinstance(g, int) and g < len(choices) else -100 for g in gold]
    if isinstance(gold, str):
        return choices.index(gold) if gold in choices else -100
    if isinstance(gold, int):
        return gold if gold < len(choices) else -100
    raise UsageProblem(f"doc_to_target gives {gold!r:.40} on {where}, not an index or a choice")


# --- prompts -------------------------------------------------------------------------------------------------------

def eval_docs(task: Task, limit: int | None = None) -> list[dict]:
    docs = task.splits[task.eval_split]
    return docs[:limit] if limit else docs


def prompts(task: Task, docs: list[dict], num_fewshot: int, seed: int = DEFAULT_SEED) -> list[str]:
    """The context of every document, lm-eval's text (see the module docstring)."""
    pool = task.splits.get(task.fewshot_split, []) if num_fewshot else []
    same = task.fewshot_split == task.eval_split
    if num_fewshot and len(pool) - (1 if same else 0) < num_fewshot:
        raise UsageProblem(f"--num-fewshot {num_fewshot} exceeds the {len(pool) - (1 if same else 0)} examples the "
                           f"few-shot split {task.fewshot_split!r} offers", path=task.path,
                           hint="lower --num-fewshot or give a larger training/fewshot split")
    rnd = random.Random(seed)
    out = []
    for i, doc in enumerate(docs):
        where = task.where(task.eval_split, i)
        ctx = ""
        if task.description:
            ctx += task.description if task.description in doc else _field(task, task.description, doc,
                                                                            "description", where)
        if num_fewshot:
            drawn = rnd.sample(pool, num_fewshot + 1) if same else rnd.sample(pool, num_fewshot)
            if same:
                drawn = [d for d in drawn if d != doc][:num_fewshot]
                if len(drawn) < num_fewshot:
                    drawn = rnd.sample([d for d in pool if d != doc], num_fewshot)
            for j, ex in enumerate(drawn):
                ex_where = f"{task.path} (few-shot example {j + 1} of row {i + 1})"
                q = doc_to_text(task, ex, ex_where)
                if isinstance(q, int):
                    q = doc_to_choice(task, ex, ex_where)[q]
                a = answer_text(task, ex, ex_where)
                ctx += q + (task.target_delimiter if a != "" else "") + (a + task.fewshot_delimiter if a != "" else "")
        q = doc_to_text(task, doc, where)
        if not isinstance(q, str):
            raise UsageProblem(f"doc_to_text gives {type(q).__name__} on {where}, not text",
                               hint="multiple-input tasks (Winogrande-style) are not supported")
        out.append(ctx + q)
    return out
