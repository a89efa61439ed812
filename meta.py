"""Meta-learning steps hand-written as pure functions over parameter dictionaries: ProMetaR, MetaPrompt, GRAM.

ProMetaR: Park, Ko, Kim, "Prompt Learning via Meta-Regularization", CVPR 2024, arXiv:2404.00851v1, Sec. 3 (the
learnable regularizer, i.e. gradient modulation; the bilevel meta-learning of prompts and regularizer; task
augmentation by manifold mixup). The paper body was not available to us, so functions cite the official code,
mlvlab/ProMetaR @ c907bdb (`trainers/prometar.py`, `meta_learning/maml.py`), by file and line.

Nothing here knows CLIP: `params` is a dict {name: tensor} of the trainable parameters of any `nn.Module`, and a loss
function `loss_fn(params, batch)` evaluates the module with `torch.func.functional_call(module, params, ...)` and
returns {"task": L, "reg": R} (other entries are ignored). The bilevel step is explicit:
    G_phi(theta; D) = grad L(theta; D) + gamma_phi(grad L, grad R) * grad R          (gradient modulation)
    theta'          = theta - alpha * G_phi(theta; support)                            (one inner step)
    outer           = outer_scale * L_query(theta')                                     (back-propagated to theta, phi)
Second order by default; `first_order=True` detaches the inner gradients, which drops exactly the second-order
terms (the gate's dependence on phi is kept, so phi still learns). No `.data` writes, no deep copies.
Also here: MetaPrompt's domain-split meta update (arXiv:2212.04196v2, TIP 2024), first order as released, with the
released code's behaviours as flags: `domain_split_update`, `class_halves`, `domain_splits`, `sgd_momentum_step`;
and GRAM's pieces (arXiv:2303.06571v2, no released code; forms from the same group's SUPMER): the gradient regulator,
the regulated inner step, the cross-modal hierarchical clustering of image-text pairs, episodes, the curriculum, the
contrastive losses.
Not included: several inner steps or several virtual tasks per iteration (the released code uses one of each);
the released code's fp16 prompts (ours are float32; use autocast on CUDA).

Shape legend: P a parameter's shape, D = numel(P), r channels sharing one gate (DIM_RATE), Bq / Bs query / support.
"""

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

DIM_RATE = 8  # prometar.py:112 VNet hidden size D / DIM_RATE; repeat_interleave(8) at prometar.py:140


class GradientModulator(nn.Module):
    """The learnable regularizer phi (official `VNet`, prometar.py:107-152): for each parameter tensor, a bias-free
    two-layer linear map (no activation in between) of the flattened [grad L; grad R] to D / r gates, through a
    sigmoid; each gate is shared by r consecutive channels. Default nn.Linear init, as the official code."""

    def __init__(self, shapes: dict, dim_rate: int = DIM_RATE):
        super().__init__()
        self.dim_rate = dim_rate
        self.index = {name: i for i, name in enumerate(shapes)}
        nets = []
        for name, shape in shapes.items():
            numel = torch.Size(shape).numel()
            if numel % dim_rate:
                raise ValueError(f"{name}: {numel} elements are not divisible by dim_rate={dim_rate}")
            hidden = numel // dim_rate
            nets.append(nn.Sequential(nn.Linear(2 * numel, hidden, bias=False), nn.Linear(hidden, hidden, bias=False)))
        self.nets = nn.ModuleList(nets)

    def forward(self, name: str, grad_task: torch.Tensor, grad_reg: torch.Tensor) -> torch.Tensor:
        """gamma (P) for the parameter `name` from its two gradients (P) (prometar.py:134-141)."""
        x = torch.cat([grad_task.flatten(), grad_reg.flatten()]).to(self.nets[0][0].weight.dtype)  # (2D,)
        gate = torch.sigmoid(self.nets[self.index[name]](x))  # (D / r,)
        return gate.repeat_interleave(self.dim_rate).view_as(grad_task).to(grad_task.dtype)  # (P)


def scaled_grad(loss: torch.Tensor, inputs, loss_scale: float = 1.0, **kwargs) -> tuple:
    """torch.autograd.grad of loss * loss_scale, divided back by it: fp16 loss scaling (gradients too small for
    float16 are computed scaled up; exact for a power-of-two scale). loss_scale 1: torch.autograd.grad itself."""
    if loss_scale == 1.0:
        return torch.autograd.grad(loss, inputs, **kwargs)
    grads = torch.autograd.grad(loss * loss_scale, inputs, **kwargs)
    return tuple(None if g is None else g / loss_scale for g in grads)


