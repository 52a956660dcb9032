"""Vision Transformer trunks (timm's ViT-S/16 and ViT-B/16) for SwAV, as DINO and later SwAV-ViT work use.

The trunk *is* timm's `VisionTransformer` (a subclass, not a wrapper), so its module tree stays plain: the 12
transformer blocks are `trunk.blocks`, which the FSDP2 parallelise step shards one by one as it does the
ResNet stages, and the state_dict keys are timm's own (a checkpoint's trunk loads into
`timm.create_model("vit_small_patch16_224", num_classes=0)`).
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, resample_abs_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import Tensor, nn

# name -> (embed_dim, depth, num_heads): timm's vit_small_patch16_224 / vit_base_patch16_224 (DeiT/DINO sizes)
_VITS: dict[str, tuple[int, int, int]] = {
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
}
VIT_ARCHS = tuple(_VITS)
PATCH_SIZE = 16


class MultiResolutionBlock(Block):
    """timm's transformer block (the same parameters and names), which also takes a list of token batches, one
    per crop resolution, and runs each through. One call for all resolutions is what lets FSDP2 gather the
    block once per pass instead of once per resolution: its hooks act per call."""

    def forward(self, x: Tensor | list[Tensor], **kwargs: object) -> Tensor | list[Tensor]:  # type: ignore[override]
        block = super().forward
        return block(x, **kwargs) if isinstance(x, Tensor) else [block(tokens, **kwargs) for tokens in x]


class TensorDropPath(nn.Module):
    """timm's DropPath (stochastic depth: in training, each sample's residual branch is dropped with probability
    `drop_prob`, and kept ones are scaled by 1 / (1 - drop_prob); in eval, nothing), with the probability held
    in a tensor.

    Why: torch.compile guards on a Python float, so blocks differing only in their drop probability (it rises
    block by block) would each compile a graph of their own; as a buffer it is an input of one graph that
    serves every block. The buffer is not persistent, so checkpoints keep timm's keys. The draws are
    `rand < keep` where timm calls bernoulli_(keep): the same distribution and the same scaled values, not the
    same random numbers.
    """

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob  # to read; forward uses the buffer only
        self.register_buffer("keep_prob", torch.tensor(1.0 - drop_prob), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        keep = self.keep_prob
        kept = torch.rand((x.shape[0],) + (1,) * (x.ndim - 1), device=x.device) < keep
        # 1 / keep in x's dtype, as timm's division of a mask in x's dtype rounds it; 0 where nothing is kept
        scale = torch.where(keep > 0, keep.reciprocal(), torch.zeros_like(keep)).to(x.dtype)
        return x * (kept.to(x.dtype) * scale)


def uniform_drop_paths(blocks: nn.Sequential) -> None:
    """Give every block a TensorDropPath with its own probability (0 for timm's first, an Identity), so that all
    blocks have the same structure and one compiled graph serves them all (engines.assemble.compile_units).
    Without stochastic depth every block has Identities already."""
    if not any(isinstance(m, DropPath) for m in blocks.modules()):
        return
    for block in blocks:
        for name in ("drop_path1", "drop_path2"):
            setattr(block, name, TensorDropPath(getattr(getattr(block, name), "drop_prob", 0.0)))


class ViTTrunk(VisionTransformer):
    """A ViT without its classifier: images (N, 3, H, W) -> CLS token after the final LayerNorm (N, out_dim).

    Multi-crop feeds the trunk 224 px global and 96 px local crops: `dynamic_img_size` resamples the 14x14
    position embeddings (bicubic) to each input's patch grid, as DINO's `interpolate_pos_encoding` does, so
    one model takes any size that is a multiple of the patch size.
    """

    def __init__(self, embed_dim: int, depth: int, num_heads: int, drop_path_rate: float = 0.1) -> None:
        super().__init__(
            img_size=224,  # the size the position embeddings are stored at (then resampled per input)
            patch_size=PATCH_SIZE,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            num_classes=0,
            global_pool="token",
            dynamic_img_size=True,
            drop_path_rate=drop_path_rate,
            block_fn=MultiResolutionBlock,
        )
        uniform_drop_paths(self.blocks)
        self.out_dim = embed_dim

    def tokens(self, x: Tensor) -> Tensor:
        """Images -> the class token and the patch tokens with their position embeddings, resampled to this
        input's patch grid: what timm's forward_features does before the blocks, for this trunk's
        configuration (a class token, no register tokens, the class token's own position embedding)."""
        h, w = x.shape[-2:]
        if h % PATCH_SIZE or w % PATCH_SIZE:
            # timm would silently drop the border pixels that do not fill a whole patch
            raise ValueError(f"ViT input of {h}x{w} px: both sides must be multiples of the patch size {PATCH_SIZE}")
        x = self.patch_embed(x)  # (N, H/16, W/16, C): dynamic_img_size keeps the grid
        n, rows, cols, c = x.shape
        pos_embed = resample_abs_pos_embed(self.pos_embed, new_size=(rows, cols),
                                           old_size=self.patch_embed.grid_size,
                                           num_prefix_tokens=self.num_prefix_tokens)
        x = torch.cat([self.cls_token.expand(n, -1, -1), x.reshape(n, -1, c)], dim=1) + pos_embed
        return self.norm_pre(self.patch_drop(self.pos_drop(x)))

    def forward(self, x: Tensor | list[Tensor]) -> Tensor | list[Tensor]:  # type: ignore[override]
        """Features of a batch, or of each batch of a list (one per crop resolution, as ResNetTrunk takes). The
        blocks take the list whole, each in one call: under FSDP2 a block is gathered once per pass however
        many resolutions there are."""
        batches = [x] if isinstance(x, Tensor) else x
        tokens = self.blocks([self.tokens(b) for b in batches])
        features = [self.forward_head(self.norm(t), pre_logits=True) for t in tokens]
        return features[0] if isinstance(x, Tensor) else features


def build_vit(arch: str, drop_path_rate: float = 0.1) -> ViTTrunk:
    """A ViT trunk by name, randomly initialised (timm's init; weights are never downloaded).

    drop_path_rate: stochastic depth, rising linearly to this value at the last block; 0.1 is DINO's default
    for ViT-S/16 and ViT-B/16.
    """
    if arch not in _VITS:
        raise ValueError(f"model.arch={arch!r} is not a ViT; choose one of {', '.join(VIT_ARCHS)}")
    return ViTTrunk(*_VITS[arch], drop_path_rate=drop_path_rate)
