"""`gentool evaluate`: zero- and few-shot downstream tasks (lm-evaluation-harness's task files and metrics) for
AR checkpoints (gentool, quantized, Hugging Face Llama; with a LoRA adapter) and masked/block-diffusion LMs.

Per task: documents -> prompts (evaluation.tasks, lm-eval's text) -> requests (lm-eval's tokenization,
evaluation.continuation) -> scores (AR: exact log-likelihoods with shared-context batching; diffusion: the
Monte-Carlo bound of lm.diffusion.likelihood) -> per-document metrics and their aggregation (evaluation.metrics).
generate_until decodes greedily and cuts at the first `until` string, as lm-eval: AR checkpoints with the KV-cache
generator; masked/block-diffusion LMs with the samplers' confidence rule at temperature 0 (LLaDA's low-confidence
remasking: one token per step, the most probable of all masked positions, set to its argmax), the masked LM over
the context's tail and `max_gen_toks` masks, the block LM block by block after the context.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gentool import console
from gentool.artifacts import probe
from gentool.artifacts.probe import LM_FAMILIES
from gentool.devices import dtype_name
from gentool.errors import GentoolError, UsageProblem
from gentool.evaluation import continuation as cont_mod
from gentool.evaluation import metrics as M
from gentool.evaluation import tasks as T


@dataclass
class Scorer:
    kind: str                        # "ar" | "masked-lm" | "block-lm"
    model: Any
    tokenizer: Any
    max_len: int
    device: str
    dtype: torch.dtype
    batch_size: int
    mask_id: int | None = None
    block_size: int | None = None
    mc_samples: int = 1
    seed: int = 0
    schedule: Any = None             # diffusion LMs: the masking schedule

    def loglikelihoods(self, requests: list[tuple[list[int], list[int]]]) -> list[dict[str, Any]]:
        out = self._loglikelihoods(requests)
        if not all(math.isfinite(r["ll"]) for r in out):  # NaN/inf logits: no metric can come of them
            raise GentoolError(f"a log-likelihood is not finite in {dtype_name(self.dtype)}: the model's activations "
                               "overflow", hint="evaluate with --dtype bfloat16 or float32")
        return out

    def _loglikelihoods(self, requests: list[tuple[list[int], list[int]]]) -> list[dict[str, Any]]:
        if self.kind == "ar":
            pad = self.tokenizer.pad_id if self.tokenizer.pad_id is not None else 0
            got = cont_mod.score_continuations(self.model, requests, batch_size=self.batch_size, device=self.device,
                                               dtype=self.dtype, max_len=self.max_len, pad_id=pad)
            return [{"ll": s.logprob, "greedy": s.greedy} for s in got]
        from gentool.lm.diffusion.likelihood import continuation_bound

        g = torch.Generator(device=self.device).manual_seed(self.seed)
        out = []
        with console.progress("scoring (requests)", total=len(requests)) as bar:
            for ctx, cont in requests:  # context + continuation within the window (no shift: it fills masks)
                ctx, cont = cont_mod._fit(ctx, cont, self.max_len - 1)
                ll, se = continuation_bound(self.model, ctx, cont, self.mask_id, samples=self.mc_samples,
                                            block_size=self.block_size, generator=g, device=self.device)
                out.append({"ll": ll, "greedy": False, "ll_stderr": se})
                bar.update(advance=1)
        return out


def load_scorer(checkpoint: Path, *, adapter: Path | None, device: str, dtype: torch.dtype, batch_size: int,
                mc_samples: int, seed: int, verify: bool = True) -> tuple[Scorer, dict[str, Any]]:
    found = probe(checkpoint)
    if found.family in LM_FAMILIES:
        from gentool.lm.diffusion.serve import load_diffusion_lm

        if adapter is not None:
            raise UsageProblem("--adapter applies to AR checkpoints only")
        m = load_diffusion_lm(checkpoint, device=device, dtype=dtype, verify=verify)
        if m.tokenizer is None:
            raise UsageProblem("the checkpoint has no tokenizer", path=checkpoint)
        return Scorer(m.family, m.model, m.tokenizer, m.seq_len, device, dtype, batch_size, m.mask_id, m.block_size,
                      mc_samples, seed, m.schedule), {"family": m.family, "mc_samples": mc_samples}
    from gentool.data.tokenizer import load_tokenizer
    from gentool.models.checkpoint import load_lm

    lm = load_lm(checkpoint, device=device, dtype=dtype, verify=verify)
    if adapter is not None:
        from gentool.adapters import attach_adapter

        attach_adapter(lm.model, checkpoint, adapter, verify=verify)
        lm.model.to(device=device, dtype=dtype).eval()
    if lm.tokenizer_path is None:
        raise UsageProblem("the checkpoint has no tokenizer.model or tokenizer.json", path=checkpoint)
    return Scorer("ar", lm.model, load_tokenizer(lm.tokenizer_path), lm.config.max_position_embeddings, device,
                  dtype, batch_size), {"family": "ar", **({"adapter": str(adapter)} if adapter else {})}


def _encode(tok, text: str, where: str) -> list[int]:
    try:
        return cont_mod.encode_default(tok, text)
    except Exception as e:  # a tokenizer that cannot encode the task's text
        raise UsageProblem(f"the tokenizer cannot encode {where} ({type(e).__name__}: {e})") from None


def run_task(scorer: Scorer, task: T.Task, *, num_fewshot: int, limit: int | None, seed: int,
             max_gen_toks: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the task's metrics with standard errors, one log record per document)."""
    names = M.check_metrics(task.output_type, task.metrics, task.path)
    docs = T.eval_docs(task, limit)
    ctxs = T.prompts(task, docs, num_fewshot, seed) if task.output_type != "loglikelihood_rolling" else [""] * len(docs)
    tok, items = scorer.tokenizer, {n: [] for n in names}
    logs: list[dict[str, Any]] = []
    wheres = [task.where(task.eval_split, i) for i in range(len(docs))]
    if task.output_type == "generate_until":
        texts = (_generate if scorer.kind == "ar" else _generate_diffusion)(scorer, ctxs, task, max_gen_toks)
        for doc, ctx, text, where in zip(docs, ctxs, texts, wheres):
            target = T.answer_text(task, doc, where)
            pred = M.apply_filters(text, task.filters[0].get("filter", []) if task.filters else [])
            kw = {k: v for m in task.metrics for k, v in m.items() if k in ("ignore_case", "ignore_punctuation",
                                                                          "ignore_numbers", "regexes_to_ignore")}
            em = M.exact_match(pred, target, **kw)
            items["exact_match"].append(em)
            logs.append({"prompt": ctx, "target": target, "generation": text, "prediction": pred,
                         "correct": bool(em)})
        return _summary(task, items, len(docs), num_fewshot), logs
    requests, spans = [], []
    for doc, ctx, where in zip(docs, ctxs, wheres):
        if task.output_type == "multiple_choice":
            choices = T.doc_to_choice(task, doc, where)
            conts = [task.target_delimiter + c for c in choices]
        elif task.output_type == "loglikelihood":
            conts = [T.answer_text(task, doc, where)]  # lm-eval: the target alone, no target_delimiter
        else:
            text = str(T.doc_to_target(task, doc, where))
            ids = _encode(tok, text, where)
            wins = cont_mod.rolling_windows(ids, cont_mod.prefix_token(tok), scorer.max_len)
            spans.append((len(requests), len(wins)))
            requests += wins
            continue
        spans.append((len(requests), len(conts)))
        for c in conts:
            try:
                requests.append(cont_mod.encode_pair(tok, ctx, c))
            except Exception as e:
                raise UsageProblem(f"the tokenizer cannot encode {where} ({type(e).__name__}: {e})") from None
    scores = scorer.loglikelihoods(requests)
    for doc, ctx, where, (a, n) in zip(docs, ctxs, wheres, spans):
        s = scores[a:a + n]
        lls = [x["ll"] for x in s]
        rec: dict[str, Any] = {"prompt": ctx, "loglikelihoods": lls}
        if any(x.get("ll_stderr") is not None for x in s):
            rec["loglikelihood_stderrs"] = [x.get("ll_stderr") for x in s]
        if task.output_type == "multiple_choice":
            choices = T.doc_to_choice(task, doc, where)
            gold = T.gold_index(task, doc, choices, where)
            r = M.multiple_choice(lls, choices, gold)
            rec.update(choices=choices, gold=gold, prediction=r["pred"], prediction_norm=r["pred_norm"],
                       correct=bool(r["acc"]))
        elif task.output_type == "loglikelihood":
            r = {"perplexity": lls[0], "acc": int(s[0]["greedy"])}
            rec.update(target=T.answer_text(task, doc, where), greedy=s[0]["greedy"], correct=s[0]["greedy"])
            rec["loglikelihoods"] = lls[0]
        else:
            text = str(T.doc_to_target(task, doc, where))
            r = M.rolling(sum(lls), text)
            rec = {"text": text, "loglikelihood": sum(lls), "windows": n}
        for name in names:
            items[name].append(r[name])
        logs.append(rec)
    return _summary(task, items, len(docs), num_fewshot), logs


