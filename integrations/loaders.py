"""``--model``: a local checkpoint or a built-in tiny model, as a :class:`ModelBundle`.

:func:`load_model` returns the model in eval mode, its processor and the family shim
(:mod:`.families`), which the sweep and VGRefine ask for everything family-specific
(how to call the processor, the chat text, where the LLM is, how positions continue
after a KV cache). A local directory is recognised by its ``config.json``'s
``model_type`` through the one family table (a transformers class, or the row's loader:
LLaVA-codebase checkpoints such as HuatuoGPT-Vision, with ``vision_tower=`` their CLIP
tower's folder when the config does not name a local one); built-in tiny models are those of
:data:`vgkernels.integrations.tiny.TINY_MODELS`, optionally sized: ``tiny-llava:num_layers=8``.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import os
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

from .families import FAMILIES, get_shim

DEFAULT_MODEL = "tiny-llava"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelBundle:
    """A loaded model with what the pipelines need to drive it."""

    name: str
    model: torch.nn.Module
    processor: object
    device: torch.device
    shim: object = field(default=None, repr=False)

    def __post_init__(self):
        if self.shim is None:
            self.shim = get_shim(self.model, processor=self.processor)

    @property
    def family(self) -> str:
        """The shim family: ``llava``, ``qwen`` or ``splice``."""
        return self.shim.family

    @property
    def model_type(self) -> Optional[str]:
        return getattr(getattr(self.model, "config", None), "model_type", None)

    def chat(self, text: str) -> str:
        """The model's own prompt format around one image and ``text``."""
        return self.shim.chat_text(self.processor, text)

    def text_config(self):
        """The config of the LLM's layers (heads, layers)."""
        cfg = getattr(self.shim.llm(), "config", None) or self.model.config
        return getattr(cfg, "text_config", None) or cfg

    def n_layers_heads(self) -> tuple:
        cfg = self.text_config()
        return int(cfg.num_hidden_layers), int(cfg.num_attention_heads)

    def placement(self) -> str:
        """Where the weights are: ``cpu``, ``cuda:0``, or ``device_map over cuda:0, cuda:1``."""
        devices = model_devices(self.model)
        if len(devices) <= 1:
            return str(self.device)
        return "device_map over " + ", ".join(devices)


def parse_tiny(name: str):
    """``"tiny-llava:num_layers=8,num_heads=8"`` -> ``("tiny-llava", {"num_layers": 8, ...})``;
    other names pass through with no sizes. A keyword that is not one of the tiny
    models' size keywords raises ``ValueError`` (a typo would otherwise be ignored)."""
    from .tiny import NAME_KEYWORDS, TINY_MODELS

    base, _, spec = name.partition(":")
    if base not in TINY_MODELS or not spec:
        return name, {}
    sizes = {}
    for part in spec.split(","):
        k, eq, v = part.partition("=")
        k = k.strip()
        if not eq or not k:
            raise ValueError(f"model: expected KEY=VALUE after ':' in {name!r}, got {part!r}")
        if k not in NAME_KEYWORDS:
            close = difflib.get_close_matches(k, NAME_KEYWORDS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"model: unknown size keyword {k!r} in {name!r}{hint}; known: {', '.join(NAME_KEYWORDS)}")
        try:
            sizes[k] = int(v)
        except ValueError:
            sizes[k] = v.strip()
    return base, sizes


