"""torchrun helper for tests/test_train.py: a TR-KTO run of train.py that records, on every rank, the z_ref of each
training micro batch and a fingerprint of the rank's own batch, then writes all ranks' records to
out_dir/kto_ranks.json (rank 0). Arguments: train.py's --key=value options."""
import gc
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402

records = []
compute_loss = train.compute_loss


def recording_compute_loss(policy, reference, batch, cfg, ref_logps=None):
    loss, metrics = compute_loss(policy, reference, batch, cfg, ref_logps)
    if torch.is_grad_enabled():  # training micro batches only (evaluation runs under no_grad)
        records.append([metrics["kto_z_ref"], hash(tuple(batch["input_ids"].flatten().tolist())) % 2**50])
    return loss, metrics


train.compute_loss = recording_compute_loss
cfg = train.parse_config(sys.argv[1:])
train.train(cfg)
mine = torch.tensor(records, dtype=torch.float64)
everyone = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
dist.all_gather(everyone, mine)
if dist.get_rank() == 0:
    (Path(cfg.out_dir) / "kto_ranks.json").write_text(json.dumps([t.tolist() for t in everyone]))
gc.collect()  # train()'s DDP modules go before the process group, as in train.main
dist.destroy_process_group()
