"""Vendored OpenAI CLIP (ViT image encoder, causal text transformer, BPE tokenizer, checkpoint loading).

Paper: Radford et al., "Learning Transferable Visual Models From Natural Language Supervision", arXiv:2103.00020v1.
Upstream: openai/CLIP @ d05afc436d78f1c48dc0dbf8e5980a9d471f35f6 (`clip/model.py`, `clip/clip.py`,
`clip/simple_tokenizer.py`), rewritten; official state-dict key names are kept so an official checkpoint loads with
`strict=True`. Changes from upstream:
  - batch-first tensors (B, T, D) and attention through `F.scaled_dot_product_attention` (is_causal for text);
  - fp32 by default; no `convert_weights` to fp16 (use `torch.autocast` on CUDA instead);
  - TorchScript archives are read for their tensors only, by a restricted unpickler (no TorchScript code is
    compiled or run, and `torch.jit` is not needed);
  - plain entry points for prompt learners: `encode_text_embeddings` (token embeddings + end-of-text positions,
    optional deep prompts that replace tokens before each block, optional truncation to the longest prompt) and
    `encode_image(..., prompts=, deep_prompts=)` (visual prompt tokens appended after the patches, shallow and deep),
    following the IVLP / MaPLe / PromptSRC / ProMetaR / MetaPrompt conventions;
  - `tiny_config()` for tests and demos (random init, the same code path).
Not included: the ModifiedResNet image encoder (RN50, RN101, RN50x4, ...; `build_model` refuses those checkpoints with
an error naming the supported ones) and the image preprocessing transform (see `data.py`).

Shape legend: B images, N text sequences, L token length (context length, 77 in OpenAI models), D text width,
Dv vision width, E joint embedding dim, G patch-grid side, T vision tokens (1 + G*G [+ M]), M prompt tokens.
"""

import functools
import gzip
import hashlib
import html
import io
import itertools
import math
import os
import pickle
import sys
import urllib.error
import urllib.request
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import ftfy
import regex as re
import torch
import torch.nn.functional as F
from torch import nn

