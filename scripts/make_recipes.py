"""Write the recipe grid {simclr, moco} x {infonce, +sec, +circle, +sec+circle} for CIFAR-10/100.
(recipes/stl10/, imagenet100/ and cifar10/mocov3.yaml are written by hand.)

    python scripts/make_recipes.py

Each recipe is written out complete (no inheritance); this script only keeps the grid
consistent. Edit the values here, re-run, and commit the YAML files.
"""

from __future__ import annotations

from pathlib import Path

from ssl_sec.data.registry import DATASETS

ROOT = Path(__file__).resolve().parents[1] / "recipes"

# Circle's margin and gamma: the best mean over 3 seeds in eval/sweep_circle.py (see
# eval/RESULTS.md).
CIRCLE = {"margin": 0.4, "gamma": 4.0}

METHOD = {
    "simclr": """\
# Sources: solo-learn scripts/pretrain/cifar/simclr.yaml (LARS lr 0.4 per 256 images,
# scaled linearly to 0.8 for 512; wd 1e-5; LARS eta 0.02 excluding bias/norm; T 0.2;
# 10 warmup epochs; crop scale 0.08-1; jitter 0.4/0.4/0.2/0.1 p 0.8; gray 0.2; no blur on
# 32x32); SimCLR paper appendix B.9 (2048-d hidden, 128-d output). 200 epochs matches the
# lightly CIFAR-10 benchmark row in docs/methods.md (kNN 84.8 at 200 epochs).
method: simclr
augment:
  size: 32
  crop_scale: [0.08, 1.0]
  hflip_p: 0.5
  jitter_p: 0.8
  brightness: 0.4
  contrast: 0.4
  saturation: 0.2
  hue: 0.1
  gray_p: 0.2
  blur_p: 0.0
  solarize_p: 0.0
model:
  arch: resnet18
  cifar_stem: true
  proj_hidden_dim: 2048
  proj_output_dim: 128
optim:
  name: lars
  lr: 0.8
  weight_decay: 1.0e-5
  batch_size: 512
  epochs: 200
  warmup_epochs: 10
""",
    "moco": """\
# Sources: MoCo CIFAR-10 demo (facebookresearch/moco, colab: batch 512, SGD lr 0.06, wd 5e-4,
# cosine, 200 epochs, T 0.1, queue 4096, m 0.99, symmetric loss, split-BN with 8 groups,
# crop + flip + jitter 0.4/0.4/0.4/0.1 p 0.8 + gray 0.2) with MoCo v2's 2-layer MLP head
# (2048 hidden, 128 out; Chen et al. 2020). The demo reaches kNN 85.3 at 200 epochs.
method: moco
augment:
  size: 32
  crop_scale: [0.08, 1.0]
  hflip_p: 0.5
  jitter_p: 0.8
  brightness: 0.4
  contrast: 0.4
  saturation: 0.4
  hue: 0.1
  gray_p: 0.2
  blur_p: 0.0
  solarize_p: 0.0
model:
  arch: resnet18
  cifar_stem: true
  proj_hidden_dim: 2048
  proj_output_dim: 128
moco:
  queue_size: 4096
  momentum: 0.99
  momentum_schedule: constant
  symmetric: true
  bn_remedy: split
  bn_splits: 8
optim:
  name: sgd
  lr: 0.06
  weight_decay: 5.0e-4
  batch_size: 512
  epochs: 200
  warmup_epochs: 0
""",
}
TEMPERATURE = {"simclr": 0.2, "moco": 0.1}

SEC = """\
  # SEC (Zhang et al. 2020) on the projector output of both views (MoCo: of the queries).
  # The weight ramps linearly from 0 to eta over the run, as in the SEC authors' SSL code;
  # eta = 0.01 is the default weight of their SEC class; mu is the detached batch mean norm.
  sec:
    eta: 0.01
    ramp: linear
    mu: batch
    features: projector
"""
CIRCLE_TEXT = f"""\
  # Circle-style term (Sun et al. 2020) beside InfoNCE. No published SSL setting exists;
  # margin and gamma come from the sweep in eval/sweep_circle.py (eval/RESULTS.md).
  circle:
    weight: 1.0
    margin: {CIRCLE['margin']}
    gamma: {CIRCLE['gamma']}
"""
OBJECTIVES = {"": ("InfoNCE", ""), "_sec": ("InfoNCE + SEC", SEC),
              "_circle": ("InfoNCE + Circle", CIRCLE_TEXT),
              "_sec_circle": ("InfoNCE + SEC + Circle", SEC + CIRCLE_TEXT)}
# The 32x32 datasets of the registry (image folders and STL-10 have hand-written recipes).
GRID = {name: spec.title for name, spec in DATASETS.items() if name.startswith("cifar")}


def main() -> None:
    for dataset, pretty in GRID.items():
        for method, body in METHOD.items():
            for suffix, (title, loss) in OBJECTIVES.items():
                name = f"{dataset}-{method}{suffix.replace('_', '-')}"
                text = (f"# {'MoCo v2' if method == 'moco' else 'SimCLR'} with {title} on "
                        f"{pretty}, ResNet-18 (CIFAR stem).\n{body}"
                        f"name: {name}\ndata:\n  dataset: {dataset}\n"
                        f"loss:\n  infonce:\n    temperature: {TEMPERATURE[method]}\n{loss}"
                        "eval:\n  knn_every: 10\n  knn_k: 200\n  knn_temperature: 0.1\n")
                path = ROOT / dataset / f"{method}{suffix}.yaml"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
                print(f"wrote {path.relative_to(ROOT.parent)}")


if __name__ == "__main__":
    main()
