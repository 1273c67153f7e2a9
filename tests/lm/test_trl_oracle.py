"""Post-training losses equal TRL's on the same batch and weights (TRL 1.16 is the oracle; skipped without it):
SFT's masked loss equals SFTTrainer's (its collator + the fused-head loss), DPO / robust DPO / IPO equal
DPOTrainer._compute_loss with a reference model, SimPO equals CPOTrainer (loss_type simpo, cpo_alpha 0) and ORPO
ORPOTrainer, the reward metrics included. Float32 on CPU; tolerance 1e-5."""

import copy
import types

import numpy as np
import pytest
import torch

from gentool.config import LMConfig
from gentool.lm.preference import PreferenceConfig, PreferenceTask, collate, preference_loss, sequence_logps
from gentool.lm.sft import nll, pack
from gentool.models.transformer import Transformer

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.oracle
TOL = 1e-5


def _models(seed=0):
    """(ours, HF) policy with identical weights, and (ours, HF) reference (the policy before a perturbation)."""
    cfg = LMConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=False)
    ref = Transformer(cfg)
    ref.init_weights(seed)
    pol = copy.deepcopy(ref)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in pol.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    hcfg = transformers.LlamaConfig(**cfg.to_hf_dict())

    def hf(m):
        h = transformers.LlamaForCausalLM(hcfg)
        h.load_state_dict(m.state_dict(), strict=False)
        return h.eval()

    return pol.eval(), ref.eval(), hf(pol), hf(ref)


def _pairs(seed=0, n=4):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p = rng.integers(4, 60, size=int(rng.integers(2, 6)))
        c = rng.integers(4, 60, size=int(rng.integers(1, 7)))
        r = rng.integers(4, 60, size=int(rng.integers(1, 7)))
        out.append((p, c, r))
    return out


def _trl_batch(pairs):
    """TRL's DPO layout: [chosen; rejected] rows of prompt+answer, right-padded, with completion masks."""
    ids, answer, valid = collate(pairs, 64, 0)
    return {"input_ids": ids, "attention_mask": valid.long(), "completion_mask": answer.long()}


def _accelerator():
    return types.SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def test_sft_loss_equals_trl():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling
    from trl.trainer.utils import add_fused_lm_head

    pol, _, hf, _ = _models()
    rng = np.random.default_rng(3)
    exs = []
    for _ in range(5):
        k = int(rng.integers(4, 12))
        ids = rng.integers(4, 60, size=k)
        mask = np.zeros(k, bool)
        mask[int(rng.integers(1, k - 1)):] = True
        exs.append((ids, mask))
    collator = DataCollatorForLanguageModeling(pad_token_id=0)
    batch = collator([{"input_ids": x.tolist(), "labels": [int(t) if m else -100 for t, m in zip(x, mask)]}
                      for x, mask in exs])
    add_fused_lm_head(hf)
    with torch.no_grad():
        want = hf(**batch, fused_lm_head=True).loss.item()
        packed = pack([exs[:3], exs[3:]], 40, 0)  # packed two rows: must not change a thing
        s, n = nll(pol, packed)
    assert abs(s.item() / n.item() - want) < TOL


def _ours(cfg, pol, ref, pairs):
    batch = collate(pairs, 64, 0)
    with torch.no_grad():
        s, n, logp = sequence_logps(pol, batch)
        rs, _, _ = sequence_logps(ref, batch)
    b = len(pairs)
    nll_ = None
    if cfg.loss == "orpo":
        valid = batch[2][:b, 1:]
        nll_ = -(logp[:b] * valid).sum() / valid.sum()
    return preference_loss(cfg, s[:b], s[b:], n[:b], n[b:], rs[:b], rs[b:], nll_)