def _summary(task: T.Task, items: dict[str, list], n: int, k: int) -> dict[str, Any]:
    out: dict[str, Any] = {"task": task.name, "output_type": task.output_type, "num_fewshot": k, "samples": n}
    for name, xs in items.items():
        out[name], out[f"{name}_stderr"] = M.aggregate(name, xs)
    return out


def _generate(scorer: Scorer, ctxs: list[str], task: T.Task, max_gen_toks: int | None) -> list[str]:
    from gentool.lm.sample import Generator, SamplingParams

    until = [u for u in task.generation_kwargs.get("until", []) if u]
    n_new = int(max_gen_toks or task.generation_kwargs.get("max_gen_toks", 256))
    gen = Generator(scorer.model, scorer.tokenizer, device=scorer.device, compile=False)
    out = []
    with console.progress("generating", total=len(ctxs)) as bar:
        for ctx in ctxs:
            ids = cont_mod.encode_default(scorer.tokenizer, ctx)[-max(1, scorer.max_len - n_new):]
            c = gen.generate_ids([(ctx, ids)], SamplingParams(max_new_tokens=min(n_new, scorer.max_len - len(ids)),
                                                              temperature=0.0, stop=until))[0]
            text = c.completion
            for u in until:
                text = text.split(u)[0]
            out.append(text)
            bar.update(advance=1)
    return out