def resolve_dtype(dtype: Optional[str], device: torch.device) -> torch.dtype:
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected auto or one of {sorted(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def _checkpoint_family(name: str, vision_tower: Optional[str] = None):
    """``(model_type, family)`` of a local checkpoint directory, from its config.json
    alone (``ValueError`` naming what is wrong)."""
    from .tiny import TINY_MODELS

    if not os.path.isdir(name):
        raise ValueError(f"model: {name!r} is neither a built-in tiny model ({sorted(TINY_MODELS)}) "
                         f"nor a local model directory")
    cfg_path = os.path.join(name, "config.json")
    if not os.path.exists(cfg_path):
        raise ValueError(f"model: {name!r} has no config.json; expected a Hugging Face model directory")
    try:
        with open(cfg_path) as f:
            mtype = json.load(f).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"model: {cfg_path} is not a JSON object ({e})") from None
    fam = FAMILIES.get(mtype)
    if fam is None:
        raise ValueError(f"model: {name!r} has model_type {mtype!r}; supported: {sorted(FAMILIES)}")
    if vision_tower is not None and fam.hf_class is not None:
        raise ValueError(f"vision_tower: only LLaVA-codebase checkpoints take a separate vision tower; {name!r} has "
                         f"model_type {mtype!r} ({fam.hf_class})")
    return mtype, fam


def check_model(name: str, *, vision_tower: Optional[str] = None) -> None:
    """What :func:`load_model` would refuse about ``name`` (a tiny-model name with an
    unknown size keyword, a missing directory, an unsupported ``model_type``), checked
    without loading anything: ``ValueError``."""
    from .tiny import TINY_MODELS

    base, _ = parse_tiny(name)
    if base in TINY_MODELS:
        if vision_tower is not None:
            raise ValueError(f"vision_tower: only LLaVA-codebase checkpoints take a separate vision tower, not {base}")
        return
    _checkpoint_family(name, vision_tower)


def load_model(name: str = DEFAULT_MODEL, *, device: Optional[str] = None, dtype: Optional[str] = None,
               attn_implementation: Optional[str] = None, seed: int = 0, tiny_overrides: Optional[dict] = None,
               device_map: Optional[Union[str, dict]] = None, max_memory: Optional[dict] = None,
               offload_folder: Optional[str] = None, vision_tower: Optional[str] = None) -> ModelBundle:
    """Load ``name``: a built-in tiny model or a local checkpoint directory.

    ``device`` defaults to CUDA when available; ``dtype`` to bfloat16 on CUDA, float32
    on CPU; ``attn_implementation`` to the checkpoint's default (sdpa), which patched
    layers keep for their ordinary rows.

    ``device_map`` (``"auto"`` or an explicit map, exclusive with ``device``) splits the
    model over several devices through accelerate — layer by layer, one process — with
    ``max_memory`` (``{gpu index or "cpu": bytes or "20GiB"}``) limiting each device;
    modules that fit nowhere go to ``offload_folder`` on disk. The bundle's ``device`` is
    then the one holding the input embeddings, where inputs are placed. Loading never
    turns into tensor parallelism (see :func:`single_process_loading`).
    ``vision_tower`` is the local CLIP tower folder of a LLaVA-codebase checkpoint (default:
    its config's ``mm_vision_tower``).
    """
    from .tiny import TINY_MODELS

    if device_map is not None and device is not None:
        raise ValueError(f"device and device_map are exclusive: got device={device!r} and device_map={device_map!r}")
    if device_map is not None:
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = resolve_dtype(dtype, dev)
    base, sizes = parse_tiny(name)
    if base in TINY_MODELS:
        from .tiny import build_tiny

        kw = {**sizes, **(tiny_overrides or {})}
        kw.setdefault("dtype", dt)
        if attn_implementation:
            kw.setdefault("attn_implementation", attn_implementation)
        model, proc = build_tiny(base, seed=seed, **kw)
        label = base + (":" + ",".join(f"{k}={v}" for k, v in sorted(sizes.items())) if sizes else "")
        if device_map is not None:
            model = dispatch(model.eval(), device_map, max_memory, offload_folder)
            return ModelBundle(label, model, proc, input_device(model))
        return ModelBundle(label, model.to(dev).eval(), proc, dev)
    mtype, fam = _checkpoint_family(name, vision_tower)
    if fam.hf_class is None:
        load = fam.load_function()
        if load is None:
            raise ValueError(f"model: {name!r} has model_type {mtype!r} ({fam.description}), which cannot be loaded "
                             "from a directory without its own code; build the model there and pass it to the Python "
                             "API (vgkernels.sweep.command.sweep with a ModelBundle)")
        try:
            with single_process_loading():
                model, proc = load(name, vision_tower=vision_tower, torch_dtype=dt,
                                   attn_implementation=attn_implementation, device_map=device_map)
        except ValueError as e:
            raise ValueError(f"model: {name!r} is a LLaVA-codebase checkpoint (model_type {mtype!r}) that cannot be "
                             f"loaded: {e}") from e
        check_not_tensor_parallel(model, name)
        if device_map is not None:
            return ModelBundle(os.path.abspath(name), model.eval(), proc, input_device(model))
        return ModelBundle(os.path.abspath(name), model.to(dev).eval(), proc, dev)
    import transformers

    cls = getattr(transformers, fam.hf_class)
    kw = {"dtype": dt} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dt}
    if attn_implementation:
        kw["attn_implementation"] = attn_implementation
    if device_map is not None:
        kw["device_map"] = device_map
        if max_memory is not None:
            kw["max_memory"] = max_memory
        if offload_folder is not None:
            kw["offload_folder"] = offload_folder
    with single_process_loading():
        model = cls.from_pretrained(name, **kw)
    check_not_tensor_parallel(model, name)
    if device_map is None:
        model = model.to(dev)
    model = model.eval()
    if device_map is not None:
        dev = input_device(model)
    try:
        proc = transformers.AutoProcessor.from_pretrained(name)
    except (OSError, ValueError, AttributeError, ImportError) as e:
        raise ValueError(f"model: the processor of {name!r} failed to load ({type(e).__name__}: {e}). Qwen2-VL "
                         f"processors also build a video processor, which needs torchvision installed") from e
    return ModelBundle(os.path.abspath(name), model, proc, dev)


