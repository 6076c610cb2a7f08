"""model.py: presets, initialisation, RoPE, attention paths, the authors' checkpoint layout."""
import math

import pytest
import torch
import torch.nn.functional as F

import model as model_lib
import pmf
from conftest import TINY, batch, flat_grads, tiny_cfg, tiny_model

# Paper Tab. 8 / docs/method.md §4.1, in millions: (inference, training with the v-head).
PAPER_PARAMS = {"pMF-B/16": (118.2, 175.5), "pMF-L/16": (410.3, None), "pMF-H/16": (955.5, None),
                "pMF-B/32": (120.3, None), "pMF-L/32": (413.0, None), "pMF-H/32": (959.1, None)}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_preset_parameter_counts_match_paper(name):
    inference, training = PAPER_PARAMS[name]
    with torch.device("meta"):
        counts = {v: sum(p.numel() for p in model_lib.build_model(name, with_v_head=v).parameters()) / 1e6
                  for v in (False, True)}
    assert abs(counts[False] - inference) / inference < 1e-3
    if training is not None:
        assert abs(counts[True] - training) / training < 1e-3


def test_swiglu_width_rounds_only_above_1024():
    assert [model_lib.swiglu_hidden(d) for d in (768, 1024, 1280)] == [2048, 2730, 3416]


def test_outputs_are_zero_at_init():
    net = model_lib.build_model(None, **TINY)
    z = torch.randn(2, 3, 16, 16)
    s = torch.rand(2)
    x_u, x_v = net(z, s, 1 + 7 * s, s / 2, 0.5 + s / 2, torch.tensor([1, 10]))
    assert torch.equal(x_u, torch.zeros_like(z)) and torch.equal(x_v, torch.zeros_like(z))
    gates = [p for n, p in net.named_parameters() if n.endswith("_gate")]
    assert gates and all(torch.equal(g, torch.zeros_like(g)) for g in gates)


def test_init_constants():
    net = model_lib.build_model(None, **{**TINY, "hidden_size": 256, "num_heads": 4})
    d = 256
    assert net.trunk[0].attn.q.weight.std().item() == pytest.approx(0.32 / math.sqrt(d), rel=0.05)
    assert net.h_embedder.fc1.weight.std().item() == pytest.approx(1 / 16, rel=0.05)
    assert net.label_embed.weight.std().item() == pytest.approx(1 / math.sqrt(d), rel=0.05)
    assert net.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(net.h_embedder.fc1.bias, torch.zeros(d))