def _generate_diffusion(scorer: Scorer, ctxs: list[str], task: T.Task, max_gen_toks: int | None) -> list[str]:
    """Greedy generate_until for masked/block-diffusion LMs (see the module docstring); the text is cut at the
    end-of-text token and at the first `until` string."""
    from gentool.lm.diffusion.samplers import Sampler, generate_blocks, sample_blocks
    from gentool.lm.diffusion.serve import _finish

    until = [u for u in task.generation_kwargs.get("until", []) if u]
    n_new = int(max_gen_toks or task.generation_kwargs.get("max_gen_toks", 256))
    tok, bk = scorer.tokenizer, scorer.block_size
    g = torch.Generator(device=scorer.device).manual_seed(scorer.seed)
    kw = {"sampler": Sampler("confidence"), "temperature": 0.0, "generator": g}

    def done(new: torch.Tensor) -> bool:
        return all(_finish(tok, r, until)[2] != "length" for r in new.tolist())

    out = []
    with console.progress("generating", total=len(ctxs)) as bar:
        for ctx in ctxs:
            ids = cont_mod.encode_default(tok, ctx) or [cont_mod.prefix_token(tok)]
            if bk:
                ids = ids[-max(1, scorer.max_len - bk):]
                start = torch.tensor([ids], device=scorer.device)
                res = generate_blocks(scorer.model, start, n_new, scorer.mask_id, bk, context=scorer.max_len,
                                      steps=bk, should_stop=done, **kw)
            else:
                ids = ids[-max(1, scorer.max_len - n_new):]
                block = min(n_new, scorer.max_len - len(ids))
                start = torch.tensor([ids], device=scorer.device)
                res = sample_blocks(scorer.model, start, n_new, scorer.mask_id, scorer.schedule,
                                    context=scorer.max_len, block=block, steps=block, should_stop=done, **kw)
            out.append(_finish(tok, res.tokens[0, len(ids):len(ids) + n_new].tolist(), until)[0])
            bar.update(advance=1)
    return out


