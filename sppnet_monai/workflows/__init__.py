"""What the bundle configs call: dataset resolution, pretrained weights, resuming, weight averaging, TensorBoard handlers."""

from sppnet_monai.workflows.datasets import datalist_split, dataset_folder, ensure_demo_dataset, image_datalist
from sppnet_monai.workflows.errors import report_user_errors
from sppnet_monai.workflows.handlers import LearningRateTensorBoardHandler, PromptOverlayTensorBoardHandler, ReseedRandomTransforms, ResumableTrainingState, WeightAverage
from sppnet_monai.workflows.setup import compute_device, load_pretrained, load_state_dict_file, load_trained, parameter_groups, reuse_freed_memory, trained_setting, use_all_cpu_cores

__all__ = [
    "LearningRateTensorBoardHandler",
    "PromptOverlayTensorBoardHandler",
    "ReseedRandomTransforms",
    "ResumableTrainingState",
    "WeightAverage",
    "compute_device",
    "datalist_split",
    "dataset_folder",
    "ensure_demo_dataset",
    "image_datalist",
    "load_pretrained",
    "load_state_dict_file",
    "load_trained",
    "parameter_groups",
    "report_user_errors",
    "reuse_freed_memory",
    "trained_setting",
    "use_all_cpu_cores",
]
