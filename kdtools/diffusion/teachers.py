"""Diffusion model directories: load and save (diffusers format), and the 2-D MLP denoiser.

A kdtools diffusion directory is a diffusers pipeline directory, so ``DDPMPipeline.from_pretrained(dir)``
loads image models as they are:

  DIR/model_index.json                   {"_class_name": "DDPMPipeline", "unet": [...], "scheduler": [...]}
  DIR/unet/config.json                   a diffusers UNet2DModel (images)
  DIR/unet/diffusion_pytorch_model.safetensors
  DIR/denoiser/config.json               or, for 2-D tabular data, kdtools' MLPDenoiser (a diffusers
  DIR/denoiser/diffusion_pytorch_model.safetensors   ModelMixin: same config + safetensors layout)
  DIR/scheduler/scheduler_config.json    a diffusers DDPMScheduler / DDIMScheduler config
  DIR/kdtools.json                       what kdtools adds (optional when loading a foreign directory):
      kdtools.version, kind (teacher | student), method (ddpm | sfddm | ddim | progressive | scratch),
      chain {timesteps, alphas_cumprod} (what the sampler walks, see schedules.Chain), teacher_steps,
      phi (the teacher sub-sequence, students), data {name, kind: image | tabular, image_size, channels,
      dim}, clip_sample, default_sampler, options (the resolved command options), stats (losses, seconds)
  DIR/noise_bank.safetensors             optional: SFDDM's selected input noises ("noise": (M, ...))

A foreign diffusers directory (e.g. google/ddpm-cifar10-32 saved locally) needs only the unet and the
scheduler; a flat directory (config.json + scheduler_config.json side by side) is accepted too.
Directories are written under a temporary name and renamed into place, so a failed run leaves nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import __version__
from ..errors import KdError, KdUsageError
from .schedules import Chain, alphas_cumprod_from_betas

try:  # diffusers is a dependency; ModelMixin gives MLPDenoiser save_pretrained/from_pretrained
    from diffusers import ConfigMixin, ModelMixin
    from diffusers.configuration_utils import register_to_config
except ImportError:  # pragma: no cover
    raise

SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (integer) timesteps, as in the transformer / DDPM papers."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float().view(-1, 1) * freqs.view(1, -1)
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class MLPDenoiser(ModelMixin, ConfigMixin):
    """A noise predictor for low-dimensional data (the 2-D Swiss roll): residual MLP with a time embedding.

    forward(x (N, D), t (N,) int) -> predicted noise (N, D). ``last_hidden`` keeps the features before the
    output layer of the latest call, for SFDDM's hidden-variable term.
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, data_dim: int = 2, hidden_dim: int = 256, num_blocks: int = 3, time_embed_dim: int = 64):
        super().__init__()
        h = hidden_dim
        self.inp = nn.Linear(data_dim, h)
        self.temb = nn.Sequential(nn.Linear(time_embed_dim, h), nn.SiLU(), nn.Linear(h, h))
        self.res_blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(h), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
                                        for _ in range(num_blocks))
        self.out_norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, data_dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        h = self.inp(x) + self.temb(timestep_embedding(t, self.config.time_embed_dim))
        for block in self.res_blocks:
            h = h + block(h)
        h = F.silu(self.out_norm(h))
        return self.out(h), h


@dataclass
class DiffusionModel:
    """A noise-prediction network with the chain it samples along and what kdtools knows about it."""

    net: nn.Module
    chain: Chain
    info: dict = field(default_factory=dict)  # the kdtools.json content (see module docstring)
    scheduler_config: dict = field(default_factory=dict)
    noise_bank: Optional[torch.Tensor] = None

    @property
    def steps(self) -> int:
        return len(self.chain)

    @property
    def data(self) -> dict:
        return self.info.get("data", {})

    @property
    def sample_shape(self) -> tuple:
        d = self.data
        if d.get("kind") == "tabular":
            return (int(d["dim"]),)
        return (int(d["channels"]), int(d["image_size"]), int(d["image_size"]))

    @property
    def clip(self) -> Optional[float]:
        """Range that predicted x_0 is clipped to while sampling (None: no clipping)."""
        return float(self.info.get("clip_sample_range", 1.0)) if self.info.get("clip_sample", False) else None

    def inherited(self) -> dict:
        """What a student takes over from this teacher: the data and the x_0 clipping."""
        return {"data": self.data, "clip_sample": bool(self.info.get("clip_sample", False)),
                "clip_sample_range": float(self.info.get("clip_sample_range", 1.0))}


