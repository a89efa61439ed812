"""Train a prompt learner on few shots and evaluate it: the CoOp-family protocols in one flat script.

`python train.py` with no arguments runs ProMetaR on the offline testbed (`--dataset world`, the shipped small CLIP,
about a minute on a 2-core CPU). `python train.py --dataset dtd --root DATA --method ivlp --shots 16` trains IVLP on
DTD's base classes (base-to-new, CoCoOp arXiv:2203.05557v2 Sec. 4.1) and writes `results.json` (base, new, HM)
and the prompts into `output/base2new/dtd/ivlp/shots_16/seed_1/`. Methods: zero-shot CLIP, CoOp
(arXiv:2109.01134v6), CoCoOp (arXiv:2203.05557v2), IVLP (MaPLe arXiv:2210.03117v3 Sec. 4), MaPLe (same paper, Sec. 3), PromptSRC
(arXiv:2307.06948v2); defaults per method are the official configs.
Optimisation as Dassl: SGD, one constant warm-up epoch, then cosine decay stepped per epoch; the final model is
the last epoch's (no validation-based selection), as in all three papers.
ProMetaR (arXiv:2404.00851v1): `--method prometar [--base ivlp|coop]`, the released iteration (`prometar_step`)
with the bilevel update of `meta.py`; every behaviour of the released code that changes the numbers is a flag.
MetaPrompt (arXiv:2212.04196v2, TIP 2024): `--method metaprompt`, the released iteration (`metaprompt_step`): an
in-domain step, then the domain-split meta update of `meta.py` (class halves in base-to-new, leave-one-domain-out
in `--protocol multi_source_dg`, which `--target-domain all` runs for every held-out domain); the released code's
behaviours are flags, `--metaprompt-clean` turns them all off.
Your own images: `--dataset folder --root DIR` (DIR/<class>/<image>, see data.read_folder), few-shot over all its
classes (`--protocol base2new`: its first half), `--template` for the hand-made prompts; the class list is saved
with the prompts for `eval.py predict`.
Every input that needs no download (datasets, folders, shots, target domain, backbone, checkpoint, output folder) is
checked before the backbone is loaded (`check_inputs`). A run folder is never overwritten, nor shared by two
configurations, unless asked (`--overwrite`; `--resume` continues); it gets `config.json` and `log.jsonl`, one JSON
line per iteration.
GRAM (arXiv:2303.06571v2; no released code, its form from SUPMER's): `--method gram --pairs PAIRS.csv` meta-trains a
prompt initialisation and gradient regulators on image-caption pairs; `--method coop|ivlp --gram FILE` uses them.
`torchrun --nproc_per_node N train.py ...`: data parallel, each process on its share of the same global batch, the
gradients summed by explicit all-reduces (ProMetaR's, MetaPrompt's and GRAM's meta steps included). `--precision`
sets the autocast dtype of every forward; `--cache-views N` trains CoOp / CoCoOp on N cached views of each image.
"""

import argparse
import hashlib
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F

import clip_model
import data
import meta
import prompts
import testbed

# Each method's released configuration for base-to-new (the papers' main table); CoOp's is the one CoCoOp released
# for it (KaiyangZhou/CoOp scripts/cocoop/base2new_train.sh: configs/trainers/CoOp/vit_b16_ctxv1.yaml, 200 epochs,
# 4 context vectors from "a photo of a"). IVLP and PromptSRC: muzairkhattak/PromptSRC
# configs/trainers/{IVLP,PromptSRC}/vit_b16_c2_ep20_batch4_4+4ctx.yaml.
METHOD_DEFAULTS = {
    "zeroshot": {"epochs": 0, "batch_size": 32, "lr": 0.0, "ctx_init": None},
    "coop": {"epochs": 200, "batch_size": 32, "lr": 0.002, "ctx_init": "a photo of a", "n_ctx": 4},
    "ivlp": {"epochs": 20, "batch_size": 4, "lr": 0.0025, "ctx_init": "a photo of a"},
    "promptsrc": {"epochs": 20, "batch_size": 4, "lr": 0.0025, "ctx_init": "a photo of a", "gpa_mean": 15.0,
                  "gpa_std": 1.0},
    # KaiyangZhou/CoOp configs/trainers/CoCoOp/vit_b16_c4_ep10_batch1_ctxv1.yaml (test batch 100, as every method)
    "cocoop": {"epochs": 10, "batch_size": 1, "lr": 0.002, "ctx_init": "a photo of a", "n_ctx": 4},
    # muzairkhattak/multimodal-prompt-learning configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml (N_CTX 2,
    # PROMPT_DEPTH 9: our --n-ctx-text / --text-depth, the vision prompts follow)
    "maple": {"epochs": 5, "batch_size": 4, "lr": 0.0035, "ctx_init": "a photo of a", "n_ctx_text": 2,
              "text_depth": 9},
    # mlvlab/ProMetaR configs/trainers/ProMetaR/vit_b16_c2_ep10_batch4_4+4ctx.yaml
    "prometar": {"epochs": 10, "batch_size": 4, "lr": 0.0025, "ctx_init": "a photo of a"},
    # Vill-Lab/2024-TIP-MetaPrompt configs/trainers/Meta_B2N/vit_b16.yaml + scripts/Meta/b2n.sh (LAYERS 12, both
    # modalities: vision_depth follows text_depth)
    "metaprompt": {"epochs": 8, "batch_size": 16, "lr": 0.0015, "ctx_init": None, "n_ctx_text": 2, "n_ctx_vision": 2,
                   "text_depth": 12, "vision_depth": 12},
}
# Where a method released another configuration for a protocol: the values that differ from its base-to-new one.
# A protocol a method released nothing for keeps the base-to-new configuration (docs/protocols.md lists them).
# ImageNet DG evaluates the model trained for cross-dataset transfer, so the two protocols share one configuration.
COOP_TRANSFER = {"epochs": 50}  # CoCoOp's CoOp on ImageNet: configs/trainers/CoOp/vit_b16_ep50_ctxv1.yaml
MAPLE_TRANSFER = {"epochs": 2, "lr": 0.0026, "text_depth": 3}  # MaPLe/vit_b16_c2_ep5_batch4_2ctx_cross_datasets.yaml
# PromptSRC/vit_b16_c2_ep20_batch4_4+4ctx_cross_datasets.yaml (scripts/promptsrc/xd_train.sh names an "ep5" file
# that was never released; reproduce_xd.sh loads this one's epoch 20)
PROMPTSRC_TRANSFER = {"text_depth": 3, "vision_depth": 3, "gpa_mean": 6.0, "gpa_std": 10.0}
PROTOCOL_DEFAULTS = {
    # CoOp's own few-shot configs (scripts/coop/main.sh, COOP.md): 16 random context vectors, epochs by shots
    # (COOP_EPOCHS_BY_SHOTS below)
    ("coop", "fewshot"): {"epochs": None, "ctx_init": None, "n_ctx": 16},
    ("coop", "cross_dataset"): COOP_TRANSFER, ("coop", "domain_generalization"): COOP_TRANSFER,
    ("maple", "cross_dataset"): MAPLE_TRANSFER, ("maple", "domain_generalization"): MAPLE_TRANSFER,
    # PromptSRC/vit_b16_c2_ep50_batch4_4+4ctx_few_shot.yaml (GPA 30 / 30; 45 / 5 for five datasets, below)
    ("promptsrc", "fewshot"): {"epochs": 50, "gpa_mean": 30.0, "gpa_std": 30.0},
    ("promptsrc", "cross_dataset"): PROMPTSRC_TRANSFER, ("promptsrc", "domain_generalization"): PROMPTSRC_TRANSFER,
    # Vill-Lab/2024-TIP-MetaPrompt configs/trainers/Meta_DG/vit_b16.yaml + scripts/Meta/dg.sh
    ("metaprompt", "multi_source_dg"): {"epochs": 6, "batch_size": 32, "n_ctx_text": 4, "n_ctx_vision": 4},
}
# A dataset's values inside a protocol's configuration: CoOp trains ImageNet for 50 epochs in every setting (COOP.md:
# "for ImageNet, we use *_ep50.yaml for all settings"; scripts/cocoop/base2new_train.sh: vit_b16_ep50_ctxv1);
# PromptSRC's few-shot config gives GPA 45 / 5 to "StanfordCars, Flowers102, FGVCAircraft, DTD and EuroSAT".
PROMPTSRC_FEWSHOT_GPA_45_5 = ("stanford_cars", "oxford_flowers", "fgvc_aircraft", "dtd", "eurosat")
DATASET_DEFAULTS = {
    **{("coop", protocol, "imagenet"): {"epochs": 50} for protocol in ("base2new", "fewshot")},
    **{("promptsrc", "fewshot", dataset): {"gpa_mean": 45.0, "gpa_std": 5.0} for dataset in PROMPTSRC_FEWSHOT_GPA_45_5},
}
RANDOM_CONTEXT = "random"  # --ctx-init random: N(0, 0.02) context vectors where a config has words
PROTOCOLS = ("base2new", "fewshot", "cross_dataset", "domain_generalization", "multi_source_dg")
METAPROMPT_RELEASED_FLAGS = ("metaprompt_inner_optimizer", "metaprompt_frozen_drift", "metaprompt_aliased_restore",
                             "metaprompt_raw_frozen_names", "metaprompt_domain_range")
METHODS = (*prompts.METHODS, "prometar", "gram")
# The offline testbed (`--dataset world`, the default): the shipped small CLIP (3 layers, so prompt depth
# 3), tiny images (no loader workers), and learning rates for its logit scale (~18, not 100: see testbed.py).
TESTBED_CHECKPOINT = str(testbed.CHECKPOINT)
# Every method gets the same budget there: 8 epochs of batch 4 at lr 0.002 (ProMetaR: about a minute on 2 CPU
# cores), and CoOp 4 random context vectors in every protocol (its 16 do not fit the testbed's 16-token context;
# CoCoOp's base-to-new CoOp starts from "a photo of a", the testbed's recorded tables from random vectors).
GRAM_STEPS = 2000  # reconstruction: SUPMER runs 100k on T5; the testbed's pairs need far fewer
# SUPMER's regulator: Adam at 1e-4 for 100,000 linearly decaying steps (pretrain_args.py, scripts/meta-train.sh), so
# each weight can travel up to lr x steps / 2 = 5 from its N(0, 1) start. We run ~1,000 steps: at 1e-4 the weights
# would move 0.05, and the regulator would stay its random start. The default lr keeps SUPMER's travel at our step
# count (reconstruction: the budget, not the rate, is what carries over).
SUPMER_REGULATOR_TRAVEL = 1e-4 * 100_000
GRAM_PARTS = data.GRAM_PARTS  # --gram-parts: the 2 x 2 ablation's halves, and the run folder's suffix of each
TESTBED_DATASETS = testbed.DATASETS  # written by testbed.py, trained with the shipped small CLIP
TESTBED_DEFAULTS = {"backbone": TESTBED_CHECKPOINT, "text_depth": 3, "vision_depth": 3, "num_workers": 0,
                    "epochs": 8, "batch_size": 4, "lr": 0.002, "n_ctx": 4}
TESTBED_METHOD_DEFAULTS = {"coop": {"ctx_init": None}}
# The testbed's DG task (world_styles: 4 source styles x 48 classes x up to 5 shots) gets the same budget for every
# method too: 4 epochs of batch 8 (about a minute per target domain for ProMetaR on 2 CPU cores).
TESTBED_DG_DEFAULTS = {"epochs": 4, "batch_size": 8}
GENERAL_DEFAULTS = {"backbone": "ViT-B/16", "text_depth": 9, "vision_depth": 9, "num_workers": data.NUM_WORKERS,
                    "n_ctx": 16, "n_ctx_text": 4, "n_ctx_vision": 4}