@pytest.mark.parametrize("loss_type,eps", [("sigmoid", 0.0), ("robust", 0.2), ("ipo", 0.0)])
def test_dpo_family_equals_dpotrainer(loss_type, eps):
    from trl import DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    pol, ref, hf_pol, hf_ref = _models()
    pairs = _pairs()
    add_fused_lm_head(hf_pol, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(hf_ref)
    t = DPOTrainer.__new__(DPOTrainer)
    t.model, t.ref_model, t.accelerator = hf_pol, hf_ref, _accelerator()
    t.aux_loss_enabled, t.ld_alpha, t.precompute_ref_logps, t.use_weighting = False, None, False, False
    t.loss_types, t.loss_weights, t.f_divergence_type = [loss_type], [1.0], "reverse_kl"
    t.beta, t.label_smoothing, t._tp_size, t._total_train_tokens = 0.3, eps, 1, 0
    t.args = types.SimpleNamespace(gradient_checkpointing_kwargs=None)
    from collections import defaultdict

    t._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    with torch.no_grad():
        want = t._compute_loss(hf_pol, _trl_batch(pairs), return_outputs=False)
    cfg = PreferenceConfig("ipo" if loss_type == "ipo" else "dpo", beta=0.3, label_smoothing=eps)
    loss, metrics = _ours(cfg, pol, ref, pairs)
    assert abs(loss.item() - want.item()) < TOL
    mode = "eval"  # the HF model is in eval mode
    for k, v in metrics.items():
        assert abs(v.item() - t._metrics[mode][k][-1]) < TOL, k


def _cpo_batch(pairs):
    """CPO/ORPO's layout: chosen_* and rejected_* tensors, labels -100 on the prompt and padding."""
    out = {}
    for side, k in (("chosen", 1), ("rejected", 2)):
        rows = [np.concatenate([p[0], p[k]]) for p in pairs]
        length = max(map(len, rows))
        ids = torch.zeros(len(rows), length, dtype=torch.long)
        att = torch.zeros_like(ids)
        lab = torch.full_like(ids, -100)
        for i, (row, p) in enumerate(zip(rows, pairs)):
            ids[i, :len(row)] = torch.from_numpy(row)
            att[i, :len(row)] = 1
            lab[i, len(p[0]):len(row)] = torch.from_numpy(row[len(p[0]):])
        out.update({f"{side}_input_ids": ids, f"{side}_attention_mask": att, f"{side}_labels": lab})
    return out


def _stub(cls, **attrs):
    t = cls.__new__(cls)
    t.accelerator, t.is_encoder_decoder, t.padding_value, t.label_pad_token_id = _accelerator(), False, 0, -100
    t.pad_token_id = 0
    t.aux_loss_enabled = False
    for k, v in attrs.items():
        setattr(t, k, v)
    return t


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_equals_cpotrainer(eps):
    from trl.experimental.cpo import CPOTrainer

    pol, ref, hf_pol, _ = _models(1)
    pairs = _pairs(1)
    t = _stub(CPOTrainer, loss_type="simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=eps, cpo_alpha=0.0, alpha=0.0)
    with torch.no_grad():
        want, metrics_want = t.get_batch_loss_metrics(hf_pol, _cpo_batch(pairs))
    loss, metrics = _ours(PreferenceConfig("simpo", beta=2.0, simpo_gamma=0.7, label_smoothing=eps), pol, ref, pairs)
    assert abs(loss.item() - float(want)) < TOL
    for k, v in metrics.items():
        assert abs(v.item() - float(metrics_want[k])) < TOL, k


def test_orpo_equals_orpotrainer():
    from trl.experimental.orpo import ORPOTrainer

    pol, ref, hf_pol, _ = _models(2)
    pairs = _pairs(2)
    t = _stub(ORPOTrainer, beta=0.25)
    with torch.no_grad():
        want, metrics_want = t.get_batch_loss_metrics(hf_pol, _cpo_batch(pairs))
    loss, metrics = _ours(PreferenceConfig("orpo", beta=0.25), pol, ref, pairs)
    assert abs(loss.item() - float(want)) < TOL
    for k, v in metrics.items():
        assert abs(v.item() - float(metrics_want[k])) < TOL, k


def test_task_reference_from_disabled_adapters_equals_base(tmp_path):
    """With LoRA the reference is the base: adapters off inside the loss, no second copy."""
    from gentool.models.lora import LoRAConfig, adapters_disabled, inject_lora

    pol, ref, _, _ = _models()
    inject_lora(ref, LoRAConfig(r=2, alpha=4, target_modules="all-linear"))
    for name, p in ref.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = collate(_pairs(), 64, 0)
    base = Transformer(ref.config)
    base.load_state_dict({k.replace(".base_layer", ""): v for k, v in ref.state_dict().items() if "lora_" not in k})
    with torch.no_grad(), adapters_disabled(ref):
        got = sequence_logps(ref, batch)[0]
    want = sequence_logps(base.eval(), batch)[0]
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)
    assert not torch.allclose(sequence_logps(ref, batch)[0].detach(), want, atol=1e-4)
    assert PreferenceTask  # the task wires this in: _reference() under adapters_disabled
