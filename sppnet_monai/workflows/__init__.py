"""What the bundle configs call: dataset resolution, pretrained weights, resuming, TensorBoard handlers."""

from sppnet_monai.workflows.datasets import datalist_split, image_datalist, resolve_dataset
from sppnet_monai.workflows.handlers import LearningRateTensorBoardHandler, PromptOverlayTensorBoardHandler, ReseedRandomTransforms, ResumableTrainingState
from sppnet_monai.workflows.setup import check_image_size, compute_device, load_pretrained, load_trained, reuse_freed_memory, use_all_cpu_cores

__all__ = [
    "LearningRateTensorBoardHandler",
    "PromptOverlayTensorBoardHandler",
    "ReseedRandomTransforms",
    "ResumableTrainingState",
    "check_image_size",
    "compute_device",
    "datalist_split",
    "image_datalist",
    "load_pretrained",
    "load_trained",
    "resolve_dataset",
    "reuse_freed_memory",
    "use_all_cpu_cores",
]