# openai/CLIP clip/clip.py `_MODELS`; the path component before the file name is the file's SHA256.
MODELS = {
    "ViT-B/32": "https://openaipublic.azureedge.net/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": "https://openaipublic.azureedge.net/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": "https://openaipublic.azureedge.net/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}
RESNET_MODELS = ("RN50", "RN101", "RN50x4", "RN50x16", "RN50x64")  # in openai/CLIP, refused here
DEFAULT_DOWNLOAD_ROOT = Path("~/.cache/clip").expanduser()  # openai/CLIP clip.py `load`
BPE_PATH = Path(__file__).resolve().parent / "bpe_simple_vocab_16e6.txt.gz"  # openai/CLIP clip/, sha256 9246...804a
CONTEXT_LENGTH = 77  # openai/CLIP `tokenize`
HEAD_WIDTH = 64  # openai/CLIP build_model: heads = width // 64
TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")  # deleted by openai build_model
QUICK_GELU_ALPHA = 1.702  # openai/CLIP model.py QuickGELU


class CheckpointError(ValueError):
    """A user-facing problem with a CLIP checkpoint: unknown name, missing or corrupt file, checksum, contents."""


# ----------------------------------------------------------------------------------------------------------------
# Building blocks (openai/CLIP model.py)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in the (fp32) dtype of its weights and cast back, as upstream: fp16 activations stay
    stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(QUICK_GELU_ALPHA * x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with `nn.MultiheadAttention`'s parameter names (in_proj_*, out_proj)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        B, T, W = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x (B, T, W)
        q, k, v = (t.view(B, T, self.heads, W // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, h, T, W/h)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, h, T, W/h)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, W))  # (B, T, W)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = SelfAttention(width, heads)
        self.ln_1 = LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))
        self.ln_2 = LayerNorm(width)

    def forward(self, x: torch.Tensor, causal: bool) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


def replace_tokens(x: torch.Tensor, prompt: torch.Tensor, start: int) -> torch.Tensor:
    """Deep prompting (VPT-deep / IVLP / MaPLe): tokens start..start+M of x are replaced by the block's prompt.

    Args: x (N, T, W); prompt (M, W) shared by all sequences, or (N, M, W). Returns (N, T, W).
    """
    prompt = prompt.to(x.dtype).expand(x.shape[0], -1, -1)  # (N, M, W)
    return torch.cat([x[:, :start], prompt, x[:, start + prompt.shape[1]:]], dim=1)  # (N, T, W)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width, self.layers = width, layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, causal: bool = False, deep_prompts: Sequence[torch.Tensor | None] = (),
                prompt_start: int = 0) -> torch.Tensor:
        """x (N, T, W) -> (N, T, W). `deep_prompts[i - 1]` (if not None) replaces tokens at `prompt_start` before
        block i, for i = 1..len(deep_prompts); block 0 sees the input prompts (IVLP/MaPLe/PromptSRC convention)."""
        if len(deep_prompts) >= self.layers:
            raise ValueError(f"{len(deep_prompts)} deep prompts given for blocks 1..{self.layers - 1}; "
                             f"at most {self.layers - 1} (block 0 takes the input prompts)")
        for i, block in enumerate(self.resblocks):
            if 1 <= i <= len(deep_prompts) and deep_prompts[i - 1] is not None:
                x = replace_tokens(x, deep_prompts[i - 1], prompt_start)
            x = block(x, causal)
        return x


class VisionTransformer(nn.Module):
    def __init__(self, input_resolution: int, patch_size: int, width: int, layers: int, heads: int, output_dim: int):
        super().__init__()
        self.input_resolution = input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5  # openai/CLIP VisionTransformer init
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((input_resolution // patch_size) ** 2 + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def forward(self, x: torch.Tensor, prompts: torch.Tensor | None = None,
                deep_prompts: Sequence[torch.Tensor | None] = (), return_context: bool = False):
        """x (B, 3, R, R) -> image features (B, E), before normalisation.

        prompts (M, Dv) or (B, M, Dv): visual prompt tokens appended after [CLS, patches] *after* the positional
        embedding and before `ln_pre` (VPT / IVLP / MaPLe / MetaPrompt). deep_prompts[i - 1] (M, Dv) replaces the
        last M tokens before block i (ProMetaR `VPT_shallow`). return_context=True also returns the mean of the last
        block's output tokens over batch and positions (Dv,), before ln_post (GRAM's regulator context)."""
        x = self.conv1(x.to(self.conv1.weight.dtype))  # (B, Dv, G, G)
        x = x.flatten(2).transpose(1, 2)  # (B, G*G, Dv)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, Dv)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+G*G, Dv)
        n_prompts = 0
        if prompts is not None:
            n_prompts = prompts.shape[-2]
            x = torch.cat([x, prompts.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)  # (B, T, Dv)
        if any(p is not None and p.shape[-2] != n_prompts for p in deep_prompts):
            raise ValueError(f"deep visual prompts must have as many tokens as the input prompts ({n_prompts})")
        x = self.transformer(self.ln_pre(x), deep_prompts=deep_prompts, prompt_start=x.shape[1] - n_prompts)
        features = self.ln_post(x[:, 0]) @ self.proj  # (B, E)
        return (features, x.mean(dim=(0, 1))) if return_context else features


# ----------------------------------------------------------------------------------------------------------------
# CLIP


class CLIP(nn.Module):
    def __init__(self, embed_dim: int, image_resolution: int, vision_layers: int, vision_width: int,
                 vision_patch_size: int, context_length: int, vocab_size: int, transformer_width: int,
                 transformer_heads: int, transformer_layers: int):
        super().__init__()
        self.context_length = context_length
        self.visual = VisionTransformer(image_resolution, vision_patch_size, vision_width, vision_layers,
                                        max(1, vision_width // HEAD_WIDTH), embed_dim)
        self.transformer = Transformer(transformer_width, transformer_layers, transformer_heads)
        self.vocab_size = vocab_size
        self.token_embedding = nn.Embedding(vocab_size, transformer_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, transformer_width))
        self.ln_final = LayerNorm(transformer_width)
        self.text_projection = nn.Parameter(torch.empty(transformer_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * math.log(1 / 0.07))  # CLIP paper Sec. 2.5: tau = 0.07
        self.initialize_parameters()

    def initialize_parameters(self):
        """openai/CLIP `CLIP.initialize_parameters` (ViT branch); used only for random (tiny) models."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = (width ** -0.5) * ((2 * layers) ** -0.5)
        attn_std, fc_std = width ** -0.5, (2 * width) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        for block in self.visual.transformer.resblocks:  # nn.MultiheadAttention's own init in upstream
            nn.init.xavier_uniform_(block.attn.in_proj_weight)
            nn.init.zeros_(block.attn.out_proj.bias)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    def encode_image(self, image: torch.Tensor, prompts: torch.Tensor | None = None,
                     deep_prompts: Sequence[torch.Tensor | None] = (), return_context: bool = False):
        """(B, 3, R, R) -> (B, E). Visual prompts and the context: see `VisionTransformer.forward`."""
        return self.visual(image, prompts=prompts, deep_prompts=deep_prompts, return_context=return_context)

    def encode_text(self, text: torch.Tensor, truncate: bool = True) -> torch.Tensor:
        """Token ids (N, L) -> text features (N, E). The end-of-text token has the largest id (openai/CLIP)."""
        return self.encode_text_embeddings(self.token_embedding(text), text.argmax(dim=-1), truncate=truncate)

    def encode_text_embeddings(self, x: torch.Tensor, eot_idx: torch.Tensor,
                               deep_prompts: Sequence[torch.Tensor | None] = (),
                               truncate: bool = True, return_context: bool = False):
        """Text features from token embeddings (the entry point of CoOp's `TextEncoder`).

        Args:
            x: (N, L, D) token embeddings, prompts already in place, *without* positional embedding.
            eot_idx: (N,) position of the end-of-text token of each sequence (argmax of the token ids).
            deep_prompts: deep_prompts[i - 1] (M, D) or (N, M, D) replaces tokens 1..M (right after the
                start-of-text token) before block i (IVLP / MaPLe / PromptSRC / ProMetaR / MetaPrompt).
            truncate: drop the positions after the longest end-of-text token of the batch. Exact under the
                causal mask (no position attends to later ones); several times faster for short prompts.
            return_context: also return the mean of the final hidden states (after ln_final) over the positions up
                to each sequence's end-of-text token and over the sequences, (D,) (GRAM's regulator context).
        Returns: (N, E) features, before normalisation (and the context).
        """
        N, L, _ = x.shape
        eot_idx = eot_idx.to(device=x.device, dtype=torch.long)
        if eot_idx.shape != (N,) or int(eot_idx.min()) < 0 or int(eot_idx.max()) >= L:
            raise ValueError(f"eot_idx must be {N} positions in [0, {L}); got shape {tuple(eot_idx.shape)} "
                             f"and range [{int(eot_idx.min())}, {int(eot_idx.max())}]")
        max_prompt = max((p.shape[-2] for p in deep_prompts if p is not None), default=0)
        if max_prompt and int(eot_idx.min()) <= max_prompt:
            raise ValueError(f"deep prompts of {max_prompt} tokens would overwrite an end-of-text token")
        if truncate:  # keep every end-of-text token: the slice ends right after the last one
            x = x[:, :int(eot_idx.max()) + 1]  # (N, L', D)
        x = x + self.positional_embedding[:x.shape[1]].to(x.dtype)  # (N, L', D)
        x = self.transformer(x, causal=True, deep_prompts=deep_prompts, prompt_start=1)  # (N, L', D)
        x = self.ln_final(x)
        features = x[torch.arange(N, device=x.device), eot_idx] @ self.text_projection  # (N, E)
        if not return_context:
            return features
        # GRAM's regulator context (SUPMER: the mean of T5's last hidden state; reconstruction: CLIP's, up to each EOT)
        valid = (torch.arange(x.shape[1], device=x.device)[None, :] <= eot_idx[:, None]).to(x.dtype)  # (N, L')
        return features, ((x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)).mean(0)  # (D,)

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        """Returns (logits_per_image (B, N), logits_per_text (N, B)) as openai/CLIP."""
        image_features = F.normalize(self.encode_image(image), dim=-1)  # (B, E)
        text_features = F.normalize(self.encode_text(text), dim=-1)  # (N, E)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()  # (B, N)
        return logits_per_image, logits_per_image.t()


def tiny_config(**overrides) -> dict:
    """A small CLIP for tests and demos: the real tokenizer and vocabulary, widths that keep the head width 64."""
    config = {"embed_dim": 32, "image_resolution": 32, "vision_layers": 2, "vision_width": 64,
              "vision_patch_size": 8, "context_length": CONTEXT_LENGTH, "vocab_size": 49408,
              "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 2}
    config.update(overrides)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Architecture inference and checkpoint loading (openai/CLIP model.py `build_model`, clip.py `load`)


def infer_config(state_dict: dict) -> dict:
    """The constructor arguments of `CLIP`, read off the tensor shapes of an OpenAI-layout state dict."""
    if "visual.layer1.0.conv1.weight" in state_dict or "visual.attnpool.positional_embedding" in state_dict:
        raise CheckpointError(f"ResNet CLIP checkpoints ({', '.join(RESNET_MODELS)}) are not supported; "
                              f"supported: ViT checkpoints ({', '.join(MODELS)})")
    required = ["visual.proj", "visual.conv1.weight", "visual.positional_embedding", "text_projection",
                "positional_embedding", "token_embedding.weight", "ln_final.weight"]
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise CheckpointError(f"not a CLIP ViT state dict: missing {', '.join(missing)}")
    conv = state_dict["visual.conv1.weight"]  # (Dv, 3, P, P)
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    width = state_dict["ln_final.weight"].shape[0]
    return {
        "embed_dim": state_dict["text_projection"].shape[1],
        "image_resolution": conv.shape[-1] * grid,
        "vision_layers": sum(k.startswith("visual.") and k.endswith(".attn.in_proj_weight") for k in state_dict),
        "vision_width": conv.shape[0],
        "vision_patch_size": conv.shape[-1],
        "context_length": state_dict["positional_embedding"].shape[0],
        "vocab_size": state_dict["token_embedding.weight"].shape[0],
        "transformer_width": width,
        "transformer_heads": max(1, width // HEAD_WIDTH),
        "transformer_layers": len({k.split(".")[2] for k in state_dict if k.startswith("transformer.resblocks.")}),
    }


def build_model(state_dict: dict) -> CLIP:
    """A float32 CLIP in eval mode with the weights of `state_dict` (strict: every key must match)."""
    state_dict = {k: v for k, v in state_dict.items()
                  if k not in TORCHSCRIPT_EXTRA_KEYS and not k.endswith("attn_mask")}  # TorchScript-only entries
    model = CLIP(**infer_config(state_dict))
    result = model.load_state_dict(state_dict, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(f"state dict does not match the CLIP layout: missing {result.missing_keys[:5]}, "
                              f"unexpected {result.unexpected_keys[:5]}")
    return model.eval()


# TorchScript pickles name legacy storage classes; the bytes of `<archive>/data/<key>` are read with this dtype.
_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptObject:
    """Stands in for a TorchScript class (`__torch__.*`) while unpickling: it only records its attributes."""

    def __setstate__(self, state):
        self.__dict__.update(state if isinstance(state, dict) else {})


def _rebuild_tensor(storage, offset, size, stride, *unused):
    return storage.as_strided(size, stride, offset)


class _TorchScriptUnpickler(pickle.Unpickler):
    """Reads `data.pkl` of a TorchScript zip archive; allows only tensors, storages and attribute containers."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str):
        super().__init__(io.BytesIO(data))
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module.startswith("__torch__"):
            return _ScriptObject
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise CheckpointError(f"refused: its data.pkl asks for {module}.{name}, which a CLIP checkpoint never holds "
                              "(unpickling it could run code); use OpenAI's original file")

    def persistent_load(self, pid):  # ('storage', dtype, key, location, numel)
        _, dtype, key, _, _ = pid
        data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
        return torch.frombuffer(data, dtype=dtype) if data else torch.empty(0, dtype=dtype)


def _tensors_of(obj, prefix: str = "") -> dict:
    """Flatten the attributes of an unpickled TorchScript module tree into {dotted name: tensor}."""
    out = {}
    for name, value in vars(obj).items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            out.update(_tensors_of(value, f"{prefix}{name}."))
    return out


# What reading arbitrary bytes as a zip or pickle can raise (a text file, a truncated download, a foreign format).
UNREADABLE_FILE_ERRORS = (zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError, EOFError, KeyError, IndexError,
                          ValueError, TypeError, AttributeError, StopIteration, UnicodeDecodeError)


def read_state_dict(path) -> dict:
    """Tensors of a checkpoint file: an OpenAI TorchScript archive (read without running TorchScript), or a file
    written by `torch.save` holding a state dict (optionally under a "state_dict" key)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a model name ({', '.join(MODELS)}) "
                              "or the path of an OpenAI CLIP .pt file")
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if any(n.endswith("/constants.pkl") for n in names):  # TorchScript, not torch.save
                    pkl = next(n for n in names if n.endswith("/data.pkl"))
                    prefix = pkl[:-len("/data.pkl")]
                    return _tensors_of(_TorchScriptUnpickler(archive.read(pkl), archive, prefix).load())
        with warnings.catch_warnings():  # torch warns on pickle protocols above 2 before refusing or reading them
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except CheckpointError as e:  # our unpickler refused a global: say which file and why
        raise CheckpointError(f"cannot read {path}: {e}") from None
    except UNREADABLE_FILE_ERRORS:
        # our sentence only: torch's weights_only text would suggest weights_only=False, which runs the file's code
        raise CheckpointError(f"cannot read {path}: not a CLIP checkpoint (truncated, or not an OpenAI .pt / "
                              "torch.save file); pass a model name or the path of a CLIP .pt file") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"checkpoint {path} does not hold a state dict of tensors")
    return obj


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(name_or_path) -> str:
    """What identifies a backbone across machines: a model name, or the SHA256 of a checkpoint file (hashed once per
    file version: every evaluation of a run asks for it)."""
    if str(name_or_path) in MODELS:
        return str(name_or_path)
    path = Path(name_or_path).expanduser().resolve()
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:  # keyed by size and mtime: a rewritten file re-hashes
    return sha256_of(path)


def download(url: str, root) -> Path:
    """Fetch `url` into `root` unless a file with the SHA256 named in the URL is already there.

    A cached file with the wrong checksum is re-fetched, never used; a download is written to a `.part` file and
    renamed only once its checksum is verified, so an interrupted download never leaves a bad checkpoint behind.
    """
    from tqdm import tqdm  # lazy: only downloads need it

    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    expected = url.split("/")[-2]
    target = root / os.path.basename(url)
    if target.is_file():
        if sha256_of(target) == expected:
            return target
        warnings.warn(f"{target} exists but its SHA256 does not match {expected}; downloading it again")
    partial = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(url) as source, open(partial, "wb") as out:
            total = int(source.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="iB", unit_scale=True, unit_divisor=1024, desc=target.name) as bar:
                for chunk in iter(lambda: source.read(1 << 20), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        partial.unlink(missing_ok=True)
        raise CheckpointError(f"could not download {url} ({getattr(e, 'reason', e)}); without network, fetch it "
                              f"elsewhere and put it at {target}, or pass the file's path") from None
    if sha256_of(partial) != expected:
        partial.unlink()
        raise CheckpointError(f"the file downloaded from {url} does not match its SHA256 {expected}; "
                              "it was deleted; try again")
    os.replace(partial, target)
    return target


def load(name_or_path, device=None, download_root=None) -> CLIP:
    """A CLIP model from an OpenAI model name (downloaded and verified) or a checkpoint path; float32, eval mode.

    Args:
        name_or_path: one of `MODELS` ("ViT-B/16", ...) or the path of a TorchScript archive / state-dict file.
        device: defaults to "cuda" when available, else "cpu".
        download_root: cache folder for named models (default ~/.cache/clip).
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if str(name_or_path) in MODELS:
        path = download(MODELS[str(name_or_path)], download_root or DEFAULT_DOWNLOAD_ROOT)
    elif str(name_or_path) in RESNET_MODELS:
        raise CheckpointError(f"{name_or_path} (a ResNet CLIP) is not supported; known models: {', '.join(MODELS)}")
    elif Path(name_or_path).expanduser().exists():
        path = Path(name_or_path).expanduser()
    else:
        raise CheckpointError(f"{name_or_path} is neither a known model ({', '.join(MODELS)}) nor an existing file")
    try:
        return build_model(read_state_dict(path)).to(device)
    except CheckpointError as e:
        raise CheckpointError(str(e) if str(path) in str(e) else f"{path}: {e}") from None


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer (openai/CLIP simple_tokenizer.py): byte-level BPE over ftfy-cleaned, lower-cased text


@lru_cache
def bytes_to_unicode() -> dict:
    """GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def basic_clean(text: str) -> str:
    text = ftfy.fix_text(text)
    return html.unescape(html.unescape(text)).strip()


def whitespace_clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class SimpleTokenizer:
    N_MERGES = 49152 - 256 - 2  # openai simple_tokenizer.py: merges[1:49152-256-2+1]
    PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, bpe_path=BPE_PATH):
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        with gzip.open(bpe_path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1:self.N_MERGES + 1]]
        vocab = list(self.byte_encoder.values())
        vocab += [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
        self.encoder = {token: i for i, token in enumerate(vocab)}
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.cache = {"<|startoftext|>": "<|startoftext|>", "<|endoftext|>": "<|endoftext|>"}
        self.pat = re.compile(self.PATTERN, re.IGNORECASE)
        self.sot_token, self.eot_token = self.encoder["<|startoftext|>"], self.encoder["<|endoftext|>"]

    def bpe(self, token: str) -> str:
        """Merge the lowest-ranked adjacent pair until none is in the merge table; the last char ends a word."""
        if token in self.cache:
            return self.cache[token]
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = {(a, b) for a, b in itertools.pairwise(word)}
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        self.cache[token] = " ".join(word)
        return self.cache[token]

    def encode(self, text: str) -> list:
        tokens = []
        for piece in re.findall(self.pat, whitespace_clean(basic_clean(text)).lower()):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            tokens.extend(self.encoder[t] for t in self.bpe(piece).split(" "))
        return tokens

    def decode(self, tokens) -> str:
        text = "".join(self.decoder[int(t)] for t in tokens)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")


@lru_cache
def _tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(texts, context_length: int = CONTEXT_LENGTH, truncate: bool = False) -> torch.Tensor:
    """Token ids (N, context_length), int64: [SOT] + BPE + [EOT], zero-padded (openai/CLIP `clip.tokenize`)."""
    tokenizer = _tokenizer()
    texts = [texts] if isinstance(texts, str) else list(texts)
    result = torch.zeros(len(texts), context_length, dtype=torch.long)  # (N, L)
    for i, text in enumerate(texts):
        tokens = [tokenizer.sot_token] + tokenizer.encode(text) + [tokenizer.eot_token]
        if len(tokens) > context_length:
            if not truncate:
                raise ValueError(f"input {text!r} is {len(tokens)} tokens, longer than the context length "
                                 f"{context_length}; shorten it or pass truncate=True")
            tokens = tokens[:context_length - 1] + [tokenizer.eot_token]
        result[i, :len(tokens)] = torch.tensor(tokens)
    return result


def main(argv=None):
    """`python clip_model.py ViT-B/16 [--download-root DIR]`: download, verify, load and describe a checkpoint."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("model", help=f"a model name ({', '.join(MODELS)}) or a checkpoint path")
    parser.add_argument("--download-root", default=None, help="cache folder (default ~/.cache/clip)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        model = load(args.model, device=args.device, download_root=args.download_root)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {n_params / 1e6:.1f} M parameters, image {model.visual.input_resolution} px, "
          f"context {model.context_length}, embed dim {model.text_projection.shape[1]}")


if __name__ == "__main__":
    main()
