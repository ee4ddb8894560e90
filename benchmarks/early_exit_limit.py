"""How close real early exit comes to its limit, on backbones that need no training run.

    python benchmarks/early_exit_limit.py [--setups resnet56 vit digits] [--targets 0.44 0.72]
        [--policies budgeted jei] [--rounds 5] [--batches 2] [--latency-images 200] [--threads N]
        [--clock wall|cpu] [--channels-last] [--fold-batchnorm] [--native-exits] [--reference-rev REV]
        [--out results.json]

For each setup (backbone and data), exit policy and target cost, in one interleaved run
(``speed_common``): each segment's share of the backbone's time and the latency-weighted
ideal for the policy's exit distribution, the mul-add cost of those exits, and real early
exit's time ratio against the backbone alone; images/s at batch 256 and p50/p99 latency at
batch 1 (with the batch-1 ideal). Prints the README's tables and writes the JSON to ``--out``.

``--native-exits`` runs real early exit with native exits (``jei.native_exits``) and times the
Python path of the same network beside it, as the reference column; the exits that differ
between the two are counted.

Setups (random exit heads: timing does not depend on trained IMs):
- ``resnet56``: the frozen CIFAR-10 ResNet-56 (Idelbayev's weights in the shared data folder),
  an exit after every third residual block (configs/experiment/cifar10_resnet56.yaml), on real
  CIFAR-10 test images;
- ``vit``: the timm ViT of configs/experiment/cifar10_vit.yaml (32x32, 8x8 patches, 6 blocks of
  width 128), random weights, an exit after every block but the last, on CIFAR-10 test images;
- ``digits``: the default small CNN on scikit-learn's 8x8 digits, random weights.

Policies, set to reach each target expected cost on separate "fit" images (not measured):
- ``budgeted``: MSDNet's budgeted max-prob thresholds (``BudgetedThreshold``), q chosen by
  bisection; a geometric spread of exits;
- ``jei``: JEI-DNN's rule on random uncertainty gates whose biases are shifted together,
  the shift chosen by bisection (the gates run at every exit).

Data comes from ``$JEI_SHARED_DATA`` or the ``shared/data`` folder beside the repository, so the
script runs from any directory; without CIFAR-10 there it uses random images (and says so).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_common import CLOCKS, Row, as_dict, exit_costs, markdown_tables, measure_batches, measure_latency

from jei.batchnorm_folding import fold_frozen_batchnorm
from jei.memory_format import to_channels_last
from jei.model import EarlyExitNetwork
from jei.policies import BudgetedThreshold, JEIRule
from jei.registry import BACKBONES, GATES, IMS
from jei.types import ExitOutputs

REPO = Path(__file__).resolve().parents[1]
RESNET56_WEIGHTS = "weights/resnet_cifar10_idelbayev/resnet56-4bfd9763.th"
VIT_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 6, "embed_dim": 128, "num_heads": 4, "mlp_ratio": 2.0}


def shared_data() -> Path:
    """``$JEI_SHARED_DATA``, else ``shared/data`` next to the repository (configs/paths)."""
    env = os.environ.get("JEI_SHARED_DATA")
    return Path(env).expanduser() if env else (REPO.parent / "shared" / "data")


def cifar_images(count: int, normalize: str) -> tuple[torch.Tensor, str]:
    """The first ``count`` CIFAR-10 test images, or random ones when the data is missing."""
    from jei.data.cifar import load_cifar10

    try:
        data = load_cifar10(str(shared_data()), max_per_split=count, normalize=normalize)
    except (FileNotFoundError, ValueError) as err:
        print(f"CIFAR-10 not available ({err}); timing on random images instead", file=sys.stderr)
        return torch.randn(count, 3, 32, 32, generator=torch.Generator().manual_seed(0)), "random images"
    images = torch.cat([x for x, _ in data.batches("test", 1024)])
    return images[:count], "CIFAR-10 test images"


def digits_images(count: int) -> tuple[torch.Tensor, str]:
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = (images - images.mean()) / images.std()
    return images[:count], "scikit-learn digits"


def with_heads(backbone: torch.nn.Module, num_classes: int, seed: int) -> EarlyExitNetwork:
    """Random pool-linear IMs and uncertainty gates (weights std 3, so gates disagree)."""
    torch.manual_seed(seed)
    ims = [IMS.build("pool_linear", spec=spec, num_classes=num_classes) for spec in backbone.exit_specs]
    gates = [GATES.build("uncertainty", num_classes=num_classes) for _ in backbone.exit_specs]
    for gate in gates:
        torch.nn.init.normal_(gate.linear.weight, std=3.0)
        torch.nn.init.zeros_(gate.linear.bias)
    return EarlyExitNetwork(backbone, ims, gates).eval()


def build_setup(
    name: str, count: int, channels_last: bool = False, fold_batchnorm: bool = False
) -> tuple[EarlyExitNetwork, torch.Tensor, str]:
    torch.manual_seed(0)
    if name == "resnet56":
        weights = shared_data() / RESNET56_WEIGHTS
        if not weights.is_file():
            raise SystemExit(f"resnet56: weights file {weights} is missing (set JEI_SHARED_DATA)")
        backbone = BACKBONES.build("cifar_resnet", depth=56, num_classes=10, exit_every=3, weights=str(weights))
        images, source = cifar_images(count, "imagenet")
    elif name == "vit":
        backbone = BACKBONES.build(
            "timm", model_name="vit_tiny_patch16_224", num_classes=10, exits="all", model_kwargs=VIT_KWARGS
        )
        images, source = cifar_images(count, "cifar10")
    elif name == "digits":
        backbone = BACKBONES.build("small_cnn", in_channels=1, num_classes=10)
        images, source = digits_images(count)
    else:
        raise SystemExit(f"unknown setup {name!r}: choose resnet56, vit or digits")
    network = with_heads(backbone.freeze(), 10, seed=1)
    if channels_last:
        to_channels_last(network.backbone)
    if fold_batchnorm:
        fold_frozen_batchnorm(network.backbone)
    return network, images, source


def reference_early_exit(revision: str) -> Callable[[EarlyExitNetwork, Any], Any]:
    """``EarlyExitNetwork.early_exit`` as ``jei/model.py`` had it at git ``revision``, to time the
    current implementation against it in the same run (its module imports today's ``jei``)."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{revision}:jei/model.py"], check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(f"jei_model_{revision}")
    exec(compile(source, f"{revision}:jei/model.py", "exec"), module.__dict__)  # noqa: S102 (our own git history)
    return module.EarlyExitNetwork.early_exit


def bisect(cost_of: Callable[[float], float], target: float, low: float, high: float, increasing: bool) -> float:
    """The knob value whose expected cost is closest to ``target`` (cost monotone in the knob)."""
    best, best_gap = low, float("inf")
    for _ in range(40):
        middle = (low + high) / 2
        cost = cost_of(middle)
        if abs(cost - target) < best_gap:
            best, best_gap = middle, abs(cost - target)
        if (cost < target) == increasing:
            low = middle
        else:
            high = middle
    return best


def set_policy(network: EarlyExitNetwork, kind: str, target: float, outputs: ExitOutputs, costs: torch.Tensor) -> str:
    """Make ``network`` reach about ``target`` expected cost on ``outputs`` (the fit images)."""
    if kind == "budgeted":
        def fitted(log_q: float) -> BudgetedThreshold:
            policy = BudgetedThreshold(float(torch.tensor(log_q).exp()))
            policy.fit(outputs, torch.zeros(outputs.logits.shape[1], dtype=torch.long), costs)
            return policy

        log_q = bisect(lambda v: float(costs[fitted(v).decide(outputs)].mean()), target, -4.0, 4.0, increasing=True)
        network.policy = fitted(log_q)
        return f"budgeted max-prob (q={float(torch.tensor(log_q).exp()):.3f})"
    if kind == "jei":
        rule = JEIRule()

        def cost_with(shift: float) -> float:
            shifted = ExitOutputs(outputs.logits, outputs.gate_logits + shift)
            return float(costs[rule.decide(shifted)].mean())

        shift = bisect(cost_with, target, -40.0, 40.0, increasing=False)
        for gate in network.gates:
            torch.nn.init.constant_(gate.linear.bias, shift)
        network.policy = rule
        return f"JEI rule, gate bias {shift:+.2f}"
    raise SystemExit(f"unknown policy {kind!r}: choose budgeted or jei")


def add_setup_arguments(parser: argparse.ArgumentParser, setups: list[str], latency_images: int) -> None:
    """The options of the scripts built on ``build_setup`` and ``set_policy``: what to run and how much."""
    parser.add_argument("--setups", nargs="+", default=setups)
    parser.add_argument("--policies", nargs="+", default=["budgeted", "jei"])
    parser.add_argument("--targets", nargs="+", type=float, default=[0.44, 0.72])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--batches", type=int, default=2, help="measured batches per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--fit-images", type=int, default=512, help="images that set the policy (not timed)")
    parser.add_argument("--latency-images", type=int, default=latency_images, help="batch-1 images (0: skip)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_setup_arguments(parser, setups=["resnet56", "vit", "digits"], latency_images=200)
    parser.add_argument("--latency-repeats", type=int, default=1, help="passes over the batch-1 images")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: this process's CPU time (steady on a busy machine; use with --threads 1)")
    parser.add_argument("--channels-last", action="store_true",
                        help="the backbone's maps in NHWC (trainer.channels_last); backbone_transforms.py compares")
    parser.add_argument("--fold-batchnorm", action="store_true",
                        help="BatchNorm folded into the convolutions (trainer.fold_batchnorm)")
    parser.add_argument("--native-exits", action="store_true",
                        help="early exit with native exits, the Python path timed beside it as the reference")
    parser.add_argument("--reference-rev", default=None,
                        help="also time early_exit as it was at this git revision (e.g. 95dd08a), side by side")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    clock = CLOCKS[args.clock]
    if args.native_exits and args.reference_rev:
        raise SystemExit("--native-exits and --reference-rev both set the reference column: give one")
    old_early_exit = reference_early_exit(args.reference_rev) if args.reference_rev else None

    rows: list[Row] = []
    for setup in args.setups:
        measured = args.batches * args.batch_size
        network, images, source = build_setup(
            setup, args.fit_images + max(measured, args.latency_images),
            channels_last=args.channels_last, fold_batchnorm=args.fold_batchnorm,
        )
        fit, test = images[: args.fit_images], images[args.fit_images :]
        if len(test) < measured:
            raise SystemExit(f"{setup}: {len(test)} images left after fitting, {measured} needed")
        costs = exit_costs(network, test[:4])
        with torch.no_grad():
            outputs = network(fit)
        batches = [test[i * args.batch_size : (i + 1) * args.batch_size] for i in range(args.batches)]
        singles = [test[i : i + 1] for i in range(min(args.latency_images, len(test)))]
        for kind in args.policies:
            for target in args.targets:
                label = set_policy(network, kind, target, outputs, costs)
                print(f"[{setup}] {label}, target cost {target} ...", file=sys.stderr, flush=True)
                row = Row(setup, f"{kind} @ {target:.2f}", extra={"policy": label, "images": source})
                reference = None if old_early_exit is None else types.MethodType(old_early_exit, network)
                if args.native_exits:
                    network.use_native_exits()
                    reference = network._python_early_exit  # the Python path of the same network
                    row.extra["exits_differing_from_python"] = sum(
                        int((network.early_exit(x).exit_index != reference(x).exit_index).sum()) for x in batches + singles
                    )
                if old_early_exit is not None:  # it must agree with today's early exit
                    for x in batches[:1] + singles[:8]:
                        old, new = reference(x), network.early_exit(x)
                        if not torch.equal(old.exit_index.cpu(), new.exit_index.cpu()) or not torch.equal(old.logits, new.logits):
                            raise SystemExit(f"{setup}: early_exit at {args.reference_rev} disagrees with today's")
                row.batch = measure_batches(network, batches, args.rounds, costs, device, clock, reference)
                if singles:
                    row.latency = measure_latency(
                        network, singles, costs, device, clock, args.latency_repeats, reference=reference
                    )
                rows.append(row)
                print(markdown_tables([row]), file=sys.stderr, flush=True)
    report = {
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "torch": torch.__version__,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "rows": [
            {"setup": r.setup, "policy": r.policy, **r.extra,
             "batch": as_dict(r.batch) if r.batch else None, "latency": as_dict(r.latency) if r.latency else None}
            for r in rows
        ],
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.clock} clock, batch {args.batch_size} x "
          f"{args.batches} batches x {args.rounds} rounds; batch 1: {args.latency_images} images")
    print(markdown_tables(rows))


if __name__ == "__main__":
    main()
