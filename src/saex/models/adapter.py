"""One adapter over every supported Hugging Face model: preprocess inputs, select tokens, and capture
activations at hook points, stopping the forward pass after the deepest one."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from saex.models.families import backbone_of, blocks_of, family_of, mlp_out_directions, site_module
from saex.models.hooks import HookPoint, all_hook_names, parse_hook

TOKEN_CHOICES = {
    "image": ("cls", "patches", "registers", "all"),  # registers: only models that have register tokens
    "text": ("content", "all", "first"),
}
DEFAULT_TOKENS = {"image": "cls", "text": "content"}
NEEDS = {"cls": "class token", "registers": "register tokens"}  # what an image selection needs the model to have


class _StopForward(Exception):
    pass


@dataclass
class Batch:
    """Model inputs plus what token selection needs to know about them."""

    inputs: dict[str, torch.Tensor]
    attention_BT: torch.Tensor | None = None  # text: 1 for real tokens, 0 for padding
    special_BT: torch.Tensor | None = None  # text: 1 for [CLS], [SEP], BOS...
    token_ids_BT: torch.Tensor | None = None

    def pin_memory(self) -> "Batch":
        """Model inputs in page-locked memory (the DataLoader calls this with pin_memory=True), so that
        their copy to the GPU can overlap the previous batch's forward."""
        return Batch({k: v.pin_memory() for k, v in self.inputs.items()}, self.attention_BT, self.special_BT,
                     self.token_ids_BT)


