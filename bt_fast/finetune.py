"""Semi-supervised fine-tuning: the whole backbone and a new linear head trained on a labelled subset.

The protocol of the official Barlow Twins `evaluate.py --weights finetune`:
- the head is initialised as the linear probe's (`bt_fast.linear_probe.new_linear`);
- cross-entropy, SGD with momentum 0.9 over two parameter groups, the backbone at `lr_backbone`
  and the head at `lr_classifier`, one weight decay for both;
- both rates annealed by a cosine over the epochs, stepped once per epoch;
- training images RandomResizedCrop + horizontal flip with BatchNorm in training mode;
  validation images resized and centre-cropped, BatchNorm on its running statistics;
- the labelled subset: the images a list names (the official runs use SimCLR's 1% and 10%
  ImageNet lists), or `train_percent` of every class drawn reproducibly from the seed.
Accuracy is that of the last epoch; nothing is selected on the validation set.

Several backbones train side by side on the same batches (a pretrained one and its random-init
baseline), so each image is decoded and augmented once. A batch's images depend only on
(seed, epoch), so a run resumed from its checkpoint (`<out_dir>/finetune.pth`, written atomically
after every epoch) ends with the same weights as one that was never interrupted.

    results, facts = finetune([loaded.backbone], BACKBONE_DIM[loaded.arch], "data/demo/train", "data/demo/val",
                              FinetuneSettings(image_size=48))
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bt_fast.checkpoint import CheckpointError, atomic_save, load_checkpoint, restore_model
from bt_fast.config import MIN_BATCH_PER_RANK
from bt_fast.errors import DataError
from bt_fast.files import remove_stale_temporaries
from bt_fast.knn import LabelledImageFolder, eval_loader, extract_features_multi, train_transform
from bt_fast.linear_probe import cross_entropy_step, linear_topk, new_linear
from bt_fast.progress import progress
from bt_fast.run_lock import RunLock
from bt_fast.schedule import epoch_cosine
from bt_fast.weights import weights_digest
from pipelines.epochs import sample_rng
from pipelines.image_folder import SampleList
from pipelines.reference import EpochIndexSampler, ForkingLoader, load_rgb

CHECKPOINT_NAME = "finetune.pth"
TRAIN_PERCENTS = (1, 10, 100)
SUBSET_STREAM = 1  # the per-class draw's random numbers, apart from any other use of the seed


@dataclass
class FinetuneSettings:
    image_size: int = 224
    batch_size: int = 256
    workers: int = 2
    device: torch.device = torch.device("cpu")
    epochs: int = 20
    lr_backbone: float = 0.005
    lr_classifier: float = 0.5
    weight_decay: float = 0.0
    train_percent: int = 1                 # of every class, when no train_list is given
    train_list: str | Path | None = None   # a file naming the training images, one per line
    seed: int = 0                          # subset draw, head init, order and augmentation
    out_dir: str | Path | None = None      # where finetune.pth is kept and resumed from; None: no checkpoints
    show_progress: bool = False

    def __post_init__(self) -> None:
        if self.train_list is None and self.train_percent not in TRAIN_PERCENTS:
            raise ValueError(f"train_percent must be one of {TRAIN_PERCENTS}, got {self.train_percent}")


# -- the labelled subset --------------------------------------------------------------------------
def per_class_subset(labels: Sequence[int], percent: float, seed: int) -> list[int]:
    """Indices of `percent`% of each class's samples (rounded half up, at least one), ascending.

    Drawn without replacement from a generator seeded by `seed` alone, so the same seed gives the
    same subset on any machine.
    """
    rng = np.random.default_rng([seed & 0xFFFFFFFF, SUBSET_STREAM])
    members: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        members.setdefault(int(label), []).append(index)
    chosen: list[int] = []
    for label in sorted(members):
        indices = members[label]
        count = max(1, math.floor(len(indices) * percent / 100 + 0.5))
        chosen += [indices[i] for i in rng.choice(len(indices), size=count, replace=False)]
    return sorted(chosen)


def _list_lines(path: Path) -> list[str]:
    """The lines of the train list `path`; a DataError naming it and what to do if it is not a readable file
    of UTF-8 text."""
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "is not a regular file" if path.exists() else "does not exist"
        raise DataError(f"train list {path} {what}; pass a text file naming one training image per line")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        raise DataError(f"cannot read train list {path} ({err.strerror or err}); make it readable") from None
    except UnicodeDecodeError as err:
        raise DataError(f"train list {path} is not UTF-8 text (byte {err.start}); pass a text file naming one "
                        f"training image per line") from None


def read_train_list(path: str | Path, train_dir: str | Path, samples: Sequence[tuple[str, int]]) -> list[int]:
    """Indices into `samples` (the images of `train_dir`) of the images `path` names, in its order.

    One image per line: its path inside `train_dir` (`<class>/<file>`), or its file name alone
    when that is unique in the folder, as in SimCLR's ImageNet lists. Blank lines and lines
    starting with '#' are skipped. A name that matches no image, or several, or an image named
    again, is a DataError naming the file and line; so is a list that cannot be read or is not UTF-8
    text (`_list_lines`).
    """
    path, train_dir = Path(path), Path(train_dir)
    by_path: dict[str, int] = {}
    by_name: dict[str, list[int]] = {}
    for index, (image, _) in enumerate(samples):
        relative = Path(image).relative_to(train_dir)
        by_path[relative.as_posix()] = index
        by_name.setdefault(relative.name, []).append(index)
    chosen: dict[int, int] = {}  # image index -> the line that named it, in the list's order
    for number, line in enumerate(_list_lines(path), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        matches = [by_path[name]] if name in by_path else by_name.get(name, [])
        if len(matches) != 1:
            problem = (f"matches {len(matches)} images in {train_dir}; name it as <class>/<file>" if matches else
                       f"is not an image in {train_dir}; name images as <class>/<file> or by a unique file name")
            raise DataError(f"train list {path} line {number}: '{name}' {problem}")
        if matches[0] in chosen:
            raise DataError(f"train list {path} line {number}: '{name}' names the image of line {chosen[matches[0]]} "
                            f"again; list each image once")
        chosen[matches[0]] = number
    if not chosen:
        raise DataError(f"train list {path} names no images; list one training image per line")
    return list(chosen)


def check_subset_size(images: int, train_dir: Path, settings: FinetuneSettings) -> None:
    """A DataError naming where the subset came from unless it holds MIN_BATCH_PER_RANK images: BatchNorm in
    training mode needs two per batch, and the loader drops a last batch of one."""
    if images >= MIN_BATCH_PER_RANK:
        return
    if settings.train_list is not None:
        source, remedy = f"train list {settings.train_list} names", "list more"
    else:
        source = f"--train-percent {settings.train_percent} of {train_dir} draws"
        remedy = "use a larger --train-percent or a folder with more images"
    raise DataError(f"{source} {images} image; fine-tuning needs at least {MIN_BATCH_PER_RANK} (BatchNorm trains on "
                    f"the statistics of a batch): {remedy}")


# -- data -----------------------------------------------------------------------------------------
class AugmentedSubset(Dataset):
    """(augmented image, label) of the chosen samples, keyed (epoch, position in the subset); an
    image's crop and flip depend only on (seed, epoch, position), in any worker."""

    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int, seed: int):
        self.samples, self.transform, self.seed = SampleList(samples), train_transform(image_size), seed

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, position = key
        path, label = self.samples[position]
        image = load_rgb(path)
        with sample_rng(self.seed, epoch, position):
            return self.transform(image), label


