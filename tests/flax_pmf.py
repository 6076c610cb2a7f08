"""A small flax pMF DiT with the official JAX code's module tree and parameter names, for the
converter test (tests/test_convert.py). Written from the structure of `models/pmfDiT.py`,
`models/embedder.py` and `models/torch_models.py` (github.com/Lyy-iiis/pMF, main): the same names,
shapes and layouts (Dense kernels (in, out), conv kernels (kh, kw, in, out), the label table
(1, classes + 1, D), RMSNorm weights named `kernel`), and the same forward up to the raw head
outputs. All arithmetic runs in the parameters' dtype, so a float64 tree gives a float64 forward
(the official RoPE goes through complex64; here it is written with real pairs).

Also builds the official `TrainState` (flax TrainState + `ema_params`, optax `contrib.muon` with
adam_b2=0.95, `utils/trainstate_util.py`) and saves it as `utils/ckpt_util.py` does.
"""
import math
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax.training import checkpoints, train_state

PREFIX = 20  # class 8 + omega 4 + t_min 2 + t_max 2 + time 4


class TorchLinear(nn.Module):
    features: int
    use_bias: bool = True

    def setup(self):
        self._flax_linear = nn.Dense(self.features, use_bias=self.use_bias)

    def __call__(self, x):
        return self._flax_linear(x)


class RMSNorm(nn.Module):
    dim: int

    def setup(self):
        self.weight = self.param("kernel", nn.initializers.ones, (self.dim,))

    def __call__(self, x):
        return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * self.weight


class TimestepEmbedder(nn.Module):
    hidden_size: int

    def setup(self):
        self.mlp = nn.Sequential([TorchLinear(self.hidden_size), nn.silu, TorchLinear(self.hidden_size)])

    def __call__(self, t):
        half = 128
        rates = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=t.dtype) / half)
        args = t[:, None] * rates[None]
        return self.mlp(jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1))


class TorchEmbedding(nn.Module):
    num_embeddings: int
    dim: int

    def setup(self):
        self._flax_embedding = self.param("embedding", nn.initializers.normal(1.0), (1, self.num_embeddings, self.dim))

    def __call__(self, labels):
        return self._flax_embedding[0, labels]


class LabelEmbedder(nn.Module):
    num_classes: int
    hidden_size: int

    def setup(self):
        self.embedding_table = TorchEmbedding(self.num_classes + 1, self.hidden_size)

    def __call__(self, labels):
        return self.embedding_table(labels)


class BottleneckPatchEmbedder(nn.Module):
    patch_size: int
    bottleneck: int
    hidden_size: int

    def setup(self):
        p = (self.patch_size, self.patch_size)
        self.proj1 = nn.Conv(self.bottleneck, kernel_size=p, strides=p)
        self.proj2 = nn.Conv(self.hidden_size, kernel_size=(1, 1))

    def __call__(self, x):
        x = self.proj2(self.proj1(x))
        return x.reshape(x.shape[0], -1, x.shape[-1])


def rope(x, grid):
    """Rotate adjacent channel pairs of the last grid^2 tokens: first half of the pairs by the row
    index, second half by the column index. x: (B, L, heads, head_dim)."""
    quarter = x.shape[-1] // 4
    freqs = 1.0 / 10000.0 ** (jnp.arange(0, 2 * quarter, 2, dtype=x.dtype) / (2 * quarter))
    pos = jnp.arange(grid, dtype=x.dtype)
    rows = jnp.broadcast_to(pos[:, None, None] * freqs, (grid, grid, quarter))
    cols = jnp.broadcast_to(pos[None, :, None] * freqs, (grid, grid, quarter))
    angles = jnp.concatenate([rows, cols], axis=-1).reshape(grid * grid, 1, 2 * quarter)
    prefix, patches = x[:, :-grid * grid], x[:, -grid * grid:]
    pairs = patches.reshape(patches.shape[:-1] + (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1).reshape(patches.shape)
    return jnp.concatenate([prefix, rotated], axis=1)


class RoPEAttention(nn.Module):
    hidden_size: int
    num_heads: int
    grid: int

    def setup(self):
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (TorchLinear(self.hidden_size, use_bias=False)
                                                                for _ in range(4))
        head_dim = self.hidden_size // self.num_heads
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)

    def __call__(self, x):
        b, n, _ = x.shape
        heads = lambda a: a.reshape(b, n, self.num_heads, -1)
        q = rope(self.q_norm(heads(self.q_proj(x))), self.grid)
        k = rope(self.k_norm(heads(self.k_proj(x))), self.grid)
        v = heads(self.v_proj(x))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(q.shape[-1])
        out = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v)
        return self.out_proj(out.reshape(b, n, self.hidden_size))


