"""The pMF DiT: an x-prediction transformer with in-context conditioning (docs/method.md §4).

The network maps (z, h, omega, t_min, t_max, y) to raw head outputs. It knows nothing about
the loss: the conversion of its outputs to velocities, with clip(t, 0.05, 1), lives in pmf.py.

Token sequence (docs/method.md §4.2): [class x8 | omega x4 | t_min x2 | t_max x2 | time x4 | patches x N].
A shared trunk of depth - head_depth blocks feeds a u-head and (for training) a v-head of
head_depth blocks each; each head has its own final layer. With recompute_v_head, a grad-mode
forward stores only the v-head's input and recomputes its activations in backward, after the
u-head's are freed: the training step then holds the activations of trunk + one head, as plain
flow matching does, for one extra v-head forward.

Single-pass tangent (forward-mode derivative without autograd). Every submodule's forward takes
an optional tangent of its input and returns (output, output tangent or None). The tangent is
computed under no-grad from the primal's detached intermediates, so it builds no graph, while the
primal keeps its autograd graph and its fused attention kernel. PMFDiT.forward(..., tangent=(dz,
dh)) thus returns the u-head's directional derivative along (dz, dh) next to the outputs; it
equals torch.func.jvp through the explicit-attention forward (tests/test_tangent.py). A tangent
may cover only the last n rows of the batch (pMF needs none on its r = t rows); the primal's
intermediates are then sliced to those rows.
"""
import math
import re
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

PRESETS = {
    "pMF-B/16": dict(input_size=256, patch_size=16, depth=16, hidden_size=768, num_heads=12),
    "pMF-L/16": dict(input_size=256, patch_size=16, depth=32, hidden_size=1024, num_heads=16),
    "pMF-H/16": dict(input_size=256, patch_size=16, depth=48, hidden_size=1280, num_heads=16),
    "pMF-B/32": dict(input_size=512, patch_size=32, depth=16, hidden_size=768, num_heads=12),
    "pMF-L/32": dict(input_size=512, patch_size=32, depth=32, hidden_size=1024, num_heads=16),
    "pMF-H/32": dict(input_size=512, patch_size=32, depth=48, hidden_size=1280, num_heads=16),
}

# In-context token counts, in sequence order (docs/method.md §4.2); `prefix_tokens` overrides the counts.
PREFIX_TOKENS = {"class": 8, "omega": 4, "t_min": 2, "t_max": 2, "time": 4}
BLOCK_INIT = 0.32  # block linears: std = 0.32 / sqrt(fan_in) (docs/method.md §4.6)
ATTENTION_IMPLS = ("sdpa", "explicit")


@contextmanager
def _tangent_mode(like):
    """No-grad region for tangent code. Under fp16 autocast it also turns autocast off, so the
    tangent runs in fp32 from the fp16 intermediates (fp16's range is too narrow for du/dt,
    docs/method.md §10.4); under bf16 it keeps the primal's precision."""
    device = like.device.type
    enabled = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device)
    with torch.no_grad(), torch.autocast(device, dtype=dtype, enabled=enabled and dtype != torch.float16):
        yield


def _rows(a, dx):
    """The detached primal intermediate `a` restricted to the rows the tangent dx covers (the last ones)."""
    return a.detach()[a.shape[0] - dx.shape[0]:]


def _linear_tangent(layer, dx):
    """Tangent of a linear layer: W dx (the bias is constant). No-grad; None passes through."""
    if dx is None:
        return None
    with _tangent_mode(dx):
        return F.linear(dx, layer.weight)


def _normal_linear(module, gain):
    nn.init.normal_(module.weight, std=gain / math.sqrt(module.in_features))
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim; statistics in the input dtype."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x, dx=None):
        """x: (..., dim) -> (y, dy); dy = w r dx - y r^2 mean(x dx), r = rsqrt(mean(x^2) + eps)."""
        inv = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        y = x * inv * self.weight
        if dx is None:
            return y, None
        with _tangent_mode(dx):
            x, inv = _rows(x, dx), _rows(inv, dx)
            slope = inv.square() * (x * dx).mean(-1, keepdim=True)
            return y, (dx * self.weight).mul_(inv).addcmul_(_rows(y, dx), slope, value=-1)