# -- training -------------------------------------------------------------------------------------
def classifier(backbone: nn.Module, feature_dim: int, num_classes: int, seed: int) -> nn.Sequential:
    """`backbone` (features out) followed by a freshly initialised linear head."""
    return nn.Sequential(backbone, new_linear(feature_dim, num_classes, seed))


def sgd(model: nn.Sequential, settings: FinetuneSettings) -> torch.optim.SGD:
    """Group 0: the head at lr_classifier; group 1: the backbone at lr_backbone (the official order)."""
    backbone, head = model
    return torch.optim.SGD([{"params": head.parameters(), "lr": settings.lr_classifier},
                            {"params": backbone.parameters(), "lr": settings.lr_backbone}],
                           lr=settings.lr_classifier, momentum=0.9, weight_decay=settings.weight_decay)


def run_record(settings: FinetuneSettings, subset: Sequence[str], backbones: Sequence[str],
               classes: Sequence[str]) -> dict[str, Any]:
    """What decides a run's result; a checkpoint written with other values cannot be resumed.

    `backbones`: the `weights_digest` of each backbone before fine-tuning, so a checkpoint is never
    resumed for other weights (another file, or random init instead of a checkpoint). `classes`: the
    training folder's, whose order gives the labels."""
    return {"image_size": settings.image_size, "batch_size": settings.batch_size, "epochs": settings.epochs,
            "lr_backbone": settings.lr_backbone, "lr_classifier": settings.lr_classifier,
            "weight_decay": settings.weight_decay, "seed": settings.seed, "models": len(backbones),
            "subset": list(subset), "backbones": list(backbones), "classes": list(classes)}