def loss_gradients(losses: dict, params: dict, create_graph: bool, loss_scale: float = 1.0) -> tuple:
    """(grad L_task, grad L_reg) as dicts over `params`; zeros where a loss does not reach a parameter (the text
    regularizer does not reach vision prompts). maml.py:109-140 takes the same gradients with allow_unused."""
    names, tensors = list(params), list(params.values())
    g_task = scaled_grad(losses["task"], tensors, loss_scale, create_graph=create_graph, retain_graph=True,
                         allow_unused=True)
    g_reg = scaled_grad(losses["reg"], tensors, loss_scale, create_graph=create_graph, retain_graph=create_graph,
                        allow_unused=True) if losses["reg"].requires_grad else [None] * len(tensors)
    fill = [torch.zeros_like(p) for p in tensors]
    return ({n: g if g is not None else z for n, g, z in zip(names, g_task, fill, strict=True)},
            {n: g if g is not None else z for n, g, z in zip(names, g_reg, fill, strict=True)})


def modulated_gradients(grad_task: dict, grad_reg: dict, gate) -> dict:
    """ProMetaR Sec. 3 gradient modulation: G = grad L + gamma(grad L, grad R) * grad R (prometar.py:53-105).
    `gate(name, grad_task, grad_reg) -> gamma` is a GradientModulator (or any function, e.g. a fixed gate)."""
    return {name: g + gate(name, g, grad_reg[name]) * grad_reg[name] for name, g in grad_task.items()}


def inner_update(params: dict, grads: dict, inner_lr: float) -> dict:
    """One MAML step theta' = theta - alpha * G, a new dict; differentiable in theta (and phi through G)."""
    return {name: p - inner_lr * grads[name] for name, p in params.items()}


def regularized_gradients(loss_fn, params: dict, batch, gate, reduce=None, loss_scale: float = 1.0) -> tuple:
    """Step A of the released iteration (prometar.py:415-424): the modulated gradient on the whole batch, to be
    applied by an ordinary optimizer step. No graph is kept (the released code builds one and never uses it).
    `reduce(grad_task, grad_reg)` (optional) maps both gradient dicts before the modulation (data parallelism: the sum
    over processes); `loss_scale`: fp16 loss scaling (scaled_grad), so the gate sees the true gradients.
    Returns (gradients {name: (P)}, every entry of loss_fn's dict detached: "task", "reg" and any extras)."""
    losses = loss_fn(params, batch)
    grad_task, grad_reg = loss_gradients(losses, params, create_graph=False, loss_scale=loss_scale)
    if reduce is not None:
        grad_task, grad_reg = reduce(grad_task, grad_reg)
    with torch.no_grad():
        return modulated_gradients(grad_task, grad_reg, gate), {k: v.detach() for k, v in losses.items()}


def second_order_attention(enabled: bool):
    """Double backward through scaled_dot_product_attention exists only for the math kernel (CPU and CUDA)."""
    return sdpa_kernel(SDPBackend.MATH) if enabled else contextlib.nullcontext()


def meta_loss(loss_fn, outer_loss_fn, params: dict, support, query, gate, *, inner_lr: float, outer_scale: float,
              first_order: bool = False, reduce=None, loss_scale: float = 1.0) -> torch.Tensor:
    """Step B (prometar.py:426-459): adapt on the support set with the modulated gradient, one step, then the
    scaled outer loss of the adapted parameters on the (augmented) query. Call `.backward()` on the result to get
    the meta-gradients of theta (through theta') and of the gate's parameters phi (fp16: of the result times the loss
    scale; `loss_scale` scales the inner step's gradients the same way, scaled_grad)."""
    with second_order_attention(not first_order):
        grad_task, grad_reg = loss_gradients(loss_fn(params, support), params, create_graph=not first_order,
                                             loss_scale=loss_scale)
    if reduce is not None:  # a differentiable map (data parallelism: the sum over processes)
        grad_task, grad_reg = reduce(grad_task, grad_reg)
    adapted = inner_update(params, modulated_gradients(grad_task, grad_reg, gate), inner_lr)
    return outer_scale * outer_loss_fn(adapted, query)


# ----------------------------------------------------------------------------------------------------------------
# Task augmentation (ProMetaR Sec. 3, "virtual tasks"; prometar.py:429-452, 299-304)


def split_virtual_task(labels: torch.Tensor):
    """One random class present in the batch is the query, the other images the support; None when the batch
    holds a single class (the released code then skips the meta step). Returns (query mask, support mask), (B,)."""
    classes = torch.unique(labels)
    if len(classes) < 2:
        return None
    query_class = classes[torch.randperm(len(classes))[0]]  # uniform over the classes present (CPU RNG)
    query = labels == query_class
    return query, ~query


def sample_mixup(n_query: int, n_support: int, alpha: float, beta: float) -> tuple:
    """lambda ~ Beta(alpha, beta) per query image, then a random support partner for each (in this order, CPU RNG).
    Returns (lam (Bq,), partner (Bq,))."""
    lam = torch.distributions.Beta(torch.tensor(float(alpha)), torch.tensor(float(beta))).sample((n_query,))
    return lam, torch.randint(n_support, (n_query,))


