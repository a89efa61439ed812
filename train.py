"""Train a prompt learner on few shots and evaluate it: the CoOp-family protocols in one flat script.

`python train.py --dataset dtd --root DATA --method ivlp --shots 16 --seed 1` trains IVLP on DTD's base classes
(base-to-new, CoCoOp arXiv:2203.05557v2 Sec. 4.1) and writes `results.json` (base, new, HM) and the prompts into
`output/base2new/dtd/ivlp/shots_16/seed_1/`. Methods: zero-shot CLIP, CoOp (arXiv:2109.01134v6), IVLP (MaPLe
arXiv:2210.03117v3 Sec. 4), PromptSRC (arXiv:2307.06948v2); defaults per method are the official configs.
Optimisation as Dassl: SGD, one constant warm-up epoch, then cosine decay stepped per epoch; the final model is
the last epoch's (no validation-based selection), as in all three papers.
Not included: ProMetaR, MetaPrompt and GRAM (their own issues), CoCoOp and MaPLe, multi-GPU.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import clip_model
import data
import prompts

# Official configs (shared/spec/protocol.md Sec. 6.1): CoOp configs/trainers/CoOp/vit_b16.yaml + COOP.md epochs;
# IVLP and PromptSRC: muzairkhattak/PromptSRC configs/trainers/{IVLP,PromptSRC}/vit_b16_c2_ep20_batch4_4+4ctx.yaml.
METHOD_DEFAULTS = {
    "zeroshot": {"epochs": 0, "batch_size": 32, "lr": 0.0, "ctx_init": None},
    "coop": {"epochs": None, "batch_size": 32, "lr": 0.002, "ctx_init": None},
    "ivlp": {"epochs": 20, "batch_size": 4, "lr": 0.0025, "ctx_init": "a photo of a"},
    "promptsrc": {"epochs": 20, "batch_size": 4, "lr": 0.0025, "ctx_init": "a photo of a"},
}
COOP_EPOCHS_BY_SHOTS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}  # CoOp COOP.md; 200 for full data
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # Dassl defaults.py OPTIM.MOMENTUM / WEIGHT_DECAY
WARMUP_EPOCHS, WARMUP_LR = 1, 1e-5  # CoOp/PromptSRC configs: WARMUP_EPOCH 1, WARMUP_TYPE constant, CONS_LR 1e-5
TEXT_LOSS_WEIGHT, IMAGE_LOSS_WEIGHT = 25.0, 10.0  # PromptSRC configs TEXT_LOSS_WEIGHT / IMAGE_LOSS_WEIGHT
GPA_MEAN, GPA_STD = 15.0, 1.0  # PromptSRC base-to-new configs GPA_MEAN / GPA_STD (epochs 1..20)
EPOCH_SEED_STRIDE = 1000  # epoch e draws its batches and augmentations from seed * stride + e: resumable
PROTOCOL_EVAL = {"cross_dataset": ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                                   "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"],
                 "domain_generalization": ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="dtd", help="training dataset (data.DATASETS)")
    p.add_argument("--root", default="data", help="folder holding the datasets in CoOp's layout")
    p.add_argument("--method", default="ivlp", choices=prompts.METHODS)
    p.add_argument("--protocol", default="base2new",
                   choices=["base2new", "fewshot", "cross_dataset", "domain_generalization"])
    p.add_argument("--shots", type=int, default=16, help="K images per class (CoOp: 1, 2, 4, 8, 16)")
    p.add_argument("--seed", type=int, default=1, help="papers report seeds 1, 2, 3")
    p.add_argument("--eval-datasets", default=None, help="comma list for cross_dataset / DG (default: the papers')")
    p.add_argument("--target-domain", default=None, help="held-out domain of a DG suite (pacs, vlcs, ...)")
    p.add_argument("--backbone", default="ViT-B/16", help="CLIP model name or checkpoint path")
    p.add_argument("--epochs", type=int, default=None, help="default: the method's official config")
    p.add_argument("--batch-size", type=int, default=None, help="default: the method's official config")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate; default: the official config")
    p.add_argument("--n-ctx", type=int, default=16, help="CoOp context length M (CoOp: 16)")
    p.add_argument("--ctx-init", default="", help='words for the initial context, e.g. "a photo of a"')
    p.add_argument("--class-specific", action="store_true", help="CoOp class-specific context (CSC)")
    p.add_argument("--class-token-position", default="end", choices=prompts.CLASS_TOKEN_POSITIONS)
    p.add_argument("--n-ctx-text", type=int, default=4, help="IVLP text prompt tokens (PromptSRC: 4)")
    p.add_argument("--n-ctx-vision", type=int, default=4, help="IVLP vision prompt tokens (PromptSRC: 4)")
    p.add_argument("--text-depth", type=int, default=9, help="IVLP text prompt depth (PromptSRC: 9)")
    p.add_argument("--vision-depth", type=int, default=9, help="IVLP vision prompt depth (PromptSRC: 9)")
    p.add_argument("--num-workers", type=int, default=data.NUM_WORKERS)
    p.add_argument("--output-dir", default=None, help="default: output/<protocol>/<dataset>/<method>/shots_K/seed_S")
    p.add_argument("--resume", action="store_true", help="continue from <output-dir>/checkpoint.pt")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on --subsample classes")
    p.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only")
    p.add_argument("--subsample", default="new", choices=["base", "new", "all"], help="classes for --eval-only")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars (logs)")
    args = p.parse_args(argv)
    defaults = METHOD_DEFAULTS[args.method]
    args.epochs = 0 if args.method == "zeroshot" else args.epochs if args.epochs is not None else \
        defaults["epochs"] if defaults["epochs"] is not None else COOP_EPOCHS_BY_SHOTS.get(args.shots, 200)
    args.batch_size = args.batch_size or defaults["batch_size"]
    args.lr = args.lr if args.lr is not None else defaults["lr"]
    args.ctx_init = args.ctx_init or defaults["ctx_init"]
    args.output_dir = args.output_dir or os.path.join(
        "output", args.protocol, args.dataset, args.method, f"shots_{args.shots}", f"seed_{args.seed}")
    return args


def seed_everything(seed: int):
    import random

    import numpy as np
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def dassl_lr(epoch: int, base_lr: float, epochs: int) -> float:
    """Dassl ConstantWarmupScheduler(CosineAnnealingLR(T_max=epochs)): epoch 0 at 1e-5, then epoch e >= 1 at
    base * (1 + cos(pi * (e - 1) / epochs)) / 2 (the cosine starts only after the warm-up; it never reaches 0)."""
    if epoch < WARMUP_EPOCHS:
        return WARMUP_LR
    return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - WARMUP_EPOCHS) / epochs))


def learner_for(args, clip, dataset, classnames):
    templates = [data.zero_shot_template(dataset)]
    return prompts.build_learner(args.method, clip, classnames, templates, n_ctx=args.n_ctx, ctx_init=args.ctx_init,
                                 class_specific=args.class_specific, class_token_position=args.class_token_position,
                                 n_ctx_text=args.n_ctx_text, n_ctx_vision=args.n_ctx_vision,
                                 text_depth=args.text_depth, vision_depth=args.vision_depth)


def training_losses(args, learner, teacher, images, labels) -> dict:
    """CE on CLIP logits (CoOp Eq. 3); PromptSRC adds its L1 consistency and KL terms (PromptSRC Eq. 2-4)."""
    image_features = learner.encode_image(images)  # (B, E)
    text_features = learner.encode_text()  # (C, E)
    logits = prompts.clip_logits(learner.clip, image_features, text_features)  # (B, C)
    losses = {"loss_ce": F.cross_entropy(logits, labels)}
    if teacher is not None:
        frozen_image = teacher.image_features(images)  # (B, E)
        losses["loss_reg_text"] = TEXT_LOSS_WEIGHT * prompts.consistency_l1(text_features, teacher.text_features)
        losses["loss_reg_image"] = IMAGE_LOSS_WEIGHT * prompts.consistency_l1(image_features, frozen_image)
        losses["loss_kl"] = prompts.kl_to_zero_shot(logits, teacher.logits(frozen_image))
    return losses, logits


def save_atomic(obj, path):
    """Write to a temporary file, then rename: an interrupted save never leaves a broken checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def evaluate(args, clip, state, dataset, subsample, device, target_domain=None) -> dict:
    """Accuracy and macro-F1 of the prompts `state` on a dataset's test set restricted to `subsample` classes."""
    _, _, test, classnames = data.build_dataset(dataset, args.root, shots=args.shots, seed=args.seed,
                                                subsample=subsample, target_domain=target_domain)
    learner = learner_for(args, clip, dataset, classnames)
    prompts.load_prompts(learner, state)
    loader = data.build_loader(test, train=False, size=clip.visual.input_resolution, num_workers=args.num_workers)
    labels, preds = prompts.predict(learner, loader, device, autocast=device == "cuda")
    return data.classification_metrics(labels, preds)