COOP_EPOCHS_BY_SHOTS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}  # CoOp COOP.md; 200 for full data
MOMENTUM, WEIGHT_DECAY = 0.9, 5e-4  # Dassl defaults.py OPTIM.MOMENTUM / WEIGHT_DECAY
WARMUP_EPOCHS, WARMUP_LR = 1, 1e-5  # CoOp/PromptSRC configs: WARMUP_EPOCH 1, WARMUP_TYPE constant, CONS_LR 1e-5
TEXT_LOSS_WEIGHT, IMAGE_LOSS_WEIGHT = 25.0, 10.0  # PromptSRC configs TEXT_LOSS_WEIGHT / IMAGE_LOSS_WEIGHT
REGULARIZER_MOMENTUM, REGULARIZER_WEIGHT_DECAY = 0.9, 5e-4  # ProMetaR train.py OPTIM_VNET (Dassl defaults)
DEVICES = ("cpu", "cuda")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast dtypes
COMPILE_METHODS = ("zeroshot", "coop", "cocoop", "ivlp", "maple", "promptsrc")  # no double backward in their step
CACHED_VIEW_METHODS = ("coop", "cocoop")  # trainable methods whose image encoder has no prompts (--cache-views)
EPOCH_SEED_STRIDE = 1000  # epoch e draws its batches and augmentations from seed * stride + e: resumable
PROTOCOL_EVAL = {"cross_dataset": ["caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101",
                                   "fgvc_aircraft", "sun397", "dtd", "eurosat", "ucf101"],
                 "domain_generalization": ["imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"]}


def parse_args(argv=None):
    p = data.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="world", help="training dataset (data.DATASETS); world = offline testbed; "
                   "folder = your own images in --root DIR (DIR/<class>/<image>)")
    p.add_argument("--root", default="data", help="folder holding the datasets in CoOp's layout (--dataset folder: "
                   "the image folder)")
    p.add_argument("--method", default="prometar", choices=METHODS)
    p.add_argument("--protocol", default=None, choices=PROTOCOLS,
                   help="default: multi_source_dg for a DG suite (pacs, vlcs, office_home, domainnet, world_styles, "
                        "...), fewshot (all classes) for --dataset folder, base2new otherwise")
    p.add_argument("--shots", type=data.parse_shots, default=16, help="K images per class, a positive number (CoOp: "
                   "1, 2, 4, 8, 16), or all: every training image")
    p.add_argument("--seed", type=int, default=1, help="papers report seeds 1, 2, 3")
    p.add_argument("--eval-datasets", default=None, help="comma list for cross_dataset / DG (default: the papers')")
    p.add_argument("--target-domain", default=None, help="multi-source DG: the held-out domain (name or index), "
                   "or all: every domain in turn, results per target and their average")
    p.add_argument("--backbone", default=None, help="CLIP name or checkpoint path (ViT-B/16; testbed: its own)")
    p.add_argument("--epochs", type=int, default=None, help="default: the method's official config")
    p.add_argument("--batch-size", type=int, default=None, help="default: the method's official config")
    p.add_argument("--lr", type=float, default=None, help="SGD learning rate; default: the official config")
    p.add_argument("--n-ctx", type=int, default=None, help="CoOp context length M (CoOp: 16)")
    p.add_argument("--ctx-init", default="", help='words for the initial context, e.g. "a photo of a"; '
                   f'{RANDOM_CONTEXT}: N(0, 0.02) vectors (default: the method\'s config)')
    p.add_argument("--class-specific", action="store_true", help="CoOp class-specific context (CSC)")
    p.add_argument("--class-token-position", default="end", choices=prompts.CLASS_TOKEN_POSITIONS)
    p.add_argument("--template", default=None,
                   help='hand-made prompt of zero-shot CLIP, of MetaPrompt\'s frozen branch and of the frozen teacher '
                        '(PromptSRC, ProMetaR), "{}" for the class name; default: CoOp\'s for the dataset ("a photo of '
                        'a {}." for --dataset folder), the teachers\' own ensembles')
    p.add_argument("--n-ctx-text", type=int, default=None, help="text prompt tokens (PromptSRC: 4; MetaPrompt: 2)")
    p.add_argument("--n-ctx-vision", type=int, default=None, help="vision prompt tokens (PromptSRC: 4; MetaPrompt: 2)")
    p.add_argument("--text-depth", type=int, default=None, help="text prompt depth (PromptSRC: 9; MetaPrompt: 12, "
                   "both modalities)")
    p.add_argument("--vision-depth", type=int, default=None, help="IVLP vision prompt depth (PromptSRC: 9)")
    p.add_argument("--gpa-mean", type=float, default=None, help="PromptSRC's Gaussian prompt aggregation: mean "
                   "epoch (base-to-new 15, few-shot 30 or 45, cross-dataset / DG 6)")
    p.add_argument("--gpa-std", type=float, default=None, help="its std in epochs (base-to-new 1, few-shot 30 or 5, "
                   "cross-dataset / DG 10)")
    p.add_argument("--maple-cloned-couplings", action=argparse.BooleanOptionalAction, default=True,
                   help="released MaPLe: the deep coupling functions start as copies of one layer (maple.py "
                        "_get_clones); --no-...: each initialised afresh")
    # ProMetaR (released code: mlvlab/ProMetaR trainers/prometar.py, train.py:99-106)
    p.add_argument("--base", default=None, choices=["ivlp", "coop"],
                   help="the prompt model ProMetaR (default ivlp, the paper's) or GRAM's meta-training (default coop) "
                        "works on")
    p.add_argument("--meta-inner-lr", type=float, default=5e-4, help="alpha of the inner step (ADAPT_LR 5e-4)")
    p.add_argument("--meta-outer-scale", type=float, default=5e-4, help="scale of the outer loss (LR_RATIO 5e-4)")
    p.add_argument("--first-order", action="store_true", help="drop the second-order terms of the meta-gradient")
    p.add_argument("--mixup-alpha", type=float, default=0.5, help="lambda ~ Beta(alpha, beta) (MIXUP_ALPHA 0.5)")
    p.add_argument("--mixup-beta", type=float, default=0.5, help="(MIXUP_BETA 0.5)")
    p.add_argument("--dim-rate", type=int, default=meta.DIM_RATE, help="channels per gate (DIM_RATE 8)")
    p.add_argument("--reg-text-weight", type=float, default=50.0, help="text L1 weight (prometar.py:417-420: 50)")
    p.add_argument("--reg-image-weight", type=float, default=20.0, help="image L1 weight (prometar.py:417-420: 20)")
    p.add_argument("--regularizer-lr", type=float, default=1e-6,
                   help="SGD lr of the gate phi. Released code: 1e-6 for all of training (its scheduler is never "
                        "stepped, so the YAML's 2.5e-4 is never applied); the paper's numbers come from that")
    p.add_argument("--no-meta-second-step", dest="meta_second_step", action="store_false",
                   help="apply the meta-gradient together with step A in one optimizer step, instead of the "
                        "released code's second step of the prompt optimizer after step B")
    # MetaPrompt (released code: Vill-Lab/2024-TIP-MetaPrompt trainers/meta.py, train.py); the behaviours of the
    # release that change the numbers are on by default, --metaprompt-clean turns them all off (see meta.py)
    p.add_argument("--metaprompt-meta-step", type=float, default=0.2, help="META_STEP: the meta write is "
                   "prompt -= lr * META_STEP * sum of the split gradients, at the live lr (train.py default 0.2)")
    released = argparse.BooleanOptionalAction
    p.add_argument("--metaprompt-inner-optimizer", action=released, default=True,
                   help="released: the inner step is a step of the main SGD optimizer (momentum, weight decay, momentum "
                        "carried into the next step); --no-...: a plain SGD step with weight decay")
    p.add_argument("--metaprompt-frozen-drift", action=released, default=True,
                   help="released (torch 1.10 zero_grad): inner optimizer steps apply weight decay and momentum to the "
                        "frozen prompt too")
    p.add_argument("--metaprompt-aliased-restore", action=released, default=True,
                   help="released: the restore aliases its snapshot, so only the first split is undone (B2N keeps "
                        "split 1's inner step; DG splits chain); --no-...: every split starts from the same prompt")
    p.add_argument("--metaprompt-raw-frozen-names", action=released, default=True,
                   help="released: the frozen templates get raw class names (underscores kept)")
    p.add_argument("--metaprompt-domain-range", action=released, default=True,
                   help="released (DG): splits over domain ids 0..N-1 for N distinct ids in the batch, which can "
                        "miss a batch; --no-...: each domain present once")
    p.add_argument("--metaprompt-clean", action="store_true",
                   help="MetaPrompt as the paper describes it: all five released behaviours above off")
    # GRAM (no released code: meta-training form from the same group's SUPMER, beepkh/SUPMER, see meta.py)
    p.add_argument("--pairs", default=None, help="GRAM meta-training: image-caption pairs, a CSV in open_clip's "
                   "convention (python testbed.py pairs DIR writes one)")
    p.add_argument("--csv-img-key", default=data.CSV_IMG_KEY, help="open_clip's --csv-img-key (filepath)")
    p.add_argument("--csv-caption-key", default=data.CSV_CAPTION_KEY, help="open_clip's --csv-caption-key (title)")
    p.add_argument("--csv-separator", default=data.CSV_SEPARATOR, help="open_clip's --csv-separator (a tab)")
    p.add_argument("--gram", default=None, help="downstream: a gram.pt written by --method gram; CoOp / IVLP start "
                   "from its prompts and pass every prompt gradient through its frozen regulators")
    p.add_argument("--gram-parts", default="both", choices=GRAM_PARTS, help="downstream ablation: which half of the "
                   "--gram file to use: both, the initialisation alone (plain gradients), or the regulator alone (from "
                   "the method's own initialisation); runs go to <method>" + "/<method>".join(GRAM_PARTS.values()))
    p.add_argument("--gram-steps", type=int, default=GRAM_STEPS, help="outer steps of meta-training")
    p.add_argument("--gram-checkpoint-every", type=int, default=100, help="outer steps between atomic checkpoints")
    p.add_argument("--gram-tasks", type=int, default=4, help="tasks per meta-batch (SUPMER: 4)")
    p.add_argument("--gram-batch", type=int, default=16, help="pairs in a support / query set (SUPMER: 16)")
    p.add_argument("--gram-alpha", type=float, default=0.002, help="inner step size (reconstruction: CoOp's lr)")
    p.add_argument("--gram-prompt-lr", type=float, default=1e-3, help="Adam lr of the prompt initialisation "
                   "(reconstruction; SUPMER's 0.1 is T5-scale)")
    p.add_argument("--gram-regulator-lr", type=float, default=None, help="Adam lr of the regulators (default: "
                   f"{SUPMER_REGULATOR_TRAVEL:g} / --gram-steps, SUPMER's 1e-4 x 100,000 steps of travel)")
    p.add_argument("--gram-clip", type=float, default=1.0, help="gradient-norm clip of prompts and regulators, "
                   "separately (SUPMER: 1)")
    p.add_argument("--gram-k-text", type=int, default=100, help="level-1 (caption) clusters (reconstruction)")
    p.add_argument("--gram-k-image", type=int, default=4, help="level-2 (image) clusters per concept; 1: flat "
                   "clustering (reconstruction)")
    p.add_argument("--gram-regulator", default="supmer", choices=["supmer", "identity", "meta_sgd"],
                   help="SUPMER's regulator, its identity-start variant, or Meta-SGD scaling (ablations)")
    p.add_argument("--gram-norm-mode", default="row", choices=["row", "global"],
                   help="norm matching per prompt row (SUPMER meta-training) or of the whole gradient (SUPMER's "
                        "downstream config)")
    p.add_argument("--gram-second-order", action="store_true", help="keep the graph of the inner gradient "
                   "(reconstruction flag; SUPMER is first order in the prompt)")
    p.add_argument("--gram-gate-regularizer", action=argparse.BooleanOptionalAction, default=True,
                   help="SUPMER's (code-only) gate regularizer (d_sim / 2 + s / 2 - c)^2")
    p.add_argument("--gram-partner-any-leaf", action="store_true",
                   help="SUPMER's mixing partner from any leaf, the task's own included (default: another leaf)")
    p.add_argument("--gram-negatives", default="other_concepts", choices=meta.NEGATIVE_SOURCES,
                   help="the task losses' negatives: pairs of other concepts than the task's and its partner's "
                   "(SUPMER's tasks contrast across clusters), or the set's own pairs (in_batch: same-leaf episodes, "
                   "where captions of one concept are each other's negatives)")
    p.add_argument("--device", default=None, choices=DEVICES, help="where to train and evaluate (default: cuda when a "
                   "GPU is visible, else cpu); under torchrun each process takes the GPU of its LOCAL_RANK")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=False,
                   help="on CUDA, let float32 matmuls and convolutions use TF32 (10-bit mantissa; faster on Ampere and "
                   "later). Off: --precision fp32 computes in float32 (the released codes trained in fp16, where TF32 "
                   "plays no part)")
    p.add_argument("--precision", default=None, choices=list(PRECISIONS),
                   help="autocast dtype of every forward, meta steps included; prompts, gates, regulators and "
                        "optimizer state stay float32. Default: bf16 on a CUDA GPU that has it, else fp16 (with a GradScaler for "
                        "plain backward passes) on CUDA, fp32 on a CPU")
    p.add_argument("--cache-views", type=int, default=0, metavar="N",
                   help="CoOp / CoCoOp: encode N augmented views of every training image once and train on one view "
                        "per image per epoch, drawn from the epoch seed (changes the augmentation stream; 0: off)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile CLIP's image encoder and text transformer (plain-step methods: the meta steps' "
                        "double backward cannot run compiled)")
    p.add_argument("--compile-backend", default="inductor", help=argparse.SUPPRESS)  # tests: aot_eager, no compiler
    p.add_argument("--num-workers", type=int, default=None, help=f"loader processes ({data.NUM_WORKERS})")
    p.add_argument("--output-dir", default=None, help="default: output/<protocol>/<dataset>/<method>/shots_K/seed_S")
    p.add_argument("--resume", action="store_true", help="continue the unfinished run in <output-dir> "
                   "(checkpoint.pt)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in <output-dir> (without it, train.py "
                   "never overwrites a finished run, nor writes into a run folder of another configuration)")
    p.add_argument("--eval-only", action="store_true", help="evaluate --checkpoint on --subsample classes (into "
                   "<output-dir>/eval_<subsample> by default)")
    p.add_argument("--checkpoint", default=None, help="checkpoint for --eval-only")
    p.add_argument("--subsample", default="new", choices=["base", "new", "all"], help="classes for --eval-only")
    p.add_argument("--download", action="store_true", help="download the dataset if missing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars: one line per epoch (logs)")
    args = p.parse_args(argv)
    if args.template is not None and args.template.count("{}") != 1:
        p.error(f'--template {args.template!r} must hold "{{}}" once, where the class name goes, '
                'e.g. "a photo of a {}."')
    if args.eval_only and not args.checkpoint:
        p.error("--eval-only needs --checkpoint (a prompts.pt or checkpoint.pt written by train.py)")
    for flag in ("epochs", "batch_size", "n_ctx", "n_ctx_text", "n_ctx_vision", "num_workers"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            p.error(f"--{flag.replace('_', '-')} {value} must not be negative")
    if args.gpa_std is not None and args.gpa_std <= 0:
        p.error(f"--gpa-std {args.gpa_std} must be positive: the Gaussian's width in epochs")
    spec = data.DATASETS.get(args.dataset)
    args.protocol = args.protocol or ("multi_source_dg" if spec is not None and spec.domains else
                                      "fewshot" if args.dataset == "folder" else "base2new")
    # unset flags: the testbed's values on its datasets, else the method's released config for the protocol and
    # dataset, else its base-to-new config, else the general ones
    args.base = args.base or ("coop" if args.method == "gram" else "ivlp")
    method = args.base if args.method == "gram" else args.method  # GRAM meta-trains its base's prompts
    testbed_backbone = args.backbone is not None and is_testbed_backbone(args.backbone)
    on_testbed = (args.dataset in TESTBED_DATASETS and (args.method != "gram" or args.backbone is None)) or \
        testbed_backbone  # the shipped small CLIP on any dataset (your own folder too) gets the testbed's settings
    defaults = {**GENERAL_DEFAULTS, **METHOD_DEFAULTS[method], **PROTOCOL_DEFAULTS.get((method, args.protocol), {}),
                **DATASET_DEFAULTS.get((method, args.protocol, args.dataset), {}),
                **({**TESTBED_DEFAULTS, **TESTBED_METHOD_DEFAULTS.get(method, {})} if on_testbed else {}),
                **(TESTBED_DG_DEFAULTS if args.dataset == "world_styles" else {})}
    for key, value in defaults.items():
        if getattr(args, key) in (None, ""):
            setattr(args, key, value)
    if args.ctx_init == RANDOM_CONTEXT:
        args.ctx_init = None
    if args.epochs is None:  # CoOp: by shots
        args.epochs = COOP_EPOCHS_BY_SHOTS.get(args.shots, max(COOP_EPOCHS_BY_SHOTS.values()))
    if args.method == "zeroshot":
        args.epochs = 0
    args.rank, args.world_size = 0, 1  # torchrun: set by start_distributed
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this machine shows no CUDA GPU (torch.cuda.is_available() is False); leave the flag "
                "out to train on the CPU")
    args.precision = args.precision or default_precision(args.device)
    if args.metaprompt_clean:
        for flag in METAPROMPT_RELEASED_FLAGS:
            setattr(args, flag, False)
    args.gram_regulator_lr = args.gram_regulator_lr or SUPMER_REGULATOR_TRAVEL / max(args.gram_steps, 1)
    if args.method == "gram" and not args.pairs:
        p.error("--method gram meta-trains on image-caption pairs: pass --pairs PAIRS.csv "
                "(python testbed.py pairs DIR writes one)")
    if args.cache_views and (args.method not in CACHED_VIEW_METHODS or args.gram):
        p.error(f"--cache-views caches CLIP's own image features: it works for {', '.join(CACHED_VIEW_METHODS)} "
                "(no prompts in the image encoder), without --gram")
    if args.compile and args.method not in COMPILE_METHODS:
        p.error(f"--compile works for {', '.join(COMPILE_METHODS)}: torch.compile cannot take the double backward of "
                f"{args.method}'s meta step")
    if args.gram and args.method not in ("coop", "ivlp"):
        p.error(f"--gram plugs into --method coop or ivlp, not {args.method}")
    if args.method == "gram":
        args.output_dir = args.output_dir or os.path.join("output", "gram", Path(args.pairs).stem, args.base,
                                                          f"seed_{args.seed}")
    if args.dataset == "folder":  # your own folder is the dataset: named by its absolute path (run_identity)
        args.root = str(Path(args.root).expanduser().resolve())
    args.output_dir = args.output_dir or default_output_dir(args)
    return args


