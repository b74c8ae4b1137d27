"""Which device each tensor of a model lives on, for a worker that spans several GPUs.

Contiguous equal runs of layers, so the hidden state crosses a device only between runs; the
sources, the eval model and the memory plan share the split (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from evomerge.merge.architecture import classify


def layer_runs(num_layers: int, devices: int) -> list[range]:
    """`devices` contiguous runs of layers, sizes differing by at most one (the first longer)."""
    if devices < 1:
        raise ValueError("need at least one device")
    size, extra = divmod(num_layers, devices)
    runs, start = [], 0
    for d in range(devices):
        n = size + (1 if d < extra else 0)
        runs.append(range(start, start + n))
        start += n
    return runs


def tied_head(info, names) -> bool:
    """Whether the model's head is its embedding: the config ties them (transformers' default
    where config.json does not say) and the checkpoint holds no head of its own."""
    return bool(info.tie_word_embeddings) and "lm_head.weight" not in set(names)


@dataclass(frozen=True)
class Placement:
    """Tensor name -> device, from the model's layer count and the devices it is split over."""

    devices: tuple[str, ...]
    num_layers: int
    tied: bool = False

    def __post_init__(self) -> None:
        if not self.devices:
            raise ValueError("a placement needs at least one device")

    def layer_device(self, layer: int) -> str:
        for device, run in zip(self.devices, layer_runs(self.num_layers, len(self.devices))):
            if layer in run:
                return device
        return self.devices[-1]

    def device_of(self, name: str) -> str:
        if len(self.devices) == 1:
            return self.devices[0]
        slot = classify(name)
        if slot.group == "layer":
            assert slot.layer is not None
            return self.layer_device(slot.layer)
        if slot.group == "embed" or (self.tied and slot.group == "head"):
            return self.devices[0]
        return self.devices[-1]

    def device_map(self, model) -> dict[str, str]:
        """An accelerate device map for `model`: each module that holds parameters or buffers
        of its own, on its first parameter's device (a module with buffers only, e.g. a rotary
        embedding's frequencies, on the first device, where the forward pass starts)."""
        out = {}
        for name, module in model.named_modules():
            params = [n for n, _ in module.named_parameters(recurse=False)]
            if params:
                out[name] = self.device_of(f"{name}.{params[0]}" if name else params[0])
            elif next(module.named_buffers(recurse=False), None) is not None:
                out[name] = self.devices[0]
        return out
