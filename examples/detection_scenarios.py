"""Exploratory runs of the threat detector without the protocol (docs/defences.md, "Known blind spots").

    PYTHONPATH=. python examples/detection_scenarios.py ATTACK SCALE ATTACKERS [PER_ROUND]

digits, 20 devices, Dirichlet(ALPHA, env, default 0.1; PART=iid for IID), MLP, 1 local epoch, 10 rounds,
mean of the updates the detector keeps.  Devices 0..ATTACKERS-1 send -SCALE x (``flip``) or SCALE x
(``scale``) their honest update.  Prints per round the devices left out and the quarantined ones.
"""

import os
import sys

import numpy as np
import torch

from qflare.data import load_dataset
from qflare.data.partition import partition
from qflare.models import create_model
from qflare.protocol.detection import DetectionConfig, Detector
from qflare.training import LocalTrainer, TrainConfig, client_seed
from qflare.wire import ParamLayout

torch.set_num_threads(1)
N, R = 20, 10
mode, s, nat = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
per = int(sys.argv[4]) if len(sys.argv) > 4 else N
attackers = set(range(nat))
tr = load_dataset("digits", "train")
parts = partition(
    os.environ.get("PART", "dirichlet"), tr.labels.numpy(), N, seed=0, alpha=float(os.environ.get("ALPHA", "0.1"))
)
torch.manual_seed(0)
m = create_model("mlp", tr.input_shape, tr.num_classes)
lay = ParamLayout.from_module(m)
flat = lay.module_to_flat(m)
trainer = LocalTrainer(m, TrainConfig(epochs=1, lr=0.05), lay)
x, y = tr.normalized(), tr.labels
det = Detector(DetectionConfig())
quarantined: dict[int, int] = {}
rng = np.random.default_rng(1)
for r in range(1, R + 1):
    active = [i for i in range(N) if i not in quarantined]
    chosen = sorted(rng.choice(active, min(per, len(active)), replace=False).tolist())
    ups = []
    for i in chosen:
        idx = torch.from_numpy(parts[i])
        d = trainer.train(flat, x[idx], y[idx], seed=client_seed(0, r, i)).delta
        if i in attackers:
            d = -s * d if mode == "flip" else s * d
        ups.append((str(i), d, len(parts[i])))
    v = det.judge(r, ups)
    left = {int(k): why for k, why in v.left_out.items()}
    for q in v.quarantined:
        quarantined[int(q)] = r
    flat = flat + torch.stack([d for k, d, _ in ups if int(k) not in left]).mean(0)
    print(
        r,
        "left out",
        sorted(left),
        "honest left out",
        sorted(set(left) - attackers),
        "quarantined",
        sorted(quarantined),
    )
honest = sorted(set(quarantined) - attackers)
print("quarantined (device: round)", quarantined, "honest quarantined", honest)