class ScalarEmbedder(nn.Module):
    """A scalar in [0, 1] (no x1000) -> 256-d [cos, sin] sinusoid -> Linear -> SiLU -> Linear (docs/method.md §4.3)."""

    def __init__(self, hidden_size, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, hidden_size)
        self.fc2 = nn.Linear(hidden_size, hidden_size)
        _normal_linear(self.fc1, 1.0)
        _normal_linear(self.fc2, 1.0)

    def forward(self, s, ds=None):
        """s, ds: (B,) -> (B, D) embedding and its tangent (None without ds)."""
        half = self.freq_dim // 2
        dtype = torch.promote_types(s.dtype, torch.float32)
        k = torch.arange(half, device=s.device, dtype=dtype)
        rates = torch.exp(-math.log(10000.0) * k / half)[None]
        args = s.to(dtype)[:, None] * rates
        freqs = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        hidden = self.fc1(freqs.to(self.fc1.weight.dtype))
        out = self.fc2(F.silu(hidden))
        if ds is None:
            return out, None
        with _tangent_mode(ds):
            args = _rows(args, ds)
            d_freqs = torch.cat([-torch.sin(args), torch.cos(args)], dim=-1) * (rates * ds.to(dtype)[:, None]).repeat(1, 2)
            d_hidden = _linear_tangent(self.fc1, d_freqs.to(self.fc1.weight.dtype))
            return out, _linear_tangent(self.fc2, _silu_tangent(_rows(hidden, ds), d_hidden))


class PatchEmbed(nn.Module):
    """Bottleneck patch embedding: Conv(p x p, stride p, C -> C_b) then Conv(1 x 1, C_b -> D)."""

    def __init__(self, patch_size, in_channels, bottleneck, hidden_size):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, bottleneck, patch_size, stride=patch_size)
        self.conv2 = nn.Conv2d(bottleneck, hidden_size, 1)
        for conv in (self.conv1, self.conv2):  # Xavier-uniform with Linear-style fans (docs/method.md §4.6)
            fan_in = conv.weight[0].numel()
            limit = math.sqrt(6.0 / (fan_in + conv.out_channels))
            nn.init.uniform_(conv.weight, -limit, limit)
            nn.init.zeros_(conv.bias)

    def forward(self, x, dx=None):
        """x, dx: (B, C, H, W) -> (B, N, D) tokens in row-major grid order, and their tangent."""
        out = self.conv2(self.conv1(x)).flatten(2).transpose(1, 2)
        if dx is None:
            return out, None
        with _tangent_mode(dx):  # the convolutions are linear: the tangent drops the biases
            d_out = F.conv2d(F.conv2d(dx, self.conv1.weight, stride=self.conv1.stride), self.conv2.weight)
            return out, d_out.flatten(2).transpose(1, 2)


def rope_tables(grid, head_dim, dtype, device, theta=10000.0):
    """2-D RoPE angles (docs/method.md §4.4): (cos, sin), each (grid*grid, head_dim/2).

    Of the head_dim/2 channel pairs the first half rotates by the row index, the second half by
    the column index, both with frequencies theta^(-2k/(head_dim/2)), k < head_dim/4.
    """
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, device=device, dtype=dtype) * 2 / (head_dim // 2))
    pos = torch.arange(grid, device=device, dtype=dtype)
    rows = (pos[:, None, None] * freqs).expand(grid, grid, quarter)
    cols = (pos[None, :, None] * freqs).expand(grid, grid, quarter)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid * grid, 2 * quarter)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x, rope):
    """Rotate the last N tokens of x: (B, L, heads, head_dim); adjacent pairs (2k, 2k+1) interleaved.

    Prefix tokens (the first L - N) are left unrotated (docs/method.md §4.4).
    """
    cos, sin = rope
    n = cos.shape[0]
    prefix, patches = x[:, :-n], x[:, -n:]
    pairs = patches.unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = cos[:, None, :], sin[:, None, :]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return torch.cat([prefix, rotated.flatten(-2).to(x.dtype)], dim=1)