def manifold_mixup(f_query: torch.Tensor, f_support: torch.Tensor, lam: torch.Tensor, partner: torch.Tensor):
    """lam * f_q + (1 - lam) * f_s[partner] on features (Bq, E), (Bs, E) -> (Bq, E)."""
    lam = lam.to(f_query.device, f_query.dtype)[:, None]  # (Bq, 1)
    return lam * f_query + (1 - lam) * f_support[partner.to(f_support.device)]


def mixup_cross_entropy(logits: torch.Tensor, y_query: torch.Tensor, y_partner: torch.Tensor, lam: torch.Tensor):
    """Soft-label CE of mixed features: mean_j [lam_j CE(logits_j, y_q,j) + (1 - lam_j) CE(logits_j, y_p,j)]."""
    lam = lam.to(logits.device, logits.dtype)
    ce_query = F.cross_entropy(logits, y_query, reduction="none")  # (Bq,)
    ce_partner = F.cross_entropy(logits, y_partner, reduction="none")  # (Bq,)
    return (lam * ce_query + (1 - lam) * ce_partner).mean()


# ----------------------------------------------------------------------------------------------------------------
# MetaPrompt's domain-split meta update (arXiv:2212.04196v2, TIP 2024; the released code, Vill-Lab/2024-TIP-MetaPrompt
# @ ca996074 trainers/meta.py `Meta_B2N.forward_backward` (cross-class) and `Meta_DG.forward_backward` (cross-domain)).
# First order, as released: the meta-test gradient is taken at the adapted prompt and applied to the original one.


def sgd_momentum_step(params: dict, grads: dict, buffers: dict, *, lr: float, momentum: float,
                      weight_decay: float) -> tuple:
    """torch.optim.SGD's update (no dampening, no Nesterov) as a pure function: d = g + wd p; buf = d on a tensor's
    first step, else momentum buf + d; p - lr buf. Only the names in `grads` move. Returns (params, buffers), new
    dicts (buffers[name] None = no step taken yet)."""
    params, buffers = dict(params), dict(buffers)
    for name, g in grads.items():
        d = g + weight_decay * params[name]
        buffers[name] = d if buffers.get(name) is None else momentum * buffers[name] + d
        params[name] = params[name] - lr * buffers[name]
    return params, buffers


def class_halves(n_classes: int, generator=None) -> list:
    """Meta_B2N: shuffle *all* training class ids and cut them into N = 2 parts of ceil(n / 2) and the rest
    (meta.py:339-346: m = (n - 1) // N + 1). Drawn from torch's generator (the release uses Python's `random`)."""
    order = torch.randperm(n_classes, generator=generator).tolist()
    m = (n_classes - 1) // 2 + 1
    return [order[:m], order[m:]]


def relabel(labels: torch.Tensor, classes: list) -> tuple:
    """(mask (B,), labels of the masked samples as indices into `classes`): a half's local labels."""
    local = {c: i for i, c in enumerate(classes)}
    mask = torch.tensor([int(y) in local for y in labels.tolist()], device=labels.device)
    return mask, torch.tensor([local[int(y)] for y in labels[mask].tolist()], dtype=torch.long, device=labels.device)


def class_half_splits(labels: torch.Tensor, halves: list) -> list:
    """Meta_B2N's two splits: for half i, meta-train = the samples of the other half (its classes only, labels
    re-indexed within it), meta-test = the samples of half i (likewise). A split is skipped when half i has fewer
    than 2 classes or either side has no sample (meta.py:358-361). Returns [((mask, labels, classes) support,
    (mask, labels, classes) query)]."""
    splits = []
    for i, query_classes in enumerate(halves):
        support_classes = [c for j, half in enumerate(halves) if j != i for c in half]
        query, support = relabel(labels, query_classes), relabel(labels, support_classes)
        if len(query_classes) < 2 or not query[0].any() or not support[0].any():
            continue
        splits.append(((*support, support_classes), (*query, query_classes)))
    return splits


def domain_splits(domains: torch.Tensor, released_range: bool = True) -> list:
    """Leave-one-domain-out inside the batch (Meta_DG): meta-test = one domain, meta-train = the others.
    released_range=True: the released loop (meta.py:465-467) takes N = the number of distinct ids and uses the ids
    0..N-1, and a split without a meta-train or a meta-test sample is skipped, as released. So a batch whose domains
    are {0, 2} gets no domain-split update at all: the split of id 0 has no meta-train sample (its other id, 1, is
    absent) and the split of id 1 no meta-test sample. False: each domain present in the batch once.
    Returns [(support mask, query mask)]."""
    present = torch.unique(domains).tolist()
    ids = range(len(present)) if released_range else present
    splits = []
    for d in ids:
        query = domains == d
        support = torch.isin(domains, torch.tensor([i for i in ids if i != d], device=domains.device))
        if query.any() and support.any():
            splits.append((support, query))
    return splits