class ModelAdapter:
    def __init__(self, model: nn.Module, processor, name: str, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        self.name = name
        self.source = name  # the folder or hub id it was loaded from (load_model sets it)
        self.family = family_of(model.config.model_type)
        self.device = torch.device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.model = model.to(self.device, self.dtype).eval()
        self.processor = processor
        self.backbone = backbone_of(self.model, self.family)
        config = self.backbone.config
        self.n_layers: int = config.num_hidden_layers
        self.d_model: int = config.hidden_size
        self.num_channels: int = getattr(config, "num_channels", 3)
        # images: [CLS] (if the family has one), then the register tokens (DINOv2 with registers), then the patches
        self.n_registers: int = getattr(config, "num_register_tokens", 0)
        self.n_prefix: int = int(self.family.has_cls) + self.n_registers  # image tokens before the patches
        self.blocks = blocks_of(self.backbone, self.n_layers)
        # images: the processor's integer work (decode, resize, crop) runs in prepare(), possibly in DataLoader
        # workers; rescaling and normalising wait for on_device(), on the model's device. Pixels then travel
        # between processes as uint8 (4x smaller) and the CPU skips three float passes per image.
        self._deferred = {"do_rescale": False, "do_normalize": False} if (
            hasattr(processor, "do_rescale") and hasattr(processor, "do_normalize")) else {}
        limits = [getattr(config, "max_position_embeddings", None), getattr(processor, "model_max_length", None)]
        self.max_tokens = min((n for n in limits if isinstance(n, int) and 0 < n < 1 << 20), default=None)

    @property
    def modality(self) -> str:
        return self.family.modality

    def hook_names(self) -> list[str]:
        return all_hook_names(self.n_layers)

    def hook(self, name: str) -> HookPoint:
        return parse_hook(name, self.n_layers)

    def mlp_out_directions(self, layer: int) -> torch.Tensor:
        """[d_mlp, d_model] output vectors of block `layer`'s MLP neurons (float32, CPU)."""
        return mlp_out_directions(self.blocks[layer], self.d_model).float().cpu()

    def token_choices(self) -> list[str]:
        """The token selections this model offers."""
        has = {"cls": self.family.has_cls, "registers": self.n_registers > 0}
        return [t for t in TOKEN_CHOICES[self.modality] if has.get(t, True)]

    def check_tokens(self, tokens: str) -> str:
        valid = self.token_choices()
        if tokens in valid:
            return tokens
        what = (f"which has no {NEEDS[tokens]}" if tokens in TOKEN_CHOICES[self.modality]
                else f"which reads {self.modality}")
        raise ValueError(f"token selection {tokens!r} is not valid for {self.name} ({self.family.name}, {what}); "
                         f"valid: {valid}")

    # -- inputs ---------------------------------------------------------------------------------

    def prepare(self, inputs: list, context_size: int = 128) -> Batch:
        """Tokenised or preprocessed inputs, on the CPU."""
        if self.modality == "image":
            mode = "L" if self.num_channels == 1 else "RGB"
            images = [im if im.mode == mode else im.convert(mode) for im in inputs]
            pixels = self.processor(images=images, return_tensors="pt", **self._deferred)["pixel_values"]
            if self._deferred:  # integral values after a PIL resize: uint8; otherwise finish here
                pixels = pixels.to(torch.uint8) if torch.equal(pixels, pixels.round()) else self.finish_pixels(pixels)
            return Batch({"pixel_values": pixels})
        if self.max_tokens:
            context_size = min(context_size, self.max_tokens)
        enc = self.processor(list(inputs), padding=True, truncation=True, max_length=context_size,
                             return_tensors="pt", return_special_tokens_mask=True)
        model_inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        return Batch(model_inputs, enc["attention_mask"], enc["special_tokens_mask"], enc["input_ids"])

    def finish_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Rescale and normalise as the processor would have, in one fused float32 pass:
        (x r - mean) / std = x (r / std) - mean / std."""
        p = self.processor
        scale = p.rescale_factor if p.do_rescale else 1.0
        mean, std = (torch.as_tensor(v, dtype=torch.float32, device=pixels.device).reshape(-1, 1, 1)
                     for v in ((p.image_mean, p.image_std) if p.do_normalize else (0.0, 1.0)))
        return torch.addcmul(-mean / std, pixels.float(), scale / std)

    def on_device(self, batch: Batch) -> Batch:
        """The batch with its model inputs on the model's device (pixels finished and in its dtype).
        prepare() stays on the CPU so that it can run in DataLoader worker processes."""
        inputs = {}
        for k, v in batch.inputs.items():
            if k == "pixel_values" and v.dtype == torch.uint8:
                v = self.finish_pixels(v.to(self.device, non_blocking=True))
            inputs[k] = (v.to(self.device, self.dtype, non_blocking=True) if v.is_floating_point()
                         else v.to(self.device, non_blocking=True))
        return Batch(inputs, batch.attention_BT, batch.special_BT, batch.token_ids_BT)

    def select(self, batch: Batch, n_tokens: int, tokens: str) -> torch.Tensor:
        """Bool [B, T] of the token positions that `tokens` selects (on the CPU)."""
        if self.modality == "image":
            B = next(iter(batch.inputs.values())).shape[0]
            spans = {"cls": (0, 1), "registers": (int(self.family.has_cls), self.n_prefix),
                     "patches": (self.n_prefix, n_tokens), "all": (0, n_tokens)}
            start, end = spans[tokens]
            mask = torch.zeros(B, n_tokens, dtype=torch.bool)
            mask[:, start:end] = True
            return mask
        real = batch.attention_BT.bool()
        if tokens == "all":
            return real
        if tokens == "first":
            mask = torch.zeros_like(real)
            mask[:, 0] = True
            return mask & real
        return real & ~batch.special_BT.bool()

    # -- activations ----------------------------------------------------------------------------

    def _register(self, point: HookPoint, fn) -> torch.utils.hooks.RemovableHandle:
        """Call fn(acts) at `point`; if it returns a tensor, that replaces the activations downstream."""
        block = self.blocks[point.layer]

        def on_output(module, args, output):
            acts = output[0] if isinstance(output, tuple) else output
            new = fn(acts)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        if point.site in ("hook_resid_pre", "hook_mlp_in"):  # a module's input: the block's, or the MLP's
            def on_input(module, args, kwargs):
                acts = args[0] if args else kwargs["hidden_states"]
                new = fn(acts)
                if new is None:
                    return None
                return ((new, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": new})

            module = block if point.site == "hook_resid_pre" else site_module(block, point.site)
            return module.register_forward_pre_hook(on_input, with_kwargs=True)
        module = block if point.site == "hook_resid_post" else site_module(block, point.site)
        return module.register_forward_hook(on_output)

    @torch.inference_mode()
    def run_edited(self, run, point: HookPoint, edit):
        """run() with the activations at `point` replaced by edit(acts) (no edit when `edit` is None)."""
        return self.run_hooked(run, {point: edit} if edit is not None else {})

    @torch.inference_mode()
    def run_hooked(self, run, hooks: dict[HookPoint, object]):
        """run() with fn(acts) called at each point of `hooks` (in the order the forward pass reaches them);
        a tensor it returns replaces the activations downstream (a transcoder reads one point, writes another)."""
        handles = [self._register(point, fn) for point, fn in hooks.items()]
        try:
            return run()
        finally:
            for handle in handles:
                handle.remove()

    @torch.inference_mode()
    def capture(self, batch: Batch, hooks: list[HookPoint]) -> dict[str, torch.Tensor]:
        """Activations [B, T, d] at each hook point, from one forward pass that stops after the deepest."""
        if not hooks:
            raise ValueError("capture needs at least one hook point")
        deepest = max(hooks, key=lambda h: h.order)
        out: dict[str, torch.Tensor] = {}

        def record(point: HookPoint, acts: torch.Tensor):
            out[point.name] = acts.detach()
            if point == deepest:
                raise _StopForward

        handles = [self._register(point, lambda acts, p=point: record(p, acts)) for point in hooks]
        try:
            self.backbone(**self.on_device(batch).inputs)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
        return out