# ----------------------------------------------------------------------------- several devices

# What torchrun sets. transformers releases with tensor parallelism but before
# huggingface/transformers#38942 (mid-2025) turned ``device_map="auto"`` into tensor
# parallelism (DTensor weights sharded over every rank) when they saw WORLD_SIZE; 4.57
# and 5.x only log a note ("You've set device_map=`auto` while triggering a distributed
# run with torchrun"), but a data-parallel sweep whose ranks each hold a whole model must
# never be sharded that way, whatever version is installed.
_TORCHRUN_ENV = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                 "ROLE_WORLD_SIZE", "GROUP_WORLD_SIZE")


@contextlib.contextmanager
def single_process_loading():
    """Hide torchrun's environment from ``from_pretrained``: each rank loads its own
    complete copy (placed by ``device_map`` on its own GPUs), whatever transformers
    would infer from ``WORLD_SIZE``. The variables are restored on exit."""
    saved = {k: os.environ.pop(k) for k in _TORCHRUN_ENV if k in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def check_not_tensor_parallel(model, name: str = "model") -> None:
    """Raise if ``model`` came back sharded by tensor parallelism (a device mesh, a TP
    degree above 1, or DTensor weights): the sweep and VGRefine need whole layers."""
    tp = getattr(model, "_tp_size", None)
    mesh = getattr(model, "_device_mesh", None)
    dtensor = None
    try:
        from torch.distributed.tensor import DTensor

        dtensor = next((n for n, p in model.named_parameters() if isinstance(p, DTensor)), None)
    except ImportError:  # pragma: no cover - torch without distributed
        pass
    if (tp is not None and int(tp) > 1) or mesh is not None or dtensor is not None:
        raise RuntimeError(f"model: transformers loaded {name!r} with tensor parallelism (tp_size={tp}, "
                           f"device mesh={mesh is not None}, first DTensor weight={dtensor}); vgkernels needs each "
                           "process to hold whole layers: load with device_map (--device-map auto) and no tp_plan")


def model_devices(model) -> list:
    """Distinct devices of a model's weights, in order of first appearance ("disk" for
    modules accelerate offloaded)."""
    hf_map = getattr(model, "hf_device_map", None)
    if hf_map:
        seen = []
        for d in hf_map.values():
            d = d if isinstance(d, str) else (f"cuda:{d}" if isinstance(d, int) else str(d))
            if d not in seen:
                seen.append(d)
        return seen
    seen = []
    for p in model.parameters():
        d = str(p.device)
        if d not in seen:
            seen.append(d)
    return seen


def input_device(model) -> torch.device:
    """The device of the input embeddings: where a split model wants its inputs."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if w is not None and w.device.type != "meta":
        return w.device
    return next(p.device for p in model.parameters() if p.device.type != "meta")


def dispatch(model, device_map, max_memory=None, offload_folder=None):
    """Place a model built in memory (the tiny models) by ``device_map`` through
    accelerate, as ``from_pretrained(device_map=...)`` places a checkpoint."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
    except ImportError:
        raise ValueError("device_map needs accelerate (pip install accelerate)") from None
    if isinstance(device_map, str):
        if device_map != "auto":
            raise ValueError(f"device_map: expected 'auto' or a dict, got {device_map!r}")
        device_map = infer_auto_device_map(model, max_memory=max_memory,
                                           no_split_module_classes=list(getattr(model, "_no_split_modules", None)
                                                                        or []))
    return dispatch_model(model, device_map=device_map, offload_dir=offload_folder)


__all__ = ["ModelBundle", "load_model", "check_model", "parse_tiny", "resolve_dtype", "DEFAULT_MODEL", "single_process_loading",
           "check_not_tensor_parallel", "model_devices", "input_device", "dispatch"]