def domain_split_update(loss_fn, params: dict, name: str, splits: list, buffers: dict, *, lr: float,
                        meta_step: float, momentum: float, weight_decay: float, inner_optimizer: bool = True,
                        frozen_drift: bool = True, aliased_restore: bool = True, reduce=None,
                        loss_scale: float = 1.0) -> tuple:
    """MetaPrompt's domain-split update of the prompt `name` (B2N: the text prompt; DG: the visual prompt).

    For each split (support, query): an inner step on the support loss, the first-order gradient g_i of the query
    loss at the adapted prompt, a restore; then prompt <- prompt - lr * meta_step * sum_i g_i (meta.py:377-378, a
    direct write that bypasses the optimizer). `loss_fn(params, batch) -> scalar`; `buffers` are the optimizer's
    momentum buffers {name: tensor or None}. The released code's behaviours, each a flag (all False: the method as
    described, each split from the same prompt, a plain SGD inner step):
      inner_optimizer: the inner step is a step of the main SGD optimizer (momentum 0.9 with the buffers of step A,
        weight decay), whose momentum then carries into the next step A; False: prompt - lr (g + wd prompt).
      frozen_drift: torch 1.10's zero_grad leaves a zero gradient on the other (frozen) prompt, so each inner
        optimizer step still applies its weight decay and momentum to it (the authors' environment); never restored.
      aliased_restore: `ctx.data = deepcopy_before_the_loop` makes ctx share the snapshot's storage, so the first
        split is restored exactly and every later inner step is kept: split i >= 2 starts from split i-1's adapted
        prompt, and the final write applies to the last adapted prompt (two halves: theta_1' - lr 0.2 (g0 + g1)).
    `reduce` (optional) maps every gradient taken (data parallelism: the sum over processes); `loss_scale`: fp16 loss
    scaling of every gradient taken (scaled_grad).
    Returns (new params {name: tensor}, new buffers); nothing is written in place."""
    reduce = reduce or (lambda g: g)
    theta0 = {k: v.detach() for k, v in params.items()}
    current, buffers, meta_grads = dict(theta0), dict(buffers), []
    for support, query in splits:
        base = current[name].detach().requires_grad_()
        (g,) = scaled_grad(loss_fn({**current, name: base}, support), [base], loss_scale)
        g = reduce(g)
        if inner_optimizer:
            grads = {k: (g if k == name else torch.zeros_like(v)) for k, v in current.items()
                     if k == name or frozen_drift}
            adapted, buffers = sgd_momentum_step(current, grads, buffers, lr=lr, momentum=momentum,
                                                 weight_decay=weight_decay)
        else:
            adapted = {**current, name: current[name] - lr * (g + weight_decay * current[name])}
        adapted = {k: v.detach() for k, v in adapted.items()}
        query_point = adapted[name].requires_grad_()
        (g_query,) = scaled_grad(loss_fn({**adapted, name: query_point}, query), [query_point], loss_scale)
        g_query = reduce(g_query)
        meta_grads.append(g_query)
        restored = adapted[name].detach() if aliased_restore and len(meta_grads) > 1 else theta0[name]
        current = {**adapted, name: restored}
    if meta_grads:
        current[name] = current[name] - lr * meta_step * torch.stack(meta_grads).sum(0)
    return current, buffers


# ----------------------------------------------------------------------------------------------------------------
# GRAM's gradient-regulating function (Li et al., "Gradient-Regulated Meta-Prompt Learning for Generalizable
# Vision-Language Models", ICCV 2023, arXiv:2303.06571v2). GRAM released no code; its paper states that a lightweight
# gradient-regulating function is meta-learned with the prompt initialisation and applied to every fine-tuning
# gradient. Its form is the one of the same group's SUPMER (beepkh/SUPMER @ adaddb31, model/grad_trans.py), marked
# "SUPMER:" below; choices neither source fixes are marked "reconstruction:".

REGULATOR_RANK = 1920  # SUPMER: pretrain_args.py rank (full rank for CLIP widths 512 / 768)
REGULATOR_LAYERS = 2  # SUPMER: n_hidden + 1 = 2 row-wise layers
GATE_HIDDEN = 24  # SUPMER: grad_trans.py gate width
NORM_EPS = 1e-12  # guards the norm matching of an all-zero (ReLU-killed) row


