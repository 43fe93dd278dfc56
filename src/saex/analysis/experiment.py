"""A run's model and SAE, ready for experiments on one example: its code, an edited forward pass and
what the edit changed (the readout of the model's family, the nearest examples before and after).
The CLI (`saex edit`), the index's ablation pass and the explorer's edit page all go through it."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from saex.analysis.edit import Edit, edit_code, splice_edit
from saex.analysis.effect import compare
from saex.analysis.retrieval import nearest_examples
from saex.models import load_model
from saex.models.heads import head_kind, prompt_features, readout
from saex.sae.io import load_sae, saved_saes
from saex.store import ActivationStore

MAX_LISTED = 50  # changed latents listed in an effect (the largest changes; n_features_changed counts all)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class Hooked:
    """One example at the hook point: its batch, selected tokens and their codes."""
    ref: str
    label: int
    batch: object
    mask_BT: torch.Tensor  # [1, T]
    positions_T: torch.Tensor  # the selected tokens' positions
    x_TD: torch.Tensor  # their activations
    f_TS: torch.Tensor  # their dense codes


class Experiment:
    def __init__(self, run: str | Path, sae: str | None = None, device: str = "cpu"):
        self.run = Path(run)
        self.store = ActivationStore(self.run / "acts")
        if self.store.manifest.get("modality") == "toy":
            raise ValueError(f"{self.run} is a toy store (saex toy): experiments run a model, and it has none")
        folders = saved_saes(self.run / "saes", [sae] if sae else None)
        if len(folders) != 1:
            raise ValueError(f"{self.run / 'saes'} holds {[f.name for f in folders]}; name one with --sae")
        self.sae_name = folders[0].name
        self.sae = load_sae(folders[0], device)
        m = self.store.manifest
        self.hook = self.sae.metadata.get("hook") or self.store.hooks[0]
        self.column = self.store.acts(self.hook)
        self.tokens, self.context = m["tokens"], m.get("context_size") or 128
        self.label_names = m.get("label_names") or []
        self.adapter = load_model(m["model"], device)
        self.point = self.adapter.hook(self.hook)
        self.kind = head_kind(self.adapter)
        self.prompts = prompt_features(self.adapter, self.label_names) if self.kind == "zero_shot" else None
        self._dataset = None

    @property
    def dataset(self):
        if self._dataset is None:
            from saex.data import reopen

            self._dataset = reopen(self.store.manifest["dataset"])
        return self._dataset

    @property
    def d_sae(self) -> int:
        return self.sae.d_sae

    def names(self) -> list[str] | None:
        """What each logit of the readout is called."""
        if self.kind in ("classifier",):
            id2label = self.adapter.model.config.id2label or {}
            return [id2label.get(i, str(i)) for i in range(len(id2label))] or None
        if self.kind == "zero_shot":
            return self.label_names
        if self.kind == "next_token":
            tok = self.adapter.processor
            return _TokenNames(tok)
        return None

    def input_of(self, ref: str | int):
        """(input, label) of a dataset example (its index) or of a file (an image, or a .txt's text)."""
        text = str(ref)
        path = Path(text)
        if not text.isdigit() and (path.suffix.lower() in IMAGE_SUFFIXES | {".txt"} or path.exists()):
            if not path.is_file():
                raise FileNotFoundError(f"input file {path} does not exist")
            if self.adapter.modality == "image":
                from PIL import Image, UnidentifiedImageError

                try:
                    with Image.open(path) as im:
                        return im.convert("RGB" if im.mode not in ("L", "RGB") else im.mode), -1
                except (UnidentifiedImageError, OSError) as e:
                    raise ValueError(f"{path} is not an image this model can read ({e})") from None
            try:
                return path.read_text(encoding="utf-8").strip(), -1
            except UnicodeDecodeError as e:
                raise ValueError(f"{path} is not UTF-8 text ({e})") from None
        if not text.lstrip("-").isdigit():
            raise ValueError(f"{text!r} is neither a dataset example index (0..{len(self.dataset) - 1}) nor a file")
        index = int(text)
        if not 0 <= index < len(self.dataset):
            raise ValueError(f"example {index} is outside the dataset (valid: 0..{len(self.dataset) - 1})")
        item = self.dataset[index]
        return item.input, item.label

    @torch.no_grad()
    def hooked(self, ref: str | int) -> Hooked:
        inp, label = self.input_of(ref)
        batch = self.adapter.prepare([inp], self.context)
        acts = self.adapter.capture(batch, [self.point])[self.point.name]
        mask = self.adapter.select(batch, acts.shape[1], self.tokens)
        x = acts[0][mask[0].to(acts.device)].float()
        return Hooked(str(ref), label, batch, mask, mask[0].nonzero().flatten(), x, self.sae.encode(x).dense())

    def source_codes(self, edits: list[Edit]) -> dict[str, torch.Tensor]:
        """The codes [T, S] of the examples that copy and pair edits read."""
        return {ref: self.hooked(ref).f_TS for e in edits for ref in e.examples()}

    @torch.no_grad()
    def forward(self, h: Hooked, edits: list[Edit] | None, sources: dict | None = None) -> dict:
        """The readout of the model with `edits` spliced in at the hook (None: the clean model)."""
        positions_BT = torch.arange(h.mask_BT.shape[1]).unsqueeze(0)
        fn = splice_edit(self.sae, h.mask_BT, positions_BT, edits, sources) if edits is not None else None
        out = self.adapter.run_edited(lambda: readout(self.adapter, h.batch, self.kind, self.prompts), self.point, fn)
        return {k: v[0].cpu() for k, v in out.items()}

    def effect(self, ref: str | int, edits: list[Edit], neighbours: int = 8) -> dict:
        """Everything `saex edit` reports for one example."""
        for e in edits:
            e.check(self.d_sae)
        h = self.hooked(ref)
        sources = self.source_codes(edits)
        f2 = edit_code(h.f_TS, h.positions_T, edits, sources)
        moved_S = (f2 - h.f_TS).mean(0).abs()
        changed = (f2 != h.f_TS).any(0).nonzero().flatten()
        changed = changed[moved_S[changed].argsort(descending=True, stable=True)].tolist()  # largest change first
        out = {"example": h.ref, "label": self.label_names[h.label] if 0 <= h.label < len(self.label_names) else None,
               "sae": self.sae_name, "hook": self.hook, "tokens": self.tokens, "readout": self.kind,
               "n_features_changed": len(changed),
               "features_changed": [{"feature": j, "before": float(h.f_TS[:, j].mean()),
                                     "after": float(f2[:, j].mean())} for j in changed[:MAX_LISTED]],
               "active_before": _active(h.f_TS), "active_after": _active(f2)}
        if self.kind:
            out["effect"] = compare(self.forward(h, None), self.forward(h, edits, sources), self.names())
        if self.kind == "next_token":
            out["continuation"] = {"clean": self.generate(h, None), "edited": self.generate(h, edits, sources)}
        if neighbours:
            x2 = h.x_TD + (f2 - h.f_TS) @ self.sae.W_dec.float()
            exclude = {int(h.ref)} if h.ref.isdigit() else set()
            before, after = nearest_examples(self.store, self.column, torch.stack([h.x_TD.mean(0), x2.mean(0)]),
                                             neighbours, exclude)
            out["neighbours"] = {"before": before, "after": after}
        return out

    @torch.no_grad()
    def generate(self, h: Hooked, edits: list[Edit] | None, sources: dict | None = None, n: int = 12) -> str:
        """A greedy continuation of a text example with the edit in place at every step."""
        from saex.models.adapter import Batch

        tok = self.adapter.processor
        length = int(h.batch.inputs["attention_mask"].sum())
        ids, special = h.batch.inputs["input_ids"][:, :length], h.batch.special_BT[:, :length]
        drop = 0
        if self.adapter.max_tokens:  # room for the new tokens within the model's positions: keep the prompt's end
            n = min(n, self.adapter.max_tokens - 1)
            drop = max(0, ids.shape[1] + n - self.adapter.max_tokens)
            ids, special = ids[:, drop:], special[:, drop:]
        if drop and edits and any(e.positions is not None for e in edits):
            edits = [replace(e, positions=[p - drop for p in e.positions]) if e.positions is not None else e
                     for e in edits]  # the same tokens, at their positions in the trimmed prompt
        new = []
        for _ in range(n):
            ones = torch.ones_like(ids)
            special = torch.cat([special, torch.zeros_like(ids[:, special.shape[1]:])], 1)  # new tokens: content
            batch = Batch({"input_ids": ids, "attention_mask": ones}, ones, special, ids)
            mask = self.adapter.select(batch, ids.shape[1], self.tokens)
            step = Hooked(h.ref, h.label, batch, mask, mask[0].nonzero().flatten(), h.x_TD, h.f_TS)
            logits = self.forward(step, edits, sources)["logits"]
            nxt = int(logits.argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            if nxt == tok.eos_token_id:
                break
        return tok.decode(new)


def _active(f_TS: torch.Tensor, top: int = 16) -> list[dict]:
    """The strongest latents of an example (mean over its selected tokens)."""
    mean = f_TS.mean(0)
    vals, idx = mean.topk(min(top, len(mean)))
    return [{"feature": int(j), "value": float(v)} for v, j in zip(vals, idx) if v > 0]


class _TokenNames:
    """Token strings by id, decoded on demand (a vocabulary is too long to list)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer

    def __getitem__(self, i: int) -> str:
        return self.tok.decode([i])

    def __bool__(self) -> bool:
        return True