def is_tabular_net(net: nn.Module) -> bool:
    return isinstance(net, MLPDenoiser)


def denoise(net: nn.Module, x: torch.Tensor, t: torch.Tensor, want_hidden: bool = False):
    """The network's noise prediction (and, if asked, its last hidden features) for any kdtools network."""
    if isinstance(net, nn.parallel.DistributedDataParallel):
        inner = net.module
    else:
        inner = net
    if isinstance(inner, MLPDenoiser):
        eps, hidden = net(x, t)
        return (eps, hidden) if want_hidden else eps
    if not want_hidden:
        return net(x, t).sample
    # UNet2DModel: the features entering conv_out are its last hidden layer
    box = {}
    handle = inner.conv_out.register_forward_hook(lambda m, inp, out: box.__setitem__("h", inp[0]))
    try:
        eps = net(x, t).sample
    finally:
        handle.remove()
    return eps, box["h"]


# ----------------------------------------------------------------------------------------------------
# building

def build_unet(image_size: int, channels: int, block_out_channels=(32, 64), layers_per_block: int = 1,
               attention: bool = False) -> nn.Module:
    """A diffusers UNet2DModel; ``attention`` puts self-attention in the lowest-resolution blocks."""
    from diffusers import UNet2DModel

    n = len(block_out_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    groups = math.gcd(*block_out_channels) if n > 1 else block_out_channels[0]
    return UNet2DModel(sample_size=image_size, in_channels=channels, out_channels=channels,
                       block_out_channels=tuple(block_out_channels), layers_per_block=layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=min(32, groups))


def fresh_copy(net: nn.Module) -> nn.Module:
    """A new, untrained network of the same class and configuration."""
    return type(net).from_config(net.config)


def scheduler_config_for(alphas_cumprod: torch.Tensor, clip_sample: bool, cls: str = "DDPMScheduler",
                         clip_sample_range: float = 1.0) -> dict:
    """A diffusers scheduler config that reproduces these cumulative alphas (through trained_betas)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    from .schedules import betas_from_alphas_cumprod

    betas = betas_from_alphas_cumprod(alphas_cumprod)
    klass = DDPMScheduler if cls == "DDPMScheduler" else DDIMScheduler
    sched = klass(num_train_timesteps=len(betas), trained_betas=betas.tolist(), clip_sample=clip_sample,
                  clip_sample_range=clip_sample_range, prediction_type="epsilon")
    return dict(sched.config)


def subchain_scheduler_config(teacher_config: dict, alphas_cumprod: torch.Tensor, clip_sample: bool, cls: str,
                               clip_sample_range: float = 1.0, **chosen) -> dict:
    """The teacher's scheduler config (or one rebuilt from its alphas), for a model sampled on a sub-chain of
    the teacher's steps (SFDDM aligned, DDIM skipping, progressive): ``trailing`` spacing makes diffusers'
    ``set_timesteps(T')`` land on phi - 1 for a uniform phi, i.e. on our chain's timesteps (tests pin it); for
    another phi, diffusers needs ``scheduler.set_timesteps(timesteps=...)`` with the chain's timesteps."""
    sched = dict(teacher_config) or scheduler_config_for(alphas_cumprod, clip_sample, cls, clip_sample_range)
    chosen = {"_class_name": cls, "timestep_spacing": "trailing", **chosen}
    sched.update(chosen)
    # diffusers drops keys listed as defaulted when it loads a config: ours are chosen, not defaults
    sched["_use_default_values"] = [k for k in sched.get("_use_default_values", []) if k not in chosen]
    return sched


# ----------------------------------------------------------------------------------------------------
# loading

def _quiet_diffusers():
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


# what a model *file* is called: such a name is a mistyped local path, never a hub id
FILE_SUFFIXES = (".safetensors", ".pt", ".pt2", ".pth", ".bin", ".ckpt", ".h5", ".hdf5", ".json", ".onnx", ".png",
                 ".npz", ".npy", ".pkl", ".kds")


def _local_path_reason(text: str) -> Optional[str]:
    """Why ``text`` (which does not exist) is a local path and not a hub id owner/name; None if it may be one."""
    if text.startswith(("./", "../", "/", "~", ".")) or text.endswith(("/", os.sep)):
        return "written as a local path"
    if text.lower().endswith(FILE_SUFFIXES):
        return "a file name, not a hub id"
    if text.count("/") != 1:
        return "a hub id is exactly owner/name"
    first = text.split("/", 1)[0]
    if Path(first).is_dir():
        return f"{first}/ is a local directory"
    return None


def load_diffusion(path: str | os.PathLike, allow_hub: bool = True) -> DiffusionModel:
    """Load a kdtools / diffusers directory (or, online, a hub id such as google/ddpm-cifar10-32)."""
    _quiet_diffusers()
    p = Path(path)
    if not p.exists():
        reason = _local_path_reason(str(path))
        if allow_hub and reason is None:
            return _load_hub(str(path))
        raise KdError(f"{path}: no such model directory" + (f" ({reason}; a diffusers model directory is expected)"
                                                           if reason and allow_hub and "/" in str(path) else ""))
    if not p.is_dir():
        raise KdError(f"{p}: not a directory (expected a diffusers model directory with unet/ and scheduler/)")
    if (p / "unet" / "config.json").is_file():
        net_dir, kind = p / "unet", "unet"
    elif (p / "denoiser" / "config.json").is_file():
        net_dir, kind = p / "denoiser", "mlp"
    elif (p / "config.json").is_file():
        net_dir, kind = p, "unet"
    else:
        raise KdError(f"{p}: no model in this directory (expected unet/config.json, denoiser/config.json or config.json)")
    sched_file = next((f for f in (p / "scheduler" / "scheduler_config.json", p / "scheduler_config.json") if f.is_file()), None)
    if sched_file is None:
        raise KdError(f"{p}: the directory has no scheduler (scheduler/scheduler_config.json); "
                      "a diffusion model needs its noise schedule")
    try:
        sched_cfg = json.loads(sched_file.read_text())
    except (OSError, ValueError) as e:
        raise KdError(f"{sched_file}: unreadable scheduler config ({e})") from None
    try:
        if kind == "mlp":
            net = MLPDenoiser.from_pretrained(str(net_dir), local_files_only=True)
        else:
            from diffusers import UNet2DModel

            net = UNet2DModel.from_pretrained(str(net_dir), local_files_only=True)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise KdError(f"{net_dir}: cannot load the network ({str(e).strip().splitlines()[0][:200]})") from None
    info = {}
    if (p / "kdtools.json").is_file():
        try:
            info = json.loads((p / "kdtools.json").read_text())
        except (OSError, ValueError) as e:
            raise KdError(f"{p / 'kdtools.json'}: unreadable ({e})") from None
    noise_bank = None
    if (p / "noise_bank.safetensors").is_file():
        from safetensors.torch import load_file

        noise_bank = load_file(str(p / "noise_bank.safetensors"))["noise"]
    return _assemble(net.eval(), sched_cfg, info, str(p), noise_bank)


def _load_hub(repo_id: str) -> DiffusionModel:
    """A hub id: download through diffusers (only works online). The hub's own warnings and retry messages
    are kept off stderr: a failure is one KdError."""
    import warnings

    from diffusers import DDPMScheduler, UNet2DModel

    if _local_path_reason(repo_id) is not None:
        # written as a path (a hub id is exactly owner/name): the directory is missing, the hub is beside the point
        raise KdError(f"{repo_id}: no such directory (a diffusers model directory, or a hub id owner/name when online)")
    # no reachability probe of our own: the hub library falls back to its cache when offline and honours the
    # proxy settings, which a direct connection test would not
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "urllib3", "filelock")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.CRITICAL)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            net = UNet2DModel.from_pretrained(repo_id, subfolder="unet")
            sched = DDPMScheduler.from_pretrained(repo_id, subfolder="scheduler")
    except Exception as e:  # offline, or not a diffusers repo
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise KdError(f"{repo_id}: no such local directory, and the hub could not provide it (offline, or not a "
                      f"diffusers repository: {reason[:300]})") from None
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    return _assemble(net.eval(), dict(sched.config), {}, repo_id, None)