class SwiGLUMlp(nn.Module):
    hidden_size: int
    width: int

    def setup(self):
        self.w1 = TorchLinear(self.width, use_bias=False)
        self.w3 = TorchLinear(self.width, use_bias=False)
        self.w2 = TorchLinear(self.hidden_size, use_bias=False)

    def __call__(self, x):
        return self.w2(nn.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    hidden_size: int
    num_heads: int
    grid: int

    def setup(self):
        self.norm1 = RMSNorm(self.hidden_size)
        self.attn = RoPEAttention(self.hidden_size, self.num_heads, self.grid)
        self.norm2 = RMSNorm(self.hidden_size)
        self.mlp = SwiGLUMlp(self.hidden_size, int(self.hidden_size * 8 / 3))
        self.attn_scale = self.param("attn_scale", nn.initializers.zeros, (self.hidden_size,))
        self.mlp_scale = self.param("mlp_scale", nn.initializers.zeros, (self.hidden_size,))

    def __call__(self, x):
        x = x + self.attn(self.norm1(x)) * self.attn_scale
        return x + self.mlp(self.norm2(x)) * self.mlp_scale


class FinalLayer(nn.Module):
    hidden_size: int
    out_features: int

    def setup(self):
        self.norm = RMSNorm(self.hidden_size)
        self.linear = TorchLinear(self.out_features)

    def __call__(self, x):
        return self.linear(self.norm(x))


class PmfDiT(nn.Module):
    """__call__(x (B, H, W, C), h, omega, t_min, t_max (B,), y (B,)) -> raw (u, v) head outputs, NHWC.

    with_v_head=False is the official eval build (no `v_heads_*`, no `v_final_layer`); it returns (u,)."""
    input_size: int
    in_channels: int
    num_classes: int
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    head_depth: int
    with_v_head: bool = True

    def setup(self):
        d, grid = self.hidden_size, self.input_size // self.patch_size
        self.x_embedder = BottleneckPatchEmbedder(self.patch_size, 128 if d <= 1024 else 256, d)
        self.h_embedder = TimestepEmbedder(d)
        self.omega_embedder = TimestepEmbedder(d)
        self.cfg_t_start_embedder = TimestepEmbedder(d)
        self.cfg_t_end_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(self.num_classes, d)
        tokens = nn.initializers.normal(1 / math.sqrt(d))
        self.time_tokens = self.param("time_tokens", tokens, (1, 4, d))
        self.class_tokens = self.param("class_tokens", tokens, (1, 8, d))
        self.omega_tokens = self.param("omega_tokens", tokens, (1, 4, d))
        self.t_min_tokens = self.param("t_min_tokens", tokens, (1, 2, d))
        self.t_max_tokens = self.param("t_max_tokens", tokens, (1, 2, d))
        self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02), (1, PREFIX + grid * grid, d))
        block = lambda: TransformerBlock(d, self.num_heads, grid)
        self.shared_blocks = [block() for _ in range(self.depth - self.head_depth)]
        self.u_heads = [block() for _ in range(self.head_depth)]
        self.u_final_layer = FinalLayer(d, self.patch_size ** 2 * self.in_channels)
        if self.with_v_head:
            self.v_heads = [block() for _ in range(self.head_depth)]
            self.v_final_layer = FinalLayer(d, self.patch_size ** 2 * self.in_channels)

    def unpatchify(self, tokens):
        b, p, c = tokens.shape[0], self.patch_size, self.in_channels
        g = self.input_size // p
        x = tokens.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
        return x.reshape(b, g * p, g * p, c)

    def __call__(self, x, h, omega, t_min, t_max, y):
        conds = [(self.class_tokens, self.y_embedder(y)), (self.omega_tokens, self.omega_embedder(1 - 1 / omega)),
                 (self.t_min_tokens, self.cfg_t_start_embedder(t_min)),
                 (self.t_max_tokens, self.cfg_t_end_embedder(t_max)), (self.time_tokens, self.h_embedder(h))]
        seq = jnp.concatenate([tokens + emb[:, None] for tokens, emb in conds] + [self.x_embedder(x)], axis=1)
        seq = seq + self.pos_embed
        for blk in self.shared_blocks:
            seq = blk(seq)
        heads = [(self.u_heads, self.u_final_layer)]
        if self.with_v_head:
            heads.append((self.v_heads, self.v_final_layer))
        outs = []
        for blocks, final in heads:
            s = seq
            for blk in blocks:
                s = blk(s)
            outs.append(self.unpatchify(final(s[:, PREFIX:])))
        return tuple(outs)


