"""ProMetaR's meta-regularization, hand-written as pure functions over parameter dictionaries.

Paper: Park, Ko, Kim, "Prompt Learning via Meta-Regularization", CVPR 2024, arXiv:2404.00851v1, Sec. 3 (the
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
Not included: several inner steps or several virtual tasks per iteration (the released code uses one of each);
the released code's fp16 prompts (ours are float32; use autocast on CUDA).

Shape legend: P a parameter's shape, D = numel(P), r channels sharing one gate (DIM_RATE), Bq / Bs query / support.
"""

import contextlib

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


def loss_gradients(losses: dict, params: dict, create_graph: bool) -> tuple:
    """(grad L_task, grad L_reg) as dicts over `params`; zeros where a loss does not reach a parameter (the text
    regularizer does not reach vision prompts). maml.py:109-140 takes the same gradients with allow_unused."""
    names, tensors = list(params), list(params.values())
    g_task = torch.autograd.grad(losses["task"], tensors, create_graph=create_graph, retain_graph=True,
                                 allow_unused=True)
    g_reg = torch.autograd.grad(losses["reg"], tensors, create_graph=create_graph, retain_graph=create_graph,
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


def regularized_gradients(loss_fn, params: dict, batch, gate) -> tuple:
    """Step A of the released iteration (prometar.py:415-424): the modulated gradient on the whole batch, to be
    applied by an ordinary optimizer step. No graph is kept (the released code builds one and never uses it).
    Returns (gradients {name: (P)}, every entry of loss_fn's dict detached: "task", "reg" and any extras)."""
    losses = loss_fn(params, batch)
    grad_task, grad_reg = loss_gradients(losses, params, create_graph=False)
    with torch.no_grad():
        return modulated_gradients(grad_task, grad_reg, gate), {k: v.detach() for k, v in losses.items()}


def second_order_attention(enabled: bool):
    """Double backward through scaled_dot_product_attention exists only for the math kernel (CPU and CUDA)."""
    return sdpa_kernel(SDPBackend.MATH) if enabled else contextlib.nullcontext()


def meta_loss(loss_fn, outer_loss_fn, params: dict, support, query, gate, *, inner_lr: float, outer_scale: float,
              first_order: bool = False) -> torch.Tensor:
    """Step B (prometar.py:426-459): adapt on the support set with the modulated gradient, one step, then the
    scaled outer loss of the adapted parameters on the (augmented) query. Call `.backward()` on the result to get
    the meta-gradients of theta (through theta') and of the gate's parameters phi."""
    with second_order_attention(not first_order):
        grad_task, grad_reg = loss_gradients(loss_fn(params, support), params, create_graph=not first_order)
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
