"""Loading MobileSAM, SAM and SPPNet checkpoints into :class:`~sppnet_monai.networks.SPPNet`.

Keys are mapped explicitly, and every load is checked: a key of the checkpoint that has no place
in SPPNet, or a part of SPPNet that the checkpoint should fill but does not, is an error naming
the keys, never a silent partial load.

- MobileSAM (``mobile_sam.pt``): image encoder, neck, prompt encoder and mask decoder. MobileSAM's
  TinyViT names (``layers.i``, ``Conv2d_BN.c``, patch merging at the end of a stage) are mapped to
  timm's (``stages.i``, ``ConvNorm.conv``, patch merging at the start of the next stage). Its unused
  classification head (``norm_head``, ``head``) is dropped.
- SAM (``sam_vit_{b,l,h}*.pth``): prompt encoder and mask decoder only (same shapes for all three);
  the ViT encoder has no counterpart and is left out, the Tiny-ViT encoder keeps its weights.
- SPPNet: a state dict saved by this project (bare, as the bundle's ``models/model.pt``, or inside a
  training checkpoint under ``network``/``model``/``state_dict``). Since 0.2 it carries the network's
  recipe (``_extra_state``: ``image_size``, ``fusion``, ...; see ``SPPNet.recipe``): loading it into a
  network built otherwise is an error, and :func:`read_recipe` tells what to build. Older plain
  state dicts still load into a network built with the right settings by hand.
"""

from __future__ import annotations

import os
import re
from typing import Callable, Dict, Iterable, List, Mapping, Tuple

import torch
from torch import nn

from sppnet_monai.utils import SPPNetError

__all__ = [
    "CHECKPOINT_KINDS",
    "detect_checkpoint_kind",
    "load_checkpoint",
    "read_recipe",
    "with_recipe_defaults",
    "read_release",
    "read_state_dict",
    "save_release",
]

StateDict = Dict[str, torch.Tensor]
# Where nn.Module.get_extra_state puts SPPNet's recipe in its state dict.
EXTRA_STATE_KEY = "_extra_state"

# (pattern, replacement) applied in order to MobileSAM image-encoder keys (after "image_encoder.").
_MOBILE_SAM_ENCODER_RULES: List[Tuple[str, Callable[[re.Match], str] | str]] = [
    (r"^patch_embed\.seq\.0\.", "patch_embed.conv1."),
    (r"^patch_embed\.seq\.2\.", "patch_embed.conv2."),
    # MobileSAM merges patches at the end of stage i, timm at the start of stage i + 1.
    (r"^layers\.(\d+)\.downsample\.", lambda m: f"stages.{int(m.group(1)) + 1}.downsample."),
    (r"^layers\.(\d+)\.blocks\.", r"stages.\1.blocks."),
    (r"\.c\.weight$", ".conv.weight"),
]
# Keys of MobileSAM's TinyViT that SAM's layout never uses.
_MOBILE_SAM_UNUSED = re.compile(r"^image_encoder\.(norm_head|head)\.")
# Keys only SPPNet has: a MobileSAM or SAM checkpoint leaves them at their initial values.
_SPPNET_ONLY = re.compile(r"^(llsie\.|conv_embedding\.|mask_decoder\.(fusion_proj|upscaling_stages|hyper_proj|guidance_proj|click_branch)\.)")
_SAM_PARTS = ("prompt_encoder.", "mask_decoder.")


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Tensors of a checkpoint file, unwrapped from a training checkpoint if needed."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SPPNetError(f"checkpoint {path} does not exist.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for unreadable files
        # from None: a traceback would repeat torch's advice to load the file with weights_only=False.
        raise SPPNetError(f"{path}: not a PyTorch checkpoint ({_unreadable_reason(path, err)}).") from None
    # A training checkpoint with a weight average (WeightAverage) is read through the average: it is what
    # validation scored and model.pt holds.
    for wrapper in ("weight_average", "network", "model", "state_dict"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping) and obj[wrapper]:
            obj = obj[wrapper]
    if not isinstance(obj, Mapping) or not all(
        isinstance(v, torch.Tensor) or k.endswith(EXTRA_STATE_KEY) for k, v in obj.items()
    ):
        raise SPPNetError(f"checkpoint {path} holds no state dict of tensors.")
    # DataParallel / DistributedDataParallel save their module under "module.".
    return {k[len("module.") :] if k.startswith("module.") else k: v for k, v in obj.items()}


# How torch.save's files begin: a zip archive (PyTorch >= 1.6), or a pickle of protocol 2 or later (older ones).
_CHECKPOINT_MAGIC = (b"PK\x03\x04", b"\x80")
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")