def evaluation_targets(args):
    """(name in results, dataset, class subset, target domain) for each test of the protocol."""
    if args.protocol == "base2new":
        return [("base", args.dataset, "base", None), ("new", args.dataset, "new", None)]
    if args.protocol == "fewshot" or args.target_domain:
        return [("test", args.dataset, "all", args.target_domain)]
    names = args.eval_datasets.split(",") if args.eval_datasets else PROTOCOL_EVAL[args.protocol]
    return [(name, name, "all", None) for name in [args.dataset, *names]]


def write_results(args, splits, device, wall_time):
    results = {"splits": splits, "config": vars(args), "seed": args.seed, "wall_time_s": round(wall_time, 1),
               "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    if "base" in splits and "new" in splits:
        results["hm"] = data.harmonic_mean(splits["base"]["accuracy"], splits["new"]["accuracy"])
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    path = os.path.join(args.output_dir, "results.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(results, f, indent=2)
    os.replace(f"{path}.tmp", path)
    return results


def main(args):
    start_time, device = time.time(), "cuda" if torch.cuda.is_available() else "cpu"
    seed_everything(args.seed)
    clip = clip_model.load(args.backbone, device=device)
    if args.eval_only:  # evaluate a saved model on any class subset
        ckpt = torch.load(args.checkpoint, map_location=device, weights_only=True)
        metrics = evaluate(args, clip, ckpt["prompts"], args.dataset, args.subsample, device, args.target_domain)
        print(json.dumps(write_results(args, {args.subsample: metrics}, device, time.time() - start_time)["splits"]))
        return
    subsample = "base" if args.protocol == "base2new" else "all"
    train, _, _, classnames = data.build_dataset(args.dataset, args.root, shots=args.shots, seed=args.seed,
                                                 subsample=subsample, download=args.download,
                                                 target_domain=args.target_domain)
    learner = learner_for(args, clip, args.dataset, classnames)
    params = prompts.prompt_parameters(learner)
    teacher = prompts.FrozenTeacher(clip, classnames, data.IMAGENET_TEMPLATES_PROMPTSRC) \
        if args.method == "promptsrc" else None
    gpa_weights = prompts.gaussian_epoch_weights(args.epochs, GPA_MEAN, GPA_STD) if teacher is not None else None
    optimizer = torch.optim.SGD(params.values(), lr=args.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY) \
        if params else None  # zero-shot CLIP has nothing to train
    scaler = torch.amp.GradScaler(enabled=device == "cuda")  # fp16 autocast on CUDA, fp32 master prompts
    ckpt_path, start_epoch, snapshots = os.path.join(args.output_dir, "checkpoint.pt"), 0, []
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        prompts.load_prompts(learner, ckpt["prompts"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, snapshots = ckpt["epoch"], ckpt["snapshots"]
    print(json.dumps(vars(args)))
    for epoch in range(start_epoch, args.epochs):
        # --- ALGO: one epoch of SGD on the few-shot training set (CoOp Sec. 3.2, Dassl schedule) ---
        lr = dassl_lr(epoch, args.lr, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(args.seed * EPOCH_SEED_STRIDE + epoch)
        loader = data.build_loader(train, train=True, batch_size=args.batch_size, size=clip.visual.input_resolution,
                                   num_workers=args.num_workers, seed=args.seed * EPOCH_SEED_STRIDE + epoch)
        learner.train()
        bar = progress(loader, f"epoch {epoch + 1}/{args.epochs}", args.no_progress)
        for batch in bar:
            images, labels = batch["img"].to(device, non_blocking=True), batch["label"].to(device)
            with torch.autocast(device_type=device, enabled=device == "cuda"):
                losses, logits = training_losses(args, learner, teacher, images, labels)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            accuracy = (logits.argmax(-1) == labels).float().mean().item() * 100
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{accuracy:.1f}", lr=f"{lr:.2e}")
        # --- bookkeeping: Gaussian prompt aggregation snapshot, atomic checkpoint ---
        if gpa_weights is not None:
            snapshots.append({k: v.detach().clone() for k, v in params.items()})
        save_atomic({"prompts": {k: v.detach() for k, v in params.items()}, "optimizer": optimizer.state_dict(),
                     "epoch": epoch + 1, "snapshots": snapshots, "config": vars(args)}, ckpt_path)
    if gpa_weights is not None and snapshots:  # PromptSRC Sec. 3.3: the final prompts are the Gaussian average
        prompts.load_prompts(learner, prompts.aggregate_prompts(snapshots, gpa_weights))
    final = {k: v.detach() for k, v in prompts.prompt_parameters(learner).items()}
    save_atomic({"prompts": final, "config": vars(args)}, os.path.join(args.output_dir, "prompts.pt"))
    splits = {name: evaluate(args, clip, final, dataset, subsample, device, target)
              for name, dataset, subsample, target in evaluation_targets(args)}
    results = write_results(args, splits, device, time.time() - start_time)
    summary = ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in splits.items())
    print(f"{summary}" + (f", HM {results['hm']:.2f}" if "hm" in results else "")
          + f"; results in {os.path.join(args.output_dir, 'results.json')}")


def progress(iterable, desc, disable):
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=disable, leave=False)


if __name__ == "__main__":
    try:
        main(parse_args())
    except (data.DataError, clip_model.CheckpointError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
