"""Centralised proxy for the BN vs BN-free gap (issue 15): minutes instead of a federated run.

Plain SGD on the CIFAR-10 training images (no clients), a static ERK mask at the
recipe density, batch 64, the learning rate decayed exponentially; accuracy on
a stride of the validation split. It reproduces the federated gap of each
model (MobileNetV2: BN 0.642 vs NSConv 0.429 before the depthwise change;
ResNet18: NSConv ahead), so a model change can be screened here first.

Diagnostic variants (`--variant`, joined with '+'); they patch this script's copy of the
model only:

    dwbn       BatchNorm after every depthwise conv (hybrid: which layer needs normalising?)
    projbn     BatchNorm after every MobileNetV2 projection
    dwcentred  depthwise NSConvs standardised with their mean (the plain NSConv of SPEC s. 4)
    cal        data-dependent gain calibration (models.signal.calibrate_gains)
    clscentre  the classifier sees its input minus the scaled ReLU's expected mean

    python benchmarks/nsconv_proxy.py --data ../shared/data/cifar10-jpeg-train.tar.xz --device cuda \\
        --bf16 --norm nsconv --variant dwcentred
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn

from fedmef_toolkit.data import load_data
from fedmef_toolkit.data.augment import DeviceAugment
from fedmef_toolkit.fl.plan import ClientPlan
from fedmef_toolkit.fl.stepgraph import GraphedStep
from fedmef_toolkit.layers import NSConv2d
from fedmef_toolkit.models import get_model
from fedmef_toolkit.models.blocks import SCALED_RELU_MEAN
from fedmef_toolkit.models.signal import calibrate_gains
from fedmef_toolkit.recipe import DataSpec
from fedmef_toolkit.sparse.masks import apply_masks, attach_masks, init_masks

VARIANTS = ("dwbn", "projbn", "dwcentred", "cal", "clscentre")


def _depthwise_to_bn(model: nn.Module) -> None:
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if isinstance(child, NSConv2d) and child.groups > 1 and child.groups == child.in_channels:
                setattr(mod, name, nn.Sequential(
                    nn.Conv2d(child.in_channels, child.out_channels, 3, child.stride, 1, groups=child.groups,
                              bias=False), nn.BatchNorm2d(child.out_channels)))


def build(args) -> nn.Module:
    parts = set(filter(None, args.variant.split("+")))
    unknown = parts - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variant(s) {sorted(unknown)}; known: {', '.join(VARIANTS)}")
    kw = {"nsconv_alpha": args.alpha, "nsconv_center_depthwise": "dwcentred" in parts} if args.norm == "nsconv" else {}
    model = get_model(args.arch, 10, norm=args.norm, width=args.width, **kw)
    if "dwbn" in parts:
        _depthwise_to_bn(model)
    if "projbn" in parts:
        for block in model.features:
            last = block.block[-1]
            block.block[-1] = nn.Sequential(nn.Conv2d(last.in_channels, last.out_channels, 1, bias=False),
                                            nn.BatchNorm2d(last.out_channels))
    if "clscentre" in parts:
        classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        classifier.register_forward_pre_hook(lambda mod, inp: (inp[0] - SCALED_RELU_MEAN,))
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CIFAR-10 root or archive")
    ap.add_argument("--arch", default="mobilenetv2")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--norm", default="nsconv", choices=["bn", "nsconv"])
    ap.add_argument("--alpha", type=float, default=0.2, help="residual branch scale of the BN-free blocks")
    ap.add_argument("--variant", default="", help="+-joined: " + ", ".join(VARIANTS))
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--lr-end", type=float, default=0.01, help="decayed exponentially to this by the last step")
    ap.add_argument("--momentum", type=float, default=0.0)
    ap.add_argument("--weight-decay", type=float, default=5e-4)
    ap.add_argument("--agc", type=float, default=0.0)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--eval-images", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast (CUDA)")
    args = ap.parse_args()

    dev = torch.device(args.device)
    torch.manual_seed(0)
    data = load_data(DataSpec(dataset="cifar10", root=args.data), "val", 0)
    aug = DeviceAugment(*data.channel_stats()).to(dev)
    tx, ty = data.train_x.to(dev), data.train_y.to(dev)
    stride = max(1, len(data.eval_y) // args.eval_images)  # the validation split is in class order
    ex, ey = data.eval_x[::stride].to(dev), data.eval_y[::stride].to(dev)
    model = build(args).to(dev)
    if args.density < 1:
        attach_masks(model, {k: v.to(dev) for k, v in init_masks(model, args.density, "erk", "random", 0).items()})
        apply_masks(model)
    if "cal" in args.variant.split("+"):
        calibrate_gains(model, aug.train(tx[:256], torch.Generator(device=dev).manual_seed(1)))
    # the simulator's local step (fl/stepgraph.py): masks, AGC, SGD with decay on weights only
    stepper = GraphedStep(model, batch_size=args.batch, momentum=args.momentum, weight_decay=args.weight_decay,
                          agc=args.agc, cuda_graphs=False,
                          autocast=lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16))
    stepper.begin(ClientPlan(args.lr))
    gen = torch.Generator(device=dev).manual_seed(0)
    amp = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=args.bf16)
    t0, losses = time.time(), []
    for step in range(args.steps):
        idx = torch.randint(0, len(ty), (args.batch,), generator=gen, device=dev)
        before = float(stepper.loss_sum)
        stepper.step(aug.train(tx[idx], gen), ty[idx], args.lr * (args.lr_end / args.lr) ** (step / args.steps))
        loss = stepper.loss_sum - before
        losses.append(float(loss))
        if not torch.isfinite(loss):
            break
    model.eval()
    correct = 0
    with torch.no_grad(), torch.autocast(**amp):
        for i in range(0, len(ey), 500):
            correct += int((model(aug.normalize(ex[i:i + 500])).argmax(1) == ey[i:i + 500]).sum())
    tail = losses[-50:]
    print(f"{args.arch} {args.norm} {args.variant or 'base'} lr={args.lr} momentum={args.momentum} "
          f"steps={len(losses)} loss(last 50)={sum(tail) / len(tail):.3f} acc={correct / len(ey):.3f} "
          f"time={time.time() - t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