class GradientRegulator(nn.Module):
    """psi_phi(G, e) = (1 - c) T^(G) + c G for a prompt gradient G (..., d), its rows the prompt tokens:
    T: 2 row-wise layers x <- ReLU(U V x + b) (weights shared across rows), U, V ~ N(0, 1), b = 0 (SUPMER "id" init,
    which is not an identity map); T^: T rescaled to G's norms, per row (norm_mode="row", SUPMER's meta-training) or
    as a whole (norm_mode="global", SUPMER's released downstream config); c = sigmoid(w2 . ReLU(W1 e + b1) + b2) a
    scalar gate of the context e (d,), default nn.Linear init.
    identity_start=True (reconstruction: MEND's residual form): x <- x + U V x + b with ReLU on the hidden layer's
    increment only and U = 0, so that T(G) = G and psi(G) = G exactly at initialisation."""

    def __init__(self, width: int, *, rank: int = REGULATOR_RANK, n_layers: int = REGULATOR_LAYERS,
                 gate_hidden: int = GATE_HIDDEN, identity_start: bool = False, norm_mode: str = "row"):
        super().__init__()
        if norm_mode not in ("row", "global"):
            raise ValueError(f"norm_mode must be row or global, not {norm_mode!r}")
        r = min(rank, width)
        self.width, self.identity_start, self.norm_mode = width, identity_start, norm_mode
        self.U = nn.ParameterList([nn.Parameter(torch.zeros(width, r) if identity_start else torch.randn(width, r))
                                   for _ in range(n_layers)])  # (d, r)
        self.V = nn.ParameterList([nn.Parameter(torch.randn(r, width)) for _ in range(n_layers)])  # (r, d)
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(width)) for _ in range(n_layers)])  # (d,)
        self.gate_net = nn.Sequential(nn.Linear(width, gate_hidden), nn.ReLU(), nn.Linear(gate_hidden, 1))

    def transform(self, rows: torch.Tensor) -> torch.Tensor:
        """T(rows) for rows (N, d) -> (N, d)."""
        x = rows
        for i, (U, V, b) in enumerate(zip(self.U, self.V, self.b)):
            h = x @ V.t() @ U.t() + b  # (N, d)
            if self.identity_start:  # residual; the last layer's increment is linear
                x = x + (F.relu(h) if i < len(self.U) - 1 else h)
            else:  # SUPMER: ReLU after every layer, the last included (so T >= 0)
                x = F.relu(h)
        return x

    def gate(self, context: torch.Tensor) -> torch.Tensor:
        """c (a 0-d tensor) from the context vector (d,)."""
        return torch.sigmoid(self.gate_net(context.to(self.b[0].dtype))).squeeze(-1)

    def forward(self, grad: torch.Tensor, context: torch.Tensor) -> tuple:
        """(psi(G, e) with G's shape, the gate c)."""
        rows = grad.reshape(-1, self.width).to(self.b[0].dtype)  # (N, d)
        t = self.transform(rows)  # (N, d)
        dims = (1,) if self.norm_mode == "row" else (0, 1)  # SUPMER: grad_trans.py norm matching, mode 0 / mode 1
        target, current = rows.norm(dim=dims, keepdim=True), t.norm(dim=dims, keepdim=True)
        t = t * torch.where(current > 0, target / current.clamp_min(NORM_EPS), torch.zeros_like(current))
        c = self.gate(context)
        regulated = rows + (1 - c) * (t - rows)  # = (1 - c) T^ + c G, exactly G where T^ = G or c = 1
        return regulated.view_as(grad).to(grad.dtype), c


class MetaSGDScaling(nn.Module):
    """Ablation (reconstruction; Meta-SGD, Li et al. 2017, arXiv:1707.09835): psi(G) = softplus(beta) * G per coordinate,
    beta (the prompt's shape) initialised so that softplus(beta) = 1 (the raw gradient at first). No gate."""

    def __init__(self, shape):
        super().__init__()
        self.beta = nn.Parameter(torch.full(tuple(shape), math.log(math.e - 1)))

    def forward(self, grad: torch.Tensor, context: torch.Tensor | None = None) -> tuple:
        return F.softplus(self.beta).to(grad.dtype) * grad, None


# GRAM's meta-training tasks from unlabelled image-text pairs (the paper's Cross-Modal Hierarchical Clustering; its
# details are a reconstruction), episodes, the curriculum and the losses.

def kmeans(x: torch.Tensor, k: int, generator: torch.Generator, iterations: int = 50) -> torch.Tensor:
    """Cluster ids (N,) of the rows of x (N, E) by Lloyd's k-means with k-means++ seeding (Arthur & Vassilvitskii
    2007) from `generator`: deterministic for a seed. k is capped at N."""
    k = min(k, x.shape[0])
    centres = x[torch.randint(x.shape[0], (1,), generator=generator)]  # (1, E)
    for _ in range(1, k):
        d2 = torch.cdist(x, centres).min(dim=1).values ** 2  # (N,)
        probs = d2 / d2.sum() if d2.sum() > 0 else torch.full_like(d2, 1 / len(d2))
        centres = torch.cat([centres, x[torch.multinomial(probs, 1, generator=generator)]])
    for _ in range(iterations):
        ids = torch.cdist(x, centres).argmin(dim=1)  # (N,)
        new = torch.stack([x[ids == j].mean(0) if (ids == j).any() else centres[j] for j in range(k)])
        if torch.equal(new, centres):
            break
        centres = new
    return torch.cdist(x, centres).argmin(dim=1)


