"""Training checkpoints of the one fit loop: write every N steps and when cancelled, resume exactly.

A checkpoint is one ``.safetensors`` file written atomically (a temporary file renamed over the
name, so a crash or a cancel mid-write leaves no partial file).  Its tensors are

* ``param.<i>``            the i-th trained tensor, in the optimiser's parameter order;
* ``opt.<i>.<key>``        the optimiser's per-parameter state (Adam: ``step``, ``exp_avg``, ``exp_avg_sq``);
* ``rng.<name>``           the state of every generator the loop draws from (``torch.Generator.get_state()``);
* ``extra.<name>``         what else the trainer keeps (an EMA);
* ``curve.total``, ``curve.<term>``  the losses so far (float64), so a resumed run returns the whole curve;

and its JSON header (``sie.checkpoint``) holds the step, the optimiser's parameter groups, the
scheduler's and the gradient scaler's state, and the trainer's identity (``meta``: method, stage,
configuration, a fingerprint of the base weights), which a resume must match key by key.

Exactness: the state saved at step N is the state after N optimiser steps, with each generator as
it was *before* step N + 1 drew from it (the loop records it at the start of every step), so a run
resumed from step N takes the same steps N + 1, ... as one that never stopped; on the CPU the
trained tensors and losses are bit-equal (tested in ``tests/test_checkpoint.py``; across processes with
Intel MKL's reproducibility mode, ``MKL_CBWR=AUTO,STRICT``: without it MKL's threaded kernels may round
with the buffers' alignment, which tests/integration/test_resume_comfy.py measured on ComfyUI 0.8.0).  On a GPU they agree to
float rounding only: cuDNN / cuBLAS choose non-deterministic kernels by default (atomic adds in backward), so two
uninterrupted GPU runs already differ in the last bits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .artifact_io import atomic_save_safetensors

FORMAT = "sie.checkpoint"
VERSION = 1


class ResumeError(ValueError):
    """A checkpoint that cannot be resumed here: the message names the file and the difference."""


@dataclass(frozen=True)
class Checkpointing:
    """Where and when the fit loop writes checkpoints, and what identifies the run.

    ``folder / f"{prefix}_step{N:07d}.safetensors"``, every ``every`` steps (0: only when the
    run is cancelled or fails), keeping the newest ``keep``.  ``meta`` (JSON) names the method,
    stage, configuration and base-weights fingerprint; a resume refuses a file whose meta differs.
    ``rngs``: the generators the loop's batches draw from.  ``resume``: a checkpoint to continue.
    ``on_kept(path)``: called when a run stops early (cancel, error) with the newest checkpoint it wrote.
    """

    folder: Path
    prefix: str
    meta: dict
    every: int = 0
    keep: int = 3
    rngs: dict[str, torch.Generator] = field(default_factory=dict)
    resume: Path | None = None
    write: bool = True  # False: resume only (the other processes of a distributed run; rank 0 writes)
    on_kept: Callable[[Path], None] | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.every < 0:
            raise ValueError(f"checkpoint interval must be >= 0, got {self.every}")
        if self.keep < 1:
            raise ValueError(f"checkpoints kept must be at least 1, got {self.keep}")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.prefix):
            raise ValueError(f"checkpoint prefix {self.prefix!r}: use letters, digits, '_', '-' or '.'")

    def path(self, step: int) -> Path:
        return Path(self.folder) / f"{self.prefix}_step{step:07d}.safetensors"

    def existing(self) -> list[Path]:
        """This run's checkpoints in the folder, oldest first."""
        folder = Path(self.folder)
        if not folder.is_dir():
            return []
        name = re.compile(re.escape(self.prefix) + r"_step(\d+)\.safetensors")
        found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := name.fullmatch(p.name))]
        return [p for _, p in sorted(found)]

    def rng_states(self) -> dict[str, torch.Tensor]:
        """The current state of each generator the loop draws from."""
        return {n: g.get_state() for n, g in self.rngs.items()}