def _change(key: str, saved: Any, value: Any) -> str:
    """One difference between a checkpoint's run record and this run's, for the refusal."""
    if key in ("subset", "classes"):
        return f"the training {'subset' if key == 'subset' else 'classes'}"
    if key == "backbones":  # a checkpoint from before digests were recorded has none
        then, now = (", ".join(d[:12] for d in digests) if digests else "unrecorded" for digests in (saved, value))
        return f"the backbone weights (sha256 {then} -> {now})"
    return f"{key} {saved!r} -> {value!r}"


def resume(path: Path, record: dict[str, Any], models: Sequence[nn.Module],
           optimizers: Sequence[torch.optim.Optimizer], device: torch.device) -> tuple[int, list]:
    """(epochs done, per-epoch losses) from `path`, its weights and optimizer states loaded; (0, []) without one."""
    if not path.is_file():
        return 0, []
    state = load_checkpoint(path, device)
    if not isinstance(state, dict) or not all(key in state for key in ("epoch", "run", "losses", "models",
                                                                        "optimizers")):
        raise CheckpointError(f"{path} is not a fine-tuning checkpoint (it holds no epoch, run, losses, models and "
                              f"optimizers); move it out of {path.parent} or use another --out-dir")
    saved = state["run"]
    changed = [_change(key, saved.get(key), value) for key, value in record.items() if saved.get(key) != value]
    if changed:
        raise CheckpointError(f"checkpoint {path} was written by a different fine-tuning run ({'; '.join(changed)}); "
                              f"use a new --out-dir or the same settings and backbone")
    for model, optimizer, model_state, optimizer_state in zip(models, optimizers, state["models"],
                                                               state["optimizers"]):
        restore_model(model, model_state, path)
        optimizer.load_state_dict(optimizer_state)
    return state["epoch"], state["losses"]


def finetune(backbones: Sequence[nn.Module], feature_dim: int, train_dir: str | Path, val_dir: str | Path,
             settings: FinetuneSettings, on_epoch: Callable[[int, list[float]], None] | None = None
             ) -> tuple[list[tuple[float, float]], dict[str, Any]]:
    """Fine-tune each backbone with its own head; top-1/top-5 (percent) of each on `val_dir`.

    `backbones` output (N, feature_dim) features (fc replaced by Identity) and are trained in place. With
    `settings.out_dir`, a checkpoint there is resumed and one is written after every epoch, before
    `on_epoch(epoch, mean loss per model)` is called. Returns the accuracies, one pair per backbone,
    and facts about the run: train_images, val_images, classes, epoch_losses, resumed_epochs, seconds. One
    run at a time uses an out_dir (`bt_fast.run_lock`): two would resume from and write the same checkpoint.
    """
    if settings.out_dir is None:
        return _finetune(backbones, feature_dim, train_dir, val_dir, settings, on_epoch)
    with RunLock(settings.out_dir):
        return _finetune(backbones, feature_dim, train_dir, val_dir, settings, on_epoch)


