"""Speed and peak memory of the project's hot paths (a benchmark, not a test; numbers go into the README).

`python benchmark.py clip` times CLIP ViT-B/16 (random weights: the speed does not depend on them) on this machine:
the image forward (batch 4, 224 px) and the text forward for 47 prompts (DTD's class count) with and without
truncation to the longest prompt. Each case runs in a fresh process, so its peak resident memory (ru_maxrss,
weights included) is its own. Reported time: median over repeats after one warm-up, under `torch.no_grad()`.
`python benchmark.py methods` times one training iteration (forward, backward, SGD step) of CoOp and IVLP at
ViT-B/16, batch 4, 24 classes (DTD's base classes; ProMetaR's setting, prometar.md Sec. 9), the same way.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

import clip_model
import prompts
import train

VIT_B16 = {"embed_dim": 512, "image_resolution": 224, "vision_layers": 12, "vision_width": 768,
           "vision_patch_size": 16, "context_length": 77, "vocab_size": 49408, "transformer_width": 512,
           "transformer_heads": 8, "transformer_layers": 12}  # protocol.md Sec. 7.2 (inferred from ViT-B-16.pt)
DTD_CLASSES = 47  # protocol.md Sec. 1.0
BATCH = 4  # ProMetaR / PromptSRC batch size (protocol.md Sec. 4)
BASE_CLASSES = 24  # DTD base classes (protocol.md Sec. 1.0)
CASES = {"clip": ("image", "text_truncated", "text_full"), "methods": ("coop", "ivlp")}


def training_step(method: str, model):
    """One iteration of train.py's loop for `method` on random images (batch 4, 24 classes)."""
    args = train.parse_args(["--method", method])
    learner = train.learner_for(args, model, "dtd", [f"class {i}" for i in range(BASE_CLASSES)])
    optimizer = torch.optim.SGD(prompts.prompt_parameters(learner).values(), lr=args.lr, momentum=train.MOMENTUM)
    images, labels = torch.randn(BATCH, 3, 224, 224), torch.randint(0, BASE_CLASSES, (BATCH,))

    def step():
        losses, _ = train.training_losses(args, learner, None, images, labels)
        optimizer.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        optimizer.step()
    return step


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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=list(CASES))
    parser.add_argument("--case", choices=[c for cases in CASES.values() for c in cases],
                        help="run one case in this process (used internally)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
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
