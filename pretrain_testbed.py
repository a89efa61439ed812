"""Pretrain the offline testbed's small CLIP on the procedural world of `data.py` (issue #8), on a CPU.

Real CLIP weights and the benchmark datasets cannot be fetched on machines without a network, and a randomly
initialised CLIP has no zero-shot knowledge, so base-to-new generalization cannot be seen with it. This script
makes a CLIP that has some: the same `clip_model.CLIP` (OpenAI's architecture, tokenizer and full 49,408-token
vocabulary), small (vision 128 wide / 3 layers / patch 8 at 32 px; text 64 wide / 3 layers; context 16), trained
contrastively (CLIP arXiv:2103.00020v1 Sec. 2.3) on captions of the world's *base* colour-shape combinations only
(regime (b) of shared/spec/testbed.md): the new classes are new combinations of words it has seen.

    python pretrain_testbed.py            # ~15 min on 2 CPU cores; writes testbed/clip_world.pt (+ .sha256)

The loss counts every caption consistent with an image as a positive (captions mention a subset of the scene's
attributes, so several captions in a batch can describe one image). Only the token-embedding rows of words the
world uses are trained; the others keep their random init (the file is a plain CLIP state dict in fp16, < 10 MB).
Not included: data augmentation beyond the world's own randomness; mixed precision.
"""

import argparse
import hashlib
import math
import os
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import clip_model
import data
import prompts

TESTBED_CONFIG = {"embed_dim": 64, "image_resolution": data.WORLD_IMAGE_SIZE, "vision_layers": 3,
                  "vision_width": 128, "vision_patch_size": 8, "context_length": 16, "vocab_size": 49408,
                  "transformer_width": 64, "transformer_heads": 1, "transformer_layers": 3}  # testbed.md Sec. 2
OUTPUT = Path(__file__).resolve().parent / "testbed" / "clip_world.pt"


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (~0.75 s each on one core)")
    p.add_argument("--threads", type=int, default=1, help="torch threads: one is faster for these small ops")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--images", type=int, default=50_000, help="images rendered once; captions redrawn each pass")
    p.add_argument("--lr", type=float, default=1.5e-3, help="AdamW peak lr, cosine decay (testbed.md Sec. 2)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(OUTPUT))
    return p.parse_args()


def render_pretraining_set(n_images: int, rng: random.Random):
    """Images of base colour-shape combinations only (regime (b)), as uint8 (N, 3, H, W), and their scenes."""
    base = data.world_classes()[:len(data.world_classes()) // 2]
    scenes = [data.sample_world_attributes(rng, *rng.choice(base)) for _ in range(n_images)]
    images = torch.stack([torch.frombuffer(bytearray(data.render_world_image(a, rng).tobytes()), dtype=torch.uint8)
                          for a in scenes])  # (N, H*W*3)
    size = data.WORLD_IMAGE_SIZE
    return images.view(n_images, size, size, 3).permute(0, 3, 1, 2).contiguous(), scenes  # (N, 3, H, W)


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(data.CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(data.CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std  # (B, 3, H, W)


ATTRIBUTES = "cspzo"  # colour, shape, pattern, size, position (data.CAPTION_TEMPLATES keys)


def positives(scenes: list, mentioned: list) -> torch.Tensor:
    """(B, B) mask: caption j is consistent with image i iff every attribute it mentions matches scene i."""
    values = torch.tensor([[hash(scene[k]) for k in ATTRIBUTES] for scene in scenes])  # (B, 5)
    said = torch.tensor([[k in m for k in ATTRIBUTES] for m in mentioned])  # (B, 5) caption j mentions k
    agree = values[:, None, :] == values[None, :, :]  # (B_image, B_caption, 5)
    return (agree | ~said[None, :, :]).all(-1).float()  # (B, B)


def multi_positive_contrastive_loss(logits: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """Symmetric CLIP loss with soft targets spread uniformly over the positives of each row / column."""
    image_to_text = -(positive / positive.sum(1, keepdim=True) * F.log_softmax(logits, 1)).sum(1).mean()
    text_to_image = -(positive / positive.sum(0, keepdim=True) * F.log_softmax(logits, 0)).sum(0).mean()
    return (image_to_text + text_to_image) / 2


def world_token_ids() -> torch.Tensor:
    """Every token id the world's captions, class prompts and templates can produce (rows worth training)."""
    words = list(data.WORLD_COLOURS) + list(data.WORLD_SHAPES) + list(data.WORLD_PATTERNS) \
        + list(data.WORLD_SIZES) + list(data.WORLD_POSITIONS) + ["a photo of a ."] \
        + [t.format(c="", s="", p="", z="", o="") for t in data.CAPTION_TEMPLATES]
    return torch.unique(clip_model.tokenize(words, context_length=TESTBED_CONFIG["context_length"]))


@torch.no_grad()
def zero_shot_accuracy(model, root) -> dict:
    """Zero-shot accuracy (%) on the downstream task's base and new test classes, "a photo of a {}."."""
    result = {}
    for subsample in ("base", "new"):
        _, _, test, classnames = data.build_dataset("world", root, shots=0, subsample=subsample)
        learner = prompts.ZeroShotCLIP(model, classnames, [data.zero_shot_template("world")])
        loader = data.build_loader(test, train=False, size=data.WORLD_IMAGE_SIZE, num_workers=0)
        result[subsample] = data.classification_metrics(*prompts.predict(learner, loader, "cpu"))["accuracy"]
    return result


def save_fp16(model, path: Path) -> str:
    """Atomic fp16 state-dict file next to its SHA256 (the loader restores float32)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save(state, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    path.with_name(path.name + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    rng, start = random.Random(args.seed), time.time()
    images, scenes = render_pretraining_set(args.images, rng)
    print(f"rendered {len(scenes)} images in {time.time() - start:.0f} s")
    model = clip_model.CLIP(**TESTBED_CONFIG).train()
    row_mask = torch.zeros(TESTBED_CONFIG["vocab_size"], 1)
    row_mask[world_token_ids()] = 1
    model.token_embedding.weight.register_hook(lambda g: g * row_mask)  # unused rows keep their init
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=args.lr)
    order = torch.randperm(args.images)
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = order[(step * args.batch_size + torch.arange(args.batch_size)) % args.images]
        batch_scenes = [scenes[i] for i in idx.tolist()]
        captions = [data.world_caption(scene, rng) for scene in batch_scenes]
        text = clip_model.tokenize([c for c, _ in captions], context_length=TESTBED_CONFIG["context_length"])
        image_features = F.normalize(model.encode_image(normalize_images(images[idx])), dim=-1)  # (B, E)
        text_features = F.normalize(model.encode_text(text), dim=-1)  # (B, E)
        logits = model.logit_scale.exp() * image_features @ text_features.t()  # (B, B)
        loss = multi_positive_contrastive_loss(logits, positives(batch_scenes, [m for _, m in captions]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  logit scale {model.logit_scale.exp().item():.1f}  "
                  f"lr {lr:.2e}  {time.time() - start:.0f} s", flush=True)
    model.eval()
    digest = save_fp16(model, Path(args.output))
    shipped = clip_model.load(args.output, device="cpu")  # what users get: the fp16 file, back in float32
    with tempfile.TemporaryDirectory() as root:
        accuracy = zero_shot_accuracy(shipped, root)
    print(f"wrote {args.output} (sha256 {digest}); zero-shot accuracy on the world's downstream test set: "
          f"base {accuracy['base']:.1f} %, new {accuracy['new']:.1f} % (chance {100 / 24:.1f} %); "
          f"{time.time() - start:.0f} s in all")


if __name__ == "__main__":
    main()