def _finetune(backbones: Sequence[nn.Module], feature_dim: int, train_dir: str | Path, val_dir: str | Path,
              settings: FinetuneSettings, on_epoch: Callable[[int, list[float]], None] | None
              ) -> tuple[list[tuple[float, float]], dict[str, Any]]:
    start = time.perf_counter()
    device = settings.device
    train_dir = Path(train_dir)
    folder = LabelledImageFolder(str(train_dir), transform=None)
    if settings.train_list is not None:
        chosen = read_train_list(settings.train_list, train_dir, folder.samples)
    else:
        chosen = per_class_subset([label for _, label in folder.samples], settings.train_percent, settings.seed)
    subset = [folder.samples[i] for i in chosen]
    check_subset_size(len(subset), train_dir, settings)
    classes = folder.classes
    val_loader = eval_loader(str(val_dir), settings.image_size, settings.batch_size, settings.workers,
                             classes=classes, device=device)  # its classes checked before any epoch trains

    dataset = AugmentedSubset(subset, settings.image_size, settings.seed)
    sampler = EpochIndexSampler(len(dataset), rank=0, world_size=1, seed=settings.seed)
    loader = ForkingLoader(dataset, batch_size=settings.batch_size, sampler=sampler, num_workers=settings.workers,
                           pin_memory=device.type == "cuda", persistent_workers=settings.workers > 0,
                           drop_last=len(dataset) % settings.batch_size == 1)  # BatchNorm needs two images per batch

    digests = [weights_digest(b) for b in backbones]  # before training changes them in place
    models = [classifier(b, feature_dim, len(classes), settings.seed).to(device, memory_format=torch.channels_last)
              for b in backbones]
    optimizers = [sgd(model, settings) for model in models]
    base_lrs = [settings.lr_classifier, settings.lr_backbone]

    checkpoint = Path(settings.out_dir) / CHECKPOINT_NAME if settings.out_dir is not None else None
    record = run_record(settings, [Path(path).relative_to(train_dir).as_posix() for path, _ in subset], digests,
                        classes)
    done, losses = 0, []
    if checkpoint is not None:
        remove_stale_temporaries(checkpoint.parent, (CHECKPOINT_NAME,))
        done, losses = resume(checkpoint, record, models, optimizers, device)

    with progress(total=settings.epochs, initial=done, desc="fine-tuning", unit="epoch",
                  enabled=settings.show_progress) as bar:
        for epoch in range(done, settings.epochs):
            for optimizer in optimizers:
                for group, base in zip(optimizer.param_groups, base_lrs):
                    group["lr"] = epoch_cosine(base, epoch, settings.epochs)
            losses.append(train_epoch(models, optimizers, loader, sampler, epoch, device))
            if checkpoint is not None:
                atomic_save({"epoch": epoch + 1, "run": record, "losses": losses,
                             "models": [m.state_dict() for m in models],
                             "optimizers": [o.state_dict() for o in optimizers]}, checkpoint)
            bar.update(1)
            bar.set_postfix(loss=" ".join(f"{loss:.3f}" for loss in losses[-1]))
            if on_epoch:
                on_epoch(epoch, losses[-1])

    features, val_labels = extract_features_multi([model[0] for model in models], val_loader, device)
    remedy = (f"lower --lr-backbone ({settings.lr_backbone:g}) or --lr-classifier ({settings.lr_classifier:g})"
              + (f" and start afresh (delete {checkpoint}, which holds the diverged weights)" if checkpoint else ""))
    results = [linear_topk(model[1], x, val_labels, remedy) for model, x in zip(models, features)]
    facts = {"train_images": len(subset), "val_images": len(val_loader.dataset), "classes": len(classes),
             "epoch_losses": losses, "resumed_epochs": done, "seconds": time.perf_counter() - start}
    return results, facts


def train_epoch(models: Sequence[nn.Module], optimizers: Sequence[torch.optim.Optimizer], loader: DataLoader,
                sampler: EpochIndexSampler, epoch: int, device: torch.device) -> list[float]:
    """One epoch of every model on the same batches; the mean cross-entropy of each."""
    sampler.set_epoch(epoch)
    for model in models:
        model.train()
    totals, count = [0.0] * len(models), 0  # each sum becomes a device tensor, read once after the epoch
    for images, labels in loader:
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        for i, (model, optimizer) in enumerate(zip(models, optimizers)):
            totals[i] = totals[i] + cross_entropy_step(model, optimizer, images, labels)
        count += labels.shape[0]
    return [float(total) / count for total in totals]
