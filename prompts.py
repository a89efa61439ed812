"""Prompt learners for a frozen CLIP: zero-shot templates, CoOp, CoCoOp, IVLP, MaPLe, MetaPrompt's deep prompts,
and PromptSRC's self-regularization.

Papers:
  - CoOp: Zhou et al., "Learning to Prompt for Vision-Language Models", arXiv:2109.01134v6 (Sec. 3.2).
  - CoCoOp: Zhou et al., "Conditional Prompt Learning for Vision-Language Models", arXiv:2203.05557v2 (Sec. 3.2:
    a meta-net turns each image into a bias of the context; KaiyangZhou/CoOp trainers/cocoop.py).
  - MaPLe: Khattak et al., "MaPLe: Multi-modal Prompt Learning", arXiv:2210.03117v3 (Sec. 3.2: deep text prompts,
    vision prompts coupled to them by linear functions; muzairkhattak/multimodal-prompt-learning trainers/maple.py).
  - IVLP: Khattak et al., "MaPLe: Multi-modal Prompt Learning", arXiv:2210.03117v3 (Sec. 4, "Independent V-L
    prompting", the baseline of PromptSRC and the base of ProMetaR).
  - PromptSRC: Khattak et al., "Self-regulating Prompts: Foundational Model Adaptation without Forgetting",
    arXiv:2307.06948v2 (Sec. 3.2: L1 consistency, KL to zero-shot logits; Sec. 3.3: Gaussian prompt aggregation).
Each learner is an `nn.Module` whose only trainable parameters are prompts; the CLIP it wraps is frozen. Class-list
dependent tensors (token embeddings around the prompts, frozen teacher text features) are computed once, when the
learner is built for a class list; to evaluate on other classes, build a learner for them and load the prompts.
Not included: CoCoOp's and MaPLe's use inside ProMetaR or GRAM (the papers build on CoOp and IVLP).

Shape legend: B images, C classes, M prompt tokens, L token length, D text width, Dv vision width, E embed dim,
K templates.
"""

import copy
import hashlib
import math
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import clip_model

PROMPT_INIT_STD = 0.02  # CoOp coop.py random ctx init; IVLP/PromptSRC/ProMetaR deep and vision prompts
CLASS_TOKEN_POSITIONS = ("end", "middle", "front")  # CoOp coop.py CLASS_TOKEN_POSITION


def clean_classname(name: str) -> str:
    """Every CoOp-family trainer replaces "_" by " " in class names before building prompts."""
    return name.replace("_", " ")


def freeze(clip: nn.Module) -> nn.Module:
    """Prompt learning never updates CLIP's weights (CoOp Sec. 3.2)."""
    return clip.requires_grad_(False).eval()


@torch.no_grad()
def template_text_features(clip, classnames, templates, average: str = "normalized",
                           clean_names: bool = True) -> torch.Tensor:
    """Frozen CLIP text features of each class, averaged over templates; returns (C, E), L2-normalised.

    average="normalized": normalise per template, average, renormalise (CLIP's ImageNet ensemble, CoOp ZeroshotCLIP2).
    average="raw": average the unnormalised features, then normalise (PromptSRC / ProMetaR frozen text teacher,
    promptsrc.py `fixed_embeddings`).
    clean_names=False fills the templates with the raw class names, underscores kept (MetaPrompt's frozen branch).
    """
    device = clip.positional_embedding.device
    per_template = []
    for template in templates:
        text = clip_model.tokenize([template.format(clean_classname(c) if clean_names else c) for c in classnames],
                                   context_length=clip.context_length).to(device)  # (C, L)
        features = clip.encode_text(text)  # (C, E)
        per_template.append(F.normalize(features, dim=-1) if average == "normalized" else features)
    return F.normalize(torch.stack(per_template).mean(0), dim=-1)  # (C, E)


class PromptedOutput(NamedTuple):
    """What every learner's forward returns (the same in train and eval mode)."""

    logits: torch.Tensor  # (B, C) CLIP logits of the normalised features
    image_features: torch.Tensor  # (B, E) before normalisation (ProMetaR's manifold mixup mixes these)
    text_features: torch.Tensor  # (C, E) normalised; CoCoOp: (B, C, E), per image
    contexts: dict | None = None  # {"text": (D,), "vision": (Dv,)} when asked for (GRAM's regulator contexts)


class PairOutput(NamedTuple):
    """A learner's encoding of image-caption pairs (GRAM's meta-training): both feature sets before normalisation."""

    image_features: torch.Tensor  # (B, E)
    text_features: torch.Tensor  # (B, E) of the prompted captions
    contexts: dict  # {"text": (D,), "vision": (Dv,)}: mean final hidden states of each prompted encoder


def modality(name: str) -> str:
    """Which encoder a prompt parameter belongs to: "vision" (vision_ctx, vision_deep_prompts.*) or "text"."""
    return "vision" if name.startswith("vision") else "text"