def _unreadable_reason(path: str, err: Exception) -> str:
    """Why ``torch.load`` failed on ``path``, one short line.

    A file that does not even begin like a checkpoint is described (empty, a Git LFS pointer, text); for the
    others torch's own reason is kept, without its advice to load with ``weights_only=False``: that runs any
    code the file holds, and a weights file never needs it.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except OSError as os_err:
        return f"it cannot be read: {os_err.strerror or os_err}"
    if not head:
        return "the file is empty"
    if not head.startswith(_CHECKPOINT_MAGIC):
        if head.startswith(b"version https://git-lfs"):
            return "a Git LFS pointer, not the weights: fetch them with 'git lfs pull'"
        text = head.decode("utf-8", errors="ignore")
        first = text.strip().split("\n", 1)[0].strip()
        if first and all(c.isprintable() or c.isspace() for c in text):
            return f"a text file starting {first[:40]!r}"
        return f"neither a zip archive nor a pickle; it starts with bytes {head[:4].hex(' ')}"
    if isinstance(err, EOFError):
        return "the file ends early: an interrupted download or copy?"
    message = _ANSI_ESCAPE.sub("", str(err))
    if "WeightsUnpickler error:" in message:  # the useful part of torch's weights-only advice
        message = message.split("WeightsUnpickler error:", 1)[1].split(" Please use ", 1)[0]
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    # The first sentence, past the C++ location of torch's zip reader ("[enforce fail at inline_container.cc:180] . ").
    first = re.split(r"(?<=\.)\s", re.sub(r"^\[enforce fail at [^\]]*\]\s*\.\s*", "", lines[0]), maxsplit=1)[0]
    return f"{type(err).__name__}: {first.rstrip('.')}"


def read_recipe(path: str | os.PathLike) -> Dict[str, object]:
    """The recipe an SPPNet checkpoint was saved with (``SPPNet.recipe``), or ``{}`` for an older plain state dict.

    Raises SPPNetError for a file that is not an SPPNet checkpoint.
    """
    source = read_state_dict(path)
    detected = detect_checkpoint_kind(source)
    if detected != "sppnet":
        raise SPPNetError(f"checkpoint {path} is not an SPPNet checkpoint (its keys look like {detected}: {', '.join(list(source)[:3])}).")
    return _saved_recipe(source)


def with_recipe_defaults(recipe: Mapping[str, object]) -> Dict[str, object]:
    """A saved ``recipe`` with each network setting added since it was saved at the value it then had
    (``RECIPE_DEFAULTS``); an empty recipe (none recorded) stays empty."""
    from sppnet_monai.networks.sppnet import RECIPE_DEFAULTS

    return {**RECIPE_DEFAULTS, **recipe} if recipe else {}


def _saved_recipe(source: Mapping[str, object]) -> Dict[str, object]:
    """The recipe inside a state dict's ``_extra_state`` (``SPPNet.get_extra_state``), ``{}`` when it has none."""
    extra = source.get(EXTRA_STATE_KEY)
    recipe = extra.get("recipe") if isinstance(extra, Mapping) else None
    return dict(recipe) if isinstance(recipe, Mapping) else {}


def _check_recipe(net: nn.Module, path: str | os.PathLike, source: Mapping[str, object]) -> None:
    """Refuse a checkpoint whose recipe contradicts how ``net`` was built (a 256 model run at 1024, say)."""
    from sppnet_monai.networks.sppnet import RECIPE_KEYS

    saved = with_recipe_defaults(_saved_recipe(source))
    built = getattr(net, "recipe", None)
    if not saved or built is None:
        return
    differ = [f"{key} {saved[key]!r} (this network: {built[key]!r})" for key in RECIPE_KEYS if key in saved and saved[key] != built[key]]
    if differ:
        raise SPPNetError(
            f"checkpoint {path} was trained with {', '.join(differ)}: leave these settings out to use the "
            "checkpoint's own, or give the same values."
        )


def detect_checkpoint_kind(state_dict: Mapping[str, torch.Tensor]) -> str:
    """``"mobile_sam"``, ``"sam"`` or ``"sppnet"`` from the keys; ``"unknown"`` otherwise."""
    if any(k.startswith("image_encoder.stages.") for k in state_dict):
        return "sppnet"
    if any(k.startswith("image_encoder.layers.") for k in state_dict):
        return "mobile_sam"
    if any(k.startswith("image_encoder.blocks.") for k in state_dict) or any(
        k.startswith(_SAM_PARTS) for k in state_dict
    ):
        return "sam"
    return "unknown"


def map_mobile_sam_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """MobileSAM keys -> SPPNet keys (the classification head dropped)."""
    mapped = {}
    for key, value in state_dict.items():
        if _MOBILE_SAM_UNUSED.match(key):
            continue
        if key.startswith("image_encoder."):
            sub = key[len("image_encoder.") :]
            for pattern, replacement in _MOBILE_SAM_ENCODER_RULES:
                sub = re.sub(pattern, replacement, sub)
            key = "image_encoder." + sub
        mapped[key] = value
    return mapped


def map_sam_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """SAM keys -> SPPNet keys: the prompt encoder and mask decoder; SAM's ViT encoder is left out."""
    return {k: v for k, v in state_dict.items() if k.startswith(_SAM_PARTS)}