def _rope_reference(x, grid, head_dim):
    """Loop over patches and pairs: pair k < hd/4 rotates by the row, the rest by the column."""
    out = x.clone()
    quarter = head_dim // 4
    n_prefix = x.shape[1] - grid * grid
    for i in range(grid):
        for j in range(grid):
            tok = n_prefix + i * grid + j
            for k in range(head_dim // 2):
                pos, kk = (i, k) if k < quarter else (j, k - quarter)
                angle = pos * 10000.0 ** (-2 * kk / (head_dim // 2))
                a, b = x[:, tok, :, 2 * k], x[:, tok, :, 2 * k + 1]
                out[:, tok, :, 2 * k] = a * math.cos(angle) - b * math.sin(angle)
                out[:, tok, :, 2 * k + 1] = a * math.sin(angle) + b * math.cos(angle)
    return out


def test_rope_rotates_patches_only_and_matches_reference():
    grid, hd = 3, 8
    x = torch.randn(2, 20 + grid * grid, 2, hd, dtype=torch.float64)
    rope = model_lib.rope_tables(grid, hd, torch.float64, "cpu")
    y = model_lib.apply_rope(x, rope)
    assert torch.equal(y[:, :20], x[:, :20])
    torch.testing.assert_close(y, _rope_reference(x, grid, hd), rtol=1e-12, atol=1e-12)


def test_prefix_tokens_sets_the_in_context_token_counts():
    assert tiny_model().num_prefix == sum(model_lib.PREFIX_TOKENS.values()) == 20  # the paper's 8/4/2/2/4
    net = tiny_model(prefix_tokens=[1, 2, 1, 1, 3])
    assert [getattr(net, f"{g}_tokens").shape[1] for g in model_lib.PREFIX_TOKENS] == [1, 2, 1, 1, 3]
    z, y = batch(2)
    cond = [torch.full((2,), v, dtype=torch.float64) for v in (0.3, 2.0, 0.1, 0.9)]
    seq = net._sequence(z, *cond, y)[0]
    assert seq.shape == (2, 8 + 16, 32) and net.pos_embed.shape[1] == 8 + 16
    moved = (net._sequence(z, cond[0] + 0.2, *cond[1:], y)[0] - seq).abs().amax(dim=(0, 2)) > 0
    assert moved.tolist() == [False] * 5 + [True] * 3 + [False] * 16  # h moves the 3 time tokens only


def test_explicit_attention_equals_sdpa():
    net = tiny_model()
    z = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    s = torch.rand(3, dtype=torch.float64)
    args = (z, s, 1 + s, s / 2, 0.5 + s / 2, torch.tensor([0, 4, 10]))
    for a, b in zip(net(*args, attn="sdpa"), net(*args, attn="explicit")):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# ---- the authors' release layout (docs/method.md §4.7) and a straightforward reference forward ----

def _official_state_dict(cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, p, c, k = cfg["hidden_size"], cfg["patch_size"], cfg["in_channels"], cfg["num_classes"]
    hd, grid = d // cfg["num_heads"], cfg["input_size"] // cfg["patch_size"]
    mlp = model_lib.swiglu_hidden(d)
    r = lambda *shape: 0.3 * torch.randn(*shape, generator=g)
    sd = {"x_embedder.proj1.weight": r(128, c, p, p), "x_embedder.proj1.bias": r(128),
          "x_embedder.proj2.weight": r(d, 128, 1, 1), "x_embedder.proj2.bias": r(d),
          "y_embedder.embedding_table._flax_embedding.weight": r(k + 1, d),
          "class_tokens": r(1, 8, d), "omega_tokens": r(1, 4, d), "t_min_tokens": r(1, 2, d),
          "t_max_tokens": r(1, 2, d), "time_tokens": r(1, 4, d), "pos_embed": r(1, 20 + grid * grid, d),
          "rope_freqs": torch.polar(torch.ones(grid * grid, hd // 2), r(grid * grid, hd // 2)),
          "u_final_layer.norm.weight": 1 + r(d), "u_final_layer.linear._flax_linear.weight": r(p * p * c, d),
          "u_final_layer.linear._flax_linear.bias": r(p * p * c)}
    for e in ("h", "omega", "cfg_t_start", "cfg_t_end"):
        sd.update({f"{e}_embedder.mlp.0._flax_linear.weight": r(d, 256) / 4, f"{e}_embedder.mlp.0._flax_linear.bias": r(d),
                   f"{e}_embedder.mlp.2._flax_linear.weight": r(d, d) / 4, f"{e}_embedder.mlp.2._flax_linear.bias": r(d)})
    blocks = [f"shared_blocks.{i}" for i in range(cfg["depth"] - cfg["head_depth"])]
    blocks += [f"u_heads.{j}" for j in range(cfg["head_depth"])]
    for b in blocks:
        sd.update({f"{b}.norm1.weight": 1 + r(d), f"{b}.norm2.weight": 1 + r(d),
                   f"{b}.attn.q_norm.weight": 1 + r(hd), f"{b}.attn.k_norm.weight": 1 + r(hd),
                   f"{b}.attn_scale": r(d), f"{b}.mlp_scale": r(d),
                   f"{b}.mlp.w1._flax_linear.weight": r(mlp, d) / 4, f"{b}.mlp.w3._flax_linear.weight": r(mlp, d) / 4,
                   f"{b}.mlp.w2._flax_linear.weight": r(d, mlp) / 4})
        for proj in "qkv":
            sd[f"{b}.attn.{proj}_proj._flax_linear.weight"] = r(d, d) / 4
        sd[f"{b}.attn.out_proj._flax_linear.weight"] = r(d, d) / 4
    return {f"net.{k}": v for k, v in sd.items()}, blocks


def _reference_forward(sd, blocks, cfg, z, h, omega, t_min, t_max, y):
    """The official pmfDiT forward (u-head), written out plainly on the authors' names."""
    P = lambda name: sd[f"net.{name}"]
    d, p, heads = cfg["hidden_size"], cfg["patch_size"], cfg["num_heads"]
    hd, grid, b = d // heads, cfg["input_size"] // p, z.shape[0]

    def lin(x, name, bias=True):
        return F.linear(x, P(f"{name}._flax_linear.weight"), P(f"{name}._flax_linear.bias") if bias else None)

    def embed(name, s):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        arg = s[:, None] * freqs[None]
        hidden = F.silu(lin(torch.cat([torch.cos(arg), torch.sin(arg)], -1), f"{name}_embedder.mlp.0"))
        return lin(hidden, f"{name}_embedder.mlp.2")

    def rms(x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight

    # RoPE exactly as their precompute_rope_freqs / apply_rotary_pos_emb, with complex numbers
    dim = hd // 2
    f = 1.0 / (10000 ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    pos = torch.arange(grid, dtype=torch.float32)
    fr = torch.outer(pos, f)
    angles = torch.cat([fr[:, None, :].expand(grid, grid, -1), fr[None, :, :].expand(grid, grid, -1)], -1)
    cis = torch.polar(torch.ones(grid * grid, dim), angles.reshape(grid * grid, dim))

    def rope(x):
        xc = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2).contiguous())
        xc = torch.cat([xc[:, :-grid * grid], xc[:, -grid * grid:] * cis[None, :, None]], 1)
        return torch.view_as_real(xc).flatten(-2)

    x = F.conv2d(F.conv2d(z, P("x_embedder.proj1.weight"), P("x_embedder.proj1.bias"), stride=p),
                 P("x_embedder.proj2.weight"), P("x_embedder.proj2.bias"))
    x = x.permute(0, 2, 3, 1).reshape(b, -1, d)
    table = P("y_embedder.embedding_table._flax_embedding.weight")
    seq = torch.cat([P("class_tokens") + table[y][:, None], P("omega_tokens") + embed("omega", 1 - 1 / omega)[:, None],
                     P("t_min_tokens") + embed("cfg_t_start", t_min)[:, None],
                     P("t_max_tokens") + embed("cfg_t_end", t_max)[:, None],
                     P("time_tokens") + embed("h", h)[:, None], x], 1) + P("pos_embed")
    for blk in blocks:
        a = rms(seq, P(f"{blk}.norm1.weight"))
        q, k, v = (lin(a, f"{blk}.attn.{n}_proj", bias=False).reshape(b, -1, heads, hd) for n in "qkv")
        q, k = rope(rms(q, P(f"{blk}.attn.q_norm.weight"))), rope(rms(k, P(f"{blk}.attn.k_norm.weight")))
        w = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q / math.sqrt(hd), k), -1)
        o = torch.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, -1, d)
        seq = seq + lin(o, f"{blk}.attn.out_proj", bias=False) * P(f"{blk}.attn_scale")
        m = rms(seq, P(f"{blk}.norm2.weight"))
        mlp = lin(F.silu(lin(m, f"{blk}.mlp.w1", False)) * lin(m, f"{blk}.mlp.w3", False), f"{blk}.mlp.w2", False)
        seq = seq + mlp * P(f"{blk}.mlp_scale")
    out = lin(rms(seq[:, 20:], P("u_final_layer.norm.weight")), "u_final_layer.linear")
    out = out.reshape(b, grid, grid, p, p, -1)
    return torch.einsum("nhwpqc->nchpwq", out).reshape(b, -1, grid * p, grid * p)


def test_official_checkpoint_maps_onto_our_model_and_reproduces_their_forward():
    sd, blocks = _official_state_dict(TINY)
    net = model_lib.load_weights(model_lib.build_model(None, **TINY, with_v_head=False), sd)
    own = net.state_dict()
    assert len(own) == len(sd) - 1  # every tensor used except the recomputed rope_freqs
    g = torch.Generator().manual_seed(3)
    z = torch.randn(3, 3, 16, 16, generator=g)
    s = torch.rand(3, generator=g)
    args = (z, s, 1 + 7 * s, s / 2, 0.5 + s / 2, torch.tensor([2, 10, 7]))
    ours, = net(*args, heads="u")
    torch.testing.assert_close(ours, _reference_forward(sd, blocks, TINY, *args), rtol=1e-4, atol=1e-5)


def test_checkpoint_for_another_shape_names_the_first_mismatching_tensor():
    sd, _ = _official_state_dict(TINY)
    wrong = model_lib.build_model(None, **{**TINY, "hidden_size": 64}, with_v_head=False)
    with pytest.raises(ValueError, match="patch_embed.conv2.weight.*preset"):
        model_lib.load_weights(wrong, sd)
    del sd["net.u_heads.1.mlp_scale"]
    with pytest.raises(ValueError, match="u_head.1.mlp_gate"):
        model_lib.load_weights(model_lib.build_model(None, **TINY, with_v_head=False), sd)


def test_inference_build_has_no_v_head_and_round_trips_our_weights():
    train_net = tiny_model(dtype=torch.float32)
    eval_net = model_lib.build_model(None, **TINY, with_v_head=False)
    assert not any(n.startswith(("v_head", "v_final")) for n, _ in eval_net.named_parameters())
    with_v = {n for n, _ in train_net.named_parameters()}
    assert any(n.startswith("v_head.") for n in with_v)
    inference_sd = {k: v for k, v in train_net.state_dict().items() if not k.startswith(("v_head", "v_final"))}
    model_lib.load_weights(eval_net, inference_sd)
    z, s, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([1, 2])
    assert torch.equal(eval_net(z, s, 1 + s, s / 2, s, y, heads="u")[0], train_net(z, s, 1 + s, s / 2, s, y, heads="u")[0])
    with pytest.raises(ValueError, match="without the v-head"):
        eval_net(z, s, 1 + s, s / 2, s, y, heads="v")


def test_bf16_autocast_forward_and_loss_are_finite():
    net, cfg = tiny_model(dtype=torch.float32), tiny_cfg()
    x, y = batch(dtype=torch.float32)
    draws = pmf.sample_draws(cfg, x, torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net(x, draws.t, draws.omega, draws.t_min, draws.t_max, y)
        loss, metrics = pmf.pmf_loss(net, x, y, draws, cfg)
    loss.backward()
    assert out[0].dtype == torch.bfloat16 and all(torch.isfinite(o).all() for o in out)
    assert torch.isfinite(loss) and all(torch.isfinite(v).all() for v in metrics.values())
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


def test_bad_inputs_raise_value_errors_naming_the_problem():
    with pytest.raises(ValueError, match="unknown model preset 'pMF-X/16'"):
        model_lib.build_model("pMF-X/16")
    with pytest.raises(ValueError, match="unknown build_model overrides"):
        model_lib.build_model("pMF-B/16", widht=3)
    net = model_lib.build_model(None, **TINY)
    s, y = torch.rand(2), torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"takes \(B, 3, 16, 16\)"):
        net(torch.randn(2, 3, 32, 32), s, 1 + s, s, s, y)
    with pytest.raises(ValueError, match=r"takes \(B, 3, 16, 16\)"):
        net(torch.randn(2, 1, 16, 16), s, 1 + s, s, s, y)
    cfg = tiny_cfg()
    z = torch.randn(2, 3, 16, 16)
    for bad in (torch.tensor([0, 11]), torch.tensor([-1, 0])):
        with pytest.raises(ValueError, match=r"labels must be integers in \[0, 10\]"):
            pmf.sample(net, z, bad, 7.5, 0.1, 0.8, cfg)
    with pytest.raises(ValueError, match=r"t and r must lie in \[0, 1\]"):
        pmf.predict(net, z, torch.tensor([1.2, 0.5]), torch.zeros(2), 1 + s, s, s, y, cfg)
    with pytest.raises(ValueError, match="r must not exceed t"):
        pmf.predict(net, z, torch.tensor([0.3, 0.5]), torch.tensor([0.4, 0.1]), 1 + s, s, s, y, cfg)


@pytest.mark.parametrize("jvp", pmf.JVP_PATHS)
def test_recompute_v_head_gives_the_same_loss_and_gradients(jvp, rel_err):
    x, y = batch(8)
    cfg = tiny_cfg(jvp=jvp)
    draws = pmf.sample_draws(cfg, x, torch.Generator().manual_seed(3))
    results = []
    for recompute in (False, True):
        net = tiny_model()
        net.recompute_v_head = recompute
        loss, metrics = pmf.pmf_loss(net, x, y, draws, cfg)
        results.append((loss.item(), metrics["loss_v"].item(), flat_grads(net, loss)))
    (loss0, v0, g0), (loss1, v1, g1) = results
    assert loss0 == loss1 and v0 == v1
    assert rel_err(g1, g0) < 1e-12


def _peak_allocated_bytes(step):
    """Peak of the bytes held by tensors allocated during step(), at operator granularity: the
    profiler's per-operator net allocations (frees outside operators are its "[memory]" events)
    summed in time order (CPU; deterministic, unlike the process's RSS)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_recompute_v_head_holds_the_activations_of_one_head():
    """The pMF step with the v-head recomputed peaks near plain flow matching on trunk + u-head,
    and clearly below the same step storing both heads' activations."""
    x, y = batch(32)
    cfg = tiny_cfg()
    draws = pmf.sample_draws(cfg, x, torch.Generator().manual_seed(3))
    net = tiny_model(depth=4, head_depth=2)

    def pmf_step(recompute):
        net.recompute_v_head = recompute
        pmf.pmf_loss(net, x, y, draws, cfg)[0].backward()
        net.zero_grad(set_to_none=True)

    def fm_step():
        u, = pmf.velocities(net, x, draws.t, 0 * draws.t, draws.omega, draws.t_min, draws.t_max, y, cfg, heads="u")
        u.pow(2).mean().backward()
        net.zero_grad(set_to_none=True)

    fm, stored, recomputed = (_peak_allocated_bytes(s) for s in (fm_step, lambda: pmf_step(False), lambda: pmf_step(True)))
    assert recomputed < 1.25 * fm < stored, (fm, stored, recomputed)
