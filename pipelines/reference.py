"""The paper's augmentation with PIL/torchvision on CPU workers: the correctness and speed baseline.

Each view is RandomResizedCrop (bicubic) -> flip -> ColorJitter (p 0.8) -> grayscale ->
Gaussian blur -> solarize -> normalise, as in the official `main.py`, including its blur:
PIL's `ImageFilter.GaussianBlur` with the standard deviation sigma ~ U(blur_sigma) (an
untruncated Gaussian, approximated by box filters). The device pipelines truncate the same
Gaussian to `spec.blur_kernel_size` taps (torchvision's GaussianBlur); docs/pipelines.md gives
the measured difference and why torchvision's blur on PIL images is not the baseline. Images are
decoded as the converter decodes them (`load_rgb`), where the official code's ImageFolder takes Pillow's
plain convert('RGB'): the two differ for EXIF-rotated files and 16-bit grayscale, which the official
loader leaves unrotated and clips to white.

Each rank reads its samples of the epoch as `pipelines.epochs` deals them; a sample's
distortions depend only on (seed, epoch, index), and so does its crop size (the spec's
resolution schedule, `AugmentSpec.at_epoch`), which each worker derives from the epoch itself.
"""
from __future__ import annotations

import torch
import torchvision.transforms as T
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, Dataset, Sampler

from bt_fast.config import AugmentSpec, Config
from bt_fast.errors import DataError
from bt_fast.host import usable_cores
from bt_fast.run_control import leave_stops_to_the_rank
from bt_fast.worker_pool import garbage_kept_from_forks
from pipelines.base import EpochPipeline, Placement, to_device
from pipelines.epochs import rank_indices, sample_rng, samples_per_rank
from pipelines.image_folder import find_image_folder
from pipelines.images import SkipImage, decode_source_image
from pipelines.prefetch import run_ahead


class ForkingLoader(DataLoader):
    """A DataLoader whose worker processes, forked when an iteration starts them, never collect the garbage
    they inherit (`bt_fast.worker_pool.garbage_kept_from_forks`)."""

    def __iter__(self):
        with garbage_kept_from_forks():
            return super().__iter__()


class PILGaussianBlur:
    """The official code's blur: PIL's Gaussian filter, sigma drawn from torch's generator as torchvision does."""

    def __init__(self, sigma: tuple[float, float]):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        sigma = torch.empty(1).uniform_(self.sigma[0], self.sigma[1]).item()
        return image.filter(ImageFilter.GaussianBlur(sigma))


def view_transform(spec: AugmentSpec, view: int) -> T.Compose:
    """The PIL transform for view 0 or 1 of the pair."""
    return T.Compose([
        T.RandomResizedCrop(spec.image_size, scale=spec.crop_scale, ratio=spec.crop_ratio,
                            interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(spec.flip_p),
        T.RandomApply([T.ColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue)], p=spec.jitter_p),
        T.RandomGrayscale(spec.grayscale_p),
        T.RandomApply([PILGaussianBlur(spec.blur_sigma)], p=spec.blur_p[view]),
        T.RandomSolarize(threshold=round(spec.solarize_threshold * 255), p=spec.solarize_p[view]),
        T.ToTensor(),
        T.Normalize(spec.mean, spec.std),
    ])


def load_rgb(path: str) -> Image.Image:
    """The image at `path` as 8-bit RGB, decoded as the converter decodes FFCV's and DALI's inputs
    (`pipelines.images.decode_source_image`: EXIF rotation applied, 16-bit and other pixel modes mapped by its
    rules), so every pipeline and evaluation reads the same pixels from a file; DataError naming the file and
    why (no Python object reprs) if it is no usable image."""
    try:
        image, _ = decode_source_image(path)
    except SkipImage as skip:
        raise DataError(f"cannot read image {path}: {skip.args[0]}; remove or replace the file (tools.convert's "
                        f"report lists every unreadable image of a folder)") from None
    return image


