"""Speed and peak memory of the project's hot paths (a benchmark, not a test; numbers go into the README).

`python benchmark.py clip` times CLIP ViT-B/16 (random weights: the speed does not depend on them) on this machine:
the image forward (batch 4, 224 px) and the text forward for 47 prompts (DTD's class count) with and without
truncation to the longest prompt. Each case runs in a fresh process, so its peak resident memory (ru_maxrss,
weights included) is its own. Reported time: median over repeats after one warm-up, under `torch.no_grad()`.
`python benchmark.py methods` times one training iteration of CoOp, IVLP, PromptSRC and ProMetaR (step A + the
second-order meta step) at ViT-B/16, batch 4, 24 classes (DTD's base classes, the setting
where the official ProMetaR code, mlvlab/ProMetaR @ c907bdb, took 41 s and 12.8 GB per iteration on a 2-core CPU),
the same way.

`python benchmark.py testbed` trains and evaluates zero-shot CLIP, CoOp, IVLP, ProMetaR and MetaPrompt on the offline
testbed with the shipped small CLIP and each method's testbed defaults from train.py, for seeds 1, 2, 3: base-to-new
on `world` (base / new / HM, mean ± std over the seeds), and leave-one-style-out multi-source DG on `world_styles`
with 1 and 5 shots per class and source style (accuracy per held-out style and the average). The README's testbed
tables come from this command; a run whose results.json exists is not run again, so an interrupted call resumes.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

import clip_model
import eval as evaluation
import meta
import prompts
import train

VIT_B16 = {"embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768,
           "vision_patch_size": 16, "context_length": 77, "vocab_size": 49408, "transformer_width": 512,
           "transformer_heads": 8, "transformer_layers": 12}  # shapes of OpenAI's ViT-B-16.pt
DTD_CLASSES = 47  # DTD (CoOp split_zhou_DescribableTextures.json)
BATCH = 4  # ProMetaR / PromptSRC configs DATALOADER.TRAIN_X.BATCH_SIZE
BASE_CLASSES = 24  # DTD base classes: ceil(47 / 2) (CoCoOp subsample_classes)
CASES = {"clip": ("image", "text_truncated", "text_full"), "methods": ("coop", "ivlp", "promptsrc", "prometar")}


def training_step(method: str, model):
    """One iteration of train.py's loop for `method` on random images (batch 4, 24 classes, 4 distinct labels so
    that ProMetaR's meta step always runs)."""
    args = train.parse_args(["--method", method, "--dataset", "dtd"])
    classnames = [f"class {i}" for i in range(BASE_CLASSES)]
    learner = train.learner_for(args, model, "dtd", classnames)
    params = prompts.prompt_parameters(learner)
    optimizer = torch.optim.SGD(params.values(), lr=args.lr, momentum=train.MOMENTUM)
    images, labels = torch.randn(BATCH, 3, 224, 224), torch.randperm(BASE_CLASSES)[:BATCH]
    templates = ["a photo of a {}.", "art of the {}."]  # two stand-ins: the teacher is computed once, not timed
    teacher = prompts.FrozenTeacher(model, classnames, templates) if method in ("promptsrc", "prometar") else None
    scaler = torch.amp.GradScaler(enabled=False)
    if method != "prometar":
        return lambda: train.sgd_step(args, learner, teacher, optimizer, scaler, images, labels, "cpu")
    gate = meta.GradientModulator({k: v.shape for k, v in params.items()})
    gate_optimizer = torch.optim.SGD(gate.parameters(), lr=args.regularizer_lr, momentum=train.MOMENTUM)
    return lambda: train.prometar_step(args, learner, teacher, gate, optimizer, gate_optimizer, images, labels)


def run_case(case: str, repeats: int) -> dict:
    torch.manual_seed(0)
    model = clip_model.CLIP(**VIT_B16).eval()
    if case in CASES["methods"]:
        step = training_step(case, model)
    elif case == "image":
        images = torch.randn(BATCH, 3, 224, 224)  # (B, 3, R, R)
        step = lambda: model.encode_image(images)
    else:
        text = clip_model.tokenize([f"a photo of a class{i} texture." for i in range(DTD_CLASSES)])  # (N, L)
        step = lambda: model.encode_text(text, truncate=case == "text_truncated")
    times = []
    with torch.set_grad_enabled(case in CASES["methods"]):
        for _ in range(repeats + 1):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes
    return {"case": case, "seconds": statistics.median(times[1:]), "peak_rss_mb": peak_mb,
            "threads": torch.get_num_threads()}


TESTBED_METHODS = ("zeroshot", "coop", "ivlp", "prometar", "metaprompt")
DG_SHOTS = (1, 5)  # MetaPrompt's DG table: 1 and 5 shots per class and source domain


def run_testbed(seeds, root: str, output: str, dg_shots=DG_SHOTS) -> str:
    """Every testbed method for every seed through train.py (base-to-new on world; DG on world_styles, every style
    held out in turn), then eval.py's two tables."""
    runs = [(method, ["--dataset", "world"], f"{output}/base2new/world/{method}/shots_16/seed_{seed}", seed)
            for method in TESTBED_METHODS for seed in seeds]
    runs += [(method, ["--dataset", "world_styles", "--target-domain", "all", "--shots", str(shots)],
              f"{output}/multi_source_dg/world_styles/{method}/shots_{shots}/seed_{seed}", seed)
             for shots in dg_shots for method in TESTBED_METHODS for seed in seeds]
    for method, extra, out, seed in runs:
        if not os.path.exists(f"{out}/results.json"):
            train.run(train.parse_args(["--method", method, "--seed", str(seed), "--root", root, *extra,
                                        "--output-dir", out, "--no-progress"]))
    return (evaluation.markdown_table(evaluation.collect(f"{output}/base2new")) + "\n\n"
            + evaluation.dg_table(evaluation.collect_dg(f"{output}/multi_source_dg")))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=[*CASES, "testbed"])
    parser.add_argument("--case", choices=[c for cases in CASES.values() for c in cases],
                        help="run one case in this process (used internally)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="testbed seeds")
    parser.add_argument("--dg-shots", type=int, nargs="+", default=list(DG_SHOTS), help="testbed DG shots")
    parser.add_argument("--root", default="data", help="testbed: where the world dataset is written")
    parser.add_argument("--output", default="output/testbed", help="testbed: where runs are written")
    args = parser.parse_args()
    if args.what == "testbed":
        print(run_testbed(args.seeds, args.root, args.output, args.dg_shots))
        return
    if args.case:
        print(json.dumps(run_case(args.case, args.repeats)))
        return
    print(f"| ViT-B/16, {torch.get_num_threads()} threads | seconds | peak RSS (MB) |\n|---|---|---|")
    for case in CASES[args.what]:
        out = subprocess.run([sys.executable, __file__, args.what, "--case", case, "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True).stdout
        result = json.loads(out)
        print(f"| {case} | {result['seconds']:.3f} | {result['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    main()
