"""Run under torchrun with 2 CPU processes by test_distributed.py."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from torch_utils import distributed as dist, misc, training_stats

device = dist.init(device_type='cpu')
rank = dist.get_rank()
collector = training_stats.Collector(regex='t/.*')
training_stats.report('t/rank', [float(rank)] * (rank + 1)) # rank 0: [0]; rank 1: [1, 1]
training_stats.report0('t/only0', 7.0)
collector.update()

net = torch.nn.Linear(2, 2)
torch.nn.init.constant_(net.weight, 1.0)
torch.nn.init.constant_(net.bias, 0.5)
consistent = True
misc.check_ddp_consistency(net)
if rank == 1:
    with torch.no_grad():
        net.weight[0, 0] = 2.0
try:
    misc.check_ddp_consistency(net)
except RuntimeError as err:
    consistent = str(err)
result = dict(rank=rank, world=dist.get_world_size(), device=str(device),
    num=collector.num('t/rank'), mean=collector.mean('t/rank'), only0=[collector.num('t/only0'), collector.mean('t/only0')],
    consistent=consistent)
with open(os.path.join(sys.argv[1], f'rank{rank}.json'), 'w') as f:
    json.dump(result, f)
dist.shutdown()