def default_output_dir(args) -> str:
    """output/<protocol>/<dataset>/<method>/shots_<K>/seed_<S>[/<target domain>][/eval_<subsample>]: your own folder
    is named with a digest of its absolute path (two folders called `images` never share a run folder), a run from
    a GRAM file as <method>+gram, an --eval-only run in a folder of its own."""
    dataset = data.folder_run_name(args.root) if args.dataset == "folder" else args.dataset
    method = args.method + (GRAM_PARTS[args.gram_parts] if args.gram else "")
    target = [str(args.target_domain)] if args.protocol == "multi_source_dg" and args.target_domain else []
    return os.path.join("output", args.protocol, dataset, method, f"shots_{data.shots_name(args.shots)}",
                        f"seed_{args.seed}", *target, *([f"eval_{args.subsample}"] if args.eval_only else []))


# ----------------------------------------------------------------------------------------------------------------
# Run folders: train.py never overwrites a finished run, and never writes into a folder holding a run of another
# configuration, unless asked (--overwrite); --resume continues an unfinished run of the same configuration.

RUN_FILES = ("config.json", "results.json", "prompts.pt", "checkpoint.pt", "log.jsonl", "gram.pt")


def stored_config(folder: Path):
    """The configuration of the run in `folder` (config.json, else the one its results or checkpoints carry), or
    None where it holds no run."""
    for name in ("config.json", "results.json", "checkpoint.pt", "prompts.pt"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            stored = json.loads(path.read_text()) if name.endswith(".json") else \
                torch.load(path, map_location="cpu", weights_only=True)
        except (*clip_model.UNREADABLE_FILE_ERRORS, OSError, ValueError):
            continue  # a damaged file: look at the next one
        config = stored.get("config", stored) if name == "results.json" else \
            stored if name == "config.json" else stored.get("config")
        if isinstance(config, dict):
            return config
    return None


def check_output_dir(args):
    """One line, before any work, unless <output-dir> can take this run: a folder (or a path to make one), writable,
    and holding no run (or the same configuration's unfinished run with --resume, or anything with --overwrite)."""
    out = Path(args.output_dir)
    if out.exists() and not out.is_dir():
        raise data.DataError(f"--output-dir {out} is a file; pass a folder (created if missing)")
    data.check_writable(out, "--output-dir", "pass a folder you can write to")
    config = stored_config(out) if out.is_dir() else None
    if config is None or args.overwrite:
        return
    finished = (out / ("gram.pt" if args.method == "gram" else "results.json")).is_file()
    mine, theirs = data.run_identity(vars(args)), data.run_identity(config)
    differing = sorted(k for k in mine.keys() & theirs.keys() if mine[k] != theirs[k])
    if differing:
        shown = ", ".join(f"{k} {theirs[k]!r} there, {mine[k]!r} here" for k in differing[:3])
        raise data.DataError(f"--output-dir {out} holds a run of another configuration ({shown}); pass another "
                             "--output-dir, or --overwrite to replace it")
    if finished and not args.resume:
        raise data.DataError(f"--output-dir {out} holds this configuration's finished run; --overwrite runs it again")
    if (out / "checkpoint.pt").is_file() and not args.resume:
        raise data.DataError(f"--output-dir {out} holds this configuration's unfinished run; --resume continues it, "
                             "--overwrite starts it again")


def claim_output_dir(args):
    """Make <output-dir>, clear what a replaced run left (--overwrite), and write this run's config.json."""
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite:
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)
    data.write_json_atomic(vars(args), out / "config.json")


def run_summary(args) -> str:
    """The line a run starts with (the whole configuration is in <output-dir>/config.json)."""
    if args.method == "gram":
        what = f"GRAM meta-training of {args.base} on {args.pairs}, {args.gram_steps} steps"
    elif args.eval_only:
        what = f"{args.method} from {args.checkpoint} on {args.dataset}, {args.subsample} classes"
    else:
        what = f"{args.method}{' from ' + args.gram if args.gram else ''} on {args.dataset}" \
               f"{' ' + str(Path(args.root)) if args.dataset == 'folder' else ''}, {args.protocol}, " \
               f"{data.shots_name(args.shots)} shots, {args.epochs} epochs"
    return f"{what}, seed {args.seed}, {args.backbone}, {args.precision}; config in " \
           f"{os.path.join(args.output_dir, 'config.json')}"


def check_inputs(args):
    """Every check that needs no download and no model, run before the backbone is loaded or fetched: the datasets
    (name, root, folders, the files their readers need, shots, target domain), the backbone name or file, the
    checkpoint to evaluate, the --gram file. Raises data.DataError / clip_model.CheckpointError with one line.
    Returns the verified --gram file (None without --gram), so that it is read once."""
    check_backbone(args.backbone)
    gram = None
    if args.gram:
        gram = read_gram_file(args.gram, args)
        args.gram_sha256 = gram["sha256"]
    if args.rank == 0:  # torchrun: process 0 writes the run folder
        check_output_dir(args)
    if args.dataset in TESTBED_DATASETS:  # the offline testbed is made, not downloaded
        testbed.ensure_dataset(args.dataset, args.root)
    domains = data.get_spec(args.dataset).domains
    if args.dataset == "folder" and args.protocol not in ("base2new", "fewshot"):
        raise data.DataError(f"--dataset folder trains and tests on the images in --root: use --protocol base2new "
                             f"(train on half of the classes, test on both halves) or fewshot (all classes), not "
                             f"{args.protocol}")
    if args.protocol == "multi_source_dg" and not domains:
        suites = ", ".join(n for n, s in data.DATASETS.items() if s.domains)
        raise data.DataError(f"{args.dataset} has no domains; multi-source DG needs one of: {suites}")
    if domains and args.protocol != "multi_source_dg":
        raise data.DataError(f"{args.dataset} is a multi-source DG suite: use --protocol multi_source_dg "
                             f"--target-domain <{'|'.join(domains)}|all>")
    for target in (domains if args.target_domain == "all" else [args.target_domain]):
        data.check_request(args.dataset, args.root, args.shots, args.download, target)
    if args.dataset == "folder":
        check_own_folder(args)
    for name, dataset, _, target in evaluation_targets(args):
        if dataset != args.dataset:  # cross-dataset / DG evaluation sets are read, never downloaded
            data.check_request(dataset, args.root, args.shots, False, target)
    if args.eval_only:
        prompts.read_checkpoint(args.checkpoint, args.method)
    return gram


FOLDER_MIN_CLASSES = {"fewshot": 2, "base2new": 4}  # a classifier needs 2 classes; base-to-new 2 base and 2 new