def _silu_tangent(a, da):
    """silu'(a) da in one fused kernel (silu's backward formula is its derivative times da)."""
    return torch.ops.aten.silu_backward(da, a.to(da.dtype))


def attention_tangent(q, k, v, o, dq, dk, dv):
    """Tangent of o = softmax(q k^T / sqrt(d)) v by the softmax-JVP identity; all (B, heads, L, head_dim).

    dS = (dq k^T + q dk^T) / sqrt(d) (one product of [dq, q] and [k, dk]), and with P * dS:
    dO = (P * dS) v - rowsum(P * dS) o + P dv. The weights P are recomputed from the detached
    q, k with the explicit path's fp32 softmax; o is the primal's output.
    """
    with _tangent_mode(dq):
        q, k, v, o = (_rows(a, dq) for a in (q, k, v, o))
        scale = 1 / math.sqrt(q.shape[-1])
        q = q * scale
        logits = q @ k.transpose(-2, -1)
        wide = torch.promote_types(logits.dtype, torch.float32)
        weights = torch.softmax(logits, dim=-1, dtype=wide)
        d_logits = torch.cat([dq.to(q.dtype) * scale, q], -1) @ torch.cat([k, dk.to(k.dtype)], -1).transpose(-2, -1)
        weighted = d_logits.to(wide).mul_(weights)
        work = torch.promote_types(v.dtype, dv.dtype)  # fp32 under fp16 autocast (_tangent_mode)
        d_o = (weighted.to(work) @ v.to(work)).add_(weights.to(work) @ dv.to(work))
        return d_o.addcmul_(weighted.sum(-1, keepdim=True).to(d_o.dtype), o, value=-1)


def attention(q, k, v, impl):
    """Softmax attention, q, k, v: (B, heads, L, head_dim), scale 1/sqrt(head_dim).

    "sdpa": fused kernel (flash on GPU); no forward-mode AD on CPU/flash.
    "explicit": matmul + fp32 softmax as the official code; supports forward-mode AD (docs/method.md §10.1).
    """
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    logits = (q / math.sqrt(q.shape[-1])) @ k.transpose(-2, -1)
    weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    return weights.to(v.dtype) @ v