CHECKPOINT_KINDS: Dict[str, Tuple[Callable[[Mapping[str, torch.Tensor]], StateDict], Tuple[str, ...]]] = {
    # kind: (key mapping, prefixes of SPPNet that the checkpoint must fill completely)
    "mobile_sam": (map_mobile_sam_keys, ("image_encoder.",) + _SAM_PARTS),
    "sam": (map_sam_keys, _SAM_PARTS),
    "sppnet": (dict, ("",)),
}


def load_checkpoint(net: nn.Module, path: str | os.PathLike, kind: str = "auto") -> str:
    """Load a MobileSAM, SAM or SPPNet checkpoint into ``net`` (an :class:`SPPNet`) in place.

    Args:
        path: the checkpoint file.
        kind: ``"auto"`` (from the keys), ``"mobile_sam"``, ``"sam"`` or ``"sppnet"``.

    Returns:
        The kind that was loaded.

    Raises:
        SPPNetError: unreadable file, a checkpoint of another architecture, missing, unexpected or
            mis-shaped keys; ``net`` is left unchanged.
    """
    source = read_state_dict(path)
    detected = detect_checkpoint_kind(source)
    if kind == "auto":
        kind = detected
    first = ", ".join(list(source)[:3])
    if kind not in CHECKPOINT_KINDS:
        raise SPPNetError(
            f"checkpoint {path} is not a MobileSAM, SAM or SPPNet checkpoint (kind {kind!r}; first keys: {first})."
        )
    if detected != kind:
        raise SPPNetError(f"checkpoint {path} is not a {kind} checkpoint (its keys look like {detected}: {first}).")
    if kind == "sppnet":
        _check_recipe(net, path, source)
    mapping, filled_prefixes = CHECKPOINT_KINDS[kind]
    mapped = mapping(source)
    target = net.state_dict()
    # The recipe is not a weight: an older checkpoint without one loads into a network built by hand.
    expected = {
        k
        for k in target
        if k.startswith(filled_prefixes) and k != EXTRA_STATE_KEY and not (kind != "sppnet" and _SPPNET_ONLY.match(k))
    }
    _check_keys(path, kind, mapped, target, expected)
    net.load_state_dict(mapped, strict=False)
    return kind


def _check_keys(
    path: str | os.PathLike,
    kind: str,
    mapped: Mapping[str, torch.Tensor],
    target: Mapping[str, torch.Tensor],
    expected: Iterable[str],
) -> None:
    expected = set(expected)
    unexpected = sorted(set(mapped) - set(target))
    missing = sorted(expected - set(mapped))
    mismatched = sorted(
        f"{k} {tuple(mapped[k].shape)} vs {tuple(target[k].shape)}"
        for k in set(mapped) & set(target)
        if k != EXTRA_STATE_KEY and mapped[k].shape != target[k].shape
    )
    problems = [
        f"{label} ({len(keys)}): {_head(keys)}"
        for label, keys in (("unexpected keys", unexpected), ("missing keys", missing), ("shape mismatch", mismatched))
        if keys
    ]
    if problems:
        raise SPPNetError(f"{kind} checkpoint {path} does not fit this SPPNet: " + "; ".join(problems))


def _head(items: List[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def save_release(src: str | os.PathLike, dst: str | os.PathLike, provenance: Mapping[str, object]) -> Dict[str, object]:
    """Write the trained SPPNet ``src`` as a release file ``dst``: float16 weights, its recipe and ``provenance``.

    Floating-point tensors are stored in float16 (half the size; networks load them into their float32
    parameters); the recipe stays in ``_extra_state`` and ``provenance`` (training command, data and
    its licence, ...) joins it as ``release``. Returns that ``release`` entry (what :func:`read_release` reads).
    """
    from sppnet_monai.utils import atomic_path

    source = read_state_dict(src)
    if detect_checkpoint_kind(source) != "sppnet":
        raise SPPNetError(f"checkpoint {src} is not an SPPNet checkpoint.")
    recipe = _saved_recipe(source)
    if not recipe:
        raise SPPNetError(f"checkpoint {src} records no recipe (saved before sppnet_monai 0.2): load and save it again first.")
    release = {k: v.half() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in source.items()}
    provenance = {**provenance, "storage_dtype": "float16"}
    release[EXTRA_STATE_KEY] = {"recipe": recipe, "release": provenance}
    with atomic_path(dst) as tmp:
        torch.save(release, tmp)
    return dict(provenance)


def read_release(path: str | os.PathLike) -> Dict[str, object]:
    """The ``release`` provenance a checkpoint carries (:func:`save_release`), ``{}`` for other checkpoints."""
    extra = read_state_dict(path).get(EXTRA_STATE_KEY)
    release = extra.get("release") if isinstance(extra, Mapping) else None
    return dict(release) if isinstance(release, Mapping) else {}