def check_own_folder(args):
    """Your own image folder (--dataset folder), before any work: writable (split.json and the few-shot and feature
    caches are written into it), enough classes for the protocol, and every image decodes."""
    folder = data.dataset_folder("folder", args.root)
    data.check_writable(folder, "--root", "train.py writes split.json and its few-shot and feature caches into your "
                        "image folder; make it writable, or copy the folder somewhere writable and pass that")
    train, val, test, classnames = data.read_folder(folder)
    needed = FOLDER_MIN_CLASSES[args.protocol]
    if len(classnames) < needed:
        raise data.DataError(f"{folder} holds {len(classnames)} class(es) ({', '.join(classnames)}); --protocol "
                             f"{args.protocol} needs at least {needed}: add class folders (DIR/<class>/<image>)")
    data.check_images_decode(train + val + test)


def check_backbone(backbone):
    """A CLIP model name or an existing file; the shipped testbed file must match its SHA256."""
    backbone = str(backbone)
    if backbone not in clip_model.MODELS and not Path(backbone).expanduser().is_file():
        raise clip_model.CheckpointError(f"--backbone {backbone} is neither a CLIP model name "
                                         f"({', '.join(clip_model.MODELS)}) nor an existing checkpoint file")
    if is_testbed_backbone(backbone):  # the shipped file must be the one that was pretrained
        testbed.check_checkpoint(TESTBED_CHECKPOINT)


def is_testbed_backbone(backbone) -> bool:
    """Whether --backbone is the shipped small CLIP (by any path to it)."""
    return os.path.realpath(str(backbone)) == os.path.realpath(TESTBED_CHECKPOINT)


def read_gram_file(path, args) -> dict:
    """A gram.pt written by --method gram, checked against this run (one line each): the file itself, the prompt
    model it was meta-trained for, the backbone, the prompt shapes. Returns it with its "sha256"."""
    if not Path(path).is_file():
        raise clip_model.CheckpointError(f"--gram {path} does not exist; meta-train one with --method gram --pairs ...")
    try:
        gram = torch.load(path, map_location="cpu", weights_only=True)
    except (*clip_model.UNREADABLE_FILE_ERRORS, OSError):
        raise clip_model.CheckpointError(f"--gram {path} is not a file written by --method gram") from None
    if not isinstance(gram, dict) or not {"prompts", "regulators", "config"} <= set(gram):
        raise clip_model.CheckpointError(f"--gram {path} is not a file written by --method gram")
    config = gram["config"]
    if config["base"] != args.method:
        raise clip_model.CheckpointError(f"--gram {path} was meta-trained for --method {config['base']}, not "
                                         f"{args.method}; use it with --method {config['base']}")
    if config["backbone_fingerprint"] != clip_model.fingerprint(args.backbone):
        raise clip_model.CheckpointError(f"--gram {path} was meta-trained with the backbone {config['backbone']}, "
                                         f"not {args.backbone}; pass --backbone {config['backbone']}")
    return {**gram, "sha256": clip_model.sha256_of(path)}


def apply_gram(args, learner, gram):
    """Start `learner` from the GRAM initialisation `gram` (read_gram_file) and return its frozen regulators (None
    without --gram); --gram-parts init keeps the method's plain gradients (no regulators), --gram-parts regulator the
    method's own initial prompts."""
    if gram is None:
        return None
    expected = {k: list(v.shape) for k, v in prompts.prompt_parameters(learner).items()}
    if gram["config"]["shapes"] != expected:
        raise clip_model.CheckpointError(f"--gram {args.gram} holds prompts {gram['config']['shapes']}, this "
                                         f"learner {expected}; use the same prompt flags (--n-ctx, --n-ctx-text, "
                                         "--n-ctx-vision, --text-depth, --vision-depth) as its meta-training")
    if args.gram_parts in ("both", "init"):
        prompts.load_prompts(learner, gram["prompts"])
    if args.gram_parts == "init":
        return None
    regulators = gram_regulators(args, learner, kind=gram["config"]["kind"], norm_mode=gram["config"]["norm_mode"])
    regulators.load_state_dict(gram["regulators"])
    return regulators.requires_grad_(False).eval()


def default_precision(device: str) -> str:
    """bf16 on a CUDA GPU that supports it, fp16 on other GPUs, fp32 on a CPU (prompts.default_dtype)."""
    return {v: k for k, v in PRECISIONS.items()}[prompts.default_dtype(device)]


def autocast(args, device: str):
    """The forward passes' mixed precision (--precision): float32 master weights, autocast to bf16 / fp16."""
    return torch.autocast(device_type=device, dtype=PRECISIONS[args.precision], enabled=args.precision != "fp32")


def in_precision(args, device: str, fn):
    """`fn` with its forward under autocast (--precision): the loss functions of the meta steps, whose gradients
    (torch.autograd.grad, second order included) are then taken outside the autocast region, as PyTorch advises."""
    def wrapped(*a, **k):
        with autocast(args, device):
            return fn(*a, **k)
    return wrapped


NO_LOSS_SCALING = torch.amp.GradScaler("cpu", enabled=False)  # fp32 / bf16: scale() and step() pass through


def loss_scale(scaler) -> float:
    """The factor the hand-made steps multiply their losses by before torch.autograd.grad (meta.scaled_grad): the
    GradScaler's under fp16 (its scale() of a one, which also starts the scaler on first use), 1 otherwise."""
    return float(scaler.scale(torch.ones(()))) if scaler.is_enabled() else 1.0


def finite_or_back_off(scaler, tensors) -> bool:
    """fp16: whether every hand-made gradient (or update) is finite; if one is not, the caller skips its update and
    the loss scale backs off, as GradScaler.step and update do for .grad. Always True without fp16 (fp32 and bf16
    take every step, as PyTorch's GradScaler-free loops do)."""
    if not scaler.is_enabled():
        return True
    finite = all(bool(torch.isfinite(t).all()) for t in tensors)
    if not finite:
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    return finite


# ----------------------------------------------------------------------------------------------------------------
# torchrun: every process loads the same global batch (same seeded draws: batches, augmentations, virtual tasks),
# computes on its contiguous share of it, and the gradients are summed with explicit all-reduces, each process's
# losses weighted by its share of the batch; so N processes take the step one process takes, within float tolerance.

def start_distributed(args):
    """Under torchrun (WORLD_SIZE > 1) join the process group and set args.rank and args.world_size (0 and 1 for a
    single process). On CUDA each process takes GPU LOCAL_RANK (modulo the GPUs visible) and the group is NCCL's; more
    processes than GPUs (2 on one GPU, to check the path) share them through gloo, as on CPUs, since NCCL refuses
    two ranks on one device."""
    args.world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.world_size > 1 and not dist.is_initialized():
        on_gpus = args.device == "cuda"
        if on_gpus:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        dist.init_process_group("nccl" if on_gpus and args.world_size <= torch.cuda.device_count() else "gloo")
    args.rank = dist.get_rank() if args.world_size > 1 else 0


def set_tf32(enabled: bool):
    """--tf32: whether CUDA's float32 matmuls (cuBLAS) and convolutions (cuDNN: CLIP's patch embedding) may round
    their inputs to TF32. PyTorch's defaults differ (matmuls off since 1.12, convolutions on), so both are set."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def stop_distributed():
    """Leave the process group, if this process joined one (torchrun): without it, a process can exit with gloo's
    threads alive and abort ("terminate called without an active exception") after its work is done."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def share(n: int, args) -> tuple:
    """This process's contiguous part of n items (torch.tensor_split's) and its weight, part / n."""
    base, extra = divmod(n, args.world_size)
    start = args.rank * base + min(args.rank, extra)
    stop = start + base + (args.rank < extra)
    return slice(start, stop), (stop - start) / n if n else 0.0


class SumOverProcesses(torch.autograd.Function):
    """A differentiable all-reduce sum: every process's output depends on every process's input, so the gradient of
    each input is the sum over processes of the incoming gradients, itself through this Function, so that a double
    backward (ProMetaR's inner step under torchrun) crosses the processes again (what the deprecated
    torch.distributed.nn.functional.all_reduce does)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.contiguous().clone()  # never in place into a view (an expanded zero gradient has stride 0)
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        return SumOverProcesses.apply(grad)


def all_reduce_sum(args, tensor: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
    """The sum over processes (the tensor itself for one process); differentiable=True keeps the autograd graph."""
    if args.world_size == 1:
        return tensor
    if differentiable:
        return SumOverProcesses.apply(tensor)
    tensor = tensor.contiguous().clone()  # never in place into a view (an expanded zero gradient has stride 0)
    dist.all_reduce(tensor)
    return tensor


def reduce_gradients(args, modules):
    """Sum the .grad of every parameter of `modules` (the prompts, the gate, the regulators) over processes, in one
    all-reduce of a flat vector (a gradient missing on some process counts as zero there)."""
    if args.world_size == 1:
        return
    tensors = [p for m in modules for p in (m.values() if isinstance(m, dict) else m.parameters())]
    flags = torch.tensor([float(p.grad is not None) for p in tensors], device=tensors[0].device)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in tensors] + [flags])
    dist.all_reduce(flat)
    for p, value, present in zip(tensors, flat[:-len(tensors)].split([p.numel() for p in tensors]),
                                 flat[-len(tensors):], strict=True):
        if present > 0:
            p.grad = value.view_as(p).clone()


def reduce_dicts(args, *grads: dict, graph: bool = False) -> tuple:
    """The sum over processes of gradient dicts, in one differentiable all-reduce of a flat vector: one collective,
    so every process runs the same collectives in the same order, in the backward pass too. graph=True (the inner
    step of second-order meta-learning): every process records it, also one whose share was empty (constant zeros)."""
    if args.world_size == 1:
        return grads
    names = [(i, k) for i, g in enumerate(grads) for k in g]
    values = [grads[i][k] for i, k in names]
    flat = torch.cat([v.flatten() for v in values])
    if graph and not flat.requires_grad:
        flat = flat.detach().requires_grad_()
    total = all_reduce_sum(args, flat, differentiable=True)
    out = [{} for _ in grads]
    for (i, k), v, piece in zip(names, values, total.split([v.numel() for v in values]), strict=True):
        out[i][k] = piece.view_as(v)
    return tuple(out)


def gather_rows(args, tensor: torch.Tensor) -> torch.Tensor:
    """The rows of every process's share, in order (logits for the logged training accuracy)."""
    if args.world_size == 1:
        return tensor
    parts = [None] * args.world_size
    dist.all_gather_object(parts, tensor.detach().cpu())
    return torch.cat(parts).to(tensor.device)


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
    templates = data.hand_templates(dataset, args.method, args.template)
    method = args.base if args.method == "prometar" else args.method  # ProMetaR trains IVLP's (or CoOp's) prompts
    return prompts.build_learner(method, clip, classnames, templates, n_ctx=args.n_ctx, ctx_init=args.ctx_init,
                                 class_specific=args.class_specific, class_token_position=args.class_token_position,
                                 n_ctx_text=args.n_ctx_text, n_ctx_vision=args.n_ctx_vision,
                                 text_depth=args.text_depth, vision_depth=args.vision_depth,
                                 raw_frozen_names=args.metaprompt_raw_frozen_names,
                                 cloned_couplings=args.maple_cloned_couplings)


def build_optimizers(args, params: dict, gate):
    """SGD for the prompts (Dassl: momentum 0.9, weight decay 5e-4; None for zero-shot CLIP, which has none) and,
    for ProMetaR, SGD for the gate phi at the released code's fixed lr (prometar.py OPTIM_VNET)."""
    optimizer = torch.optim.SGD(params.values(), lr=args.lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY) \
        if params else None
    gate_optimizer = torch.optim.SGD(gate.parameters(), lr=args.regularizer_lr, momentum=REGULARIZER_MOMENTUM,
                                     weight_decay=REGULARIZER_WEIGHT_DECAY) if gate is not None else None
    return optimizer, gate_optimizer


def crop_scale(args) -> tuple:
    """The train-time crop scale: Dassl's, but the testbed's crops keep at least half of its 32 px images."""
    return testbed.WORLD_CROP_SCALE if args.dataset == "world" else data.RRC_SCALE


def train_loader(args, items, size: int, epoch: int):
    """The epoch's training loader: batches and augmentations drawn from seed * 1000 + epoch (so a resumed run
    sees the same ones); the testbed's crops keep at least half of its 32 px images (testbed.WORLD_CROP_SCALE)."""
    return data.build_loader(items, train=True, batch_size=args.batch_size, size=size, num_workers=args.num_workers,
                             seed=args.seed * EPOCH_SEED_STRIDE + epoch, crop_scale=crop_scale(args),
                             pin_memory=args.device == "cuda")