def hierarchical_clusters(text_features: torch.Tensor, image_features: torch.Tensor, *, k_text: int, k_image: int,
                          min_size: int, seed: int = 0) -> tuple:
    """Cross-modal hierarchical clustering (reconstruction): level 1, k-means of the frozen text embeddings (N, E)
    into concepts; level 2, k-means of the image embeddings inside each concept into visual sub-populations. The
    leaves are the meta-training domains; a leaf with fewer than `min_size` pairs (a support and a disjoint query
    set) is dropped, one of exactly `min_size` kept. k_image=1 gives the flat fallback (SUPMER: flat clusters per data
    source). Returns (the leaf id of every pair (N,), 0..L-1 in order of first appearance, -1 for dropped pairs; the
    concept id of every pair (N,)). Deterministic for a seed."""
    generator = torch.Generator().manual_seed(seed)
    concepts = kmeans(F.normalize(text_features.float(), dim=-1), k_text, generator)  # (N,)
    leaves = torch.full_like(concepts, -1)
    next_id = 0
    for concept in torch.unique(concepts).tolist():
        members = (concepts == concept).nonzero().flatten()
        sub = kmeans(F.normalize(image_features[members].float(), dim=-1), k_image, generator)
        for s in torch.unique(sub).tolist():
            chosen = members[sub == s]
            if len(chosen) >= min_size:
                leaves[chosen] = next_id
                next_id += 1
    return leaves, concepts


def leaf_centroids(image_features: torch.Tensor, leaves: torch.Tensor) -> torch.Tensor:
    """(L, E): the mean L2-normalised image embedding of each leaf (reconstruction: the domain centroid)."""
    normalised = F.normalize(image_features.float(), dim=-1)
    return torch.stack([normalised[leaves == j].mean(0) for j in range(int(leaves.max()) + 1)])


NEGATIVE_SOURCES = ("other_concepts", "in_batch")


class Episode(NamedTuple):
    """One meta-training task's pair indices (each (batch,)) and leaves."""

    support: torch.Tensor
    query: torch.Tensor
    augmentation: torch.Tensor  # the mixing partner: an augmentation query set from another leaf
    leaf: int
    augmentation_leaf: int
    negatives: torch.Tensor | None  # pairs of other concepts (negatives="other_concepts"), None for in-batch InfoNCE


def sample_episodes(leaves: torch.Tensor, n_tasks: int, batch: int, generator: torch.Generator,
                    partner_any_leaf: bool = False, concepts: torch.Tensor | None = None,
                    negatives: str = "other_concepts") -> list:
    """SUPMER: pretrain/metatask/*.py: n_tasks distinct leaves; per task a support and a disjoint query set of `batch`
    pairs, both from the task's leaf, and an augmentation query set of `batch` pairs (the mixing partner) from
    another leaf, drawn uniformly (reconstruction: GRAM simulates a domain shift; partner_any_leaf=True is SUPMER's
    draw over all leaves, the task's own included).
    negatives="other_concepts" (SUPMER's tasks contrast a domain's examples with candidates from other clusters:
    pretrain/metatask/SameClusterSentSelectionTask.py:52-72 draws them from any cluster d != the task's): `batch`
    negative pairs drawn uniformly from the pairs whose concept is neither the task's nor its partner's, so that no
    caption of the task's own concept (often the same words) is a negative;
    negatives="in_batch": none, the InfoNCE of a set contrasts its own pairs (same-leaf episodes, the ablation).
    Returns [Episode], in this draw order: leaves, then per task its order, partner leaf, partner, negatives."""
    if negatives not in NEGATIVE_SOURCES:
        raise ValueError(f"negatives must be one of {NEGATIVE_SOURCES}, not {negatives!r}")
    n_leaves = int(leaves.max()) + 1
    if n_leaves < max(n_tasks, 2):
        raise ValueError(f"{n_leaves} leaves: a meta-batch of {n_tasks} tasks needs at least {max(n_tasks, 2)}")
    tasks = []
    for leaf in torch.randperm(n_leaves, generator=generator)[:n_tasks].tolist():
        members = (leaves == leaf).nonzero().flatten()
        order = members[torch.randperm(len(members), generator=generator)]
        if partner_any_leaf:
            other = int(torch.randint(n_leaves, (1,), generator=generator))
        else:
            other = int(torch.randint(n_leaves - 1, (1,), generator=generator))
            other += int(other >= leaf)  # uniform over the other leaves
        pool = (leaves == other).nonzero().flatten()
        augmentation = pool[torch.randperm(len(pool), generator=generator)[:batch]]
        drawn = None
        if negatives == "other_concepts":
            excluded = torch.isin(concepts, concepts[torch.cat([members[:1], pool[:1]])])  # the task's, the partner's
            candidates = (~excluded).nonzero().flatten()
            if len(candidates) < batch:
                raise ValueError(f"{len(candidates)} pairs outside the concepts of leaves {leaf} and {other}: fewer "
                                 f"than the {batch} negatives a task needs")
            drawn = candidates[torch.randperm(len(candidates), generator=generator)[:batch]]
        tasks.append(Episode(order[:batch], order[batch:2 * batch], augmentation, leaf, other, drawn))
    return tasks


AGREEMENT_BASE = 2.0  # SUPMER: meta.py curriculum, m = 2
CURRICULUM_EPS = 1e-7  # SUPMER: meta.py, keeps Beta's second parameter positive


