"""Muon with a Nesterov-AdamW partner, as pMF trains with it: optax `contrib.muon(lr, adam_b2=0.95)`.

docs/method.md §5. Muon branch, per matrix W (PyTorch layout (fan_out, fan_in)), step k = 1, 2, ...:
    m_k = b m_{k-1} + (1 - b) g_k
    m^  = b m_k / (1 - b^(k+1)) + (1 - b) g_k / (1 - b^k)          (Nesterov, bias-corrected)
    O   = NS5(m^)                                                    (quintic Newton-Schulz)
    W  <- W - lr (s O + wd W),   s = sqrt(max(1, fan_out / fan_in))
AdamW branch (Nesterov, optax.adamw): the same m^ with b1, v^ = v_k / (1 - b2^k),
    p  <- p - lr (m^ / (sqrt(v^) + eps) + wd p).

Distributed: with a process group, every rank updates every momentum buffer (so any rank's
state_dict resumes exactly) but orthogonalises only its share of the matrices; the results are
all-gathered, so Newton-Schulz cost divides by the world size. Sharded (FSDP2 DTensor) parameters
keep sharded momentum; each Muon matrix has one owner among all processes, its m^ is gathered whole
on the owner from the owner's shard group, orthogonalised there, its rows scattered back in that
group and (HSDP) all-gathered across the replica groups (`_sharded_orthogonalise`): the same update
as unsharded, Newton-Schulz cost divided by the world size. AdamW is elementwise and runs on the
shards as they are.
"""
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

NS_COEFFS = (3.4445, -4.7750, 2.0315)
PARTITION_RULES = ("official", "keller")
ADJUST_LR = ("original", "match_rms_adamw")
_HIDDEN_BLOCKS = ("trunk.", "u_head.", "v_head.")


def newton_schulz(g, steps=5, coeffs=NS_COEFFS, eps=1e-8, dtype=torch.float32):
    """Quintic Newton-Schulz orthogonalisation of a matrix g: (m, n) -> ~U S' V^T, same shape and dtype.

    X = g / (||g||_F + eps), then `steps` times X <- a X + (b A + c A^2) X with A = X X^T, on the
    wide orientation (a tall g is transposed and back). S' lies roughly in [0.7, 1.2].
    """
    x = g.to(dtype)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / (x.norm() + eps)
    a, b, c = coeffs
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


def shape_scale(shape, adjust_lr):
    """Update scale for a (fan_out, fan_in, ...) weight, flattened to (fan_out, rest)."""
    fan_out, fan_in = shape[0], math.prod(shape[1:])
    if adjust_lr == "original":
        return math.sqrt(max(1.0, fan_out / fan_in))
    return 0.2 * math.sqrt(max(fan_out, fan_in))


