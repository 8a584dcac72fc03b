"""Clone paths of the first topology (stored before the article's topology was built): the masked
*source* prefix, run from the pixels, adapted and added into the target at tap ``R``. They keep
serving exactly as they were; nothing builds them any more (docs/methods/clone.md says why)."""

from __future__ import annotations

from torch import Tensor, nn

from zoo_store.archs import TapNet
from zoo_store.archs.base import resize_to


class SourcePrefixClone(nn.Module):
    """The frozen target, run tap by tap; at each source's insertion tap the conv ``A`` of that
    source's (masked) prefix, resized to the target's resolution, is added; a head reads the
    target's last tap."""

    def __init__(
        self,
        target: TapNet,
        sources: list[TapNet],
        depths: list[str],
        inserts: list[str],
        adapters: list[nn.Conv2d],
        head: nn.Linear,
    ):
        super().__init__()
        self.target, self.sources = target, nn.ModuleList(sources)
        self.depths, self.inserts = list(depths), list(inserts)
        self.adapters, self.head = nn.ModuleList(adapters), head

    def forward(self, x: Tensor) -> Tensor:
        feats = [s.run(x, None, d) for s, d in zip(self.sources, self.depths, strict=True)]  # (B, C_s, H_s, W_s) each
        h = x
        for i, tap in enumerate(self.target.taps):
            h = self.target.stage_fn(i)(h)
            for f, r, a in zip(feats, self.inserts, self.adapters, strict=True):
                if r == tap.name:
                    h = h + a(resize_to(f, tuple(h.shape[-2:])))  # (B, C_t, H_t, W_t)
        return self.head(h)  # (B, K): the last tap is the flattened feature vector


def legacy_adapter(source_channels: int, target_channels: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(source_channels, target_channels, kernel, padding=kernel // 2)
