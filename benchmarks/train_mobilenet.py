"""Train examples/mobilenet_cifar.py on CIFAR-10's data_batch_1: a non-zoo pretrained model for
the bring-your-own-model results (the weights stay outside the project; this script and its
results file are what is committed).

    python benchmarks/train_mobilenet.py [--epochs 15] [--seeds 0] [--threads T]
        [--weights ~/.cache/pimsim/mobilenet_cifar-s<seed>.safetensors] [--out DIR]

Seeded SGD (momentum 0.9, Nesterov, lr 0.1 with a cosine schedule, weight decay 5e-4 except
BatchNorm and biases, batch 128, random crop with 4-pixel padding and horizontal flip) on the
10,000 images of data_batch_1, inputs normalized as ``pimsim.data.to_tensor`` does (what
``pimsim run`` feeds the model). A checkpoint is written after every epoch (``<weights>.ckpt``,
tensors only), so an interrupted run resumes. At the end: float top-1 on the test set, the
weights as .safetensors, and DIR/train-mobilenet_cifar.json with the per-epoch loss and
accuracy, the test top-1, the sha256 of the weights and the provenance.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from harness import Bench, common_args, log
from pimsim.data import CALIBRATION_BATCH, CIFAR_FOLDER, find_data_dir, load_batch, load_cifar10, to_tensor
from pimsim.simulate import evaluate

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
import mobilenet_cifar  # noqa: E402

BATCH = 128


def default_weights(seed: int) -> Path:
    return Path.home() / ".cache" / "pimsim" / f"mobilenet_cifar-s{seed}.safetensors"


def augment(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random 32x32 crop of the 4-pixel zero-padded batch and a random horizontal flip."""
    n = x.shape[0]
    xp = F.pad(x, (4, 4, 4, 4))
    dx, dy = rng.integers(0, 9, n), rng.integers(0, 9, n)
    flip = rng.random(n) < 0.5
    out = torch.empty_like(x)
    for i in range(n):
        v = xp[i, :, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        out[i] = v.flip(-1) if flip[i] else v
    return out


def param_groups(net: nn.Module, wd: float):
    decay, no = [], []
    for name, p in net.named_parameters():
        (no if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no, "weight_decay": 0.0}]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--weights", default=None, help="where the trained weights go")
    common_args(ap, seeds=(0,), limit=False)
    args = ap.parse_args(argv)
    bench = Bench(args)
    from safetensors.torch import load_file, save_file
    seed = args.seeds[0]
    weights = Path(args.weights).expanduser() if args.weights else default_weights(seed)
    weights.parent.mkdir(parents=True, exist_ok=True)
    ckpt = weights.with_name(weights.name + ".ckpt")

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = mobilenet_cifar.build().to(memory_format=torch.channels_last)
    images, labels = load_batch(find_data_dir() / CIFAR_FOLDER / CALIBRATION_BATCH)
    x_all, y_all = to_tensor(images), torch.as_tensor(np.asarray(labels))
    steps = args.epochs * math.ceil(len(x_all) / BATCH)
    opt = torch.optim.SGD(param_groups(net, 5e-4), lr=0.1, momentum=0.9, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps,
                                                pct_start=0.15, anneal_strategy="cos")
    history, start = [], 0
    if ckpt.is_file():                                  # resume: tensors only
        state = torch.load(ckpt, weights_only=True)
        net.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        history = [dict(zip(("epoch", "loss", "train_acc", "seconds"), map(float, h)))
                   for h in state["history"].tolist()]
        start = len(history)
        rng = np.random.default_rng([seed, start])
        torch.manual_seed(seed * 1000 + start)
        log(f"resumed after epoch {start} from {ckpt}")
    for epoch in range(start, args.epochs):
        net.train()
        t0 = time.perf_counter()
        perm = rng.permutation(len(x_all))
        tot = correct = 0
        loss_sum = 0.0
        for s in tqdm(range(0, len(perm), BATCH), desc=f"epoch {epoch + 1}/{args.epochs}",
                      leave=False, unit="batch"):
            idx = perm[s:s + BATCH]
            xb = augment(x_all[idx], rng).contiguous(memory_format=torch.channels_last)
            yb = y_all[idx]
            out = net(xb)
            loss = F.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += float(loss) * len(idx)
            correct += int((out.argmax(1) == yb).sum())
            tot += len(idx)
        history.append({"epoch": epoch + 1, "loss": loss_sum / tot, "train_acc": correct / tot,
                        "seconds": time.perf_counter() - t0})
        log(f"epoch {epoch + 1}: loss {loss_sum / tot:.3f}, train acc {100 * correct / tot:.2f}%"
            f" ({history[-1]['seconds']:.0f} s)")
        hist = torch.tensor([[h["epoch"], h["loss"], h["train_acc"], h["seconds"]] for h in history])
        tmp = ckpt.with_name(ckpt.name + ".tmp")
        torch.save({"model": net.state_dict(), "opt": opt.state_dict(),
                    "sched": sched.state_dict(), "history": hist}, tmp)
        tmp.replace(ckpt)
    net = net.to(memory_format=torch.contiguous_format).eval()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(weights))
    check = mobilenet_cifar.build().eval()
    check.load_state_dict(load_file(str(weights)))
    test_x, test_y = load_cifar10("test")
    top1, _ = evaluate(check, test_x, test_y, 500, progress=True)
    log(f"float top-1 on {len(test_y)} test images: {100 * top1:.2f}%  -> {weights}")
    bench.write_json("train-mobilenet_cifar.json", {
        "model": "examples/mobilenet_cifar.py:build", "train_images": len(x_all),
        "train_data": "data_batch_1", "epochs": args.epochs, "batch": BATCH, "seed": seed,
        "history": history, "float_top1": round(top1, 4), "test_images": len(test_y),
        "weights": str(weights), "weights_sha256": sha256(weights),
        "params": sum(p.numel() for p in check.parameters())})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
