"""The checkpoint format, and its one owner: `Checkpointer` saves and restores a run; `load_checkpoint` reads a
model back for inference.

A checkpoint is a directory that every rank writes a part of (Ray Train merges the parts):

    state.pt         rank 0: model, optimizer, scheduler, step (torch.save)
    model.pt         rank 0: the bare model state_dict (weights_only; what inference loads)
    meta.json        rank 0: step, epoch, world size, job name, model name + resolved config, the data section,
                     and the training vocabulary (`training_vocabulary`: gene ids, their fingerprint, obs categories)
    rank{r}.pt       every rank: its loader position and RNG states (a run resumed at another size: see `restore`)

A checkpoint is complete when every one of these files is there; readers skip incomplete ones. A run whose
`train.output` is a URI keeps its checkpoints in the bucket (Ray Train uploads them); `latest_checkpoint` finds the
newest complete one there and downloads it once into the node's cache (`CELLRAY_CACHE_DIR/checkpoints`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import models
from engine.atomic import temporary_sibling
from engine.errors import TrainError
from engine.loading.mixing import Mix
from engine.objects import ObjectPath, cache_dir, exists, list_objects, read_bytes, store_path

META_FILE = "meta.json"
MODEL_FILE = "model.pt"
STATE_FILE = "state.pt"
LOCAL_PREFIX = "checkpoint_step"  # names of checkpoints written in local mode (Ray Train's are checkpoint_*)


@dataclass
class TrainState:
    """Everything a checkpoint saves of one rank."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    loader: Any  # engine.loading.Loader
    step: int = 0
    epoch: int = 0


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves a rank's part of each checkpoint (reported to Ray Train) and restores the newest complete one."""

    def __init__(
        self,
        output: str,
        *,
        rank: int,
        world_size: int,
        meta: dict[str, Any],
        keep: int,
        local_mode: bool,
    ):
        self.output = store_path(output)  # a URI when train.output is one (then Ray Train uploads the checkpoints)
        self.rank = rank
        self.world_size = world_size
        self.meta = meta  # job name, model name + resolved config, data section
        self.keep = keep
        self.local_mode = local_mode  # Ray Train's local mode persists nothing: write to output/ ourselves
        self.reports: list[dict[str, Any]] = []  # rank 0: the metrics reported since the previous checkpoint

    def write(self, d: Path, state: TrainState, metrics: dict[str, Any]) -> None:
        if self.rank == 0:
            torch.save(
                {
                    "model": state.model.state_dict(),
                    "optimizer": state.optimizer.state_dict(),
                    "scheduler": state.scheduler.state_dict(),
                    "step": state.step,
                },
                d / STATE_FILE,
            )
            torch.save(state.model.state_dict(), d / MODEL_FILE)
            meta = {
                "step": state.step,
                "epoch": state.epoch,
                "world_size": self.world_size,
                **self.meta,
                "metrics": metrics,
                "reports": self.reports or [metrics],  # every report since the previous checkpoint
            }
            (d / META_FILE).write_text(json.dumps(meta, indent=1))
            self.reports = []
        torch.save(
            {"loader": state.loader.state_dict(), "rng": rng_state(), "epoch": state.epoch, "step": state.step},
            d / f"rank{self.rank}.pt",
        )

    def save(self, state: TrainState, metrics: dict[str, Any]) -> None:
        """Write this rank's part and report it with `metrics` to Ray Train (a barrier across ranks)."""
        import ray.train

        if self.local_mode:
            final = self.output / f"{LOCAL_PREFIX}{state.step:09d}"
            tmp = temporary_sibling(final)
            tmp.mkdir(parents=True)
            self.write(tmp, state, metrics)
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in sorted(self.output.glob(f"{LOCAL_PREFIX}*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(final)))
            return
        with tempfile.TemporaryDirectory(prefix="cellray-ckpt-") as d:
            self.write(Path(d), state, metrics)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))

    def restore(self, state: TrainState) -> bool:
        """Load the newest complete checkpoint into `state` (model, optimizer, scheduler, loader, RNG, step,
        epoch); False when there is none."""
        checkpoint = self.resume_point
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as d:
            d = Path(d)
            saved = torch_load(d / STATE_FILE)
            mine = d / f"rank{self.rank}.pt"
            # A run resized to more workers: a new rank takes rank 0's loader position, which a resize-invariant
            # plan shares with every rank (a per-rank plan refuses it mid-epoch), and keeps its fresh RNG seed.
            own = torch_load(mine if mine.exists() else d / "rank0.pt")
        # a checkpoint of another model (or run) in this output cannot resume this one: deterministic, never retried
        try:
            state.model.load_state_dict(saved["model"])
            state.optimizer.load_state_dict(saved["optimizer"])
            state.scheduler.load_state_dict(saved["scheduler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            changes = _config_changes(state.model, d)
            cause = f"its model config differs ({changes})" if changes else "it holds another model's training"
            raise TrainError(
                f"{self.output}: its checkpoint {d.name} does not fit this run's model ({one_line(e)}): {cause}; "
                "use another train.output, or the model config it was trained with (its meta.json)"
            ) from None
        state.loader.load_state_dict(own["loader"])
        if mine.exists():
            set_rng_state(own["rng"])
        state.step, state.epoch = saved["step"], state.loader.state_dict()["epoch"]
        return True

    @functools.cached_property
    def resume_point(self):
        """The newest complete checkpoint: Ray Train's latest registered one, or a newer one on disk; None for a
        fresh run. Found once per worker group (the loop asks before it builds the start, `restore` loads it).

        Ray registers a checkpoint when its controller next polls the workers, so a worker lost right after
        report() can leave a complete checkpoint on disk that Ray does not know yet.
        """
        import ray.train

        registered = ray.train.get_checkpoint()
        on_disk = latest_checkpoint(self.output, required=False)
        if on_disk is None:
            return registered
        if registered is not None:
            with registered.as_directory() as d:
                if (Path(d) / META_FILE).exists() and read_meta(Path(d))["step"] >= read_meta(on_disk)["step"]:
                    return registered
        return ray.train.Checkpoint.from_directory(str(on_disk))


def gene_fingerprint(gene_ids) -> str:
    """Identifies an ordered gene vocabulary (sha256 of the ids, one per line)."""
    return "sha256:" + hashlib.sha256("\n".join(map(str, gene_ids)).encode()).hexdigest()[:32]


def training_vocabulary(source: str | os.PathLike | Mix, obs_keys=(), pipeline: Any = None) -> dict[str, Any]:
    """What the model's inputs mean, kept in meta.json so inference can map another store onto them by name:
    the training store's gene ids in column order (+ fingerprint), and the categories of the obs keys it read
    (a mix of stores: the run's genes and the union of the sources' categories). With a gene selection in the
    run's `pipeline` (select_genes: hvg, a list, a file): its genes' ids in output column order, `selected_genes`,
    so that inference selects the same genes without the training store's statistics."""
    from engine.store.format import Store

    if isinstance(source, Mix):
        mix = source.open()
        genes = [str(g) for g in mix.genes]
        cats = {k: c for k in obs_keys if (c := mix.categories(k)) is not None}
        where: str | list[str] = [str(Path(st.path).resolve()) for st in mix.stores]
    else:
        store = Store.open(source)
        genes = [str(g) for g in store.gene_ids]
        schema = store.manifest.obs_schema
        cats = {k: schema[k]["categories"] for k in obs_keys if "categories" in schema.get(k, {})}
        where = str(Path(source).resolve())
    vocabulary = {"store": where, "genes": genes, "fingerprint": gene_fingerprint(genes), "obs_categories": cats}
    selected = pipeline.selected_genes(genes) if pipeline is not None else None
    if selected is not None:
        vocabulary["selected_genes"] = selected
    return vocabulary


def one_line(error: BaseException) -> str:
    """An exception's whole message on one line (torch's load_state_dict errors span several)."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


def torch_load(path: Path, weights_only: bool = False) -> Any:
    """torch.load on CPU; a file that is garbage or truncated is a TrainError naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except FileNotFoundError:
        raise TrainError(f"{path}: missing (an incomplete checkpoint)") from None
    except Exception as e:  # pickle, zipfile and torch raise many types for bad bytes
        raise TrainError(f"{path}: not a readable checkpoint file, garbage or truncated ({one_line(e)})") from None


def _config_changes(model: torch.nn.Module, checkpoint: Path) -> str:
    """The fields in which this run's model config differs from the one a checkpoint was trained with (a field that
    did not exist then shows as absent); '' when either is unknown."""
    config = getattr(getattr(model, "module", model), "config", None)
    try:
        saved = read_meta(checkpoint)["model"]["config"]
    except (TrainError, KeyError, TypeError):
        return ""
    if not dataclasses.is_dataclass(config) or not isinstance(saved, dict):
        return ""
    mine = json.loads(json.dumps(dataclasses.asdict(config)))  # as meta.json holds it (tuples -> lists)
    return "; ".join(
        f"{k}: {v!r} here, " + (f"{saved[k]!r} there" if k in saved else "absent there")
        for k, v in mine.items()
        if k not in saved or saved[k] != v
    )


def read_meta(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's meta.json; unreadable or not a JSON object: a TrainError naming it."""
    path = Path(checkpoint) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise TrainError(f"{path}: missing (not a checkpoint, or an incomplete one)") from None
    except (OSError, ValueError) as e:
        raise TrainError(f"{path}: not valid JSON ({one_line(e)})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        raise TrainError(f"{path}: not a checkpoint's meta (expected a JSON object with an integer 'step')")
    return meta


def checkpoint_complete(path: Path) -> bool:
    """Every file of every rank is there (a rank that died while writing leaves an incomplete directory)."""
    try:
        meta = read_meta(path)
    except TrainError:
        return False
    names = [MODEL_FILE, STATE_FILE] + [f"rank{r}.pt" for r in range(int(meta.get("world_size", 1)))]
    return all((path / n).is_file() and (path / n).stat().st_size > 0 for n in names)


def _download_latest(path: ObjectPath) -> Path | None:
    """The newest complete checkpoint at or under `path` in a bucket, downloaded into the node's cache."""
    if exists(path / META_FILE):
        candidates = {path: [o.name for o in list_objects(path)]}
    else:
        candidates: dict[ObjectPath, list[str]] = {}
        for o in list_objects(path):
            rel = o.key[len(path.key) :].strip("/").split("/")
            if len(rel) == 2 and rel[0].startswith(("checkpoint_", LOCAL_PREFIX)):
                candidates.setdefault(path / rel[0], []).append(rel[1])
    best: tuple[int, ObjectPath, dict[str, Any]] | None = None
    for ckpt, names in candidates.items():
        if META_FILE not in names:
            continue
        meta = json.loads(read_bytes(ckpt / META_FILE))
        needed = [MODEL_FILE, STATE_FILE] + [f"rank{r}.pt" for r in range(int(meta.get("world_size", 1)))]
        if all(n in names for n in needed) and (best is None or int(meta["step"]) > best[0]):
            best = (int(meta["step"]), ckpt, meta)
    if best is None:
        return None
    _, ckpt, meta = best
    local = cache_dir() / "checkpoints" / ckpt.scheme / ckpt.bucket / ckpt.key
    if not checkpoint_complete(local):
        tmp = temporary_sibling(local)
        tmp.mkdir(parents=True)
        for o in list_objects(ckpt):
            (tmp / o.name).write_bytes(read_bytes(o))
        if local.exists():
            shutil.rmtree(local)
        os.rename(tmp, local)
    return local


def latest_checkpoint(path: str | os.PathLike | ObjectPath, required: bool = True) -> Path | None:
    """`path` itself when it is a checkpoint, else the complete checkpoint with the highest step under it. A URI's
    checkpoint is downloaded into the node's cache and that local copy returned."""
    path = store_path(path)
    if isinstance(path, ObjectPath):
        found = _download_latest(path)
        if found is None and required:
            raise TrainError(f"{path}: no complete checkpoint here (expected a run's train.output or a checkpoint)")
        return found
    if (path / META_FILE).exists():
        read_meta(path)  # a garbled meta.json is named as such
        return path
    best: tuple[int, Path] | None = None
    metas = sorted(path.glob(f"checkpoint_*/{META_FILE}")) if path.is_dir() else []
    for meta in metas:
        if not checkpoint_complete(meta.parent):
            continue
        step = read_meta(meta.parent)["step"]
        if best is None or step > best[0]:
            best = (step, meta.parent)
    if best is None and required:
        if metas:  # checkpoints, none complete: say why the newest is not
            read_meta(metas[-1].parent)
            raise TrainError(f"{metas[-1].parent}: an incomplete checkpoint (a file missing or empty), and no other")
        raise TrainError(
            f"{path}: no checkpoint here (expected a run's train.output folder or a checkpoint_* directory)"
        )
    return best[1] if best else None


def checkpoint_metrics(output: str | os.PathLike) -> list[dict[str, Any]]:
    """The report saved with each complete checkpoint under a run's output folder: what a driver killed before it
    could log them still left on disk (its workers may have gone on to the next checkpoint)."""
    found = []
    for meta_file in Path(output).glob(f"checkpoint_*/{META_FILE}"):
        if checkpoint_complete(meta_file.parent):
            meta = read_meta(meta_file.parent)
            for metrics in meta.get("reports") or [meta.get("metrics")]:
                if isinstance(metrics, dict) and "step" in metrics:
                    found.append(metrics)
    return found


def load_checkpoint(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a checkpoint (or of a run folder's latest one), in eval mode on CPU, and its meta."""
    ckpt = latest_checkpoint(path)
    meta = read_meta(ckpt)
    try:
        model = models.build(meta["model"]["name"], meta["model"]["config"], saved=True)
    except (KeyError, TypeError) as e:
        raise TrainError(f"{ckpt / META_FILE}: no model name and config ({one_line(e)})") from None
    try:
        model.load_state_dict(torch_load(ckpt / MODEL_FILE, weights_only=True))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise TrainError(f"{ckpt / MODEL_FILE}: does not fit the model its meta.json names ({one_line(e)})") from None
    model.eval()
    meta["path"] = str(ckpt)
    return model, meta
