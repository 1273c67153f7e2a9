import torch

from gentool.models.denoisers import DenoiserConfig, SelfAttention, build_denoiser, timestep_embedding


def test_shapes_and_conditioning():
    unet = build_denoiser(DenoiserConfig("unet", [3, 16, 16], width=16, depth=1, channel_mult=[1, 2],
                                         attn_max_res=8, num_classes=4))
    assert any(isinstance(m, SelfAttention) for m in unet.modules())
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    for p in unet.parameters():  # zero-initialised output convolutions would hide the conditioning
        if p.dim() > 1 and not p.any():
            torch.nn.init.normal_(p, std=0.1)
    out = unet(x, t, torch.tensor([0, 1]))
    assert out.shape == x.shape
    assert torch.equal(unet(x, t, None), unet(x, t, torch.tensor([4, 4])))  # None = the null class
    assert not torch.allclose(out, unet(x, t, torch.tensor([2, 3])))
    mlp = build_denoiser(DenoiserConfig("mlp", [5], width=32, depth=2))
    assert mlp(torch.randn(7, 5), torch.rand(7)).shape == (7, 5)


def test_timestep_embedding_distinguishes_times():
    e = timestep_embedding(torch.tensor([0.0, 0.001, 1.0]), 32)
    assert e.shape == (3, 32) and (e[0] - e[1]).abs().max() > 0.1