def curriculum_lambda(agreement: float, generator: torch.Generator) -> float:
    """SUPMER: lambda ~ Beta(1, kappa), kappa = (m^s - 1) / (m - 1) + 1e-7 with m = 2 and s the running gradient
    agreement: s = 0 (the start) gives lambda = 1, no mixing; s -> 1 gives Uniform(0, 1), harder query tasks."""
    kappa = (AGREEMENT_BASE ** agreement - 1) / (AGREEMENT_BASE - 1) + CURRICULUM_EPS
    # Beta(1, kappa) by inversion of its CDF 1 - (1 - x)^kappa, from the dedicated generator
    u = float(torch.rand((), generator=generator, dtype=torch.float64))
    return 1.0 - (1.0 - u) ** (1.0 / kappa)


def gradient_agreement(query_grad: torch.Tensor, regulated_grad: torch.Tensor) -> float:
    """SUPMER: meta.py:149-157: s = (1 + mean over prompt rows of cos(g_q, psi(g_s))) / 2, in [0, 1]."""
    d = query_grad.shape[-1]
    cosine = F.cosine_similarity(query_grad.reshape(-1, d), regulated_grad.reshape(-1, d), dim=1)
    return float((1 + cosine.mean()) / 2)


def gate_regularizer(gate: torch.Tensor, domain_similarity: float, agreement: float) -> torch.Tensor:
    """SUPMER (code only): (d_sim / 2 + s / 2 - c)^2, its only gradient path the gate c."""
    return (0.5 * domain_similarity + 0.5 * agreement - gate) ** 2


