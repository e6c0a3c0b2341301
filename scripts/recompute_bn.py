"""Developer check: a training checkpoint's weight average (``ema_decay``) with its batch-norm statistics recomputed
on one epoch of training crops, as SWA's ``update_bn`` does, saved as a plain state dict for ``evaluate``.

Usage:
    python scripts/recompute_bn.py CHECKPOINT_EPOCH.pt OUT.pt PREPARED_DIR [key=value ...]

The network and the training crops are those of ``train.json`` + ``cpu_recipe.json`` + ``native_cpu.json``;
``key=value`` overrides a string setting of those configs (``instance_head=boundary``). ``update_bn`` itself
takes a loader of tensors, not MONAI's dictionaries, so the same few lines are written out here.
"""

import sys

import torch
from monai.bundle import ConfigParser
from monai.utils import set_determinism

from sppnet_monai.networks.checkpoints import load_checkpoint

CONFIGS = ["bundle/configs/train.json", "bundle/configs/cpu_recipe.json", "bundle/configs/native_cpu.json"]


def main() -> None:
    checkpoint, out, dataset_dir, *overrides = sys.argv[1:]
    parser = ConfigParser()
    parser.read_config(CONFIGS)
    parser.update({"dataset_dir": dataset_dir, **dict(item.split("=", 1) for item in overrides)})
    set_determinism(0)
    network = parser.get_parsed_content("network_def")
    load_checkpoint(network, checkpoint)  # a training checkpoint is read through its weight average
    for module in network.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain mean over the batches below
    network.train()
    with torch.no_grad():
        for batch in parser.get_parsed_content("train#dataloader"):
            network(batch["image"])
    torch.save(network.state_dict(), out)


if __name__ == "__main__":
    main()