def _assemble(net, sched_cfg: dict, info: dict, where: str, noise_bank) -> DiffusionModel:
    cls = sched_cfg.get("_class_name", "DDPMScheduler")
    if cls not in SCHEDULER_CLASSES:
        raise KdError(f"{where}: scheduler {cls} is not supported (DDPMScheduler or DDIMScheduler)")
    if sched_cfg.get("prediction_type", "epsilon") != "epsilon":
        raise KdError(f"{where}: the model predicts {sched_cfg.get('prediction_type')}; kd-diffstep needs epsilon prediction")
    from diffusers import DDPMScheduler

    cfg = {k: v for k, v in sched_cfg.items() if not k.startswith("_")}
    try:
        sched = DDPMScheduler.from_config(cfg)
    except Exception as e:
        raise KdError(f"{where}: bad scheduler config ({str(e).splitlines()[0][:160]})") from None
    acp = sched.alphas_cumprod.double()
    if sched.config.trained_betas is not None:  # diffusers keeps float32; rebuild exactly from the betas
        acp = alphas_cumprod_from_betas(torch.tensor(sched.config.trained_betas, dtype=torch.float64))
    info = dict(info)
    chain = Chain.from_json(info["chain"]) if "chain" in info else Chain(list(range(len(acp))), acp)
    info.setdefault("kind", "teacher")
    info.setdefault("method", "ddpm")
    info.setdefault("teacher_steps", len(chain))
    info.setdefault("clip_sample", bool(sched_cfg.get("clip_sample", False)))
    info.setdefault("clip_sample_range", float(sched_cfg.get("clip_sample_range", 1.0)))
    info.setdefault("default_sampler", "ddpm")
    if "data" not in info:
        if isinstance(net, MLPDenoiser):
            info["data"] = {"kind": "tabular", "dim": int(net.config.data_dim)}
        else:
            info["data"] = {"kind": "image", "image_size": int(net.config.sample_size), "channels": int(net.config.in_channels)}
    return DiffusionModel(net, chain, info, dict(sched_cfg), noise_bank)


