"""Developer check: the mean of several training checkpoints' networks (SWA's average of the weights along the
end of a schedule), or one checkpoint's weight average (``ema_decay``), with its batch-norm statistics recomputed
on one epoch of training crops, as ``torch.optim.swa_utils.update_bn`` does; saved as a plain state dict (the
recipe inside) for ``evaluate --checkpoint``.

Usage:
    python scripts/average_checkpoints.py OUT.pt PREPARED_DIR CHECKPOINT.pt [CHECKPOINT.pt ...] [--key value ...]

The training crops are those of ``train.json`` + ``cpu_recipe.json`` + ``native_cpu.json`` with the overrides
(``--full_resolution_chans 32``, typed by ``fire`` as the package's CLI is), the recipe settings of the run the
checkpoints come from. A training checkpoint
is read through its weight average where it has one (``load_checkpoint``). ``update_bn`` takes a loader of tensors,
not MONAI's dictionaries, so its few lines are written out here.
"""

import os

import fire
import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from sppnet_monai.networks.checkpoints import load_checkpoint

CONFIGS = ["bundle/configs/train.json", "bundle/configs/cpu_recipe.json", "bundle/configs/native_cpu.json"]


def main(out: str, dataset_dir: str, *checkpoints: str, **overrides: object) -> None:
    if not checkpoints:
        raise SystemExit(__doc__)
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser.update({"dataset_dir": dataset_dir, **overrides})
    set_determinism(0)
    network = parser.get_parsed_content("network_def")
    states = []
    for checkpoint in checkpoints:
        load_checkpoint(network, checkpoint)
        states.append({key: value.detach().clone() for key, value in network.state_dict().items() if torch.is_tensor(value)})
    with torch.no_grad():
        for key, value in network.state_dict().items():
            if torch.is_tensor(value) and value.is_floating_point():
                value.copy_(torch.stack([state[key].float() for state in states]).mean(0))
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain mean over the batches below
    network.train()
    with torch.no_grad():
        for batch in parser.get_parsed_content("train#dataloader"):
            network(batch["image"])
    torch.save(network.state_dict(), out + ".tmp")
    os.replace(out + ".tmp", out)  # never a half-written file under the final name
    print(f"{out}: the mean of {len(checkpoints)} networks, batch-norm statistics of one epoch of training crops")


if __name__ == "__main__":
    fire.Fire(main)
