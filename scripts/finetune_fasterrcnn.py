"""Continue training the default Faster R-CNN from a checkpoint, for a time budget (seconds).

    PYTHONPATH=. .venv/bin/python scripts/finetune_fasterrcnn.py IN.pth OUT.pth SECONDS

Random batches of 4 generated scenes (seed 7), AdamW with a cosine decay from
1e-3 to 1e-4 over the budget, 1 torch thread (faster than 2 on a busy 2-core
machine). models/README.md lists the runs that made the shipped file.
"""
import sys, time, math
import detserve.runtime.offline; detserve.runtime.offline.apply()
import numpy as np, torch
from pathlib import Path
from detserve.training import synthetic
from detserve.training.recipes import load_fasterrcnn, save_fasterrcnn, _frcnn_sample
torch.set_num_threads(1); torch.manual_seed(1)
src, out, budget = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3])
ck = torch.load(src, weights_only=True, map_location="cpu")
model = load_fasterrcnn(src); model.roi_heads.fg_bg_sampler.batch_size_per_image = 128; model.train()
scenes = synthetic.scenes(1500, 7)
params = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
rng = np.random.default_rng(3); start = time.perf_counter(); step = 0
while True:
    el = time.perf_counter() - start
    if el > budget: break
    for g in opt.param_groups: g["lr"] = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * min(1.0, el / budget)))
    idx = rng.integers(0, len(scenes), 4)
    ims, tg = zip(*[_frcnn_sample(scenes[i].image, scenes[i].boxes, scenes[i].classes + 1, rng) for i in idx])
    losses = model(list(ims), list(tg)); loss = sum(losses.values())
    opt.zero_grad(); loss.backward(); torch.nn.utils.clip_grad_norm_(params, 10.0); opt.step(); step += 1
    if step % 10 == 0:
        print(f"step {step} t {el:.0f}s loss {loss.item():.3f}", flush=True)
        save_fasterrcnn(model, out, ck["arch"], ck["min_size"], ck["max_size"])
save_fasterrcnn(model, out, ck["arch"], ck["min_size"], ck["max_size"]); print("done", step, flush=True)