class TwoViewImageFolder(Dataset):
    """Indexed by (epoch, index): the distortions of a sample depend only on (seed, epoch, index),
    so they do not change with the number of workers or when a run resumes mid-epoch.

    `epochs` is the run's length, which places each epoch on the spec's resolution schedule.
    """

    def __init__(self, root: str, spec: AugmentSpec, seed: int = 0, epochs: int = 1):
        self.classes, self.samples = find_image_folder(root)  # a SampleList: workers read it without copying it
        self.spec, self.seed, self.epochs = spec, seed, epochs
        self._views: dict[int, tuple[T.Compose, T.Compose]] = {}  # crop size -> the two views' transforms

    def __len__(self) -> int:
        return len(self.samples)

    def views(self, epoch: int) -> tuple[T.Compose, T.Compose]:
        spec = self.spec.at_epoch(epoch, self.epochs)
        if spec.image_size not in self._views:
            self._views[spec.image_size] = (view_transform(spec, 0), view_transform(spec, 1))
        return self._views[spec.image_size]

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, index = key
        image = load_rgb(self.samples[index][0])
        view1, view2 = self.views(epoch)
        with sample_rng(self.seed, epoch, index):
            return view1(image), view2(image)


class EpochIndexSampler(Sampler):
    """This rank's samples of the epoch (`pipelines.epochs.rank_indices`) as (epoch, index) keys,
    so each sample knows its epoch in any worker."""

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int):
        self.num_samples, self.rank, self.world_size, self.seed = num_samples, rank, world_size, seed
        self.epoch = 0
        self.start = 0  # position in the epoch's order where iteration begins

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_samples // self.world_size - self.start

    def __iter__(self):
        indices = rank_indices(self.num_samples, self.seed, self.epoch, self.rank, self.world_size)[self.start:]
        return ((self.epoch, int(index)) for index in indices)


# Batches each loader worker keeps ready (torch's default, as in the official code). Each one waits in shared
# memory (/dev/shm) until the step takes it: two float32 views, 2 * B * 3 * S^2 * 4 bytes.
BATCHES_PER_WORKER = 2


def loader_workers(workers: int) -> int:
    """The DataLoader worker processes for config `workers`: at most the usable cores, as FFCV's threads are (more
    only compete for them, and torch warns in four lines that the loader may freeze)."""
    return min(workers, usable_cores())


class ReferencePipeline(EpochPipeline):
    """ImageFolder -> two PIL-augmented views -> device, through a torch DataLoader."""

    def __init__(self, config: Config, placement: Placement, batch_size: int):
        super().__init__(config, placement, batch_size)
        root, workers, seed = config.data, loader_workers(config.workers), config.seed
        self.dataset = TwoViewImageFolder(root, config.augment, seed, config.epochs)
        self.prefetch = config.prefetch
        self.num_samples = len(self.dataset)
        samples_per_rank(len(self.dataset), batch_size, placement.world_size, f"data directory {root}")
        self.sampler = EpochIndexSampler(len(self.dataset), placement.rank, placement.world_size, seed)
        self.loader = ForkingLoader(self.dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
                                    pin_memory=placement.device.type == "cuda", drop_last=True,
                                    persistent_workers=workers > 0,
                                    prefetch_factor=BATCHES_PER_WORKER if workers > 0 else None,
                                    worker_init_fn=leave_stops_to_the_rank)

    def __len__(self) -> int:
        return self.sampler.num_samples // self.placement.world_size // self.batch_size

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        # Each sample's views depend on (seed, epoch, index) only: starting later in the order skips the
        # earlier batches without reading them.
        super().set_epoch(epoch, start_batch)
        self.sampler.set_epoch(epoch, start_batch * self.batch_size)

    def views(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        view1, view2 = batch
        return to_device(view1, self.placement), to_device(view2, self.placement)

    def __iter__(self):
        return run_ahead(self.loader, self.views, self.prefetch, self.placement.device)