def caption_prompts(clip, captions, n_ctx: int, prompt_prefix: str | None = None) -> "TextPrompts":
    """The prompted-caption side of GRAM's meta-training: "[SOS] ctx caption [EOS]" (reconstruction), captions cut to
    the context length with the end-of-text token kept (CLIP's tokenizer truncation)."""
    return TextPrompts(clip, captions, n_ctx, prompt_prefix, truncate=True, template="{prefix} {name}")


def prompted_output(clip, image_features: torch.Tensor, text_features: torch.Tensor, contexts=None) -> PromptedOutput:
    logits = clip_logits(clip, F.normalize(image_features, dim=-1), text_features)  # (B, C)
    return PromptedOutput(logits, image_features, text_features, contexts)


def clip_logits(clip, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """CLIP's cosine-similarity logits with its own (frozen) temperature: (B, E), (C, E) -> (B, C)."""
    return clip.logit_scale.exp() * image_features @ text_features.t()


class ZeroShotCLIP(nn.Module):
    """Hand-made prompts: one template per dataset (CoOp zsclip.py CUSTOM_TEMPLATES) or an ensemble (ImageNet)."""

    def __init__(self, clip, classnames, templates):
        super().__init__()
        self.clip = freeze(clip)
        self.register_buffer("text_features", template_text_features(clip, classnames, templates), persistent=False)

    def encode_text(self) -> torch.Tensor:
        return self.text_features  # (C, E)

    def classify(self, image_features: torch.Tensor) -> PromptedOutput:
        """Logits from frozen image features (B, E) (FROZEN_IMAGE: features can be computed once and reused)."""
        return prompted_output(self.clip, image_features, self.text_features)

    def forward(self, images: torch.Tensor) -> PromptedOutput:
        return self.classify(self.clip.encode_image(images))


def word_embeddings(clip, words: str, n_ctx: int | None = None) -> torch.Tensor:
    """Token embeddings of the first n_ctx tokens of `words`, e.g. "a photo of a" -> (4, D) (CoOp / IVLP / MaPLe
    ctx_init: the context starts as these tokens; the rest of the words stay fixed in the prompt). By default n_ctx
    is the number of space-separated words, as CoOp's and CoCoOp's `len(ctx_init.split(" "))` ("_" read as " "):
    "itap of a" gives 3 vectors ("it", "ap", "of") and leaves "a" fixed."""
    words = words.replace("_", " ")
    ids = clip_model.tokenize(words, context_length=clip.context_length)[0]  # (L,)
    n_tokens = int(ids.argmax()) - 1  # tokens between SOT and EOT
    n_ctx = len(words.split(" ")) if n_ctx is None else n_ctx
    if n_ctx > n_tokens:
        raise ValueError(f"ctx_init {words!r} has {n_tokens} tokens, fewer than n_ctx={n_ctx}")
    with torch.no_grad():
        return clip.token_embedding(ids[1:1 + n_ctx].to(clip.positional_embedding.device)).clone()  # (M, D)


def initial_context(clip, ctx_init: str | None, n_ctx: int | None) -> torch.Tensor:
    """A shared context (M, D): the words of `ctx_init` (word_embeddings; n_ctx=None: one vector per word) or
    N(0, 0.02) random vectors (CoOp / CoCoOp / IVLP / MaPLe)."""
    if ctx_init:
        return word_embeddings(clip, ctx_init, n_ctx)
    return normal_prompts(n_ctx, clip.ln_final.weight.shape[0], device=clip.positional_embedding.device)


def normal_prompts(*shape: int, device) -> torch.Tensor:
    """N(0, 0.02) prompt vectors of `shape`, drawn from the CPU generator and then moved to `device`: the released
    codes build their learners on the CPU and move them to the GPU afterwards, so a run starts from the same prompts
    on a CPU and on a GPU."""
    return (torch.randn(shape) * PROMPT_INIT_STD).to(device)


TRUNCATE_TEXT = True  # ours: prompts end after the longest end-of-text token; False: the official 77 tokens


class TextPrompts(nn.Module):
    """The class-list side of a learned text prompt "X X ... X {class}.": the frozen token embeddings around the
    context (CoOp coop.py `token_prefix` / `token_suffix`), cut after the longest end-of-text token (exact under the
    causal mask, see `clip_model.CLIP.encode_text_embeddings`)."""

    def __init__(self, clip, classnames, n_ctx: int, prompt_prefix: str | None = None, truncate: bool = False,
                 template: str = "{prefix} {name}."):
        super().__init__()
        names = [clean_classname(c) for c in classnames]
        prompt_prefix = (prompt_prefix or " ".join(["X"] * n_ctx)).replace("_", " ")  # tokens after n_ctx: fixed
        tokenized = clip_model.tokenize([template.format(prefix=prompt_prefix, name=name) for name in names],
                                        context_length=clip.context_length, truncate=truncate)  # (C, L)
        tokenized = tokenized.to(clip.positional_embedding.device)
        self.n_ctx = n_ctx
        self.register_buffer("eot_idx", tokenized.argmax(-1), persistent=False)  # (C,)
        self.name_lens = [len(clip_model._tokenizer().encode(name)) for name in names]
        length = int(self.eot_idx.max()) + 1 if TRUNCATE_TEXT else tokenized.shape[1]
        with torch.no_grad():
            embedding = clip.token_embedding(tokenized[:, :length])  # (C, L', D)
        self.register_buffer("token_prefix", embedding[:, :1].clone(), persistent=False)  # (C, 1, D) SOT
        self.register_buffer("token_suffix", embedding[:, 1 + n_ctx:].clone(), persistent=False)  # (C, L'-1-M, D)

    def assemble(self, ctx: torch.Tensor, position: str = "end", class_idx=None) -> torch.Tensor:
        """Prompt embeddings (C, L', D) from the context ctx (M, D) shared or (C, M, D) class-specific (CoOp Eq. 2);
        `class_idx` (a list or (C',) tensor) builds them for those classes only (end position, shared context)."""
        if class_idx is not None:
            prefix, suffix = self.token_prefix[class_idx], self.token_suffix[class_idx]  # (C', 1, D), (C', *, D)
            ctx = ctx.to(prefix.dtype).expand(prefix.shape[0], -1, -1)  # (C', M, D)
            return torch.cat([prefix, ctx, suffix], dim=1)  # (C', L', D)
        n_cls = self.token_prefix.shape[0]
        ctx = ctx.to(self.token_prefix.dtype).expand(n_cls, -1, -1)  # (C, M, D)
        if position == "end":  # [SOS][ctx][name.][EOS]
            return torch.cat([self.token_prefix, ctx, self.token_suffix], dim=1)  # (C, L', D)
        prompts = []  # name lengths differ per class: CoOp builds middle/front prompts class by class
        half = self.n_ctx // 2
        for i, n in enumerate(self.name_lens):
            name, rest = self.token_suffix[i:i + 1, :n], self.token_suffix[i:i + 1, n:]  # (1, n, D), (1, *, D)
            parts = [ctx[i:i + 1, :half], name, ctx[i:i + 1, half:]] if position == "middle" else [name, ctx[i:i + 1]]
            prompts.append(torch.cat([self.token_prefix[i:i + 1], *parts, rest], dim=1))  # (1, L', D)
        return torch.cat(prompts, dim=0)  # (C, L', D)


class CoOp(nn.Module):
    """CoOp: n_ctx learned context vectors in front of (or around) the class name, text side only (CoOp Sec. 3.2).

    Args:
        n_ctx: number of context vectors M (CoOp: 16). Ignored when `ctx_init` is given (M = its word count).
        ctx_init: words to initialise the context from ("a photo of a"); None = N(0, 0.02) random init.
        class_specific: one context per class (CoOp "CSC") instead of one shared context; random init only
            (CoOp keeps a word-initialised context generic).
        class_token_position: "end", "middle" or "front".
    """

    def __init__(self, clip, classnames, n_ctx: int = 16, ctx_init: str | None = None,
                 class_specific: bool = False, class_token_position: str = "end"):
        super().__init__()
        if class_token_position not in CLASS_TOKEN_POSITIONS:
            raise ValueError(f"class_token_position must be one of {CLASS_TOKEN_POSITIONS}")
        self.clip = freeze(clip)
        self.class_token_position = class_token_position
        if ctx_init:  # CoOp coop.py: a word-initialised context is generic, even with class_specific
            ctx = word_embeddings(clip, ctx_init)  # (M, D); M = number of words
        else:
            shape = (len(classnames), n_ctx, clip.ln_final.weight.shape[0]) if class_specific else \
                (n_ctx, clip.ln_final.weight.shape[0])
            ctx = normal_prompts(*shape, device=clip.positional_embedding.device)
        self.ctx = nn.Parameter(ctx)  # (M, D) or (C, M, D)
        self.text = TextPrompts(clip, classnames, self.ctx.shape[-2], ctx_init)
        self.text_prefix = ctx_init  # the words in the context's place when other text (captions) is prompted

    def prompted_text(self, text: "TextPrompts | None" = None, return_context: bool = False):
        """Text features (N, E) before normalisation of the class prompts, or of `text` (captions, context in front);
        with return_context also the text encoder's context (D,) (GRAM)."""
        text, position = (self.text, self.class_token_position) if text is None else (text, "end")
        return self.clip.encode_text_embeddings(text.assemble(self.ctx, position), text.eot_idx,
                                                return_context=return_context)

    def encode_text(self) -> torch.Tensor:
        return F.normalize(self.prompted_text(), dim=-1)  # (C, E)

    def classify(self, image_features: torch.Tensor) -> PromptedOutput:
        """Logits from frozen image features (B, E): CoOp's image encoder has no prompts."""
        return prompted_output(self.clip, image_features, self.encode_text())

    def forward(self, images: torch.Tensor, captions: "TextPrompts | None" = None, with_context: bool = False):
        """PromptedOutput over the learner's classes; with `captions` (caption_prompts of the batch) the PairOutput of
        the image-caption pairs instead, `images` then also taking CLIP's image features (B, E) computed once (GRAM's
        meta-training); with_context=True adds the text encoder's context (GRAM)."""
        if captions is None and not with_context:
            return self.classify(self.clip.encode_image(images))
        if self.ctx.dim() == 3:
            raise ValueError("GRAM needs a shared context: class-specific CoOp contexts cannot prompt captions")
        text_features, context = self.prompted_text(captions, return_context=True)  # (N, E), (D,)
        if captions is not None:
            image_features = images if images.dim() == 2 else self.clip.encode_image(images)  # (B, E)
            return PairOutput(image_features, text_features, {"text": context})
        return prompted_output(self.clip, self.clip.encode_image(images), F.normalize(text_features, dim=-1),
                               {"text": context})


def deep_prompt_list(n_layers: int, n_tokens: int, width: int, device) -> nn.ParameterList:
    """One (M, W) prompt per transformer block 1..n_layers, N(0, 0.02) (IVLP / ProMetaR `VPT_shallow`)."""
    return nn.ParameterList([nn.Parameter(normal_prompts(n_tokens, width, device=device))
                             for _ in range(n_layers)])


class IVLP(nn.Module):
    """Independent vision-language deep prompts (MaPLe Sec. 4 baseline; PromptSRC's and ProMetaR's prompt model).

    Text: the context "a photo of a" (M_t tokens, trainable) at positions 1..M_t, and a fresh (M_t, D) prompt
    replacing those positions before each block 1..text_depth-1. Vision: M_v tokens appended after [CLS, patches]
    (after the positional embedding), and a fresh (M_v, Dv) prompt replacing them before blocks 1..vision_depth-1.
    Defaults: ProMetaR / PromptSRC base-to-new config (4+4 tokens, depth 9/9; mlvlab/ProMetaR
    configs/trainers/ProMetaR/vit_b16_c2_ep10_batch4_4+4ctx.yaml).
    """

    def __init__(self, clip, classnames, n_ctx_text: int = 4, n_ctx_vision: int = 4, text_depth: int = 9,
                 vision_depth: int = 9, ctx_init: str | None = "a photo of a"):
        super().__init__()
        self.clip = freeze(clip)
        device, width = clip.positional_embedding.device, clip.ln_final.weight.shape[0]
        vision_width = clip.visual.conv1.weight.shape[0]
        self.ctx = nn.Parameter(initial_context(clip, ctx_init, n_ctx_text))  # (M_t, D)
        self.text_deep_prompts = deep_prompt_list(text_depth - 1, self.ctx.shape[0], width, device)
        self.vision_ctx = nn.Parameter(normal_prompts(n_ctx_vision, vision_width, device=device)) \
            if n_ctx_vision else None  # (M_v, Dv); n_ctx_vision=0: a text-only learner
        self.vision_deep_prompts = deep_prompt_list(vision_depth - 1 if n_ctx_vision else 0, n_ctx_vision,
                                                    vision_width, device)
        self.text = TextPrompts(clip, classnames, n_ctx_text, ctx_init)
        self.text_prefix = ctx_init  # the words in the context's place when other text (captions) is prompted

    def prompted_text(self, text: "TextPrompts | None" = None, return_context: bool = False):
        """Text features (N, E) before normalisation of the class prompts, or of `text` (captions, context in front);
        with return_context also the text encoder's context (D,) (GRAM)."""
        text = text if text is not None else self.text
        return self.clip.encode_text_embeddings(text.assemble(self.ctx), text.eot_idx,
                                                deep_prompts=list(self.text_deep_prompts), return_context=return_context)

    def encode_text(self) -> torch.Tensor:
        return F.normalize(self.prompted_text(), dim=-1)  # (C, E)

    def encode_image(self, images: torch.Tensor, return_context: bool = False):
        """Prompted image features (B, E), before normalisation (and the vision context)."""
        return self.clip.encode_image(images, prompts=self.vision_ctx, deep_prompts=list(self.vision_deep_prompts),
                                      return_context=return_context)

    def forward(self, images: torch.Tensor, captions: "TextPrompts | None" = None, with_context: bool = False):
        """PromptedOutput over the learner's classes; with `captions` the PairOutput of the image-caption pairs (text
        features before normalisation); with_context=True adds both encoders' contexts (GRAM)."""
        if captions is None and not with_context:
            return prompted_output(self.clip, self.encode_image(images), self.encode_text())
        image_features, vision_context = self.encode_image(images, return_context=True)
        text_features, text_context = self.prompted_text(captions, return_context=True)  # (N, E), (D,)
        contexts = {"text": text_context, "vision": vision_context}
        if captions is not None:
            return PairOutput(image_features, text_features, contexts)
        return prompted_output(self.clip, image_features, F.normalize(text_features, dim=-1), contexts)


COCOOP_TEXT_BATCH = 4096  # ours: prompted class sequences per text pass (images x classes), to bound memory


class CoCoOp(nn.Module):
    """CoCoOp (arXiv:2203.05557v2 Sec. 3.2): each image's context is v_m(x) = v_m + pi(x), pi = h(f(x)) a meta-net
    (Linear(E, E/16)-ReLU-Linear(E/16, D), cocoop.py `meta_net`) of the normalised image feature, so every image gets
    text features of its own for every class. Context from `ctx_init` ("a photo of a": M = its word count, as CoOp)
    or N(0, 0.02). The official loop runs the text encoder image by image; here a batch's images share one text
    pass of B x C prompts (chunked at COCOOP_TEXT_BATCH sequences), truncated after the last end-of-text token."""

    def __init__(self, clip, classnames, n_ctx: int = 4, ctx_init: str | None = "a photo of a"):
        super().__init__()
        self.clip = freeze(clip)
        device, width = clip.positional_embedding.device, clip.ln_final.weight.shape[0]
        embed = clip.visual.proj.shape[1]
        self.ctx = nn.Parameter(initial_context(clip, ctx_init, None if ctx_init else n_ctx))  # (M, D)
        self.meta_net = nn.Sequential(OrderedDict([("linear1", nn.Linear(embed, embed // 16)), ("relu", nn.ReLU()),
                                                   ("linear2", nn.Linear(embed // 16, width))])).to(device)
        self.text = TextPrompts(clip, classnames, self.ctx.shape[0], ctx_init)

    def conditional_text(self, ctx: torch.Tensor) -> torch.Tensor:
        """Normalised text features (N, C, E) of every class under each of N contexts ctx (N, M, D), in one pass."""
        prefix, suffix = self.text.token_prefix, self.text.token_suffix  # (C, 1, D), (C, S, D)
        n, n_cls = ctx.shape[0], prefix.shape[0]
        ctx = ctx.to(prefix.dtype)[:, None].expand(-1, n_cls, -1, -1)  # (N, C, M, D)
        x = torch.cat([prefix.expand(n, -1, -1, -1), ctx, suffix.expand(n, -1, -1, -1)], dim=2)  # (N, C, L', D)
        features = self.clip.encode_text_embeddings(x.flatten(0, 1), self.text.eot_idx.repeat(n))  # (N*C, E)
        return F.normalize(features, dim=-1).view(n, n_cls, -1)

    def forward(self, images: torch.Tensor) -> PromptedOutput:
        """PromptedOutput with per-image text features (B, C, E)."""
        return self.classify(self.clip.encode_image(images))

    def classify(self, image_features: torch.Tensor) -> PromptedOutput:
        """From frozen image features (B, E): the image encoder has no prompts, only the text side depends on x."""
        normalized = F.normalize(image_features, dim=-1)
        ctx = self.ctx + self.meta_net(normalized)[:, None]  # (B, M, D): the bias pi(x) shifts every context vector
        chunk = max(1, COCOOP_TEXT_BATCH // self.text.token_prefix.shape[0])
        text_features = torch.cat([self.conditional_text(c) for c in ctx.split(chunk)])  # (B, C, E)
        logits = self.clip.logit_scale.exp() * torch.einsum("be,bce->bc", normalized,
                                                            text_features.to(normalized.dtype))  # (B, C)
        return PromptedOutput(logits, image_features, text_features)


class MaPLe(nn.Module):
    """MaPLe (arXiv:2210.03117v3 Sec. 3.2): text prompts P_0..P_{J-1} (M, D) at positions 1..M of the first J text
    layers (P_0 = the first M words of `ctx_init`, the rest of the words fixed in the prompt; P_j N(0, 0.02)); the
    vision prompts are never free: P~_j = F_j(P_j), F_j a linear coupling D -> Dv, appended after [CLS, patches] and
    replaced before each vision block j < J (maple.py `MultiModalPromptLearner`, `proj`,
    `compound_prompt_projections`). `cloned_couplings`: the release makes F_1..F_{J-1} deep copies of one freshly
    initialised layer (maple.py `_get_clones`), so they start equal; False draws each one afresh."""

    def __init__(self, clip, classnames, n_ctx: int = 2, depth: int = 9, ctx_init: str | None = "a photo of a",
                 cloned_couplings: bool = True):
        super().__init__()
        self.clip = freeze(clip)
        device, width = clip.positional_embedding.device, clip.ln_final.weight.shape[0]
        vision_width = clip.visual.conv1.weight.shape[0]
        self.ctx = nn.Parameter(initial_context(clip, ctx_init, n_ctx))  # P_0 (M, D)
        self.text_deep_prompts = deep_prompt_list(depth - 1, n_ctx, width, device)  # P_1..P_{J-1}
        # initialised from the CPU generator as released (normal_prompts), then moved
        self.proj = nn.Linear(width, vision_width).to(device)  # F_0
        first = nn.Linear(width, vision_width).to(device)
        self.couplings = nn.ModuleList([copy.deepcopy(first) if cloned_couplings or j == 0 else
                                        nn.Linear(width, vision_width).to(device) for j in range(depth - 1)])
        self.text = TextPrompts(clip, classnames, n_ctx, ctx_init)

    def vision_prompts(self) -> tuple:
        """(F_0(P_0) (M, Dv), [F_j(P_j) (M, Dv) for j = 1..J-1]): the vision prompts, coupled to the text ones."""
        return self.proj(self.ctx), [f(p) for f, p in zip(self.couplings, self.text_deep_prompts)]

    def encode_text(self) -> torch.Tensor:
        return F.normalize(self.clip.encode_text_embeddings(self.text.assemble(self.ctx), self.text.eot_idx,
                                                            deep_prompts=list(self.text_deep_prompts)), dim=-1)

    def forward(self, images: torch.Tensor) -> PromptedOutput:
        shallow, deep = self.vision_prompts()
        image_features = self.clip.encode_image(images, prompts=shallow, deep_prompts=deep)  # (B, E)
        return prompted_output(self.clip, image_features, self.encode_text())


class MetaPrompt(nn.Module):
    """MetaPrompt's dual-modality deep prompts (arXiv:2212.04196v2, TIP 2024; Vill-Lab/2024-TIP-MetaPrompt @ ca996074
    trainers/meta.py `CustomCLIP`): free text prompts (depth, M_t, D) and visual prompts (depth, M_v, Dv), N(0, 0.02),
    no word initialisation. Text: "X ... X {class}." with text_ctx[0] at positions 1..M_t, text_ctx[i] replacing them
    before block i (meta.py `TextEncoder`); vision: vision_ctx[0] appended after [CLS, patches] (after the positional
    embedding, before ln_pre), vision_ctx[i] replacing the last M_v tokens before block i (`VisionEncoder`).

    Asymmetric logits (meta.py `CustomCLIP.forward`): l_i = s f_v^P(x) . T_zs (prompted image, frozen hand-made text),
    l_t = s f_v^0(x) . T^P (frozen image, prompted text), l_mix = (l_i + l_t) / 2, the prediction. `frozen_templates`
    give T_zs (normalised per template, averaged, renormalised); `raw_frozen_names` fills them with the raw class
    names, underscores kept, as released (meta.py:235; the prompted branch always replaces "_" by " ").
    """

    def __init__(self, clip, classnames, frozen_templates, n_ctx_text: int = 2, n_ctx_vision: int = 2,
                 depth: int = 12, raw_frozen_names: bool = True):
        super().__init__()
        self.clip = freeze(clip)
        device, width = clip.positional_embedding.device, clip.ln_final.weight.shape[0]
        vision_width = clip.visual.conv1.weight.shape[0]
        self.text_ctx = nn.Parameter(normal_prompts(depth, n_ctx_text, width, device=device))
        self.vision_ctx = nn.Parameter(normal_prompts(depth, n_ctx_vision, vision_width, device=device))
        self.text = TextPrompts(clip, classnames, n_ctx_text)
        features = template_text_features(clip, classnames, frozen_templates, clean_names=not raw_frozen_names)
        self.register_buffer("frozen_text_features", features, persistent=False)  # (C, E) T_zs

    def encode_text(self, class_idx=None) -> torch.Tensor:
        """Prompted text features (C, E) (or (C', E) for the classes `class_idx`), normalised."""
        x = self.text.assemble(self.text_ctx[0], class_idx=class_idx)  # (C, L', D)
        eot = self.text.eot_idx if class_idx is None else self.text.eot_idx[class_idx]  # (C,)
        features = self.clip.encode_text_embeddings(x, eot, deep_prompts=list(self.text_ctx[1:]))
        return F.normalize(features, dim=-1)  # (C, E)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """Prompted image features (B, E), before normalisation."""
        return self.clip.encode_image(images, prompts=self.vision_ctx[0], deep_prompts=list(self.vision_ctx[1:]))

    @torch.no_grad()
    def frozen_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """f_v^0(x): CLIP's own image features (B, E), normalised; prompt-free, so computed once per batch."""
        return F.normalize(self.clip.encode_image(images), dim=-1)

    def forward(self, images: torch.Tensor | None, *, branch: str = "mix", frozen_image: torch.Tensor | None = None,
                class_idx=None):
        """branch="mix": PromptedOutput with l_mix over all classes, the prediction (meta.py `CustomCLIP.forward` in
        eval mode); "all": (l_mix, l_i, l_t); "image": l_i only; "text": l_t only, from `frozen_image` (images
        unused). l_i = s f_v^P(x) . T_zs and l_t = s f_v^0(x) . T^P, each (B, C), or (B, C') for the classes
        `class_idx` ("image", "text"). `frozen_image` (B, E) = frozen_image_features(images), computed if None."""
        if branch == "text":
            return clip_logits(self.clip, frozen_image, self.encode_text(class_idx))  # (B, C')
        image_features = self.encode_image(images)  # (B, E)
        frozen_text = self.frozen_text_features if class_idx is None else self.frozen_text_features[class_idx]
        l_i = clip_logits(self.clip, F.normalize(image_features, dim=-1), frozen_text)  # (B, C')
        if branch == "image":
            return l_i
        frozen_image = self.frozen_image_features(images) if frozen_image is None else frozen_image
        text_features = self.encode_text()  # (C, E)
        l_t = clip_logits(self.clip, frozen_image, text_features)  # (B, C)
        l_mix = 0.5 * (l_i + l_t)
        return (l_mix, l_i, l_t) if branch == "all" else PromptedOutput(l_mix, image_features, text_features)


def prompt_parameters(learner: nn.Module) -> dict:
    """{name: tensor} of the trainable prompts: what is optimised, checkpointed and meta-learned."""
    return {name: p for name, p in learner.named_parameters() if p.requires_grad}


def load_prompts(learner: nn.Module, state: dict) -> None:
    """Load trained prompts into a learner built for any class list; every prompt must be there, nothing else."""
    expected = prompt_parameters(learner)
    if set(state) != set(expected):
        raise ValueError(f"checkpoint prompts {sorted(state)} do not match the learner's {sorted(expected)}")
    with torch.no_grad():
        for name, value in state.items():
            if value.shape != expected[name].shape:
                raise ValueError(f"prompt {name}: checkpoint shape {tuple(value.shape)}, learner "
                                 f"{tuple(expected[name].shape)} (class-specific contexts cannot change classes)")
            expected[name].copy_(value)


def read_checkpoint(path, method: str | None = None) -> dict:
    """A prompts.pt / checkpoint.pt written by train.py ({"prompts", "config", ...}), loaded on the CPU with
    weights_only; one-line errors for a missing or foreign file, or one trained with another `method`."""
    if not Path(path).is_file():
        raise clip_model.CheckpointError(f"--checkpoint {path} does not exist; pass the prompts.pt of a run folder")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (*clip_model.UNREADABLE_FILE_ERRORS, OSError):
        raise clip_model.CheckpointError(f"--checkpoint {path} is not a checkpoint written by train.py (truncated, "
                                         "or another kind of file); pass a run folder's prompts.pt") from None
    if not isinstance(ckpt, dict) or "prompts" not in ckpt or "config" not in ckpt:
        raise clip_model.CheckpointError(f"--checkpoint {path} holds no prompts; pass a run folder's prompts.pt")
    trained = ckpt["config"].get("method")
    if method is not None and trained != method:
        raise clip_model.CheckpointError(f"--checkpoint {path} was trained with --method {trained}; evaluate it "
                                         f"with --method {trained}")
    return ckpt


# ----------------------------------------------------------------------------------------------------------------
# PromptSRC self-regularization (arXiv:2307.06948v2 Sec. 3.2-3.3), as separate functions


class FrozenTeacher(nn.Module):
    """PromptSRC's frozen CLIP targets: template-ensemble text features, computed once for the class list, and
    the frozen image features and zero-shot logits of the same (augmented) batch."""

    def __init__(self, clip, classnames, templates):
        super().__init__()
        self.clip = freeze(clip)
        features = template_text_features(clip, classnames, templates, average="raw")  # (C, E)
        self.register_buffer("text_features", features, persistent=False)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.clip.encode_image(images), dim=-1)  # (B, E)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        return clip_logits(self.clip, image_features, self.text_features)  # (B, C)


def consistency_l1(prompted: torch.Tensor, frozen: torch.Tensor) -> torch.Tensor:
    """PromptSRC Eq. (2)/(3): mean absolute difference of L2-normalised prompted and frozen features."""
    return F.l1_loss(prompted, frozen.to(prompted.dtype), reduction="mean")


def kl_to_zero_shot(logits: torch.Tensor, zero_shot_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """PromptSRC Eq. (4): KL(p_zero-shot || p_prompted) of the softened class distributions, summed over classes,
    averaged over the batch, times T^2 (promptsrc.py: `F.kl_div(log_softmax(logits/T), log_softmax(zs/T),
    reduction="sum", log_target=True) * T*T / logits.numel()`, see the note there on `numel`)."""
    log_p = F.log_softmax(logits / temperature, dim=-1)  # (B, C)
    log_q = F.log_softmax(zero_shot_logits.to(logits.dtype) / temperature, dim=-1)  # (B, C)
    kl = F.kl_div(log_p, log_q, reduction="sum", log_target=True)
    return kl * temperature ** 2 / logits.numel()


def gaussian_epoch_weights(n_epochs: int, mean: float, std: float) -> torch.Tensor:
    """PromptSRC Sec. 3.3 (Gaussian prompt aggregation): weight of the prompts after epoch e = 1..n_epochs,
    w_e proportional to exp(-(e - mean)^2 / (2 std^2)), normalised to sum 1. Returns (n_epochs,)."""
    epochs = torch.arange(1, n_epochs + 1, dtype=torch.float64)
    weights = torch.exp(-(epochs - mean) ** 2 / (2 * std ** 2)) / (std * math.sqrt(2 * math.pi))
    return weights / weights.sum()


def aggregate_prompts(snapshots: list, weights: torch.Tensor) -> dict:
    """Gaussian-weighted average of per-epoch prompt snapshots [{name: tensor}, ...] (PromptSRC Eq. (5))."""
    return {name: sum(float(w) * snap[name] for w, snap in zip(weights, snapshots, strict=True))
            for name in snapshots[0]}


# ----------------------------------------------------------------------------------------------------------------
# Building a learner by method name, and batched prediction (shared by train.py and eval.py)

METHODS = ("zeroshot", "coop", "cocoop", "ivlp", "maple", "promptsrc", "metaprompt")


def build_learner(method: str, clip, classnames, templates, *, n_ctx: int = 16, ctx_init: str | None = None,
                  class_specific: bool = False, class_token_position: str = "end", n_ctx_text: int = 4,
                  n_ctx_vision: int = 4, text_depth: int = 9, vision_depth: int = 9,
                  raw_frozen_names: bool = True, cloned_couplings: bool = True) -> nn.Module:
    """The prompt learner of `method` for a class list. PromptSRC's prompts are IVLP's (its regularizers are
    training losses, see `FrozenTeacher`); zero-shot uses `templates`, MetaPrompt its frozen branch (depth =
    text_depth, for both modalities)."""
    if method == "zeroshot":
        return ZeroShotCLIP(clip, classnames, templates)
    if method == "coop":
        return CoOp(clip, classnames, n_ctx=n_ctx, ctx_init=ctx_init, class_specific=class_specific,
                    class_token_position=class_token_position)
    if method == "cocoop":
        return CoCoOp(clip, classnames, n_ctx=n_ctx, ctx_init=ctx_init)
    if method == "maple":  # MaPLe's prompt length and depth: the text flags (the vision prompts follow)
        return MaPLe(clip, classnames, n_ctx=n_ctx_text, depth=text_depth, ctx_init=ctx_init,
                     cloned_couplings=cloned_couplings)
    if method == "metaprompt":
        return MetaPrompt(clip, classnames, templates, n_ctx_text=n_ctx_text, n_ctx_vision=n_ctx_vision,
                          depth=text_depth, raw_frozen_names=raw_frozen_names)
    if method in ("ivlp", "promptsrc"):
        return IVLP(clip, classnames, n_ctx_text=n_ctx_text, n_ctx_vision=n_ctx_vision, text_depth=text_depth,
                    vision_depth=vision_depth, ctx_init=ctx_init)
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")


FROZEN_IMAGE = (ZeroShotCLIP, CoOp, CoCoOp)  # learners whose image encoder has no prompts: `classify(features)`


@torch.no_grad()
def predict_features(learner: nn.Module, image_features: torch.Tensor, batch_size: int = 100) -> torch.Tensor:
    """Arg-max predictions (N,) of a FROZEN_IMAGE learner from precomputed image features (N, E), in batches. The
    class prompts' text features are computed once (CoCoOp's depend on the image: its own `classify` per batch)."""
    learner.eval()
    device = learner.clip.logit_scale.device
    if isinstance(learner, CoCoOp):
        logits = lambda features: learner.classify(features).logits
    else:
        text = learner.encode_text()  # (C, E)
        logits = lambda features: clip_logits(learner.clip, F.normalize(features, dim=-1), text)
    return torch.cat([logits(chunk.to(device)).argmax(-1).cpu() for chunk in image_features.split(batch_size)])


def feature_tag(clip, backbone, dtype) -> str:
    """What frozen image features depend on: the backbone (name or file SHA256), its input size and the autocast
    dtype; names the feature cache file of a dataset."""
    key = f"{clip_model.fingerprint(backbone)} {clip.visual.input_resolution} {dtype}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def default_dtype(device) -> torch.dtype:
    """The mixed-precision default: bf16 on a CUDA GPU that supports it, fp16 on other GPUs, float32 on a CPU."""
    if torch.device(device).type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@torch.no_grad()
def predict(learner: nn.Module, loader, device, dtype: torch.dtype = torch.float32):
    """Labels and arg-max predictions over a loader of {"img", "label"} batches, under autocast to `dtype` (float32:
    none). Returns two (N,) tensors."""
    learner.eval()
    labels, preds = [], []
    for batch in loader:
        with torch.autocast(device_type=torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
            logits = learner(batch["img"].to(device, non_blocking=True)).logits  # (B, C)
        labels.append(batch["label"])
        preds.append(logits.argmax(-1).cpu())
    return torch.cat(labels), torch.cat(preds)