def partition(model, rule="official"):
    """Split a pMF model's trainable parameters into [Muon group, AdamW group] (docs/method.md §5.1).

    official: every Linear weight (2-D), including embedder MLPs and both zero-initialised final
    layers, goes to Muon; the label table (3-D in the JAX code), tokens, pos_embed, gates, norms,
    biases and the patch convolutions go to AdamW.  keller: only the hidden block matrices go to Muon.
    """
    if rule not in PARTITION_RULES:
        raise ValueError(f"unknown partition rule {rule!r}; choose one of {PARTITION_RULES}")
    muon, adamw = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim == 2 and not name.startswith("label_embed.")
        if rule == "keller":
            is_matrix = is_matrix and name.startswith(_HIDDEN_BLOCKS)
        (muon if is_matrix else adamw).append(p)
    return [{"params": muon, "use_muon": True}, {"params": adamw, "use_muon": False}]


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer for both branches; each param group says `use_muon` (see `partition`).

    lr is shared by both branches (pMF: 1e-3 constant). ns_dtype: float32 (official, default) or
    bfloat16. bias_correction=False gives the torch.optim.Muon / Keller momentum form.
    process_group: None uses the default group when torch.distributed is initialised.
    """

    def __init__(self, params, lr=1e-3, momentum=0.95, ns_steps=5, ns_coeffs=NS_COEFFS, eps=1e-8,
                 weight_decay=0.0, adam_betas=(0.9, 0.95), adam_weight_decay=0.0, adjust_lr="original",
                 ns_dtype=torch.float32, bias_correction=True, process_group=None):
        if adjust_lr not in ADJUST_LR:
            raise ValueError(f"unknown adjust_lr {adjust_lr!r}; choose one of {ADJUST_LR}")
        if ns_dtype not in (torch.float32, torch.bfloat16, torch.float64):
            raise ValueError(f"ns_dtype must be float32, bfloat16 or float64, got {ns_dtype}")
        defaults = dict(lr=lr, momentum=momentum, ns_steps=ns_steps, ns_coeffs=tuple(ns_coeffs), eps=eps,
                        weight_decay=weight_decay, adam_betas=tuple(adam_betas),
                        adam_weight_decay=adam_weight_decay, adjust_lr=adjust_lr, use_muon=False)
        params = list(params)
        if not params:
            raise ValueError("MuonAdamW got an empty parameter list")
        super().__init__(params, defaults)
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                if not p.is_floating_point():
                    raise ValueError(f"parameter {i} of a group has dtype {p.dtype}; only floating tensors train")
        if not sum(len(g["params"]) for g in self.param_groups):
            raise ValueError("MuonAdamW got an empty parameter list")
        self.ns_dtype, self.bias_correction, self.process_group = ns_dtype, bias_correction, process_group

    def _world(self):
        if self.process_group is None and not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def _nesterov(self, state, p, beta):
        """Update m in place and return the bias-corrected Nesterov average m^ (optax form)."""
        k = state["step"]
        state["mu"].lerp_(p.grad, 1 - beta)
        if not self.bias_correction:
            return p.grad.lerp(state["mu"], beta)
        return beta / (1 - beta ** (k + 1)) * state["mu"] + (1 - beta) / (1 - beta ** k) * p.grad

    def _ready(self, group):
        """Parameters that step now: those with a gradient on every rank (collective-safe)."""
        has_grad = torch.tensor([p.grad is not None for p in group["params"]], dtype=torch.int32)
        rank, world = self._world()
        if world > 1 and has_grad.numel():
            device = group["params"][0].device
            has_grad = has_grad.to(device)
            dist.all_reduce(has_grad, op=dist.ReduceOp.MIN, group=self.process_group)
        return [p for p, ok in zip(group["params"], has_grad.tolist()) if ok]

    def _init_state(self, p, adam):
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["mu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if adam:
                state["nu"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state["step"] += 1
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = self._ready(group)
            if group["use_muon"]:
                self._muon_step(group, params)
            else:
                self._adamw_step(group, params)
        return loss

    def _adamw_step(self, group, params):
        b1, b2 = group["adam_betas"]
        lr, eps, wd = group["lr"], group["eps"], group["adam_weight_decay"]
        for p in params:
            state = self._init_state(p, adam=True)
            m_hat = self._nesterov(state, p, b1)
            state["nu"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            v_hat = state["nu"] / (1 - b2 ** state["step"])
            update = m_hat / (v_hat.sqrt() + eps)
            if wd:
                update.add_(p, alpha=wd)
            p.add_(update, alpha=-lr)

    def _muon_step(self, group, params):
        m_hats = [self._nesterov(self._init_state(p, adam=False), p, group["momentum"]) for p in params]
        orthogonalise = lambda m: newton_schulz(m, group["ns_steps"], group["ns_coeffs"], group["eps"],  # noqa: E731
                                                self.ns_dtype)
        if params and isinstance(params[0], DTensor):
            ortho = _sharded_orthogonalise(params, m_hats, orthogonalise)
        else:
            rank, world = self._world()
            owner = _assign_owners([p.numel() for p in params], world)
            ortho = [orthogonalise(m.reshape(p.shape[0], -1)).reshape(p.shape) if owner[i] == rank else None
                     for i, (p, m) in enumerate(zip(params, m_hats))]
            if world > 1 and params:
                _all_gather_updates([p.shape for p in params], ortho, owner, rank, self.process_group, params[0])
        for p, o in zip(params, ortho):
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(o, alpha=-group["lr"] * shape_scale(p.shape, group["adjust_lr"]))


def _assign_owners(sizes, world):
    """Deterministic balanced assignment of matrices to ranks: largest first to the least loaded."""
    load = [0] * world
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owner[i] = min(range(world), key=lambda r: (load[r], r))
        load[owner[i]] += sizes[i]
    return owner


def _all_gather_updates(shapes, ortho, owner, rank, group, like):
    """Fill `ortho` with every rank's updates: ortho[i] (a tensor of shapes[i]) is given where
    owner[i] == rank and None elsewhere; one padded all_gather over `group`, buffers like `like`."""
    world = dist.get_world_size(group)
    numels = [math.prod(s) for s in shapes]
    sizes = [sum(n for n, o in zip(numels, owner) if o == r) for r in range(world)]
    buf = like.new_zeros(max(1, *sizes))
    mine = [o.flatten() for o in ortho if o is not None]
    if mine:
        flat = torch.cat(mine)
        buf[:flat.numel()] = flat
    gathered = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(gathered, buf, group=group)
    offsets = [0] * world
    for i, (shape, n) in enumerate(zip(shapes, numels)):
        r = owner[i]
        ortho[i] = gathered[r][offsets[r]:offsets[r] + n].view(shape)
        offsets[r] += n


def _mesh_groups(params):
    """(shard group, replica group or None) of the DTensors in `params`: sharded by rows (FSDP2's
    Shard(0)) on one mesh dimension and replicated on at most one other (HSDP); ValueError for
    another layout."""
    mesh, placements = params[0].device_mesh, params[0].placements
    shard = [d for d, pl in enumerate(placements) if pl.is_shard()]
    replicate = [d for d, pl in enumerate(placements) if pl.is_replicate()]
    if any(p.device_mesh != mesh or p.placements != placements for p in params) or len(shard) != 1 \
            or placements[shard[0]].dim != 0 or len(replicate) > 1 or len(shard) + len(replicate) != len(placements):
        raise ValueError(f"sharded Muon needs every matrix sharded by rows on one mesh dimension (FSDP2 "
                         f"fully_shard), replicated on at most one other; got placements {placements}")
    return mesh.get_group(shard[0]), mesh.get_group(replicate[0]) if replicate else None


def _row_counts(rows, world):
    """Rows of each rank's shard of a `rows`-row tensor under Shard(0) (torch.chunk, empty at the end)."""
    size = -(-rows // world)
    return [max(0, min(size, rows - r * size)) for r in range(world)]


def _sharded_orthogonalise(params, m_hats, orthogonalise):
    """NS5 updates of row-sharded matrices, as DTensors placed like `params`.

    params, m_hats: DTensors of global shape (fan_out, ...), local shards (rows_r, ...), the same
    on every replica group. `orthogonalise` maps a whole (fan_out, fan_in) matrix to its update.
    Matrix i is owned by slot[i] of replicas x shard-group size (`_assign_owners`: the work
    divides by the world size), i.e. by shard rank slot % size of replica group slot // size.
    Per owner, one padded gather brings it every rank's rows of its matrices and one padded
    scatter returns each rank of its shard group its rows of the results; one padded all_gather
    across replica groups then gives every rank its rows of the other replicas' matrices.
    """
    pg, rg = _mesh_groups(params)
    rank, world = dist.get_rank(pg), dist.get_world_size(pg)
    replica, replicas = (dist.get_rank(rg), dist.get_world_size(rg)) if rg else (0, 1)
    slot = _assign_owners([p.numel() for p in params], replicas * world)
    counts = [_row_counts(p.shape[0], world) for p in params]
    cols = [p.numel() // p.shape[0] for p in params]
    local = [None] * len(params)
    for r in range(world):
        mine = [i for i in range(len(params)) if slot[i] == replica * world + r]
        sizes = [sum(counts[i][k] * cols[i] for i in mine) for k in range(world)]
        if not max(sizes, default=0):
            continue
        buf = m_hats[0].to_local().new_zeros(max(sizes))
        if sizes[rank]:
            buf[:sizes[rank]] = torch.cat([m_hats[i].to_local().flatten() for i in mine])
        pieces = [torch.empty_like(buf) for _ in range(world)] if rank == r else None
        dist.gather(buf, pieces, group=pg, group_dst=r)
        if rank == r:
            pieces = _orthogonalise_owned(mine, pieces, params, counts, cols, orthogonalise)
        dist.scatter(buf, pieces, group=pg, group_src=r)
        offset = 0
        for i in mine:
            n = counts[i][rank] * cols[i]
            local[i] = buf[offset:offset + n].view(counts[i][rank], *params[i].shape[1:])
            offset += n
    if replicas > 1:
        shapes = [(counts[i][rank], *p.shape[1:]) for i, p in enumerate(params)]
        _all_gather_updates(shapes, local, [s // world for s in slot], replica, rg, m_hats[0].to_local())
    return [DTensor.from_local(o, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            for p, o in zip(params, local)]


def _orthogonalise_owned(mine, pieces, params, counts, cols, orthogonalise):
    """On the owner: rebuild matrices `mine` from every rank's gathered buffer (pieces[k]),
    orthogonalise each, and pack every rank's rows of the results into a buffer like pieces[k]."""
    world = len(pieces)
    rows = [[] for _ in range(world)]
    offsets = [0] * world
    for i in mine:
        parts = []
        for k in range(world):
            n = counts[i][k] * cols[i]
            parts.append(pieces[k][offsets[k]:offsets[k] + n].view(counts[i][k], cols[i]))
            offsets[k] += n
        o = orthogonalise(torch.cat(parts))
        for k, block in enumerate(o.split(counts[i])):
            rows[k].append(block.flatten())
    out = [torch.zeros_like(piece) for piece in pieces]
    for k in range(world):
        if rows[k]:
            flat = torch.cat(rows[k])
            out[k][:flat.numel()] = flat
    return out