@dataclass(frozen=True)
class Plan:
    """What a user asks of a training run's checkpoints (a node's inputs, a CLI's flags): the folder,
    the interval in steps (0: only when cancelled or failed), how many to keep, an optional file to
    continue from, and a name for the files (default: the method's; with ``identify``, followed by
    the stage and the run's :func:`identity`, for a folder that many runs share).  A trainer turns it into the
    loop's :class:`Checkpointing` with :meth:`for_run`, adding what identifies its run."""

    folder: Path
    every: int = 0
    keep: int = 3
    resume: Path | None = None
    name: str = ""
    resume_latest: bool = False  # continue from the newest checkpoint of the run's stage in folder, if any
    identify: bool = False  # file names carry a digest of the run's identity (a folder many runs share)
    on_kept: Callable[[Path], None] | None = field(default=None, compare=False)  # see Checkpointing

    def for_run(self, method: str, stage: str, config: dict, base: str,
                rngs: dict[str, torch.Generator], write: bool = True) -> Checkpointing:
        """``config``: the settings a resumed run must share (not the step count: a resume asks for more);
        ``base``: the :func:`fingerprint` of the frozen base weights; ``write``: False for a process
        that only resumes (all but rank 0 of a distributed run)."""
        meta = {"method": method, "stage": stage, "config": config, "fingerprint": base}
        resume, latest = (Path(self.resume) if self.resume else None), self.resume_latest
        if resume is not None and _stage_of(resume) not in (None, stage):
            # a multi-stage run given the file of a later stage: the stages before it continue from their newest
            resume, latest = None, True
        prefix = f"{self.name or method}_{stage}" + (f"_{identity(meta)}" if self.identify else "")
        ck = Checkpointing(Path(self.folder), prefix, meta, self.every, self.keep, dict(rngs), resume, write,
                           self.on_kept)
        found = ck.existing() if latest and ck.resume is None else []
        return dataclasses.replace(ck, resume=found[-1]) if found else ck


def identity(meta: dict) -> str:
    """8 hex digits of a run's identity (method, stage, settings, fingerprints): the same for a run and its
    resumes, different for another run, so runs sharing a folder never prune each other's files."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode()).hexdigest()[:8]


def _stage_of(path: Path) -> str | None:
    """The stage a checkpoint file was written by (None when it is no readable checkpoint: :func:`load`
    then says why)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {})[FORMAT])["meta"]["stage"]
    except Exception:
        return None


def settings_of(config, exclude: tuple[str, ...] = ("steps", "gradient_checkpointing")) -> dict:
    """A stage's frozen config dataclass as the JSON a resumed run must match: every field but the step
    count (a resume asks for more) and what does not change the arithmetic's result (gradient checkpointing)."""
    return {k: v for k, v in json.loads(json.dumps(dataclasses.asdict(config), default=str)).items()
            if k not in exclude}


def stage_checkpointing(plan: Plan | None, method: str, stage: str, base: dict[str, torch.Tensor], settings: dict,
                        data: dict[str, torch.Tensor | None], rngs: dict[str, torch.Generator],
                        write: bool = True) -> Checkpointing | None:
    """The fit loop's checkpointing for one training stage (None without a plan).  The run's identity:
    its ``settings``, a :func:`fingerprint` of the frozen ``base`` weights and one of each tensor it fits
    (``data``: latents, conditionings, masks; None where absent)."""
    if plan is None:
        return None
    seen = {k: fingerprint([(k, v)]) if v is not None else None for k, v in data.items()}
    return plan.for_run(method, stage, {**settings, **seen}, fingerprint(base.items()), rngs, write)


@dataclass
class Snapshot:
    """The loop's state after ``step`` optimiser steps (what a checkpoint holds)."""

    step: int
    params: list[torch.Tensor]
    optimizer: dict
    scheduler: dict | None
    scaler: dict | None
    rngs: dict[str, torch.Tensor]
    losses: list[float]
    terms: dict[str, list[float]]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


