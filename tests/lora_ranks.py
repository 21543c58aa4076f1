"""torchrun helper for tests/test_lora.py: a LoRA run of train.py in which every rank, at each checkpoint, also writes
its own adapters (the policy's lora_A, lora_B) and its reference's factors (delta_U, delta_V) to
out_dir/rank<r>-step<step>.safetensors, so the test can check the ranks hold the same ones. Arguments: train.py's."""
import sys
from pathlib import Path

import torch.distributed as dist
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import checkpoint  # noqa: E402
import train  # noqa: E402

save = checkpoint.save


def recording_save(out_dir, step, policy, reference, optimizer, *args, **kwargs):
    mine = {f"policy.{k}": v.detach().clone() for k, v in policy.module.state_dict().items() if ".lora_" in k}
    mine |= {f"reference.{k}": v.clone() for k, v in reference.state_dict().items() if ".delta_" in k}
    save_file(mine, Path(out_dir) / f"rank{dist.get_rank()}-step{step}.safetensors")
    return save(out_dir, step, policy, reference, optimizer, *args, **kwargs)


checkpoint.save = recording_save
sys.exit(train.main(sys.argv[1:]))
