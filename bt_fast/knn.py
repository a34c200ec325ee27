"""Weighted k-NN classifier on frozen features: the evaluation tool and the training-time monitor.

The protocol of InstDisc / DINO: features are L2-normalised, each query takes its k most
cosine-similar training samples, every neighbour votes for its class with weight
exp(similarity / temperature), and classes are ranked by their summed votes.

    train_x, train_y = extract_features(backbone, train_loader, device)
    test_x, test_y = extract_features(backbone, val_loader, device)
    ranked = knn_predict(train_x, train_y, test_x, num_classes)        # (N_test, C) classes, best first
    top1, top5 = topk_accuracy(ranked, test_y, (1, 5))

`knn_evaluate` does all of that for a backbone and two loaders; `eval_loader` builds the
loaders (resize to size*256/224, centre crop, ImageNet normalisation, no augmentation).
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bt_fast.config import IMAGENET_MEAN, IMAGENET_STD
from bt_fast.errors import DataError, some_of
from bt_fast.run_control import leave_stops_to_the_rank
from pipelines.image_folder import SampleList, check_known_classes, classes_without_images, find_image_folder
from pipelines.reference import ForkingLoader, load_rgb

DEFAULT_K = 200
DEFAULT_TEMPERATURE = 0.07
_SIMILARITY_BUDGET = 2**26  # elements of one (queries x train) similarity block: 256 MB in float32


# -- the classifier -------------------------------------------------------------------------------
def knn_scores(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
               num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
               chunk_size: int | None = None) -> torch.Tensor:
    """(N_test, num_classes) summed neighbour weights exp((cos - nearest) / temperature) per class, `nearest`
    the query's largest cosine: the votes exp(cos / temperature), each query's divided by one factor, which
    keeps their ranking and keeps them finite (exp(cos / 0.01) overflows float32).

    k is capped at the number of training samples. Features need not be normalised; they are
    L2-normalised here. Queries are processed in chunks so memory stays bounded for large sets.
    """
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D; got train {tuple(train_features.shape)} "
                         f"and test {tuple(test_features.shape)}")
    if train_labels.shape != (train_features.shape[0],):
        raise ValueError(f"train_labels must have shape ({train_features.shape[0]},), got {tuple(train_labels.shape)}")
    if train_features.shape[0] == 0:
        raise ValueError("k-NN needs at least one training sample")
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    device = test_features.device
    train = F.normalize(train_features.float(), dim=1).to(device)
    labels = train_labels.to(device=device, dtype=torch.long)
    k = min(k, train.shape[0])
    if chunk_size is None:
        chunk_size = max(1, _SIMILARITY_BUDGET // train.shape[0])
    scores = torch.empty(test_features.shape[0], num_classes, device=device, dtype=torch.float32)
    for start in range(0, test_features.shape[0], chunk_size):
        query = F.normalize(test_features[start:start + chunk_size].float(), dim=1)
        similarity = query @ train.T                                   # (q, N_train) cosine similarities
        top_sim, top_idx = similarity.topk(k, dim=1)                   # (q, k)
        weights = ((top_sim - top_sim[:, :1]) / temperature).exp()  # topk sorts: column 0 is the nearest
        block = torch.zeros(query.shape[0], num_classes, device=device, dtype=torch.float32)
        block.scatter_add_(1, labels[top_idx], weights)
        scores[start:start + query.shape[0]] = block
    return scores


def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE) -> torch.Tensor:
    """(N_test, num_classes) class indices ranked by k-NN score, best first (column 0 is the prediction)."""
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    return scores.sort(dim=1, descending=True, stable=True).indices


def topk_accuracy(ranked: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> list[float]:
    """Percentages of rows whose label is among the first k ranked classes; k is capped by the class count."""
    labels = labels.to(ranked.device).view(-1, 1)
    if ranked.shape[0] == 0:
        raise ValueError("accuracy of an empty evaluation set is undefined")
    return [100.0 * (ranked[:, :min(k, ranked.shape[1])] == labels).any(dim=1).float().mean().item() for k in ks]


# -- features -------------------------------------------------------------------------------------
@torch.no_grad()
def extract_features_multi(backbones: Sequence[nn.Module], loader: Iterable, device: torch.device | str,
                           amp_dtype: torch.dtype | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Features of several frozen backbones in one pass over `loader` (images decoded once).

    Each backbone runs in eval mode (BatchNorm uses its running statistics) and is put back into
    the mode it was in. Returns float32 features on `device`, one (N, D) tensor per backbone, and
    the (N,) labels.
    """
    device = torch.device(device)
    modes = [b.training for b in backbones]
    channels_last = [_is_channels_last(b) for b in backbones]
    features: list[list[torch.Tensor]] = [[] for _ in backbones]
    labels: list[torch.Tensor] = []
    try:
        for b in backbones:
            b.eval()
        for images, targets in loader:
            images = images.to(device, non_blocking=True)
            for out, backbone, cl in zip(features, backbones, channels_last):
                x = images.contiguous(memory_format=torch.channels_last) if cl else images
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    out.append(backbone(x).float().flatten(1))
            labels.append(targets.to(device, non_blocking=True))
    finally:
        for b, mode in zip(backbones, modes):
            b.train(mode)
    if not labels:
        raise ValueError("the loader yielded no batches; nothing to extract features from")
    return [torch.cat(f) for f in features], torch.cat(labels).long()


