"""megalodon_lite.official: state dicts with the official code's names and shapes, both ways.

The official state dict here is built by hand from the official modules' definitions (names,
shapes, buffers) at commit cff8ba5, and its logits are computed by a float64 forward written
against those official names, so the converter is checked against something it does not share.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from megalodon_lite import MegalodonLM, preset
from megalodon_lite.official import (
    OFFICIAL_COMMIT,
    OfficialFormatError,
    config_from_official,
    config_to_official,
    from_official,
    load_official,
    official_shapes,
    to_official,
)

F64 = torch.float64


def official_state_dict(cfg, generator, dtype=F64) -> dict[str, torch.Tensor]:
    """``Mega(cfg).state_dict()`` as the official modules define it, with random (non-zero) values."""
    D, V, Z, E, Fh = cfg.model_dim, cfg.vocab_size, cfg.z_dim, cfg.value_dim, cfg.ffn_hidden_dim
    N, G, dz = cfg.cema_ndim, cfg.norm_num_groups, cfg.z_dim // cfg.num_heads

    def rand(*shape, scale=0.3):
        return (scale * torch.randn(*shape, generator=generator, dtype=F64)).to(dtype)

    def timenorm(prefix):  # TimestepNorm: weight, bias and its prior buffers (megalodon/modules/timestep_norm.py)
        return {prefix + "prior_count": torch.tensor(0, dtype=torch.int64), prefix + "prior_mean": torch.zeros(G, dtype=dtype),
                prefix + "prior_logv": torch.zeros(G, dtype=dtype), prefix + "weight": rand(D), prefix + "bias": rand(D)}

    sd = {"embed.weight": rand(V, D, scale=D ** -0.5)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}.mega."
        sd.update(timenorm(p + "timenorm."))
        sd.update({p + "cema.alpha": rand(D, N, 1, scale=1.0), p + "cema.delta": rand(D, N, 1, scale=1.0),
                   p + "cema.theta": rand(D, 1, 1, scale=1.0), p + "cema.gamma": rand(D, N, 2, scale=1.0),
                   p + "cema.omega": rand(D, 1), p + "rmsnorm.weight": rand(D)})
        for name, (rows, cols) in {"wv": (E, D), "wz": (Z, D), "wr": (E, D), "wh1": (D, D)}.items():
            sd.update({p + f"{name}.weight": rand(rows, cols, scale=cols ** -0.5), p + f"{name}.bias": rand(rows)})
        sd.update({p + "wh2.weight": rand(D, E, scale=E ** -0.5), p + "gamma": rand(2, Z), p + "beta": rand(2, Z)})
        f = f"layers.{i}.nffn."
        sd.update({f + "norm.weight": rand(D), f + "norm.bias": rand(D), f + "fc1.weight": rand(Fh, D, scale=D ** -0.5),
                   f + "fc2.weight": rand(D, Fh, scale=Fh ** -0.5)})
        if cfg.swiglu:
            sd[f + "fc3.weight"] = rand(Fh, D, scale=D ** -0.5)
        if cfg.rescale_nffn:
            sd[f + "alpha"] = rand(D) + 0.5
    base = cfg.rope_base
    sd["rope.freqs"] = (1.0 / torch.tensor([base ** (j / dz) for j in range(0, dz, 2)], dtype=torch.float32)).to(dtype)
    sd.update(timenorm("output.final_norm."))
    sd["output.output.weight"] = sd["embed.weight"] if cfg.share_emb else rand(V, D, scale=D ** -0.5)
    return sd


def official_logits(sd, cfg, tokens) -> torch.Tensor:
    """Float64 logits of the official ``Mega.forward`` from a fresh stream, read off the official names."""
    D, H, G, N, c, eps = cfg.model_dim, cfg.num_heads, cfg.norm_num_groups, cfg.cema_ndim, cfg.chunk_size, cfg.norm_eps
    P = {k: v.double() for k, v in sd.items()}
    B, L = tokens.shape
    dz = cfg.z_dim // H

    def timestep_norm(x, prefix):  # cumulative group mean and variance over steps <= t
        xg = x.view(B, L, G, D // G)
        steps = torch.arange(1, L + 1, dtype=F64).view(1, L, 1)
        mean = xg.mean(-1).cumsum(1) / steps
        var = (xg ** 2).mean(-1).cumsum(1) / steps - mean ** 2
        y = ((xg - mean[..., None]) / torch.sqrt(var[..., None] + eps)).reshape(B, L, D)
        return y * (P[prefix + "weight"] + 1) + P[prefix + "bias"]

    def rms(x, weight=None):
        y = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        return y if weight is None else y * (weight + 1)

    x = P["embed.weight"][tokens] * (math.sqrt(D) if cfg.scale_emb else 1.0)
    t = torch.arange(L)
    # positions restart in every chunk; the frequencies exactly (rope.freqs holds them rounded to
    # float32, which the converter checks against rope_base, and the official rotation runs in float32)
    freqs = cfg.rope_base ** (-torch.arange(0, dz, 2, dtype=F64) / dz)
    angles = (t % c).double()[:, None] * freqs
    rotation = torch.polar(torch.ones_like(angles), angles)        # (L, dz/2)
    visible = (t[:, None] // c == t[None] // c) & (t[:, None] >= t[None])
    for i in range(cfg.num_layers):
        p, f = f"layers.{i}.mega.", f"layers.{i}.nffn."
        X = timestep_norm(x, p + "timenorm.")
        # MultiHeadComplexEMA._calc_coeffs and forward
        alpha, delta = torch.sigmoid(P[p + "cema.alpha"]), torch.sigmoid(P[p + "cema.delta"])      # (D, N, 1)
        theta = torch.arange(1, N + 1, dtype=F64).view(1, N, 1) * torch.sigmoid(P[p + "cema.theta"]) * (2 * math.pi / N)
        q = torch.polar(1.0 - alpha * delta, theta)[..., 0]
        gamma = torch.view_as_complex(P[p + "cema.gamma"].contiguous()) * math.sqrt(1.0 / N)
        h, ema = torch.zeros(B, D, N, dtype=torch.complex128), []
        for step in range(L):
            h = q * h + alpha[..., 0] * X[:, step, :, None]
            ema.append((gamma * h).real.sum(-1))
        ema = torch.stack(ema, 1) + (X.transpose(1, 2) * P[p + "cema.omega"]).transpose(1, 2)   # omega (D, 1)
        mx = rms(ema, P[p + "rmsnorm.weight"])
        z = rms((mx @ P[p + "wz.weight"].T + P[p + "wz.bias"]).view(B, L, H, dz)).view(B, L, -1)
        qk = z.unsqueeze(2) * ((P[p + "gamma"] + 1.0) / math.sqrt(dz)) + P[p + "beta"]        # (B, L, 2, z_dim)
        xq, xk = (u.view(B, L, H, dz) for u in qk.unbind(2))
        xq, xk = (torch.view_as_real(torch.view_as_complex(u.reshape(B, L, H, dz // 2, 2).contiguous())
                                     * rotation[:, None]).flatten(3) for u in (xq, xk))
        v = F.silu(X @ P[p + "wv.weight"].T + P[p + "wv.bias"]).view(B, L, H, -1)
        r = F.silu(mx @ P[p + "wr.weight"].T + P[p + "wr.bias"])
        scores = torch.einsum("blhd,bshd->bhls", xq, xk).masked_fill(~visible, float("-inf"))
        attn = torch.einsum("bhls,bshd->blhd", scores.softmax(-1), v).reshape(B, L, -1)
        y = mx @ P[p + "wh1.weight"].T + P[p + "wh1.bias"] + (attn * r) @ P[p + "wh2.weight"].T + x
        u = F.layer_norm(y, (D,), P[f + "norm.weight"] + 1.0, P[f + "norm.bias"], eps)
        hidden = F.silu(u @ P[f + "fc1.weight"].T)
        if cfg.swiglu:
            hidden = hidden * (u @ P[f + "fc3.weight"].T)
        out = hidden @ P[f + "fc2.weight"].T
        x = (out * P[f + "alpha"] if cfg.rescale_nffn else out) + x
    return timestep_norm(x, "output.final_norm.") @ P["output.output.weight"].T


CONFIGS = {
    "tiny": preset("tiny", chunk_size=8),
    "swiglu, layer scale, tied, scaled embedding": preset(
        "tiny", num_layers=1, chunk_size=8, swiglu=True, rescale_nffn=True, share_emb=True, scale_emb=True,
        rope_base=500.0),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_converted_model_computes_the_official_logits(name):
    cfg = CONFIGS[name]
    sd = official_state_dict(cfg, torch.Generator().manual_seed(0))
    model = MegalodonLM(cfg).double().eval()
    model.load_state_dict(from_official(sd, cfg), strict=True)
    tokens = torch.randint(0, cfg.vocab_size, (2, 3 * cfg.chunk_size + 5), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, _ = model(tokens)
    expected = official_logits(sd, cfg, tokens)
    # float64 on both sides, different summation orders: rounding of ~1e-16 per operation
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_exact(name):
    cfg = CONFIGS[name]
    sd = official_state_dict(cfg, torch.Generator().manual_seed(2), dtype=torch.float32)
    model = load_official(sd, cfg)
    back = to_official(model)
    assert list(back) == list(official_shapes(cfg))
    assert set(back) == set(sd)
    for key, value in sd.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # and the other way: our model -> official -> our model
    again = MegalodonLM(cfg)
    again.load_state_dict(from_official(to_official(model), cfg), strict=True)
    for (key, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), key


def test_wrong_or_missing_keys_are_named():
    cfg = CONFIGS["tiny"]
    good = official_state_dict(cfg, torch.Generator().manual_seed(3))

    def broken(**changes):
        sd = dict(good)
        for key, value in changes.items():
            key = key.replace("__", ".")
            if value is None:
                del sd[key]
            else:
                sd[key] = value
        return sd

    D, G = cfg.model_dim, cfg.norm_num_groups
    with pytest.raises(OfficialFormatError, match=r"missing 1 key\(s\): layers.1.mega.cema.omega"):
        from_official(broken(layers__1__mega__cema__omega=None), cfg)
    with pytest.raises(OfficialFormatError, match=r"unexpected 1 key\(s\): layers.0.mega.extra"):
        from_official(broken(layers__0__mega__extra=torch.zeros(1)), cfg)
    with pytest.raises(OfficialFormatError, match=r"layers.0.mega.cema.omega must have shape \(64, 1\)"):
        from_official(broken(layers__0__mega__cema__omega=torch.zeros(D)), cfg)
    with pytest.raises(OfficialFormatError, match=r"layers.0.mega.gamma must have shape \(2, 32\)"):
        from_official(broken(layers__0__mega__gamma=torch.zeros(2, 2, 16)), cfg)
    with pytest.raises(OfficialFormatError, match="prior"):
        from_official(broken(output__final_norm__prior_mean=torch.ones(G)), cfg)
    with pytest.raises(OfficialFormatError, match="rope_base=10000.0"):
        from_official(broken(rope__freqs=good["rope.freqs"] * 0.5), cfg)
    with pytest.raises(OfficialFormatError, match="must be a tensor"):
        from_official(broken(embed__weight=[0.0]), cfg)
    with pytest.raises(OfficialFormatError, match="missing"):  # a config with another depth
        from_official(good, cfg.replace(num_layers=3))
    tied = cfg.replace(share_emb=True)
    with pytest.raises(OfficialFormatError, match="share_emb"):
        from_official(good, tied)
    with pytest.raises(TypeError, match="MegalodonConfig"):
        from_official(good, cfg.to_dict())


def test_config_maps_field_for_field():
    cfg = CONFIGS["swiglu, layer scale, tied, scaled embedding"]
    official = config_to_official(cfg)
    assert official["output_size"] == -1 and official["efficient_attn"] is None
    assert config_from_official(official) == cfg
    # a saved official config may leave defaults out; rope_base None is the official 10000
    small = config_from_official({"vocab_size": 256, "num_layers": 2, "model_dim": 64, "z_dim": 32, "value_dim": 128,
                                  "num_heads": 2, "ffn_hidden_dim": 128, "chunk_size": 64, "norm_num_groups": 8,
                                  "efficient_attn": "swift"})
    assert small == preset("tiny")
    assert config_from_official({**config_to_official(preset("mega200M")), "rope_base": None}) == preset("mega200M")
    for bad, message in (({"vocab_size": -1}, "vocab_size"), ({"vocab_size": 8, "colour": 1}, "colour"),
                         ({"vocab_size": 8, "norm_affine": False}, "norm_affine"),
                         ({"vocab_size": 8, "output_size": 5}, "output_size")):
        with pytest.raises(OfficialFormatError, match=message):
            config_from_official(bad)
    assert len(OFFICIAL_COMMIT) == 40
