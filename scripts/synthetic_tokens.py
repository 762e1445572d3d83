"""A seeded dataset of random token ids with 4 labels, for the benchmark and the GPU check (no
tokenizer, no download): every item is ``input_ids`` and ``attention_mask`` (``length`` ints,
1 for every position) and ``labels`` (0-3)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


class RandomTokens(Dataset):
    """``size`` items of ``length`` token ids drawn from ``[5, vocab)`` (ids 0-4 are special tokens)."""

    def __init__(self, size: int, length: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, vocab, (size, length), generator=generator)
        self.labels = torch.randint(0, 4, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "attention_mask": torch.ones_like(self.ids[index]),
                "labels": self.labels[index]}
