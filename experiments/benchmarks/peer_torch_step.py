"""Peer anchor: a PyTorch (lightly + torchvision) BYOL/DirectPred train step, on a chosen device.

A copy of ../shared/bench/peer_torch_step.py (the reference point for keras_ncssl's train-step
benchmark: what a user would pick instead) with two options added for the device check:
`--device` (cpu, cuda, cuda:N, or auto) and `--amp` (none, float16, bfloat16: torch.autocast,
the counterpart of Keras' mixed_float16 / mixed_bfloat16 policies; float16 also scales the
loss with a GradScaler). lightly's three pieces are used when lightly is installed, else the
same modules written out here (the GPU machines have torch and torchvision but not lightly).
Prints one JSON line: images_per_sec = batch / median step time.
"""
import argparse, copy, json, time, statistics
import torch, torch.nn as nn, torchvision

try:
    from lightly.models.modules import BYOLProjectionHead
    from lightly.models.utils import update_momentum
    from lightly.loss import NegativeCosineSimilarity
    LIGHTLY = True
except ImportError:  # the same modules as lightly defines them (bias only where no BatchNorm follows)
    LIGHTLY = False

    class BYOLProjectionHead(nn.Sequential):
        def __init__(self, input_dim, hidden_dim, output_dim):
            super().__init__(nn.Linear(input_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(),
                             nn.Linear(hidden_dim, output_dim, bias=True))

    @torch.no_grad()
    def update_momentum(model, model_ema, m):
        for ema, online in zip(model_ema.parameters(), model.parameters()):
            ema.data = ema.data * m + online.data * (1.0 - m)

    class NegativeCosineSimilarity(nn.Module):
        def forward(self, x0, x1):
            return -nn.functional.cosine_similarity(x0, x1, dim=1).mean()

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=128)
p.add_argument("--image", type=int, default=32)
p.add_argument("--steps", type=int, default=8)
p.add_argument("--warmup", type=int, default=3)
p.add_argument("--predictor", default="directpred", choices=["directpred", "linear", "mlp"])
p.add_argument("--threads", type=int, default=2)
p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, or auto (cuda when available)")
p.add_argument("--amp", default="none", choices=["none", "float16", "bfloat16"])
a = p.parse_args()
torch.set_num_threads(a.threads)
device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device)
amp_dtype = {"none": None, "float16": torch.float16, "bfloat16": torch.bfloat16}[a.amp]

def resnet18_cifar():
    m = torchvision.models.resnet18()
    if a.image <= 64:
        m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        m.maxpool = nn.Identity()
    m.fc = nn.Identity()
    return m

class Online(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = resnet18_cifar()
        self.projector = BYOLProjectionHead(512, 512, 128)
        if a.predictor == "mlp":
            self.predictor = BYOLProjectionHead(128, 512, 128)
        else:
            self.predictor = nn.Linear(128, 128, bias=False)

online = Online().to(device)
target_backbone = copy.deepcopy(online.backbone)
target_projector = copy.deepcopy(online.projector)
for q in list(target_backbone.parameters()) + list(target_projector.parameters()):
    q.requires_grad = False
opt = torch.optim.SGD(online.parameters(), lr=0.03, momentum=0.9, weight_decay=4e-4)
scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
crit = NegativeCosineSimilarity()
corr = None

def step(x1, x2):
    global corr
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        z1 = online.projector(online.backbone(x1)); z2 = online.projector(online.backbone(x2))
        p1 = online.predictor(z1); p2 = online.predictor(z2)
        with torch.no_grad():
            t1 = target_projector(target_backbone(x1)); t2 = target_projector(target_backbone(x2))
        loss = crit(p1, t2) + crit(p2, t1)
    opt.zero_grad(); scaler.scale(loss).backward(); scaler.step(opt); scaler.update()
    if a.predictor == "directpred":
        with torch.no_grad():
            f = torch.cat([z1, z2]).detach().float()  # the statistics stay in float32
            c = f.T @ f / f.shape[0]
            corr = c if corr is None else 0.3 * corr + 0.7 * c
            s, u = torch.linalg.eigh(corr)
            pj = (s.clamp(min=0) / s.max()).sqrt() + 0.1
            online.predictor.weight.copy_(u @ torch.diag(pj) @ u.T)
    update_momentum(online.backbone, target_backbone, 0.996)
    update_momentum(online.projector, target_projector, 0.996)
    return loss.item()  # a device sync: the step has finished when this returns

x1 = torch.randn(a.batch, 3, a.image, a.image, device=device); x2 = torch.randn(a.batch, 3, a.image, a.image, device=device)
for _ in range(a.warmup):
    step(x1, x2)
times = []
for _ in range(a.steps):
    t = time.perf_counter(); step(x1, x2); times.append(time.perf_counter() - t)
med = statistics.median(times)
print(json.dumps({"peer": "pytorch-lightly" if LIGHTLY else "pytorch (lightly's modules inlined)",
                  "torch": torch.__version__, "device": str(device),
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  "amp": a.amp, "predictor": a.predictor, "batch": a.batch, "image": a.image,
                  "step_s": med, "images_per_sec": a.batch / med}))