# ----------------------------------------------------------------------------------------------------
# saving

def check_output_dir(path: str | os.PathLike, force: bool, inputs: Sequence[str | os.PathLike] = ()) -> Path:
    """Called before any work. Refuse to clobber an existing non-empty directory unless ``force``, and even
    then replace only a model directory (one with ``model_index.json``: ``-o runs --force`` must not delete a
    folder of other work). Never an output that is, or holds, one of ``inputs`` (the teacher, a data file)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise KdUsageError(f"{p}: exists and is not a directory")
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent  # missing folders are made; the first existing one must be a folder
    if not parent.is_dir():
        raise KdUsageError(f"-o {p}: {parent} is not a directory")
    where = Path(os.path.realpath(p))
    for given in inputs:
        if given is None or not Path(given).exists():
            continue
        real = Path(os.path.realpath(given))
        if real == where or where in real.parents:
            what = "is" if real == where else "holds"
            raise KdUsageError(f"-o {p} {what} the input {given}: writing it would destroy the input; choose another -o")
    if p.exists() and any(p.iterdir()):
        if not force:
            raise KdUsageError(f"{p}: exists and is not empty; choose another -o or pass --force to replace it")
        if not (p / "model_index.json").is_file():
            raise KdUsageError(f"{p}: --force replaces only a model directory (one with model_index.json), and {p} "
                               "holds other files; choose another -o")
    return p


def save_diffusion(model: DiffusionModel, path: str | os.PathLike, scheduler_cls: str = "DDPMScheduler") -> None:
    """Write a diffusion directory atomically: build it under a temporary name, then rename into place."""
    _quiet_diffusers()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        tabular = is_tabular_net(model.net)
        sub = "denoiser" if tabular else "unet"
        net = model.net.module if isinstance(model.net, nn.parallel.DistributedDataParallel) else model.net
        net.save_pretrained(str(tmp / sub), safe_serialization=True)
        sched_cfg = model.scheduler_config or scheduler_config_for(model.chain.alphas_cumprod, model.clip is not None, scheduler_cls,
                                                                   model.clip or 1.0)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched_cfg, indent=2, default=str))
        import diffusers

        index = {"_class_name": "DDPMPipeline", "_diffusers_version": diffusers.__version__,
                 "scheduler": ["diffusers", sched_cfg.get("_class_name", scheduler_cls)]}
        if tabular:  # not a diffusers pipeline class; recorded for readers, diffusers' loader does not apply
            index["_class_name"] = "kdtools.MLPDiffusion"
            index["denoiser"] = ["kdtools.diffusion.teachers", "MLPDenoiser"]
        else:
            index["unet"] = ["diffusers", "UNet2DModel"]
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        info = {"kdtools.version": __version__, **model.info, "chain": model.chain.to_json()}
        (tmp / "kdtools.json").write_text(json.dumps(info, indent=1, default=str))
        if model.noise_bank is not None:
            from safetensors.torch import save_file

            save_file({"noise": model.noise_bank.contiguous().cpu()}, str(tmp / "noise_bank.safetensors"))
        os.chmod(tmp, 0o777 & ~_umask())
        if out.exists():  # --force: swap the old directory out only once the new one is complete
            old = out.parent / f".{out.name}.old"
            if old.exists():
                shutil.rmtree(old)
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