class Attention(nn.Module):
    """Bias-free q/k/v/out projections, QK-RMSNorm over head_dim before RoPE."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.q, self.k, self.v, self.out = (nn.Linear(hidden_size, hidden_size, bias=False) for _ in range(4))
        for lin in (self.q, self.k, self.v, self.out):
            _normal_linear(lin, BLOCK_INIT)
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)

    def forward(self, x, rope, impl, dx=None):
        """x, dx: (B, L, D) -> (B, L, D) output and its tangent (None without dx)."""
        def heads(a):  # (B, L, D) -> (B, heads, L, head_dim)
            return a.unflatten(-1, (self.num_heads, -1))

        q, k, v = (heads(proj(x)) for proj in (self.q, self.k, self.v))
        q, dq = self.q_norm(q, None if dx is None else heads(_linear_tangent(self.q, dx)))
        k, dk = self.k_norm(k, None if dx is None else heads(_linear_tangent(self.k, dx)))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        o = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), impl)
        out = self.out(o.transpose(1, 2).flatten(2))
        if dx is None:
            return out, None
        with _tangent_mode(dx):  # RoPE is linear in q, k
            dq, dk, dv = apply_rope(dq, rope), apply_rope(dk, rope), heads(_linear_tangent(self.v, dx))
            do = attention_tangent(*(a.transpose(1, 2) for a in (q, k, v)), o, *(a.transpose(1, 2) for a in (dq, dk, dv)))
            return out, _linear_tangent(self.out, do.transpose(1, 2).flatten(2))


def swiglu_hidden(hidden_size):
    """int(8D/3), rounded up to a multiple of 8 only when D > 1024 (the released H weights; docs/method.md §4.1)."""
    width = int(hidden_size * 8 / 3)
    return (width + 7) // 8 * 8 if hidden_size > 1024 else width


class SwiGLU(nn.Module):
    """w2(SiLU(w1 x) * w3 x), no biases."""

    def __init__(self, hidden_size):
        super().__init__()
        width = swiglu_hidden(hidden_size)
        self.w1 = nn.Linear(hidden_size, width, bias=False)
        self.w3 = nn.Linear(hidden_size, width, bias=False)
        self.w2 = nn.Linear(width, hidden_size, bias=False)
        for lin in (self.w1, self.w2, self.w3):
            _normal_linear(lin, BLOCK_INIT)

    def forward(self, x, dx=None):
        """x, dx: (..., D) -> output and its tangent (None without dx)."""
        gate, value = self.w1(x), self.w3(x)
        act = F.silu(gate)
        out = self.w2(act * value)
        if dx is None:
            return out, None
        with _tangent_mode(dx):
            d_hidden = _silu_tangent(_rows(gate, dx), _linear_tangent(self.w1, dx)).mul_(_rows(value, dx))
            d_hidden.addcmul_(_rows(act, dx), _linear_tangent(self.w3, dx))
            return out, _linear_tangent(self.w2, d_hidden)


def _gated_tangent(dx, gate, d_branch, in_place=False):
    """Tangent of x + gate * branch(x): dx + gate * d_branch (in place into dx if asked, for a dx
    the block made itself); None without a tangent."""
    if dx is None:
        return None
    with _tangent_mode(dx):
        return dx.addcmul_(gate, d_branch) if in_place else torch.addcmul(dx, gate, d_branch)


class Block(nn.Module):
    """Pre-norm block with per-channel residual gates initialised to zero (identity at init)."""

    def __init__(self, hidden_size, num_heads):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size)
        self.attn_gate = nn.Parameter(torch.zeros(hidden_size))
        self.mlp_gate = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x, rope, impl, dx=None):
        """x, dx: (B, L, D) -> (x, dx) after the block (dx None without a tangent)."""
        normed, d_normed = self.norm1(x, dx)
        a, da = self.attn(normed, rope, impl, d_normed)
        x = x + self.attn_gate * a
        dx = _gated_tangent(dx, self.attn_gate, da)
        m, dm = self.mlp(*self.norm2(x, dx))
        return x + self.mlp_gate * m, _gated_tangent(dx, self.mlp_gate, dm, in_place=True)


class FinalLayer(nn.Module):
    """RMSNorm -> Linear(D -> p*p*C), zero weight and bias; channel order (p_row, p_col, c)."""

    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x, dx=None):
        normed, d_normed = self.norm(x, dx)
        return self.linear(normed), _linear_tangent(self.linear, d_normed)


class PMFDiT(nn.Module):
    """pMF DiT. forward(z, h, omega, t_min, t_max, y) -> raw head outputs (x-predictions).

    Shapes: z (B, C, H, W); h, omega, t_min, t_max (B,) floats; y (B,) long in [0, num_classes],
    num_classes being the null (unconditional) label. Each head output is (B, C, H, W).
    """

    def __init__(self, input_size=256, in_channels=3, num_classes=1000, depth=16, hidden_size=768,
                 num_heads=12, patch_size=16, head_depth=8, with_v_head=True, recompute_v_head=False,
                 prefix_tokens=None):
        super().__init__()
        _check_shape_args(input_size, in_channels, num_classes, depth, hidden_size, num_heads,
                          patch_size, head_depth)
        self.prefix_tokens = prefix_token_counts(prefix_tokens)
        self.input_size, self.in_channels, self.num_classes = input_size, in_channels, num_classes
        self.patch_size, self.num_heads = patch_size, num_heads
        self.grid = input_size // patch_size
        self.head_dim = hidden_size // num_heads
        d = hidden_size

        self.patch_embed = PatchEmbed(patch_size, in_channels, 128 if d <= 1024 else 256, d)
        self.h_embedder = ScalarEmbedder(d)
        self.omega_embedder = ScalarEmbedder(d)
        self.t_min_embedder = ScalarEmbedder(d)
        self.t_max_embedder = ScalarEmbedder(d)
        self.label_embed = nn.Embedding(num_classes + 1, d)  # row num_classes = null label
        nn.init.normal_(self.label_embed.weight, std=1 / math.sqrt(d))
        for group, count in self.prefix_tokens.items():
            self.register_parameter(f"{group}_tokens", nn.Parameter(torch.randn(1, count, d) / math.sqrt(d)))
        self.num_prefix = sum(self.prefix_tokens.values())
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, self.num_prefix + self.grid ** 2, d))

        self.trunk = nn.ModuleList(Block(d, num_heads) for _ in range(depth - head_depth))
        self.u_head = nn.ModuleList(Block(d, num_heads) for _ in range(head_depth))
        self.u_final = FinalLayer(d, patch_size, in_channels)
        self.v_head = nn.ModuleList(Block(d, num_heads) for _ in range(head_depth)) if with_v_head else None
        self.v_final = FinalLayer(d, patch_size, in_channels) if with_v_head else None
        self.recompute_v_head = recompute_v_head

    @property
    def has_v_head(self):
        return self.v_head is not None

    def _check_inputs(self, z, h, y, heads):
        expected = (self.in_channels, self.input_size, self.input_size)
        if z.dim() != 4 or tuple(z.shape[1:]) != expected:
            raise ValueError(f"image batch has shape {tuple(z.shape)}; this model takes (B, {', '.join(map(str, expected))})")
        if h.shape != (z.shape[0],) or y.shape != (z.shape[0],):
            raise ValueError(f"h and y must be (B,) = ({z.shape[0]},); got {tuple(h.shape)} and {tuple(y.shape)}")
        if "v" in heads and not self.has_v_head:
            raise ValueError("this model was built without the v-head (inference build); heads='v' is unavailable")
        if not set(heads) <= {"u", "v"} or not heads:
            raise ValueError(f"heads must be a non-empty combination of 'u' and 'v', got {heads!r}")

    def _sequence(self, z, h, omega, t_min, t_max, y, dz=None, dh=None):
        """Tokens (B, L, D) and, given (dz, dh), their tangent (only the time and patch tokens move)."""
        b = z.shape[0]
        time, d_time = self.h_embedder(h, dh)  # only h = t - r is embedded; no t token
        conds = {
            "class": self.label_embed(y),
            "omega": self.omega_embedder(1 - 1 / omega)[0],  # the network embeds 1 - 1/omega (docs/method.md §4.2)
            "t_min": self.t_min_embedder(t_min)[0],
            "t_max": self.t_max_embedder(t_max)[0],
            "time": time,
        }
        prefix = [getattr(self, f"{g}_tokens").expand(b, -1, -1) + conds[g][:, None] for g in self.prefix_tokens]
        patches, d_patches = self.patch_embed(z, dz)
        x = torch.cat(prefix + [patches], dim=1) + self.pos_embed
        if dz is None:
            return x, None
        with torch.no_grad():
            d_prefix = torch.zeros(dz.shape[0], self.num_prefix, x.shape[-1], dtype=x.dtype, device=x.device)
            d_prefix[:, -self.prefix_tokens["time"]:] = d_time[:, None]
            return x, torch.cat([d_prefix, d_patches.to(x.dtype)], dim=1)

    def _unpatchify(self, tokens):
        """(B, N, p*p*C) -> (B, C, H, W)."""
        p, g = self.patch_size, self.grid
        x = tokens.reshape(tokens.shape[0], g, g, p, p, self.in_channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], self.in_channels, g * p, g * p)

    def _head(self, blocks, final, x, rope, attn, dx=None):
        for block in blocks:
            x, dx = block(x, rope, attn, dx)
        out, d_out = final(x[:, self.num_prefix:], None if dx is None else dx[:, self.num_prefix:])
        return self._unpatchify(out), None if d_out is None else self._unpatchify(d_out)

    def forward(self, z, h, omega, t_min, t_max, y, heads="uv", attn="sdpa", tangent=None):
        """Returns a tuple with one (B, C, H, W) output per letter of `heads` ("u", "v" or "uv").

        attn: "sdpa" (fused) or "explicit" (forward-mode-AD capable, fp32 softmax).
        tangent: None, or (dz, dh) for the last n rows of the batch, (n, C, H, W) and (n,), n >= 1;
        then returns (outputs, d_u), d_u (n, C, H, W) being the u-head output's derivative along
        (dz, dh) (the other inputs held fixed), computed beside the primal without autograd.
        """
        self._check_inputs(z, h, y, heads)
        if attn not in ATTENTION_IMPLS:
            raise ValueError(f"attn must be one of {ATTENTION_IMPLS}, got {attn!r}")
        if tangent is not None and "u" not in heads:
            raise ValueError("a tangent is propagated through the u-head; include 'u' in heads")
        if tangent is not None and not (0 < tangent[0].shape[0] <= z.shape[0] and tangent[0].shape[1:] == z.shape[1:]
                                        and tuple(tangent[1].shape) == (tangent[0].shape[0],)):
            raise ValueError(f"tangent must be (dz, dh) of shapes (n, {', '.join(map(str, z.shape[1:]))}) and (n,) "
                             f"for the last 1 <= n <= {z.shape[0]} rows; got {tuple(tangent[0].shape)}, {tuple(tangent[1].shape)}")
        rope_dtype = torch.promote_types(z.dtype, torch.float32)
        rope = rope_tables(self.grid, self.head_dim, rope_dtype, z.device)
        x, dx = self._sequence(z, h, omega, t_min, t_max, y, *(tangent or (None, None)))
        for block in self.trunk:
            x, dx = block(x, rope, attn, dx)
        branches = {"u": (self.u_head, self.u_final), "v": (self.v_head, self.v_final)}
        results = {}
        if self.recompute_v_head and "v" in heads and torch.is_grad_enabled():
            # Run first: backward takes the newest autograd nodes first, so it is done with the
            # u-head and has freed its activations before it recomputes these.
            results["v"] = checkpoint(self._head, *branches["v"], x, rope, attn, use_reentrant=False)
        for name in heads:
            if name not in results:
                results[name] = self._head(*branches[name], x, rope, attn, dx if name == "u" else None)
        outs = tuple(results[name][0] for name in heads)
        return outs if tangent is None else (outs, results["u"][1])


def _check_shape_args(input_size, in_channels, num_classes, depth, hidden_size, num_heads,
                      patch_size, head_depth):
    if input_size % patch_size:
        raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
    if hidden_size % num_heads or (hidden_size // num_heads) % 4:
        raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} must be a head_dim divisible by 4 (2-D RoPE)")
    if not 0 < head_depth <= depth:
        raise ValueError(f"head_depth {head_depth} must be in [1, depth={depth}]")
    if min(in_channels, num_classes) < 1:
        raise ValueError("in_channels and num_classes must be positive")


def prefix_token_counts(counts=None):
    """{group: tokens} in sequence order: PREFIX_TOKENS (the paper's 8/4/2/2/4), or `counts`, one
    positive integer per group in that order (class, omega, t_min, t_max, time)."""
    if counts is None:
        return dict(PREFIX_TOKENS)
    counts = list(counts)
    if len(counts) != len(PREFIX_TOKENS) or not all(float(c).is_integer() and c >= 1 for c in counts):
        raise ValueError(f"prefix_tokens must be {len(PREFIX_TOKENS)} positive integers, one per group "
                         f"{list(PREFIX_TOKENS)}, got {counts}")
    return dict(zip(PREFIX_TOKENS, map(int, counts)))


BUILD_OVERRIDES = ("input_size", "in_channels", "num_classes", "depth", "hidden_size", "num_heads",
                   "patch_size", "head_depth", "with_v_head", "recompute_v_head", "prefix_tokens")


def build_model(name, **overrides):
    """Build a preset (`pMF-B/16` ... `pMF-H/32`) or, with name=None, a custom shape from overrides.

    Overrides: input_size, in_channels, num_classes, depth, hidden_size, num_heads, patch_size,
    head_depth, with_v_head (False for inference builds), recompute_v_head (training memory: the
    v-head's activations are recomputed in backward instead of stored; same numbers),
    prefix_tokens (in-context tokens per condition group, `prefix_token_counts`).
    """
    if name is not None and name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)} or None for a custom shape")
    unknown = sorted(set(overrides) - set(BUILD_OVERRIDES))
    if unknown:
        raise ValueError(f"unknown build_model overrides {unknown}; allowed: {list(BUILD_OVERRIDES)}")
    return PMFDiT(**{**PRESETS.get(name, {}), **overrides})


# Authors' PyTorch release (branch `torch`, docs/method.md §4.7): their names -> ours.
_OFFICIAL_RENAMES = [
    (r"^x_embedder\.proj([12])\.", r"patch_embed.conv\1."),
    (r"^cfg_t_start_embedder\.", "t_min_embedder."),
    (r"^cfg_t_end_embedder\.", "t_max_embedder."),
    (r"_embedder\.mlp\.0\._flax_linear\.", "_embedder.fc1."),
    (r"_embedder\.mlp\.2\._flax_linear\.", "_embedder.fc2."),
    (r"^y_embedder\.embedding_table\._flax_embedding\.weight$", "label_embed.weight"),
    (r"^shared_blocks\.", "trunk."),
    (r"^u_heads\.", "u_head."),
    (r"^v_heads\.", "v_head."),
    (r"^u_final_layer\.", "u_final."),
    (r"^v_final_layer\.", "v_final."),
    (r"\.attn\.(q|k|v|out)_proj\._flax_linear\.", r".attn.\1."),
    (r"\.mlp\.(w[123])\._flax_linear\.", r".mlp.\1."),
    (r"\.linear\._flax_linear\.", ".linear."),
    (r"\.attn_scale$", ".attn_gate"),
    (r"\.mlp_scale$", ".mlp_gate"),
]
_OFFICIAL_IGNORED = {"rope_freqs"}  # recomputed on the fly here


def official_to_ours(state_dict):
    """Rename an authors' `pmfDiT` state dict (optionally prefixed `net.`) to this model's names."""
    renamed = {}
    for key, value in state_dict.items():
        name = key[len("net."):] if key.startswith("net.") else key
        if name in _OFFICIAL_IGNORED:
            continue
        for pattern, repl in _OFFICIAL_RENAMES:
            name = re.sub(pattern, repl, name)
        renamed[name] = value
    return renamed


def load_weights(model, state_dict, source="checkpoint"):
    """Load our or the authors' state dict into `model`, strictly, with readable errors.

    The v-head may be absent from the file (release files are inference builds); then the model's
    v-head, if any, keeps its initialisation. An inference build ignores the file's v-head. Every
    other tensor must be present with its shape.
    """
    if any(k.startswith(("net.", "x_embedder.", "shared_blocks.")) for k in state_dict):
        state_dict = official_to_ours(state_dict)
    if not model.has_v_head:  # an inference build takes training checkpoints without their v-head
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("v_head.", "v_final."))}
    own = model.state_dict()
    for name, tensor in state_dict.items():
        if name not in own:
            raise ValueError(f"{source}: tensor {name!r} has no place in this model (wrong preset or file?)")
        if tuple(tensor.shape) != tuple(own[name].shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(own[name].shape)}; choose the preset the checkpoint was trained with")
    missing = [n for n in own if n not in state_dict and not n.startswith(("v_head.", "v_final."))]
    if missing:
        raise ValueError(f"{source}: {len(missing)} tensors missing, first {missing[0]!r}")
    model.load_state_dict(state_dict, strict=False)
    return model