def file_sha(path: Path) -> str:
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def evaluate(checkpoint: Path, task_files: list[Path], *, num_fewshot: int | None, limit: int | None,
             batch_size: int, seed: int, adapter: Path | None, device: str, dtype: torch.dtype, mc_samples: int,
             max_gen_toks: int | None = None, verify: bool = True) -> tuple[dict[str, Any], list[list[dict]]]:
    """Every task on one model: (results, per-task example logs)."""
    tasks = [T.load_task(p) for p in task_files]  # all task files checked before the model loads
    for t in tasks:
        M.check_metrics(t.output_type, t.metrics, t.path)
    scorer, model_info = load_scorer(checkpoint, adapter=adapter, device=device, dtype=dtype, batch_size=batch_size,
                                     mc_samples=mc_samples, seed=seed, verify=verify)
    results, logs = {}, []
    for t in tasks:
        k = t.num_fewshot if num_fewshot is None else num_fewshot
        console.log(f"{t.name}: {t.output_type}, {k}-shot")
        res, log = run_task(scorer, t, num_fewshot=k, limit=limit, seed=seed, max_gen_toks=max_gen_toks)
        results[t.name] = res
        logs.append(log)
    manifest = {"model": str(checkpoint), "model_id": _model_id(checkpoint), **model_info, "fewshot_seed": seed,
                "tasks": {t.name: {"path": str(t.path), "sha256": t.sha256,
                                   "data": {s: len(d) for s, d in t.splits.items()}} for t in tasks}}
    return {"results": results, **manifest}, logs


def _model_id(checkpoint: Path) -> str:
    m = checkpoint / "manifest.json"
    if m.is_file():
        try:
            return json.loads(m.read_text(encoding="utf-8")).get("fingerprint") or file_sha(m)
        except (ValueError, AttributeError):
            pass
    cfg = checkpoint / "config.json"
    return file_sha(cfg) if cfg.is_file() else str(checkpoint)


SCALING_CONTENTS = ("n_params", "n_params_non_embedding", "tokens_seen", "train_flops", "step")


def write_results(out: Path, results: dict[str, Any], logs: list[list[dict]], checkpoint: Path, *,
                  force: bool = False) -> None:
    """An `evaluation` artifact: results.json, one examples JSONL per task, and a manifest whose contents carry the
    checkpoint's size and compute and whose metrics carry every task metric (TASK/METRIC, and METRIC alone for the
    first task) next to the checkpoint's val_loss, so `scale-fit --form downstream` reads the directory as a run."""
    from gentool.artifacts import create_artifact

    src: dict[str, Any] = {}
    if (checkpoint / "manifest.json").is_file():
        try:
            src = json.loads((checkpoint / "manifest.json").read_text(encoding="utf-8"))
        except ValueError:
            src = {}
    contents = {k: v for k, v in (src.get("contents") or {}).items() if k in SCALING_CONTENTS}
    metrics = {k: v for k, v in (src.get("metrics") or {}).items() if k in ("val_loss", "train_loss")}
    for i, (name, res) in enumerate(results["results"].items()):
        for key, value in res.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("num_fewshot",
                                                                                               "samples"):
                metrics[f"{name}/{key}"] = value
                if i == 0:
                    metrics.setdefault(key, value)
    inputs = [{"path": str(checkpoint), "id": results["model_id"]}] + \
        [{"path": t["path"], "id": t["sha256"]} for t in results["tasks"].values()]
    with create_artifact(out, "evaluation", force=force, inputs=inputs,
                         config={"fewshot_seed": results["fewshot_seed"]}) as art:
        (art.dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        for name, log in zip(results["results"], logs):
            with open(art.dir / f"examples-{name}.jsonl", "w", encoding="utf-8") as f:
                for rec in log:
                    f.write(json.dumps(rec) + "\n")
        art.contents.update(contents, model=results["model"], model_id=results["model_id"], tasks=results["tasks"],
                            family=results["family"])
        art.metrics.update(metrics)