def contrastive_loss(image: torch.Tensor, text: torch.Tensor, scale: torch.Tensor, negative_image=None,
                     negative_text=None) -> torch.Tensor:
    """CLIP's symmetric InfoNCE (CLIP arXiv:2103.00020v1 Fig. 3) of pre-normalisation features (B, E), (B, E), with
    the frozen logit scale: (CE(s V W^T, i) + CE(s W V^T, i)) / 2. With negatives (N, E) each (other concepts' pairs,
    sample_episodes): pair j's image is scored against its caption and the N negative captions, its caption against
    its image and the N negative images (the other pairs of the set are not candidates)."""
    v, w = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    if negative_image is None:
        logits = scale * v @ w.t()  # (B, B)
        target = torch.arange(len(v), device=v.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
    nv, nw = F.normalize(negative_image, dim=-1), F.normalize(negative_text, dim=-1)  # (N, E)
    positive = scale * (v * w).sum(-1, keepdim=True)  # (B, 1)
    image_to_text = torch.cat([positive, scale * v @ nw.t()], dim=1)  # (B, 1 + N)
    text_to_image = torch.cat([positive, scale * w @ nv.t()], dim=1)  # (B, 1 + N)
    target = torch.zeros(len(v), dtype=torch.long, device=v.device)
    return (F.cross_entropy(image_to_text, target) + F.cross_entropy(text_to_image, target)) / 2


def mixup_contrastive_loss(image_q, text_q, image_a, text_a, lam: float, scale, negative_image=None,
                           negative_text=None) -> torch.Tensor:
    """The query loss with the augmentation batch mixed in (SUPMER mixes encoder outputs with a mixed one-hot target;
    reconstruction: this CLIP form). Mixed features lam * query + (1 - lam) * augmentation, normalised, scored
    against candidates with the soft target lam on the query pair's feature and 1 - lam on the augmentation pair's:
    without negatives the 2B features of both batches (lam = 1: InfoNCE on the query batch with B extra negatives);
    with negatives (N, E) each, row j's own two features and the N negatives."""
    b = len(image_q)
    mixed_v = F.normalize(lam * image_q + (1 - lam) * image_a, dim=-1)  # (B, E)
    mixed_w = F.normalize(lam * text_q + (1 - lam) * text_a, dim=-1)  # (B, E)
    vq, va = F.normalize(image_q, dim=-1), F.normalize(image_a, dim=-1)
    wq, wa = F.normalize(text_q, dim=-1), F.normalize(text_a, dim=-1)
    if negative_image is None:
        text_to_image = scale * mixed_w @ torch.cat([vq, va]).t()  # (B, 2B)
        image_to_text = scale * mixed_v @ torch.cat([wq, wa]).t()  # (B, 2B)
        target = torch.zeros(b, 2 * b, dtype=image_q.dtype, device=image_q.device)
        target[torch.arange(b), torch.arange(b)] = lam
        target[torch.arange(b), b + torch.arange(b)] += 1 - lam
    else:
        nv, nw = F.normalize(negative_image, dim=-1), F.normalize(negative_text, dim=-1)  # (N, E)
        own = lambda mixed, q, a: torch.stack([(mixed * q).sum(-1), (mixed * a).sum(-1)], dim=1)  # (B, 2)
        text_to_image = scale * torch.cat([own(mixed_w, vq, va), mixed_w @ nv.t()], dim=1)  # (B, 2 + N)
        image_to_text = scale * torch.cat([own(mixed_v, wq, wa), mixed_v @ nw.t()], dim=1)  # (B, 2 + N)
        target = torch.zeros_like(text_to_image)
        target[:, 0], target[:, 1] = lam, 1 - lam
    soft_ce = lambda logits: -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    return (soft_ce(text_to_image) + soft_ce(image_to_text)) / 2


def regulated_inner_update(loss_fn, params: dict, regulate, support, *, alpha: float,
                           second_order: bool = False, loss_scale: float = 1.0) -> tuple:
    """GRAM's inner step (SUPMER: meta.py:105-143): g_s = grad L_s(theta), taken without a graph (first order in theta;
    `second_order=True`, a reconstruction flag, keeps it), theta' = theta - alpha psi_phi(g_s, e_s); theta' depends on
    phi through psi, so the outer loss at theta' gives phi its exact gradient and theta the first-order one.
    `loss_fn(params, batch) -> (loss, {name: context e})`; `regulate(name, grad, context) -> (regulated, gate)`;
    `loss_scale`: fp16 loss scaling of g_s (scaled_grad).
    Returns (theta', {name: psi(g_s)}, {name: gate c}, the support loss, {name: context}, {name: g_s})."""
    loss, contexts = loss_fn(params, support)
    grads = scaled_grad(loss, list(params.values()), loss_scale, create_graph=second_order)
    regulated, gates = {}, {}
    contexts = {name: contexts[name].detach() for name in params}
    for (name, p), g in zip(params.items(), grads, strict=True):
        regulated[name], gates[name] = regulate(name, g, contexts[name])
    raw = dict(zip(params, grads, strict=True))
    return {n: p - alpha * regulated[n] for n, p in params.items()}, regulated, gates, loss.detach(), contexts, raw


def regulation_diagnostics(params: dict, raw: dict, regulated: dict, gates: dict, step_size: float) -> dict:
    """What a regulated step does (GRAM's diagnostics, over all prompt tensors together): step_ratio =
    ||step_size psi(g)|| / ||theta||, the regulated step's size against the prompts'; cos = cos(psi(g), g) of the
    flattened gradients (1: the regulator keeps the direction); gate = the mean gate c over the regulators that have
    one (NaN for none: Meta-SGD scaling)."""
    flat = lambda tensors: torch.cat([t.detach().reshape(-1).double() for t in tensors])
    theta, g, psi = flat(params.values()), flat(raw.values()), flat(regulated.values())
    values = [float(c.detach()) for c in gates.values() if c is not None]
    return {"step_ratio": float(step_size * psi.norm() / theta.norm()),
            "cos": float(F.cosine_similarity(psi, g, dim=0)),
            "gate": sum(values) / len(values) if values else math.nan}


def distance_from(module: nn.Module, initial: dict) -> float:
    """||phi - phi_0|| / ||phi_0|| over all parameters of `module` against its initial state dict (how far
    meta-training has moved the regulators)."""
    now = torch.cat([p.detach().reshape(-1).double() for _, p in sorted(module.named_parameters())])
    then = torch.cat([initial[n].reshape(-1).double().to(now.device) for n, _ in sorted(module.named_parameters())])
    return float((now - then).norm() / then.norm())


class RegulatorBank(nn.Module):
    """The regulators of a prompt learner: one GradientRegulator per encoder width group (reconstruction: one per
    modality, shared by that modality's prompt tensors, e.g. IVLP's text context and deep text prompts; `group_of`
    maps a parameter name to its group), or, kind="meta_sgd", one MetaSGDScaling per prompt tensor.
    Call: bank(name, grad, context) -> (psi(grad), gate or None); bank.gate(name, context) -> c."""

    def __init__(self, shapes: dict, group_of, *, kind: str = "supmer", norm_mode: str = "row"):
        super().__init__()
        if kind not in ("supmer", "identity", "meta_sgd"):
            raise ValueError(f"regulator kind must be supmer, identity or meta_sgd, not {kind!r}")
        self.kind, self.group_of = kind, group_of
        if kind == "meta_sgd":
            self.regulators = nn.ModuleDict({self.key(n): MetaSGDScaling(shape) for n, shape in shapes.items()})
        else:
            widths = {group_of(n): shape[-1] for n, shape in shapes.items()}
            self.regulators = nn.ModuleDict({g: GradientRegulator(w, identity_start=kind == "identity",
                                                                  norm_mode=norm_mode) for g, w in widths.items()})

    def key(self, name: str) -> str:
        return name.replace(".", "_") if self.kind == "meta_sgd" else self.group_of(name)

    def forward(self, name: str, grad: torch.Tensor, context: torch.Tensor) -> tuple:
        return self.regulators[self.key(name)](grad, context)

    def gate(self, name: str, context: torch.Tensor):
        regulator = self.regulators[self.key(name)]
        return regulator.gate(context) if isinstance(regulator, GradientRegulator) else None