def extract_features(backbone: nn.Module, loader: Iterable, device: torch.device | str,
                     amp_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, D) float32 features of the frozen `backbone` (eval mode) and (N,) labels for `loader`."""
    (features,), labels = extract_features_multi([backbone], loader, device, amp_dtype)
    return features, labels


def _is_channels_last(module: nn.Module) -> bool:
    for p in module.parameters():
        if p.ndim == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def knn_evaluate(backbone: nn.Module, train_loader: Iterable, val_loader: Iterable, device: torch.device | str,
                 num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                 amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """k-NN top-1/top-5 (percent) of `backbone` on `val_loader` with `train_loader` as the memory bank."""
    train_x, train_y = extract_features(backbone, train_loader, device, amp_dtype)
    val_x, val_y = extract_features(backbone, val_loader, device, amp_dtype)
    top1, top5 = topk_accuracy(knn_predict(train_x, train_y, val_x, num_classes, k, temperature), val_y)
    return {"top1": top1, "top5": top5}


# -- data -----------------------------------------------------------------------------------------
def resize_size(image_size: int) -> int:
    """The short side before the centre crop: 256 for 224 px, the same ratio for other sizes."""
    return int(round(image_size * 256 / 224))


def eval_transform(image_size: int) -> T.Compose:
    return T.Compose([T.Resize(resize_size(image_size)), T.CenterCrop(image_size), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def train_transform(image_size: int) -> T.Compose:
    """The linear-probe training augmentation of the paper: RandomResizedCrop + horizontal flip."""
    return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


class LabelledImageFolder(Dataset):
    """ImageFolder of (image tensor, label). `classes` fixes the label of each class name, so a
    validation folder is labelled like its training folder; a class not in `classes` is an error. Without
    `classes` (a training folder), so is a class folder without images, as in torchvision's ImageFolder: a
    classifier would have an output no image trains, and top-5 of five classes is always 100%."""

    def __init__(self, root: str, transform, classes: Sequence[str] | None = None):
        own, samples = find_image_folder(root)
        if classes is None:
            empty = classes_without_images(own, samples)
            if empty:
                raise DataError(f"{root} has class folders without images: {some_of(empty)}; add images to them or "
                                f"remove them")
        self.classes = list(classes) if classes is not None else own
        check_known_classes(root, own, self.classes)
        index = {name: i for i, name in enumerate(self.classes)}
        self.samples = SampleList((path, index[own[label]]) for path, label in samples)  # read by every worker
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[i]
        return self.transform(load_rgb(path)), label


def eval_loader(root: str, image_size: int, batch_size: int = 256, workers: int = 2,
                classes: Sequence[str] | None = None, train: bool = False,
                device: torch.device | str = "cpu", seed: int = 0) -> DataLoader:
    """DataLoader over an ImageFolder; `train=True` gives the shuffled, augmented linear-probe loader."""
    dataset = LabelledImageFolder(root, train_transform(image_size) if train else eval_transform(image_size), classes)
    generator = torch.Generator().manual_seed(seed) if train else None
    return ForkingLoader(dataset, batch_size=batch_size, shuffle=train, generator=generator, num_workers=workers,
                         pin_memory=torch.device(device).type == "cuda", persistent_workers=train and workers > 0,
                         worker_init_fn=leave_stops_to_the_rank)


class _CutShort(Exception):
    pass


def _until(loader: Iterable, stop: Callable[[], bool]) -> Iterator:
    """`loader`'s batches, raising _CutShort before the next one once `stop()` is true."""
    for batch in loader:
        if stop():
            raise _CutShort
        yield batch


class KnnMonitor:
    """k-NN accuracy of the training backbone, for the metrics log: memory bank `train_dir`, queries `val_dir`.

    The loaders (and their decoded file lists) are built once; each call extracts features afresh.
    Meant for small labelled folders (the demo, an ImageNet subset): it runs on one process.
    """

    def __init__(self, train_dir: str, val_dir: str, image_size: int, device: torch.device,
                 workers: int = 2, batch_size: int = 256, amp_dtype: torch.dtype | None = None):
        self.train_loader = eval_loader(train_dir, image_size, batch_size, workers, device=device)
        classes = self.train_loader.dataset.classes
        self.val_loader = eval_loader(val_dir, image_size, batch_size, workers, classes=classes, device=device)
        self.num_classes = len(classes)
        self.device, self.amp_dtype = device, amp_dtype

    def __call__(self, backbone: nn.Module, stop: Callable[[], bool] = lambda: False) -> dict[str, float] | None:
        """top1 / top5 of `backbone`; None if `stop()` (a stop request, checked between batches) cut it short."""
        try:
            return knn_evaluate(backbone, _until(self.train_loader, stop), _until(self.val_loader, stop), self.device,
                                self.num_classes, amp_dtype=self.amp_dtype)
        except _CutShort:
            return None
