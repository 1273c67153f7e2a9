"""Post-training benchmarks (issue 26), each part printing a table measured in one run.

    python bench/post_training.py --part quality [--work examples/post-training/work]
        held-out metrics of the examples/post-training pipeline (built with make if --work is missing), on the
        plays kept out of all training: SFT's completion NLL (base -> SFT), preference accuracy (SFT -> DPO)
    python bench/post_training.py --part memory    # DPO-LoRA vs SFT-LoRA peak memory, same model and batch
    python bench/post_training.py --part speed     # DPO-LoRA steps/s: gentool vs TRL 1.16 (+ PEFT), same CPU batch
    python bench/post_training.py                  # all three

Preference accuracy: the share of held-out pairs whose chosen answer has the higher summed log-probability under
the model (the SFT model's own preference: about 50% with another play's line as the rejected one, near 100% with
the demo's default, the true line's words shuffled), and DPO's implicit-reward accuracy (chosen log-ratio against the
SFT reference above the rejected one, TRL's rewards/accuracies: 50% before DPO, the policy being the reference).
Memory: each configuration in its own subprocess; peak RSS (VmHWM) above the process's level after a warm-up step
(reset through /proc/self/clear_refs), with glibc told to map every allocation over 16 KiB on its own and return
it on free, so RSS follows the live bytes (without that the retained arenas make the peak swing 2x either way).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

SHAPE = {"vocab_size": 2048, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512,
         "tie_word_embeddings": False}


# --- quality ---------------------------------------------------------------------------------------------------------
def quality(work: Path) -> dict:
    import torch

    from gentool.data.examples import open_masked, open_pairs
    from gentool.lm.preference import collate, sequence_logps
    from gentool.lm.sft import nll, pack
    from gentool.models.checkpoint import load_lm

    targets = [str(work.resolve() / d / "manifest.json") for d in ("dpo-merged", "heldout-sft", "heldout-pairs")]
    if not all(Path(t).is_file() for t in targets):
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        subprocess.run(["make", "-C", str(ROOT / "examples" / "post-training"), f"WORK={work.resolve()}",
                        f"GENTOOL={sys.executable} -m gentool", f"PYTHON={sys.executable}", *targets],
                       check=True, env=env)
    models = {m: load_lm(work / m).model.eval() for m in ("base", "sft", "dpo-merged")}
    ex = open_masked(work / "heldout-sft", "train")  # the held-out plays: one split, nothing trained on it
    pairs = open_pairs(work / "heldout-pairs", "train")
    out = {}
    with torch.no_grad():
        for m in ("base", "sft"):
            total = count = 0.0
            for i in range(0, len(ex), 16):
                rows = [[ex.example(j)] for j in range(i, min(i + 16, len(ex)))]
                s, n = nll(models[m], pack(rows, max(len(r[0][0]) for r in rows), 0))
                total, count = total + s.item(), count + n.item()
            out[f"completion_nll/{m}"] = total / count
        logps = {}
        for m in ("sft", "dpo-merged"):
            cs, rs = [], []
            for i in range(0, len(pairs), 16):
                s, _, _ = sequence_logps(models[m], collate([pairs.pair(j) for j in range(i, min(i + 16, len(pairs)))],
                                                            512, 0))
                c, r = s.chunk(2)
                cs.append(c)
                rs.append(r)
            logps[m] = torch.cat(cs), torch.cat(rs)
            out[f"preference_accuracy/{m}"] = (logps[m][0] > logps[m][1]).float().mean().item()
        (c1, r1), (c0, r0) = logps["dpo-merged"], logps["sft"]
        out["rewards/accuracies (dpo vs sft reference)"] = ((c1 - c0) > (r1 - r0)).float().mean().item()
    out["heldout_examples"], out["heldout_pairs"] = len(ex), len(pairs)
    return out


# --- memory and speed ------------------------------------------------------------------------------------------------
def _batch(pairs: int, length: int, seed: int = 0):
    import numpy as np

    rng = np.random.default_rng(seed)
    prompt = length // 2
    return [(rng.integers(4, SHAPE["vocab_size"], prompt), rng.integers(4, SHAPE["vocab_size"], length - prompt),
             rng.integers(4, SHAPE["vocab_size"], length - prompt)) for _ in range(pairs)]


def _ours(objective: str, pairs: int, length: int, live: bool = False):
    """A LoRA model and a step function: DPO on `pairs` pairs (reference log-probs precomputed as train-lm does,
    or `live`: adapters switched off in every step), or SFT on the same 2·pairs sequences."""
    import numpy as np
    import torch

    from gentool.config import LMConfig
    from gentool.lm.preference import PreferenceConfig, collate, preference_loss, sequence_logps
    from gentool.lm.sft import nll, pack
    from gentool.models.lora import LoRAConfig, adapters_disabled, inject_lora
    from gentool.models.transformer import Transformer

    torch.manual_seed(0)
    model = Transformer(LMConfig(**SHAPE))
    model.init_weights(0)
    inject_lora(model, LoRAConfig(r=16, alpha=32, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    data = _batch(pairs, length)
    cfg = PreferenceConfig("dpo", beta=0.1)
    if objective == "dpo":
        batch = collate(data, length, 0)

        with torch.no_grad(), adapters_disabled(model):
            fixed, _, _ = sequence_logps(model, batch)

        def loss_fn():
            ref = fixed
            if live:
                with torch.no_grad(), adapters_disabled(model):  # as PreferenceTask.compute: the reference first
                    ref, _, _ = sequence_logps(model, batch)
            s, n, _ = sequence_logps(model, batch)
            b = len(data)
            return preference_loss(cfg, s[:b], s[b:], n[:b], n[b:], ref[:b], ref[b:])[0]
    else:
        rows = [[(np.concatenate([p, a]), np.r_[np.zeros(len(p), bool), np.ones(len(a), bool)])]
                for p, c, r in data for a in (c, r)]
        batch = pack(rows, length, 0)

        def loss_fn():
            s, n = nll(model, batch)
            return s / n

    def step():
        opt.zero_grad(set_to_none=True)
        loss_fn().backward()
        opt.step()

    return step


def _trl(pairs: int, length: int, precompute: bool = False):
    """The same model shape as a transformers Llama with PEFT LoRA, stepped through TRL's DPOTrainer._compute_loss
    (its default: the reference forward in every step with the adapter off; or `precompute`, its
    precompute_ref_log_probs, the reference log-probs given in the batch)."""
    import types
    from collections import defaultdict

    import peft
    import torch
    import transformers
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    from gentool.lm.preference import collate

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    model = peft.get_peft_model(hf, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    add_fused_lm_head(model.get_base_model(), outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    t = DPOTrainer.__new__(DPOTrainer)
    t.model, t.ref_model = model, None
    t.accelerator = types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x,
                                          gather_for_metrics=lambda x: x, unwrap_model=lambda m: m)
    t.aux_loss_enabled, t.ld_alpha, t.precompute_ref_logps, t.use_weighting = False, None, precompute, False
    t.loss_types, t.loss_weights, t.f_divergence_type = ["sigmoid"], [1.0], "reverse_kl"
    t.beta, t.label_smoothing, t._tp_size, t._total_train_tokens = 0.1, 0.0, 1, 0
    t.args = types.SimpleNamespace(gradient_checkpointing_kwargs=None)
    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    ids, answer, valid = collate(_batch(pairs, length), length, 0)
    inputs = {"input_ids": ids, "attention_mask": valid.long(), "completion_mask": answer.long()}
    if precompute:
        inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = torch.zeros(pairs), torch.zeros(pairs)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        t._compute_loss(model, inputs, return_outputs=False).backward()
        opt.step()

    return step


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    step = _ours(spec["objective"], spec["pairs"], spec["length"], spec.get("live", False)) \
        if spec["impl"] == "gentool" else _trl(spec["pairs"], spec["length"], spec.get("precompute", False))
    step()  # warm-up: allocator, optimizer state
    Path("/proc/self/clear_refs").write_text("5")
    base = _hwm()
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"peak_bytes": _hwm() - base, "steps_per_s": 1 / (sum(times) / len(times)), "times": times}


def _run(spec: dict) -> dict:
    # every allocation above 16 KiB its own mapping, returned on free: RSS follows the live bytes, so the high-water
    # mark is the step's true peak rather than the allocator's retained arenas
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MALLOC_MMAP_THRESHOLD_": "16384",
           "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}
    r = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                       env=env, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=["quality", "memory", "speed", "all"], default="all")
    p.add_argument("--work", type=Path, default=ROOT / "examples" / "post-training" / "work")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="speed: interleaved rounds of each implementation")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(json.loads(a.child))))
        return
    print(f"load average: {Path('/proc/loadavg').read_text().split()[:3]}")
    base = {"pairs": a.pairs, "length": a.length, "steps": a.steps, "threads": a.threads}
    if a.part in ("quality", "all"):
        for k, v in quality(a.work).items():
            print(f"{k:45s} {v:.4f}" if isinstance(v, float) else f"{k:45s} {v}")
    if a.part in ("memory", "all"):
        sft = _run({**base, "impl": "gentool", "objective": "sft"})
        print(f"peak memory, LoRA r=16, {a.pairs} pairs x {a.length} tokens (SFT: the same {2 * a.pairs} rows)")
        print(f"  {'SFT-LoRA':40s} {sft['peak_bytes'] / 2**20:8.1f} MiB")
        for name, live in (("DPO-LoRA (reference precomputed)", False), ("DPO-LoRA --reference-live", True)):
            dpo = _run({**base, "impl": "gentool", "objective": "dpo", "live": live})
            print(f"  {name:40s} {dpo['peak_bytes'] / 2**20:8.1f} MiB   "
                  f"x{dpo['peak_bytes'] / max(sft['peak_bytes'], 1):.3f} of SFT-LoRA")
    if a.part in ("speed", "all"):
        configs = {"gentool (default: reference precomputed)": {"impl": "gentool"},
                   "gentool --reference-live (adapters off per step)": {"impl": "gentool", "live": True},
                   "TRL default (adapter off per step)": {"impl": "trl"},
                   "TRL precompute_ref_log_probs": {"impl": "trl", "precompute": True}}
        rates = {k: [] for k in configs}
        for _ in range(a.rounds):  # interleaved, so a change in the machine's load hits all of them
            for k, c in configs.items():
                rates[k].append(_run({**base, "objective": "dpo", **c})["steps_per_s"])
        best = {k: max(v) for k, v in rates.items()}
        trl = best["TRL default (adapter off per step)"]
        print(f"DPO-LoRA steps/s, {a.pairs} pairs x {a.length} tokens, {a.threads} thread(s), best of {a.rounds}")
        for k, v in best.items():
            print(f"  {k:50s} {v:.3f}   x{v / trl:.2f} of TRL's default")


if __name__ == "__main__":
    main()