def fingerprint(named: Iterable[tuple[str, torch.Tensor]], samples: int = 4) -> str:
    """A short digest of base weights: every name, shape and dtype, and a few values of each tensor
    (its first and last ``samples`` elements), so another model, or the same architecture with other
    weights, gives another fingerprint without reading every weight."""
    h = hashlib.sha256()
    for name, t in named:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        flat = t.detach().reshape(-1)
        if flat.numel():
            picks = torch.cat([flat[:samples], flat[-samples:]]).to("cpu", torch.float64)
            h.update(picks.numpy().tobytes())
    return h.hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """Scheduler / scaler state as JSON (Counters and tuples as plain containers, tensors as floats)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.item()
    return value


def save(ck: Checkpointing, snap: Snapshot) -> Path | None:
    """Write ``snap`` atomically as ``ck.path(step)``, then drop all but the newest ``ck.keep``
    (None, writing nothing, when ``ck.write`` is False)."""
    if not ck.write:
        return None
    tensors: dict[str, torch.Tensor] = {}
    for i, p in enumerate(snap.params):
        tensors[f"param.{i}"] = p.detach().cpu().clone()
    scalars: dict[str, dict] = {}
    for i, state in snap.optimizer["state"].items():
        for key, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{i}.{key}"] = v.detach().cpu().clone()
            elif isinstance(v, dict) and v and all(isinstance(x, torch.Tensor) for x in v.values()):
                for sub, x in v.items():  # a dict of tensors (bitsandbytes' quantised moments): "key/sub"
                    tensors[f"opt.{i}.{key}/{sub}"] = x.detach().cpu().clone()
            else:
                scalars.setdefault(str(i), {})[key] = v
    for name, st in snap.rngs.items():
        tensors[f"rng.{name}"] = st
    for name, t in snap.extra.items():
        tensors[f"extra.{name}"] = t.detach().cpu().clone()
    tensors["curve.total"] = torch.tensor(snap.losses, dtype=torch.float64)
    for name, vals in snap.terms.items():
        tensors[f"curve.{name}"] = torch.tensor(vals, dtype=torch.float64)
    header = {"format": FORMAT, "version": VERSION, "step": snap.step, "meta": ck.meta,
              "param_groups": _jsonable(snap.optimizer["param_groups"]), "opt_scalars": scalars,
              "scheduler": _jsonable(snap.scheduler), "scaler": _jsonable(snap.scaler),
              "terms": list(snap.terms), "rngs": list(snap.rngs), "extra": list(snap.extra)}
    path = ck.path(snap.step)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(tensors, path, {FORMAT: json.dumps(header)})
    for old in ck.existing()[:-ck.keep]:
        old.unlink(missing_ok=True)
    return path


def _differences(want: Any, got: Any, where: str = "") -> list[str]:
    if isinstance(want, dict) and isinstance(got, dict):
        out = []
        for k in sorted(set(want) | set(got)):
            out += _differences(want.get(k, "<absent>"), got.get(k, "<absent>"), f"{where}.{k}" if where else k)
        return out
    return [] if want == got else [f"{where}: this run has {want!r}, the checkpoint {got!r}"]


def load(ck: Checkpointing, path: str | Path, params: list[torch.Tensor]) -> Snapshot:
    """Read a checkpoint written by :func:`save` for a run like ``ck`` (no pickle: safetensors and JSON).

    Refuses, naming the file and the difference: a file that is no checkpoint, one from another
    method, stage, configuration or base model (``meta`` differs), or one whose trained tensors do
    not match ``params`` in number or shape."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ResumeError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(FORMAT)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # a truncated or foreign file
        raise ResumeError(f"{path.name}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if raw is None:
        raise ResumeError(f"{path.name}: not a training checkpoint of this pack (no {FORMAT} header)")
    header = json.loads(raw)
    if header.get("version") != VERSION:
        raise ResumeError(f"{path.name}: checkpoint format version {header.get('version')}, this pack "
                              f"reads {VERSION}")
    diff = _differences(ck.meta, header.get("meta", {}))
    if diff:
        raise ResumeError(f"{path.name} is from another run: " + "; ".join(diff[:4]))
    saved = [tensors.get(f"param.{i}") for i in range(len(params))]
    if any(t is None for t in saved) or f"param.{len(params)}" in tensors:
        n = sum(1 for k in tensors if k.startswith("param."))
        raise ResumeError(f"{path.name}: holds {n} trained tensors, this run trains {len(params)}")
    for i, (t, p) in enumerate(zip(saved, params)):
        if t.shape != p.shape:
            raise ResumeError(f"{path.name}: trained tensor {i} has shape {tuple(t.shape)}, this run's "
                                  f"{tuple(p.shape)}")
    missing = [n for n in ck.rngs if f"rng.{n}" not in tensors]
    if missing:
        raise ResumeError(f"{path.name}: no state for the generator(s) {missing}")
    state: dict[int, dict] = {}
    for key, t in tensors.items():
        if key.startswith("opt."):
            _, i, name = key.split(".", 2)
            if "/" in name:
                name, sub = name.split("/", 1)
                state.setdefault(int(i), {}).setdefault(name, {})[sub] = t
            else:
                state.setdefault(int(i), {})[name] = t
    for i, scalars in header.get("opt_scalars", {}).items():
        state.setdefault(int(i), {}).update(scalars)
    optimizer = {"state": state, "param_groups": header["param_groups"]}
    terms = {name: tensors[f"curve.{name}"].tolist() for name in header.get("terms", [])}
    return Snapshot(step=int(header["step"]), params=saved, optimizer=optimizer, scheduler=header.get("scheduler"),
                    scaler=header.get("scaler"), rngs={n: tensors[f"rng.{n}"] for n in header.get("rngs", [])},
                    losses=tensors["curve.total"].tolist(), terms=terms,
                    extra={n: tensors[f"extra.{n}"] for n in header.get("extra", [])})