class TrainState(train_state.TrainState):
    ema_params: Dict[Any, Any]


def randomised_params(net, seed=0):
    """The flax tree {'net': ...} of `net` (a PmfDiT) with every leaf randomised (numpy generator):
    norms near 1, matrices N(0, 1 / fan-in), the rest N(0, 0.3^2), so every path contributes."""
    dummy = jnp.zeros((1, net.input_size, net.input_size, net.in_channels))
    s = jnp.ones((1,))
    shapes = jax.eval_shape(net.init, jax.random.key(seed), dummy, s, 2 * s, 0 * s, s, jnp.zeros((1,), jnp.int32))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name, noise = jax.tree_util.keystr(path), rng.standard_normal(leaf.shape).astype(np.float32)
        if leaf.ndim == 1 and "norm" in name:
            return 1 + 0.1 * noise
        if leaf.ndim == 2 and "kernel" in name:
            return noise / math.sqrt(leaf.shape[0])
        return 0.3 * noise

    return {"net": jax.tree_util.tree_map_with_path(draw, shapes["params"])}


def random_grads(params, seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: rng.standard_normal(p.shape).astype(np.float32), params)


def official_train_state(net, ema_half_lives, steps, seed=0):
    """The official TrainState after `steps` Muon updates on random gradients, with one EMA per
    half-life (dict keyed by the half-life, as `create_train_state`) blended towards the updates."""
    params = randomised_params(net, seed)
    tx = optax.contrib.muon(learning_rate=1e-3, adam_b2=0.95)
    state = TrainState.create(apply_fn=net.apply, params=params, tx=tx, ema_params={h: params for h in ema_half_lives})
    state = state.replace(step=np.asarray(0, np.int32))  # the type every later step has: one compile of `update`
    for i in range(steps):
        state = jax.device_get(update(state, random_grads(state.params, seed + 2 + i)))
        blend = {h: jax.tree.map(lambda e, p, a=0.5 / (1 + j + i): (1 - a) * e + a * p, e_tree, state.params)
                 for j, (h, e_tree) in enumerate(state.ema_params.items())}
        state = state.replace(ema_params=blend)
    return state


def official_inference_state(net, ema_half_life, seed=0):
    """The state `just_evaluate` restores: eval-build params, optax.sgd(0), one EMA."""
    params = randomised_params(net, seed)
    ema = randomised_params(net, seed + 1)
    return TrainState.create(apply_fn=net.apply, params=params, tx=optax.sgd(0.0), ema_params={ema_half_life: ema})


@jax.jit
def update(state, grads):
    """One optimizer step of the official TrainState (`train.py` `train_step`, after the gradient)."""
    return state.apply_gradients(grads=grads)


def save_official(state, workdir):
    """Save as `utils/ckpt_util.py` does: flax's multiprocess checkpoint at the state's step."""
    return checkpoints.save_checkpoint_multiprocess(workdir, jax.device_get(state), int(state.step), keep=3)