@torch.no_grad()
def cached_views(args, clip, items, device) -> torch.Tensor:
    """--cache-views N: CLIP's image features of N augmented views of every training image (Dassl's train transform),
    drawn once from the run seed; (N, I, E), float32 on `device`."""
    dataset = data.ImageListDataset(items, data.build_transform(True, clip.visual.input_resolution, crop_scale(args)))
    views = []
    for view in range(args.cache_views):
        generator = torch.Generator().manual_seed(args.seed * EPOCH_SEED_STRIDE - 1 - view)  # apart from the epochs'
        torch.manual_seed(args.seed * EPOCH_SEED_STRIDE - 1 - view)
        loader = torch.utils.data.DataLoader(dataset, batch_size=data.TEST_BATCH_SIZE, num_workers=args.num_workers,
                                             generator=generator)
        with autocast(args, device):
            views.append(torch.cat([clip.encode_image(b["img"].to(device)).float() for b in loader]))  # (I, E)
    return torch.stack(views)  # (N, I, E)


def view_batches(views, items, batch_size: int, seed: int):
    """One epoch over cached views: a permutation of the training images and one view per image, both drawn from
    `seed`; batches as the loader's ({"img": (B, E) features, "label", "domain"}), the last one dropped as Dassl's."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(views.shape[1], generator=generator)
    choice = torch.randint(views.shape[0], (views.shape[1],), generator=generator)
    labels = torch.tensor([d.label for d in items])
    domains = torch.tensor([d.domain for d in items])
    stop = len(order) - len(order) % batch_size if len(order) >= batch_size else len(order)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        yield {"img": views[choice[idx], idx], "label": labels[idx], "domain": domains[idx]}


def training_losses(args, learner, teacher, images, labels, with_context=False) -> tuple:
    """CE on CLIP logits (CoOp Eq. 3); PromptSRC adds its L1 consistency and KL terms (PromptSRC Eq. 2-4). Returns
    (losses, logits, the encoders' contexts or None)."""
    if images.dim() == 2:  # (B, E): CLIP image features of cached views (--cache-views, a FROZEN_IMAGE learner)
        out = learner.classify(images)
    else:
        out = learner(images, with_context=True) if with_context else learner(images)
    losses = {"loss_ce": F.cross_entropy(out.logits, labels)}
    if teacher is not None:
        frozen_image = teacher.image_features(images)  # (B, E)
        image_features = F.normalize(out.image_features, dim=-1)  # (B, E)
        losses["loss_reg_text"] = TEXT_LOSS_WEIGHT * prompts.consistency_l1(out.text_features, teacher.text_features)
        losses["loss_reg_image"] = IMAGE_LOSS_WEIGHT * prompts.consistency_l1(image_features, frozen_image)
        losses["loss_kl"] = prompts.kl_to_zero_shot(out.logits, teacher.logits(frozen_image))
    return losses, out.logits, out.contexts


def sgd_step(args, learner, teacher, optimizer, scaler, images, labels, device, regulators=None, diagnostics=None):
    """One ordinary step on the training loss (CoOp, CoCoOp, IVLP, MaPLe, PromptSRC) under --precision (fp16: with the
    GradScaler). With GRAM's frozen `regulators`, every prompt gradient is replaced by psi(g, e) after the backward
    and before the step (SUPMER: model/trainer.py:829-836), e the batch's context of the prompt's encoder, and the
    dict `diagnostics` receives what the regulation did (meta.regulation_diagnostics, at the live lr)."""
    part, weight = share(len(labels), args)  # torchrun: this process's part of the batch
    with autocast(args, device):
        losses, logits, contexts = training_losses(args, learner, teacher, images[part], labels[part],
                                                   with_context=regulators is not None)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(weight * sum(losses.values())).backward()
    reduce_gradients(args, [prompts.prompt_parameters(learner)])
    if regulators is not None and args.world_size > 1 and "vision" in contexts:  # the batch mean over processes
        contexts["vision"] = all_reduce_sum(args, weight * contexts["vision"].detach())
    if regulators is not None:
        scaler.unscale_(optimizer)
        regulate_gradients(learner, regulators, contexts, optimizer.param_groups[0]["lr"], diagnostics)
    scaler.step(optimizer)
    scaler.update()
    losses = {k: all_reduce_sum(args, weight * v.detach()) for k, v in losses.items()}
    return losses, gather_rows(args, logits)


@torch.no_grad()
def regulate_gradients(learner, regulators, contexts: dict, lr: float, diagnostics: dict | None = None):
    """GRAM downstream: every prompt's .grad replaced by psi(g, e) of its frozen regulator; `diagnostics` (if given)
    receives the step's size against the prompts at `lr`, cos(psi(g), g) and the mean gate."""
    params = {k: p for k, p in prompts.prompt_parameters(learner).items() if p.grad is not None}
    raw, regulated, gates = {}, {}, {}
    for name, p in params.items():
        raw[name] = p.grad
        regulated[name], gates[name] = regulators(name, p.grad, contexts[prompts.modality(name)].to(p.grad.dtype))
        p.grad = regulated[name]
    if diagnostics is not None:
        diagnostics.update(meta.regulation_diagnostics(params, raw, regulated, gates, lr))


def prometar_losses(args, learner, teacher, params, batch) -> dict:
    """L_task = CE over the base classes; R = 50 L1(text, frozen text) + 20 L1(image, frozen image) on normalised
    features (prometar.py:415-420). The learner runs with `params` through functional_call; the logits ride
    along for logging."""
    images, labels, frozen_image = batch
    out = torch.func.functional_call(learner, params, (images,))
    reg = args.reg_text_weight * prompts.consistency_l1(out.text_features, teacher.text_features)
    if frozen_image is not None:  # IVLP: vision prompts; CoOp's image features are CLIP's own, R_image = 0
        image_features = F.normalize(out.image_features, dim=-1)  # (B, E)
        reg = reg + args.reg_image_weight * prompts.consistency_l1(image_features, frozen_image)
    return {"task": F.cross_entropy(out.logits, labels), "reg": reg, "logits": out.logits}


def prometar_outer_loss(learner, params, batch) -> torch.Tensor:
    """Mixup CE of the adapted prompts on the virtual task's query (prometar.py:299-304, 320-321): each query image's
    features mixed with its support partner's after the projection, before normalisation; one pass over the batch,
    as released. batch = (images, labels, query positions (q,), their partners' positions (q,), lam (q,), weight):
    under torchrun a process takes part of the query, and `weight`, its share, makes the sum over processes the mean."""
    images, labels, query, partner, lam, weight = batch
    if len(query) == 0:  # torchrun: none of the query is this process's; zero, still through the inner step's sum
        return sum(p.sum() for p in params.values()) * 0.0
    out = torch.func.functional_call(learner, params, (images,))
    mixed = meta.manifold_mixup(out.image_features[query], out.image_features, lam, partner)  # (q, E)
    logits = prompts.clip_logits(learner.clip, F.normalize(mixed, dim=-1), out.text_features)  # (q, C)
    return weight * meta.mixup_cross_entropy(logits, labels[query], labels[partner], lam)


def prometar_step(args, learner, teacher, gate, optimizer, gate_optimizer, images, labels, scaler=None):
    """One ProMetaR iteration as released (prometar.py:410-466). Step A: the gradient of L_task + R on the batch,
    modulated by the gate phi, one SGD step. Step B: a virtual task (none for a single class); the meta-loss of a
    modulated inner step on its support set and a mixup loss on its query updates the prompts (a second step) and the
    gate. torchrun's shares and sums, and fp16's loss scaling (a non-finite step is skipped), sit in the helpers."""
    params, device, scaler = prompts.prompt_parameters(learner), images.device.type, scaler or NO_LOSS_SCALING
    loss_factor = loss_scale(scaler)  # fixed for the iteration: the scaler only updates at its end
    with autocast(args, device):  # R_image's frozen image features (IVLP; CoOp's image encoder has no prompts)
        frozen_image = teacher.image_features(images) if getattr(learner, "vision_ctx", None) is not None else None
    batch = (images, labels, frozen_image)
    inner_losses = lambda weight: shared_prometar_losses(args, learner, teacher, weight)
    part, weight = share(len(labels), args)
    grads, losses = meta.regularized_gradients(inner_losses(weight), params, rows(batch, part), gate,
                                               reduce=lambda *g: reduce_dicts(args, *g), loss_scale=loss_factor)  # A
    finite = finite_or_back_off(scaler, grads.values())
    if args.meta_second_step and finite:
        apply_gradients(optimizer, params, grads)
    task = meta.split_virtual_task(labels) if finite else None  # step B
    optimizer.zero_grad(set_to_none=True)
    gate_optimizer.zero_grad(set_to_none=True)
    if task is not None:
        query, support = (mask.nonzero()[:, 0] for mask in task)  # positions in the batch
        lam, partner = meta.sample_mixup(len(query), len(support), args.mixup_alpha, args.mixup_beta)
        (support_batch, s_weight), query_batch = virtual_task_shares(args, batch, query, support, partner, lam)
        outer_loss = in_precision(args, device, lambda p, b: prometar_outer_loss(learner, p, b))
        loss_meta = meta.meta_loss(inner_losses(s_weight), outer_loss, params, support_batch, query_batch, gate,
                                   inner_lr=args.meta_inner_lr, outer_scale=args.meta_outer_scale,
                                   first_order=args.first_order, loss_scale=loss_factor,
                                   reduce=lambda *g: reduce_dicts(args, *g, graph=not args.first_order))
        backward_over_processes(args, scaler, loss_meta, [params, gate], [optimizer, gate_optimizer])
        losses["meta"] = all_reduce_sum(args, loss_meta.detach())
        if not args.meta_second_step:  # one step with the sum of step A's gradient and the meta-gradient
            for k, p in params.items():
                p.grad = grads[k] + (p.grad if p.grad is not None else 0)
        step_optimizers(scaler, optimizer, gate_optimizer)
    elif finite and not args.meta_second_step:  # no virtual task: step A's gradient alone
        apply_gradients(optimizer, params, grads)
    logits = gather_rows(args, losses.pop("logits"))  # step A's, before its update
    return {**losses, **{k: all_reduce_sum(args, losses[k].clone()) for k in ("task", "reg")}}, logits


def shared_prometar_losses(args, learner, teacher, weight: float):
    """prometar_losses under autocast, weighted by this process's share of the set (torchrun); an empty share gives
    zeros that keep the graph (a support set smaller than the processes)."""
    def loss_fn(p, batch):
        if len(batch[1]) == 0:
            zero = sum(v.sum() for v in p.values()) * 0.0
            return {"task": zero, "reg": zero, "logits": torch.zeros(0, device=batch[0].device)}
        with autocast(args, batch[0].device.type):
            losses = prometar_losses(args, learner, teacher, p, batch)
        return {k: weight * v if k in ("task", "reg") else v for k, v in losses.items()}
    return loss_fn


def rows(batch: tuple, index) -> tuple:
    """The rows `index` (a slice or positions) of every tensor of a batch tuple; None stays None."""
    return tuple(None if t is None else t[index] for t in batch)


def virtual_task_shares(args, batch, query, support, partner, lam) -> tuple:
    """torchrun: this process's share of a virtual task's support set and its weight, and of its query (positions,
    their mixup partners' positions, lam, weight), so that the sums over processes are the losses of the whole sets
    (one process: the whole sets, weight 1)."""
    images, labels, _ = batch
    s_part, s_weight = share(len(support), args)
    q_part, q_weight = share(len(query), args)
    partners = support[partner.to(support.device)]
    return (rows(batch, support[s_part]), s_weight), (images, labels, query[q_part], partners[q_part], lam[q_part],
                                                     q_weight)


def backward_over_processes(args, scaler, loss, modules, optimizers):
    """The backward pass of a (fp16: scaled) loss, then summed_and_unscaled."""
    scaler.scale(loss).backward()
    summed_and_unscaled(args, scaler, modules, optimizers)


def summed_and_unscaled(args, scaler, modules, optimizers):
    """The gradients of `modules` summed over processes (torchrun), then unscaled where the optimizers will step
    (fp16: GradScaler checks them for inf there)."""
    reduce_gradients(args, modules)
    for optimizer in optimizers:
        scaler.unscale_(optimizer)


def step_optimizers(scaler, *optimizers):
    """Each optimizer's step (fp16: skipped where its gradients are not finite), then the loss scale's update."""
    for optimizer in optimizers:
        scaler.step(optimizer)
    scaler.update()


def metaprompt_in_domain_losses(learner, images, labels, frozen_image) -> tuple:
    """MetaPrompt's asymmetric contrastive loss, unit weights (meta.py:331-335): CE(l_mix) + CE(l_i) + CE(l_t)."""
    l_mix, l_i, l_t = learner(images, branch="all", frozen_image=frozen_image)  # (B, C) each
    return {"loss_mix": F.cross_entropy(l_mix, labels), "loss_i": F.cross_entropy(l_i, labels),
            "loss_t": F.cross_entropy(l_t, labels)}, l_mix


def metaprompt_text_loss(learner, params, batch) -> torch.Tensor:
    """CE(l_t) of a class half (meta.py:363, 367): batch = (frozen image features (B, E), labels re-indexed within
    the half (B,), the half's class ids); the text classifier is restricted to those classes."""
    frozen_image, labels, classes = batch
    logits = torch.func.functional_call(learner, params, (None,),
                                        {"branch": "text", "frozen_image": frozen_image, "class_idx": classes})
    return F.cross_entropy(logits, labels)  # logits (B, len(classes))


def metaprompt_image_loss(learner, params, batch) -> torch.Tensor:
    """CE(l_i) over all classes of some source domains (meta.py:490, 494): batch = (images (B, 3, H, W), labels)."""
    images, labels = batch
    return F.cross_entropy(torch.func.functional_call(learner, params, (images,), {"branch": "image"}), labels)


def metaprompt_step(args, learner, optimizer, images, labels, domains, scaler=None):
    """One MetaPrompt iteration as released (meta.py `Meta_B2N` / `Meta_DG.forward_backward`). Step A: the in-domain
    loss on the batch, one SGD step of both prompts. Step B: the domain-split meta update of one prompt
    (meta.domain_split_update) at the optimizer's live lr: base-to-new, the text prompt over two random class halves
    (CE(l_t) on each half's classes, from the batch's frozen image features); multi-source DG, the visual prompt,
    leave-one-domain-out (CE(l_i) over all classes). torchrun's shares and sums, and fp16's loss scaling (a
    non-finite step is skipped), sit in the helpers (split_shares, shared_split_loss, backward_and_step)."""
    device, params, scaler = images.device.type, prompts.prompt_parameters(learner), scaler or NO_LOSS_SCALING
    part, weight = share(len(labels), args)  # torchrun: this process's part of the batch
    with autocast(args, device):
        frozen_image = learner.frozen_image_features(images)  # (B, E), once per batch
        losses, logits = metaprompt_in_domain_losses(learner, images[part], labels[part], frozen_image[part])
    backward_and_step(args, scaler, optimizer, weight * sum(losses.values()), params)  # step A
    if args.protocol == "multi_source_dg":  # step B': visual prompt, leave one source domain out
        name, loss = "vision_ctx", lambda p, b: metaprompt_image_loss(learner, p, b)
        splits = [((images[s], labels[s]), (images[q], labels[q]))
                  for s, q in meta.domain_splits(domains, args.metaprompt_domain_range)]
    else:  # step B: text prompt, two random halves of the training classes
        name, loss = "text_ctx", lambda p, b: metaprompt_text_loss(learner, p, b)
        halves = meta.class_halves(learner.frozen_text_features.shape[0])
        splits = [((frozen_image[s_mask], s_labels, s_classes), (frozen_image[q_mask], q_labels, q_classes))
                  for (s_mask, s_labels, s_classes), (q_mask, q_labels, q_classes)
                  in meta.class_half_splits(labels, halves)]
    buffers = {k: optimizer.state[p].get("momentum_buffer") for k, p in params.items()}
    new, buffers = meta.domain_split_update(
        shared_split_loss(args, device, loss, name), params, name, split_shares(args, splits), buffers,
        lr=optimizer.param_groups[0]["lr"], meta_step=args.metaprompt_meta_step, momentum=MOMENTUM,
        weight_decay=WEIGHT_DECAY, inner_optimizer=args.metaprompt_inner_optimizer,
        frozen_drift=args.metaprompt_frozen_drift, aliased_restore=args.metaprompt_aliased_restore,
        reduce=lambda g: all_reduce_sum(args, g), loss_scale=loss_scale(scaler))
    if finite_or_back_off(scaler, [new[name]]):
        write_like_an_optimizer(optimizer, params, new, buffers)
    return {k: all_reduce_sum(args, weight * v.detach()) for k, v in losses.items()}, gather_rows(args, logits)


def backward_and_step(args, scaler, optimizer, loss, params):
    """One plain optimizer step on a loss: backward (fp16: scaled), the gradients summed over processes (torchrun),
    the step (fp16: skipped where not finite) and the loss scale's update."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    reduce_gradients(args, [params])
    step_optimizers(scaler, optimizer)


def split_shares(args, splits) -> list:
    """torchrun: this process's share of each split's support and query set (their first two fields, the rest kept),
    each with the share's weight."""
    def mine(batch):
        part, weight = share(len(batch[1]), args)
        return (batch[0][part], batch[1][part], *batch[2:]), weight
    return [(mine(support), mine(query)) for support, query in splits]


def shared_split_loss(args, device, loss, name):
    """A split loss over a (batch, weight) share: under autocast, weighted; an empty share adds zero (a set smaller
    than the processes) through the prompt `name`, so that every process records the same graph."""
    def loss_fn(p, weighted):
        batch, weight = weighted
        with autocast(args, device):
            return weight * loss(p, batch) if len(batch[1]) else p[name].sum() * 0.0
    return loss_fn


def write_like_an_optimizer(optimizer, params, new, buffers):
    """Write new prompt values and momentum buffers in place, as an optimizer step would (MetaPrompt's meta write
    bypasses the optimizer, meta.py:377-378)."""
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(new[k])
            if buffers[k] is not None:
                optimizer.state[p]["momentum_buffer"] = buffers[k]


def apply_gradients(optimizer, params, grads):
    """An optimizer step with hand-made gradients (ProMetaR sets p.grad itself, prometar.py:422-424)."""
    for name, p in params.items():
        p.grad = grads[name]
    optimizer.step()


def save_atomic(obj, path):
    """Write to a temporary file, then rename: an interrupted save never leaves a broken checkpoint."""
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def evaluate(args, clip, state, dataset, subsample, device, target_domain=None) -> dict:
    """Accuracy and macro-F1 of the prompts `state` on a dataset's test set restricted to `subsample` classes."""
    shots = args.shots if dataset == args.dataset else 0  # another dataset (cross-dataset, DG): no few-shot draw
    _, _, test, classnames = data.build_dataset(dataset, args.root, shots=shots, seed=args.seed,
                                                subsample=subsample, target_domain=target_domain)
    learner = learner_for(args, clip, dataset, classnames)
    prompts.load_prompts(learner, state)
    dtype, mine = PRECISIONS[args.precision], test[share(len(test), args)[0]]  # torchrun: a shard per process
    if isinstance(learner, prompts.FROZEN_IMAGE):  # image features once per backbone, for every subset and method
        features = frozen_image_features(clip, args.backbone, dataset, args.root, mine, device, dtype, args.num_workers)
        labels, preds = torch.tensor([d.label for d in mine]), prompts.predict_features(learner, features)
    else:
        loader = data.build_loader(mine, train=False, size=clip.visual.input_resolution, num_workers=args.num_workers,
                                   pin_memory=args.device == "cuda")
        labels, preds = prompts.predict(learner, loader, device, dtype)
    return data.classification_metrics(gather_rows(args, labels), gather_rows(args, preds))


def frozen_image_features(clip, backbone, dataset, root, items, device, dtype, num_workers) -> torch.Tensor:
    """CLIP's own image features (N, E) of `items`, cached in the dataset folder per backbone, resolution and dtype
    (data.cached_image_features): each image is encoded once."""
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        return data.cached_image_features(items, lambda images: clip.encode_image(images.to(device)),
                                          data.feature_cache_file(dataset, root, prompts.feature_tag(clip, backbone,
                                                                                                      dtype)),
                                          clip.visual.input_resolution, num_workers)


def evaluation_targets(args):
    """(name in results, dataset, class subset, target domain) for each test of the protocol."""
    if args.protocol == "base2new":
        return [("base", args.dataset, "base", None), ("new", args.dataset, "new", None)]
    if args.protocol in ("fewshot", "multi_source_dg"):
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
    start_time, device = time.time(), args.device
    start_distributed(args)  # torchrun: one process per device; process 0 writes checkpoints, logs and results
    lead = args.rank == 0
    if args.world_size > 1 and not lead:  # process 0 first: it writes what the checks may create (the testbed)
        dist.barrier()
    gram = check_inputs(args)
    if args.world_size > 1 and lead:
        dist.barrier()
    if lead:
        claim_output_dir(args)
        print(run_summary(args), flush=True)
    seed_everything(args.seed)
    clip = clip_model.load(args.backbone, device=device)
    if args.compile:  # the frozen encoders' forward passes; gradients still reach the prompts through them
        clip.visual.forward = torch.compile(clip.visual.forward, backend=args.compile_backend)
        clip.transformer.forward = torch.compile(clip.transformer.forward, backend=args.compile_backend)
    if args.eval_only:  # evaluate a saved model on any class subset
        ckpt = prompts.read_checkpoint(args.checkpoint, args.method)
        metrics = evaluate(args, clip, ckpt["prompts"], args.dataset, args.subsample, device, args.target_domain)
        if lead:
            print(json.dumps(write_results(args, {args.subsample: metrics}, device, time.time() - start_time)["splits"]))
        return
    subsample = "base" if args.protocol == "base2new" else "all"  # DG: every class, few shots per source domain
    train, _, _, classnames = data.build_dataset(args.dataset, args.root, shots=args.shots, seed=args.seed,
                                                 subsample=subsample, download=args.download,
                                                 target_domain=args.target_domain)
    learner = learner_for(args, clip, args.dataset, classnames)
    params = prompts.prompt_parameters(learner)
    teacher_templates = [args.template] if args.template else data.IMAGENET_TEMPLATES_PROMPTSRC
    teacher = prompts.FrozenTeacher(clip, classnames, teacher_templates) \
        if args.method in ("promptsrc", "prometar") else None
    gpa_weights = prompts.gaussian_epoch_weights(args.epochs, args.gpa_mean, args.gpa_std) \
        if args.method == "promptsrc" else None
    gate = meta.GradientModulator({k: v.shape for k, v in params.items()}, args.dim_rate).to(device) \
        if args.method == "prometar" else None
    regulators = apply_gram(args, learner, gram)  # --gram: GRAM's initialisation and frozen regulators
    diagnostics = {} if regulators is not None else None  # what each regulated step did, for log.jsonl
    optimizer, gate_optimizer = build_optimizers(args, params, gate)
    scaler = torch.amp.GradScaler(device, enabled=args.precision == "fp16")  # loss scaling for fp16 only
    ckpt_path, start_epoch, snapshots = os.path.join(args.output_dir, "checkpoint.pt"), 0, []
    if args.resume and not os.path.exists(ckpt_path):
        print(f"--resume: no {ckpt_path} yet, starting from the first epoch", file=sys.stderr)
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        prompts.load_prompts(learner, ckpt["prompts"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, snapshots = ckpt["epoch"], ckpt["snapshots"]
        if ckpt.get("scaler"):  # fp16: the loss scale and its growth count, so the run resumes exactly
            scaler.load_state_dict(ckpt["scaler"])
        if gate is not None:
            gate.load_state_dict(ckpt["gate"])
            gate_optimizer.load_state_dict(ckpt["gate_optimizer"])
    views = cached_views(args, clip, train, device) if args.cache_views else None
    log = open_log(os.path.join(args.output_dir, "log.jsonl"), start_epoch, write=lead)
    for epoch in range(start_epoch, args.epochs):
        # --- ALGO: one epoch of SGD on the few-shot training set (CoOp Sec. 3.2, Dassl schedule) ---
        lr = dassl_lr(epoch, args.lr, args.epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(args.seed * EPOCH_SEED_STRIDE + epoch)
        loader = train_loader(args, train, clip.visual.input_resolution, epoch) if views is None else \
            view_batches(views, train, args.batch_size, args.seed * EPOCH_SEED_STRIDE + epoch)
        learner.train()
        bar = progress(loader, f"epoch {epoch + 1}/{args.epochs}", args.no_progress)
        tick = epoch_start = time.perf_counter()
        seen = []  # (loss, accuracy) of each iteration, for --no-progress's epoch line
        for iteration, batch in enumerate(bar):
            images, labels = batch["img"].to(device, non_blocking=True), batch["label"].to(device)
            if gate is not None:
                losses, logits = prometar_step(args, learner, teacher, gate, optimizer, gate_optimizer, images, labels,
                                               scaler)
            elif args.method == "metaprompt":
                losses, logits = metaprompt_step(args, learner, optimizer, images, labels, batch["domain"].to(device),
                                                 scaler)
            else:
                losses, logits = sgd_step(args, learner, teacher, optimizer, scaler, images, labels, device,
                                          regulators, diagnostics)
            accuracy = (logits.argmax(-1) == labels).float().mean().item() * 100
            seen.append((sum(losses.values()).item(), accuracy))
            bar.set_postfix(loss=f"{seen[-1][0]:.4f}", acc=f"{accuracy:.1f}", lr=f"{lr:.2e}")
            tick = log_iteration(log, {"epoch": epoch, "iteration": iteration},
                                 {**losses, "accuracy": accuracy, "lr": lr, **named_diagnostics(diagnostics)}, tick)
        if args.no_progress and lead:
            print(epoch_line(epoch, args.epochs, seen, lr, time.perf_counter() - epoch_start), flush=True)
        # --- bookkeeping: Gaussian prompt aggregation snapshot, atomic checkpoint ---
        if gpa_weights is not None:
            snapshots.append({k: v.detach().clone() for k, v in params.items()})
        if lead:
            save_atomic({"prompts": {k: v.detach() for k, v in params.items()}, "optimizer": optimizer.state_dict(),
                         "epoch": epoch + 1, "snapshots": snapshots, "config": vars(args), "classnames": classnames,
                         "gate": gate.state_dict() if gate is not None else None,
                         "gate_optimizer": gate_optimizer.state_dict() if gate is not None else None,
                         "scaler": scaler.state_dict()}, ckpt_path)
    log.close()
    if gpa_weights is not None and snapshots:  # PromptSRC Sec. 3.3: the final prompts are the Gaussian average
        prompts.load_prompts(learner, prompts.aggregate_prompts(snapshots, gpa_weights))
    final = {k: v.detach() for k, v in prompts.prompt_parameters(learner).items()}
    if lead:
        save_atomic({"prompts": final, "config": vars(args), "classnames": classnames},
                    os.path.join(args.output_dir, "prompts.pt"))
    splits = {name: evaluate(args, clip, final, dataset, subsample, device, target)
              for name, dataset, subsample, target in evaluation_targets(args)}
    if not lead:
        return
    results = write_results(args, splits, device, time.time() - start_time)
    summary = ", ".join(f"{k} {v['accuracy']:.2f}" for k, v in splits.items())
    print(f"{summary}" + (f", HM {results['hm']:.2f}" if "hm" in results else "")
          + f"; results in {os.path.join(args.output_dir, 'results.json')}")


def epoch_line(epoch: int, epochs: int, seen: list, lr: float, seconds: float) -> str:
    """--no-progress: one line per epoch, the mean training loss and accuracy of its iterations."""
    loss, accuracy = (statistics.fmean(values) for values in zip(*seen)) if seen else (math.nan, math.nan)
    return f"epoch {epoch + 1}/{epochs}: loss {loss:.4f}, accuracy {accuracy:.1f}%, lr {lr:.2e}, {seconds:.1f} s"


def open_log(path, start_epoch, key="epoch", write=True):
    """The per-iteration log, `log.jsonl`, opened for appending. A fresh run starts it empty; a resumed run keeps
    the lines of the epochs its checkpoint holds and drops those of the interrupted epoch, which runs again, so
    every iteration appears exactly once (GRAM: key="step", the steps its checkpoint holds). write=False (torchrun's
    other processes): a sink."""
    if not write:
        return open(os.devnull, "w")
    kept = []
    if start_epoch > 0 and os.path.exists(path):
        with open(path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)[key] < start_epoch]
    with open(f"{path}.tmp", "w") as f:
        f.writelines(kept)
    os.replace(f"{path}.tmp", path)
    return open(path, "a")


def named_diagnostics(diagnostics: dict | None) -> dict:
    """GRAM's per-step diagnostics (meta.regulation_diagnostics) as log.jsonl fields: gram_step_ratio, gram_cos,
    gram_gate."""
    return {f"gram_{k}": v for k, v in (diagnostics or {}).items()}


def log_iteration(log, position: dict, values: dict, tick) -> float:
    """One JSON line: where in the run (epoch and iteration within it; GRAM: step), every value (loss terms,
    training accuracy (%), lr; tensors or numbers), wall seconds since the previous line (batch loading included).
    Flushed at once, so an interrupted run loses no finished line. Returns the time of this line."""
    now = time.perf_counter()
    record = {**position, **{k: v.item() if torch.is_tensor(v) else float(v) for k, v in values.items()},
              "seconds": round(now - tick, 4)}
    log.write(json.dumps(record) + "\n")
    log.flush()
    return now


# ----------------------------------------------------------------------------------------------------------------
# GRAM meta-training on image-caption pairs (arXiv:2303.06571v2; the form of SUPMER's released meta-training, see
# meta.py for which choice comes from where)

def gram_learner(args, clip):
    """The prompt model GRAM meta-trains (CoOp's context or IVLP's prompts), built for a stand-in class name: in
    meta-training the captions take the class name's place."""
    return prompts.build_learner(args.base, clip, ["object"], ["a photo of a {}."], n_ctx=args.n_ctx,
                                 ctx_init=args.ctx_init, n_ctx_text=args.n_ctx_text, n_ctx_vision=args.n_ctx_vision,
                                 text_depth=args.text_depth, vision_depth=args.vision_depth)


def gram_regulators(args, learner, kind=None, norm_mode=None) -> meta.RegulatorBank:
    shapes = {k: v.shape for k, v in prompts.prompt_parameters(learner).items()}
    return meta.RegulatorBank(shapes, prompts.modality, kind=kind or args.gram_regulator,
                              norm_mode=norm_mode or args.gram_norm_mode).to(learner.clip.logit_scale.device)


def encode_pairs(learner, params, batch):
    """A learner's PairOutput of a batch (images or their cached features, prompted captions) through `params`."""
    images, captions = batch
    return torch.func.functional_call(learner, params, (images,), {"captions": captions})


def pair_loss(learner, params, batch) -> tuple:
    """CLIP's symmetric InfoNCE of a batch of pairs through the prompts `params` (reconstruction: GRAM's task loss),
    and each prompt's regulator context (the mean final hidden state of its prompted encoder). batch = (images,
    captions, negatives: None or a batch of other concepts' pairs, the candidates instead of the set's own pairs)."""
    images, captions, negatives = batch
    out = encode_pairs(learner, params, (images, captions))
    neg = encode_pairs(learner, params, negatives) if negatives is not None else None
    loss = meta.contrastive_loss(out.image_features, out.text_features, learner.clip.logit_scale.exp(),
                                 *((neg.image_features, neg.text_features) if neg is not None else ()))
    contexts = {name: out.contexts[prompts.modality(name)].to(p.dtype) for name, p in params.items()}  # autocast: back
    return loss, contexts


def pair_batch(learner, pairs, index, transform, device, image_features=None) -> tuple:
    """(images (B, 3, R, R), prompted captions) of the pairs `index`; with `image_features` (N, E), the cached CLIP
    features of every pair (a learner without image prompts: CoOp), those rows (B, E) instead of the images."""
    if image_features is not None:
        images = image_features[index].to(device)
    else:
        images = torch.stack([transform(data.read_image(pairs[i].impath)) for i in index.tolist()]).to(device)
    captions = prompts.caption_prompts(learner.clip, [pairs[i].caption for i in index.tolist()],
                                       learner.ctx.shape[-2], learner.text_prefix)
    return images, captions


def gram_step(args, learner, regulators, optimizer, regulator_optimizer, tasks, agreement, generator, first,
              n_tasks=None, offset=0, scaler=None):
    """One meta-training step (SUPMER: model/meta.py:77-212) over tasks (support, query, partner, negatives or None,
    domain similarity): per task the regulated inner step, the query loss at the adapted prompts (first order in the
    prompts, exact in the regulators), the gradient agreement s, the gate regularizer; then clipped Adam steps and
    s's running mean. Also logged: meta.regulation_diagnostics of the inner step. torchrun: this process's tasks
    start at `offset` of `n_tasks`. Returns (losses, agreement)."""
    params, scaler = prompts.prompt_parameters(learner), scaler or NO_LOSS_SCALING
    loss_factor = loss_scale(scaler)  # fixed for the step: the scaler only updates at its end
    optimizer.zero_grad(set_to_none=True)
    regulator_optimizer.zero_grad(set_to_none=True)
    n, sims = n_tasks or len(tasks), []
    logged = {"support": 0.0, "outer": 0.0, "lam": 0.0, "gate": 0.0, "step_ratio": 0.0, "cos": 0.0}
    scale, device = learner.clip.logit_scale.exp(), learner.clip.logit_scale.device.type
    lams = [meta.curriculum_lambda(agreement, generator) for _ in range(n)]  # the same stream in every process
    groups = {regulators.key(k): k for k in params}  # one gate per regulator
    for lam, (support, query, partner, negatives, domain_similarity) in zip(lams[offset:], tasks):
        with meta.second_order_attention(args.gram_second_order):  # double backward through attention: math kernel
            adapted, regulated, gates, support_loss, contexts, raw = meta.regulated_inner_update(
                in_precision(args, device, lambda p, b: pair_loss(learner, p, b)), params, regulators,
                (*support, negatives), alpha=args.gram_alpha, second_order=args.gram_second_order,
                loss_scale=loss_factor)
            with autocast(args, device):
                outer = query_loss(learner, adapted, query, partner, negatives, lam, scale)
            query_grads = task_gradients(scaler, outer / n, params, n, loss_factor)
        s_tau = statistics.fmean(meta.gradient_agreement(query_grads[k], regulated[k].detach()) for k in params)
        if args.gram_gate_regularizer and args.gram_regulator != "meta_sgd":
            terms = [meta.gate_regularizer(regulators.gate(k, contexts[k]), domain_similarity, s_tau)
                     for k in groups.values()]
            scaler.scale(sum(terms) / n).backward()  # its only gradient path is the gate
        sims.append(s_tau)
        accumulate(logged, n, support=float(support_loss), outer=float(outer.detach()), lam=lam,
                   **meta.regulation_diagnostics(params, raw, regulated, gates, args.gram_alpha))
    clipped_steps(args, scaler, [params, regulators], [optimizer, regulator_optimizer], args.gram_clip)
    totals = all_reduce_sum(args, torch.tensor([sum(sims), *logged.values()], dtype=torch.float64,
                                               device=learner.clip.logit_scale.device))
    mean_sim, logged = float(totals[0]) / n, dict(zip(logged, totals[1:].tolist()))
    agreement = mean_sim if first else 0.5 * agreement + 0.5 * mean_sim  # SUPMER: meta.py:205-210
    logged.update(similarity=mean_sim, agreement=agreement)
    return {k: torch.tensor(v, dtype=torch.float64) for k, v in logged.items()}, agreement


def query_loss(learner, adapted, query, partner, negatives, lam: float, scale) -> torch.Tensor:
    """GRAM's outer loss: the query batch mixed with its partner (meta.mixup_contrastive_loss) at the adapted
    prompts, against the task's negatives (or, without them, both batches' own pairs)."""
    q, a = encode_pairs(learner, adapted, query), encode_pairs(learner, adapted, partner)
    neg = encode_pairs(learner, adapted, negatives) if negatives is not None else None
    return meta.mixup_contrastive_loss(q.image_features, q.text_features, a.image_features, a.text_features, lam,
                                       scale, *((neg.image_features, neg.text_features) if neg is not None else ()))


def task_gradients(scaler, loss, params, n: int, loss_factor: float) -> dict:
    """What one task's (fp16: scaled) loss adds to the prompts' accumulated .grad, unscaled and times n (the task's
    own gradient, the loss being its 1/n share of the meta-batch's): its backward, less the .grad before it."""
    before = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for k, p in params.items()}
    scaler.scale(loss).backward()
    return {k: (p.grad - before[k]) * n / loss_factor for k, p in params.items()}


def accumulate(logged: dict, n: int, **values):
    """Add each value's 1/n share to the meta-batch's logged means."""
    for key, value in values.items():
        logged[key] += value / n


def clipped_steps(args, scaler, modules, optimizers, max_norm: float):
    """The gradients of `modules` summed over processes (torchrun) and unscaled (fp16), each module's clipped to
    `max_norm` on its own, then every optimizer's step and the loss scale's update."""
    summed_and_unscaled(args, scaler, modules, optimizers)
    for module in modules:
        torch.nn.utils.clip_grad_norm_(list(module.values() if isinstance(module, dict) else module.parameters()),
                                       max_norm)
    step_optimizers(scaler, *optimizers)


class TaskTree(NamedTuple):
    """The meta-training tasks' structure over the pairs: leaf and concept of every pair (N,) (-1: a dropped leaf),
    the leaves' centroids (L, E), and the pairs' frozen CLIP image features (N, E)."""

    leaves: torch.Tensor
    concepts: torch.Tensor
    centroids: torch.Tensor
    image_features: torch.Tensor


TASK_TREE_VERSION = 2  # in the cache's key: 2 added the concepts and the image features


def gram_task_tree(args, clip, pairs, device) -> TaskTree:
    """The cross-modal hierarchical clustering of the pairs' frozen CLIP embeddings (a TaskTree); cached next to the
    CSV (the cache is keyed by the CSV's SHA256, the backbone and the clustering settings)."""
    key = hashlib.sha256(f"{clip_model.sha256_of(args.pairs)} {args.backbone} {args.gram_k_text} {args.gram_k_image} "
                         f"{2 * args.gram_batch} {args.seed} {TASK_TREE_VERSION}".encode()).hexdigest()[:16]
    cache = Path(args.pairs).with_name(f"{Path(args.pairs).name}.gram-tree-{key}.pt")
    if cache.exists():
        return TaskTree(**torch.load(cache, weights_only=True))
    transform = data.build_transform(False, clip.visual.input_resolution)
    image_features, text_features = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), data.TEST_BATCH_SIZE):
            chunk = pairs[start:start + data.TEST_BATCH_SIZE]
            images = torch.stack([transform(data.read_image(p.impath)) for p in chunk]).to(device)
            text = clip_model.tokenize([p.caption for p in chunk], context_length=clip.context_length, truncate=True)
            image_features.append(clip.encode_image(images).cpu())
            text_features.append(clip.encode_text(text.to(device)).cpu())
    image_features, text_features = torch.cat(image_features), torch.cat(text_features)
    leaves, concepts = meta.hierarchical_clusters(text_features, image_features, k_text=args.gram_k_text,
                                                  k_image=args.gram_k_image, min_size=2 * args.gram_batch,
                                                  seed=args.seed)
    if int(leaves.max()) + 1 < max(args.gram_tasks, 2):
        raise data.DataError(f"{args.pairs}: {len(pairs)} pairs give {int(leaves.max()) + 1} clusters of at least "
                             f"{2 * args.gram_batch} pairs, fewer than a meta-batch of {args.gram_tasks} tasks needs; "
                             "add pairs, or lower --gram-k-text / --gram-k-image / --gram-batch / --gram-tasks")
    tree = TaskTree(leaves, concepts, meta.leaf_centroids(image_features, leaves), image_features)
    if args.rank == 0:  # torchrun: every process computes the same tree; one writes it
        save_atomic(tree._asdict(), cache)
    return tree


