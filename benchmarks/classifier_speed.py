"""Speed and memory of the paper's five classifiers on this machine's CPU, at their input sizes.

Usage: python benchmarks/classifier_speed.py [--batch 16] [--steps 3] [--models a,b,...]

Each model runs in a fresh subprocess (so peak memory is its own): forward images/s (eval, no
grad), full-backprop training images/s (every layer trainable, Adam), and, for the transfer models,
head-only training images/s on precomputed features (what `ctguard train` does with a frozen
backbone). fp32, channels_last (what helped here; bf16 is 20x slower without bf16 units).
Peak memory is the process's ru_maxrss. To see what helps: --no-channels-last, and
LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 (Debian's libtcmalloc-minimal4).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PROBE = r"""
import json, resource, sys, time, torch
from ctguard.models.registry import build, SPECS
name, batch, steps, cl = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
fmt = torch.channels_last if cl else torch.contiguous_format
torch.manual_seed(0)
s = SPECS[name]
m = build(name, 2, pretrained=False, unfreeze=-1).to(memory_format=fmt)
x = torch.randn(batch, 3, s.input_size, s.input_size).contiguous(memory_format=fmt)
y = torch.randint(0, 2, (batch,))
m.eval()
with torch.no_grad():
    m(x)
    t = time.perf_counter()
    for _ in range(steps):
        m(x)
    fwd = batch * steps / (time.perf_counter() - t)
m.train()
opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], 1e-4)
def step():
    opt.zero_grad(); torch.nn.functional.cross_entropy(m(x), y).backward(); opt.step()
step()
t = time.perf_counter()
for _ in range(steps):
    step()
train = batch * steps / (time.perf_counter() - t)
head = None
if s.transfer:
    f = torch.randn(batch * 64, m.head[-1].in_features)
    yy = torch.randint(0, 2, (len(f),))
    hopt = torch.optim.Adam(m.head.parameters(), 1e-3)
    t = time.perf_counter()
    for i in range(0, len(f), 32):
        hopt.zero_grad(); torch.nn.functional.cross_entropy(m.head(f[i:i+32]), yy[i:i+32]).backward(); hopt.step()
    head = len(f) / (time.perf_counter() - t)
print(json.dumps({"model": name, "input": s.input_size, "forward_img_s": round(fwd, 1), "train_img_s": round(train, 2),
                  "head_only_train_img_s": round(head) if head else None,
                  "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), "threads": torch.get_num_threads()}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--models", default="paper-cnn,mobilenet_v2,resnet50,inception_v3,vgg16")
    ap.add_argument("--no-channels-last", action="store_true", help="plain NCHW memory format, to see what channels_last gives")
    args = ap.parse_args()
    rows = []
    for name in args.models.split(","):
        out = subprocess.run([sys.executable, "-c", PROBE, name, str(args.batch), str(args.steps), "0" if args.no_channels_last else "1"], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("| model | input | forward img/s | train img/s (all layers) | head-only train img/s | peak MB |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['model']} | {r['input']} | {r['forward_img_s']} | {r['train_img_s']} | {r['head_only_train_img_s'] or 'n/a'} | {r['peak_mb']} |")


if __name__ == "__main__":
    main()
