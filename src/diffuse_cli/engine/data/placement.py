"""Where training reads its batches: the uint8 data copied onto the accelerator when it fits, else
gathered per batch from the CPU tensor (or its memory mapping)."""

from __future__ import annotations

import torch

from . import folders as D

# The uint8 dataset goes onto the accelerator when it takes at most this share of the free
# memory there: the model, optimizer state and activations need the rest.
DEVICE_FRACTION = 0.5


def fits_on_device(nbytes: int, free_bytes: int, fraction: float = DEVICE_FRACTION) -> bool:
    """Whether a uint8 dataset of ``nbytes`` should be copied to a device with ``free_bytes`` free."""
    return nbytes <= fraction * free_bytes


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


class DeviceImages:
    """A dataset's uint8 images as training reads them: ``images[idx]`` -> (B, C, H, W) uint8 on the device.

    Either a copy on the device (``on_device``), or the CPU tensor (in memory or memory-mapped)
    from which each batch's rows are gathered and, on CUDA, sent through a pinned buffer.
    ``where`` says which, for the data line.
    """

    def __init__(self, images: torch.Tensor, device: torch.device, on_device: bool, where: str) -> None:
        self.images = images
        self.device = device
        self.on_device = on_device
        self.where = where
        self._staging: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.images.shape

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.on_device or self.device.type == "cpu":
            return self.images[idx.to(self.images.device)]
        # Streaming: the indices come from the device generator, so reading them is a host sync.
        # That sync also means the previous batch's copy out of the staging buffer has finished,
        # so one pinned buffer can be reused.
        idx_cpu = idx.cpu()
        b = idx_cpu.shape[0]
        if self.device.type != "cuda":
            return self.images[idx_cpu].to(self.device)
        if self._staging is None or self._staging.shape[0] < b:
            self._staging = torch.empty((b, *self.images.shape[1:]), dtype=torch.uint8).pin_memory()
        out = self._staging[:b]
        torch.index_select(self.images, 0, idx_cpu, out=out)
        return out.to(self.device, non_blocking=True)


def _copy_to_device(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy in chunks: a mapped file is read once, and no second full-size host buffer is made."""
    out = torch.empty(images.shape, dtype=images.dtype, device=device)
    row = max(1, images[0].numel())
    step = max(1, (256 << 20) // row)
    for start in range(0, images.shape[0], step):
        out[start : start + step].copy_(images[start : start + step])
    return out


def place_images(ds: D.ImageDataset, device: torch.device, free_bytes: int | None = None) -> DeviceImages:
    """Put ``ds.images`` where training reads them from (see :class:`DeviceImages`).

    CPU: the tensor as it is (a memory-mapped one is read per batch). CUDA: a copy on the
    device when the uint8 data take at most :data:`DEVICE_FRACTION` of its free memory,
    else read per batch from the host. Other accelerators (MPS): a copy on the device.
    ``free_bytes`` overrides the measured free memory (tests).
    """
    device = torch.device(device)
    images = ds.images
    nbytes = images.numel()
    host = "the memory-mapped cache" if ds.cache is not None else "memory"
    if device.type == "cpu":
        return DeviceImages(images, device, False, f"{_gb(nbytes)} of uint8 images, batches read from {host}")
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0] if free_bytes is None else free_bytes
        if not fits_on_device(nbytes, free):
            return DeviceImages(images, device, False, f"{_gb(nbytes)} of uint8 images, more than {DEVICE_FRACTION:.0%} "
                                f"of the {_gb(free)} free on {device}: batches read from {host}")  # fmt: skip
        return DeviceImages(_copy_to_device(images, device), device, True,
                            f"{_gb(nbytes)} of uint8 images, copied to {device} ({_gb(free)} were free)")  # fmt: skip
    return DeviceImages(images.to(device), device, True, f"{_gb(nbytes)} of uint8 images, copied to {device}")