def meta_train_gram(args):
    """`--method gram`: meta-train a prompt initialisation and its gradient regulators on image-caption pairs, with
    atomic checkpoints every --gram-checkpoint-every steps, `--resume`, log.jsonl, and <output-dir>/gram.pt at the end."""
    start_time, device = time.time(), args.device
    start_distributed(args)  # torchrun: the meta-batch's tasks shared out; process 0 writes
    lead = args.rank == 0
    check_backbone(args.backbone)
    if lead:
        check_output_dir(args)
    pairs = data.read_pairs(args.pairs, args.csv_img_key, args.csv_caption_key, args.csv_separator)
    if len(pairs) < 2 * args.gram_batch * (args.gram_tasks + 1):
        raise data.DataError(f"{args.pairs} holds {len(pairs)} pairs; one meta-batch needs at least "
                             f"{2 * args.gram_batch * (args.gram_tasks + 1)} (--gram-tasks {args.gram_tasks} leaves "
                             f"of 2 x --gram-batch {args.gram_batch}, and partners)")
    if lead:
        claim_output_dir(args)
        print(run_summary(args), flush=True)
    seed_everything(args.seed)
    clip = clip_model.load(args.backbone, device=device)
    learner = gram_learner(args, clip)
    regulators = gram_regulators(args, learner)
    params = prompts.prompt_parameters(learner)
    optimizer = torch.optim.Adam(params.values(), lr=args.gram_prompt_lr, weight_decay=0.0)
    regulator_optimizer = torch.optim.Adam(regulators.parameters(), lr=args.gram_regulator_lr, weight_decay=0.0)
    scaler = torch.amp.GradScaler(device, enabled=args.precision == "fp16")  # loss scaling for fp16 only
    tree = gram_task_tree(args, clip, pairs, device)
    # a learner without image prompts (CoOp) sees the same image features every step: the tree's, computed once
    features = tree.image_features if isinstance(learner, prompts.FROZEN_IMAGE) else None
    initial_regulators = {k: v.detach().clone() for k, v in regulators.state_dict().items()}
    generator = torch.Generator().manual_seed(args.seed)  # leaves, partners, curriculum: one dedicated stream
    transform = data.build_transform(False, clip.visual.input_resolution)
    ckpt_path, start_step, agreement = os.path.join(args.output_dir, "checkpoint.pt"), 0, 0.0
    if args.resume and os.path.exists(ckpt_path):
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        prompts.load_prompts(learner, ckpt["prompts"])
        regulators.load_state_dict(ckpt["regulators"])
        optimizer.load_state_dict(ckpt["optimizer"])
        regulator_optimizer.load_state_dict(ckpt["regulator_optimizer"])
        start_step, agreement = ckpt["step"], ckpt["agreement"]
        initial_regulators = ckpt["initial_regulators"]
        generator.set_state(ckpt["generator"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    log = open_log(os.path.join(args.output_dir, "log.jsonl"), start_step, key="step", write=lead)
    bar = progress(range(start_step, args.gram_steps), "GRAM meta-training", args.no_progress)
    tick = time.perf_counter()
    for step in bar:
        decay = 1 - step / args.gram_steps  # SUPMER: linear decay to 0, no warm-up
        for opt, lr in ((optimizer, args.gram_prompt_lr), (regulator_optimizer, args.gram_regulator_lr)):
            for group in opt.param_groups:
                group["lr"] = lr * decay
        episodes = meta.sample_episodes(tree.leaves, args.gram_tasks, args.gram_batch, generator,
                                        args.gram_partner_any_leaf, tree.concepts, args.gram_negatives)
        mine = share(len(episodes), args)[0]  # torchrun: this process's tasks (every process draws them all)
        tasks = []
        for e in episodes[mine]:
            batch = lambda idx: pair_batch(learner, pairs, idx, transform, device, features)
            similarity = (1 + F.cosine_similarity(tree.centroids[e.leaf], tree.centroids[e.augmentation_leaf], dim=0))
            tasks.append((batch(e.support), batch(e.query), batch(e.augmentation),
                          batch(e.negatives) if e.negatives is not None else None, float(similarity / 2)))
        losses, agreement = gram_step(args, learner, regulators, optimizer, regulator_optimizer, tasks, agreement,
                                      generator, first=step == 0, n_tasks=len(episodes), offset=mine.start,
                                      scaler=scaler)
        losses["regulator_moved"] = meta.distance_from(regulators, initial_regulators)
        bar.set_postfix(outer=f"{float(losses['outer']):.3f}", s=f"{agreement:.3f}")
        tick = log_iteration(log, {"step": step}, {**losses, "lr": args.gram_prompt_lr * decay}, tick)
        if lead and ((step + 1) % args.gram_checkpoint_every == 0 or step + 1 == args.gram_steps):
            save_atomic({"prompts": {k: v.detach() for k, v in params.items()}, "regulators": regulators.state_dict(),
                         "optimizer": optimizer.state_dict(), "regulator_optimizer": regulator_optimizer.state_dict(),
                         "step": step + 1, "agreement": agreement, "generator": generator.get_state(),
                         "initial_regulators": initial_regulators,
                         "scaler": scaler.state_dict(), "config": vars(args)}, ckpt_path)
    log.close()
    if not lead:
        return
    file = gram_file(args, learner, regulators)
    save_atomic(file, os.path.join(args.output_dir, "gram.pt"))
    print(f"GRAM meta-trained {args.gram_steps} steps in {time.time() - start_time:.0f} s; the learned context's "
          f"mean token norm {file['config']['context_norm']:.3f} against the token embeddings' "
          f"{file['config']['token_embedding_norm']:.3f}; wrote {os.path.join(args.output_dir, 'gram.pt')}")


def gram_file(args, learner, regulators) -> dict:
    """What downstream training needs: the prompt initialisation, the regulators and how to rebuild them; and the
    learned text context's mean norm per token beside the CLIP token embeddings' (where the context sits on their
    scale)."""
    params = prompts.prompt_parameters(learner)
    return {"prompts": {k: v.detach().cpu() for k, v in params.items()},
            "regulators": {k: v.cpu() for k, v in regulators.state_dict().items()},
            "config": {"base": args.base, "backbone": str(args.backbone), "kind": args.gram_regulator,
                       "backbone_fingerprint": clip_model.fingerprint(args.backbone),
                       "norm_mode": args.gram_norm_mode, "shapes": {k: list(v.shape) for k, v in params.items()},
                       "ctx_init": args.ctx_init, "pairs": str(args.pairs), "steps": args.gram_steps,
                       "seed": args.seed, "context_norm": float(learner.ctx.detach().norm(dim=-1).mean()),
                       "token_embedding_norm": float(learner.clip.token_embedding.weight.norm(dim=-1).mean())}}


def run(args):
    """main(args), or for `--target-domain all` main once per target domain of the DG suite (in <output-dir>/<target>)
    and then <output-dir>/results.json with the accuracy per target and their average (MetaPrompt's DG tables)."""
    set_tf32(args.tf32)
    try:
        if args.method == "gram":
            return meta_train_gram(args)
        if args.protocol != "multi_source_dg" or args.target_domain != "all":
            return main(args)
        return run_every_target(args)
    finally:  # every exit path (results, an error, Ctrl-C): gloo's threads must not outlive the interpreter
        stop_distributed()


def run_every_target(args):
    """--target-domain all: main() for each held-out domain in turn, then the average (run's docstring)."""
    check_inputs(args)
    claim_output_dir(args)
    per_target, start_time = {}, time.time()
    for target in data.get_spec(args.dataset).domains:
        target_args = argparse.Namespace(**{**vars(args), "target_domain": target,
                                            "output_dir": os.path.join(args.output_dir, target)})
        done = os.path.join(target_args.output_dir, "results.json")
        if not (args.resume and os.path.exists(done)):  # --resume: a finished target is not run again
            main(target_args)
        with open(done) as f:
            per_target[target] = json.load(f)["splits"]["test"]
    average = {k: sum(m[k] for m in per_target.values()) / len(per_target) for k in ("accuracy", "macro_f1")}
    write_results(args, {**per_target, "average": average}, args.device, time.time() - start_time)
    print(f"average over {len(per_target)} target domains: {average['accuracy']:.2f}; "
          f"results in {os.path.join(args.output_dir, 'results.json')}")


def progress(iterable, desc, disable):
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, disable=disable, leave=False)


def where_stopped(args) -> str:
    """Where an interrupted run stopped, from what its run folder holds (its last checkpoint)."""
    domains = data.get_spec(args.dataset).domains if args.dataset in data.DATASETS else ()
    folders = [Path(args.output_dir) / t for t in domains] if args.target_domain == "all" else [Path(args.output_dir)]
    for folder in folders:
        if (folder / "results.json").exists():
            continue
        ckpt = folder / "checkpoint.pt"
        if not ckpt.exists():
            return f"{folder}: before its first checkpoint"
        done = torch.load(ckpt, map_location="cpu", weights_only=True)
        if args.method == "gram":
            return f"{folder}: {done['step']} of {args.gram_steps} steps checkpointed"
        return f"{folder}: {done['epoch']} of {args.epochs} epochs checkpointed"
    return f"{args.output_dir}: after training"


def cli(argv=None) -> int:
    """The command line: run(), one line per user error (exit 1); Ctrl-C: where it stopped and the command that
    resumes it (exit 130); argparse's mistakes exit 2 (data.ArgumentParser)."""
    data.one_line_warnings()
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        run(args)
    except (data.DataError, clip_model.CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"error: {data.error_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        command = shlex.join(["python", "train.py", *argv,
                              *([] if "--resume" in argv else ["--resume"])])
        print(f"interrupted, {where_stopped(args)}; resume with: {command}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
