import pytest
import torch

from bt_fast.config import AugmentSpec
from pipelines import DataError, Placement
from pipelines.reference import ReferencePipeline, TwoViewImageFolder

SPEC = AugmentSpec(image_size=32)


def test_batches_are_two_normalised_channels_last_views(image_folder):
    pipeline = ReferencePipeline(str(image_folder), SPEC, batch_size=4, placement=Placement(torch.device("cpu")),
                                 workers=0)
    assert len(pipeline) == 24 // 4
    pipeline.set_epoch(0)
    batches = list(pipeline)
    assert len(batches) == len(pipeline)
    view1, view2 = batches[0]
    assert view1.shape == view2.shape == (4, 3, 32, 32)
    assert view1.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(view1, view2)
    # normalised with ImageNet statistics: values span roughly [-2.1, 2.6]
    assert view1.min() >= -2.2 and view1.max() <= 2.7 and view1.min() < 0 < view1.max()


def test_distortions_depend_only_on_seed_epoch_and_index(image_folder):
    dataset = TwoViewImageFolder(str(image_folder), SPEC, seed=5)
    a, b = dataset[(1, 3)], dataset[(1, 3)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(dataset[(2, 3)][0], a[0])


def test_ranks_split_each_epoch_disjointly(image_folder):
    seen = []
    for rank in range(2):
        pipeline = ReferencePipeline(str(image_folder), SPEC, batch_size=4,
                                     placement=Placement(torch.device("cpu"), rank=rank, world_size=2), workers=0)
        pipeline.set_epoch(3)
        seen.append({index for _, index in pipeline.sampler})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 24


def test_unreadable_image_names_the_file(image_folder, tmp_path):
    broken = tmp_path / "folder" / "class0"
    broken.mkdir(parents=True)
    (broken / "bad.jpg").write_bytes(b"not a jpeg")
    dataset = TwoViewImageFolder(str(tmp_path / "folder"), SPEC)
    with pytest.raises(DataError, match="bad.jpg"):
        dataset[(0, 0)]


def test_empty_data_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="holds no images"):
        TwoViewImageFolder(str(tmp_path), SPEC)
