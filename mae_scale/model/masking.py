"""Which tokens the encoder sees: MAE-ST's four masking strategies, one mechanism.

Tokens are numbered in (t, h, w) order over the token grid `(t, h, w)`. Each strategy groups the
tokens into *units* and masks whole units, chosen per sample by sorting uniform noise (small is
keep, large is remove, as mae_st's `random_masking`):

| mask_type | unit                          | units U          | visible tokens per sample   |
|-----------|-------------------------------|------------------|-----------------------------|
| random    | one token (agnostic, default) | t*h*w            | int(U * (1 - ratio))        |
| tube      | one spatial position, all t   | h*w              | int(U * (1 - ratio)) * t    |
| frame     | one time slice, all h*w       | t                | int(U * (1 - ratio)) * h*w  |
| cube      | a ct x ch x cw block of tokens| t*h*w/(ct*ch*cw) | int(U * (1 - ratio)) * ct*ch*cw |

so every sample of a batch keeps the same number of tokens (the encoder gathers a dense tensor).
At 16x224 with 2x16x16 patches and ratio 0.9: random keeps 156 of 1568, tube 19*8 = 152,
cube 19*8 = 152; frame at 0.9 would keep int(0.8) = 0 of 8 slices and is refused (use <= 0.875).

Cube side: `DEFAULT_CUBE = (2, 2, 2)` tokens (4 frames x 32 x 32 px at the default patches). Along
a grid side that the requested cube side does not divide, the side shrinks to its largest divisor
that is not larger (a 7-token side at 112 px / patch 16 gives 1): see `cube_shape`.

A caller fixes the mask by passing `noise` of shape (B, U); for `random` this is the same noise
as mae_st's `random_masking`, so both give the same mask.

**Dual masking** (VideoMAE V2, Wang et al. 2023): the decoder may also drop tokens. With
`decoder_mask_ratio` r > 0 it drops n_drop = int(N * r) of ALL N tokens per sample, always chosen
among the masked ones: it runs on every visible token plus the N - n_visible - n_drop kept masked
tokens, and the loss is taken on those kept masked tokens only. `decoder_mask_type` says which:

- `random`: n_drop masked tokens chosen uniformly per sample;
- `running_cell` (VideoMAE V2): every time slice is tiled with 2x2 cells of tokens; in each cell the
  pattern drops 4r of its 4 tokens (r in 0.25, 0.5, 0.75), and the dropped cell positions shift by
  one (in raster order in the cell) from one time slice to the next, with a random phase per
  sample. A visible token is never dropped, even where the pattern says so: the decoder then drops,
  instead, as many masked tokens that the pattern keeps, chosen at random. So every sample drops
  exactly n_drop tokens (batched tensors need equal counts) and follows the pattern everywhere but
  at those few tokens (about n_visible * r of them). On grids with an odd side the partial cells at
  the edge can make the pattern drop more than n_drop masked tokens; the ones kept are then chosen
  at random among them.

VideoMAE V2 keeps, instead, every position the pattern keeps, visible or not (mask tokens at
visible positions too), so its decoder runs on n_visible + N - n_drop tokens and its loss on a
number of tokens that varies per sample; here the decoder runs on N - n_drop tokens, the same for
every sample. Ranking is by sorted noise again, so `noise` of shape (B, U_dec) fixes it, as above.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK_TYPES = ("random", "tube", "frame", "cube")
DECODER_MASK_TYPES = ("running_cell", "random")
CELL_TOKENS = 4  # a running cell is 2x2 tokens of one time slice
DEFAULT_CUBE = (2, 2, 2)  # (t, h, w) in tokens

Grid = tuple[int, int, int]  # token grid (t, h, w)


@dataclass
class Mask:
    ids_keep: torch.Tensor  # (B, n_keep) token indices the encoder sees, in noise order
    ids_restore: torch.Tensor  # (B, N) position of each token in the shuffled order (unshuffle index)
    mask: torch.Tensor  # (B, N) float, 1 = masked (removed), 0 = visible


@dataclass
class DecoderMask:
    ids_decode: torch.Tensor  # (B, N - n_drop) tokens the decoder runs on, ascending (t, h, w) order
    loss_mask: torch.Tensor  # (B, N) float, 1 = masked and reconstructed (the loss's tokens), else 0


def cube_shape(grid: Grid, cube: tuple[int, int, int] = DEFAULT_CUBE) -> tuple[int, int, int]:
    """The cube actually used on `grid`: each side is the largest divisor of the grid side <= asked."""
    if len(cube) != 3 or min(cube) < 1:
        raise ValueError(f"mask cube {cube} must be three positive token counts (t, h, w)")
    return tuple(
        max(d for d in range(1, min(c, g) + 1) if g % d == 0) for g, c in zip(grid, cube, strict=True)
    )


def unit_of_token(mask_type: str, grid: Grid, cube: tuple[int, int, int] = DEFAULT_CUBE) -> torch.Tensor:
    """(N,) long: the masking unit of every token; units are numbered 0..U-1."""
    t, h, w = grid
    ti, hi, wi = (g.flatten() for g in torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"))
    if mask_type == "random":
        return torch.arange(t * h * w)
    if mask_type == "tube":
        return hi * w + wi
    if mask_type == "frame":
        return ti
    if mask_type == "cube":
        ct, ch, cw = cube_shape(grid, cube)
        return ((ti // ct) * (h // ch) + hi // ch) * (w // cw) + wi // cw
    raise ValueError(f"mask_type {mask_type!r} is not one of {', '.join(MASK_TYPES)}")


def num_units(mask_type: str, grid: Grid, cube: tuple[int, int, int] = DEFAULT_CUBE) -> int:
    """U: how many units a sample's noise must rank (the second dimension of `noise`)."""
    t, h, w = grid
    ct, ch, cw = cube_shape(grid, cube)
    counts = {"random": t * h * w, "tube": h * w, "frame": t, "cube": (t // ct) * (h // ch) * (w // cw)}
    if mask_type not in counts:
        raise ValueError(f"mask_type {mask_type!r} is not one of {', '.join(MASK_TYPES)}")
    return counts[mask_type]


def num_visible(
    mask_type: str, grid: Grid, mask_ratio: float, cube: tuple[int, int, int] = DEFAULT_CUBE
) -> int:
    """Tokens the encoder sees per sample; raises when none would be visible or none masked."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio {mask_ratio} is outside [0, 1)")
    units = num_units(mask_type, grid, cube)
    keep_units = int(units * (1 - mask_ratio))  # truncation, exactly as mae_st
    if not 0 < keep_units < units:
        raise ValueError(
            f"mask_type {mask_type!r} with mask_ratio {mask_ratio} keeps {keep_units} of {units} units "
            f"on the token grid {grid}: at least one unit must stay visible and one be masked"
        )
    return keep_units * (grid[0] * grid[1] * grid[2] // units)


def make_mask(
    mask_type: str,
    grid: Grid,
    mask_ratio: float,
    batch: int,
    *,
    noise: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    cube: tuple[int, int, int] = DEFAULT_CUBE,
) -> Mask:
    """Draw (or, given `noise` (B, U), fix) one mask per sample."""
    n_tokens = grid[0] * grid[1] * grid[2]
    n_keep = num_visible(mask_type, grid, mask_ratio, cube)
    units = num_units(mask_type, grid, cube)
    if noise is None:
        noise = torch.rand(batch, units, device=device)  # noise in [0, 1)
    elif tuple(noise.shape) != (batch, units):
        raise ValueError(
            f"noise for mask_type {mask_type!r} must have shape (B, U) = ({batch}, {units}) "
            f"on the token grid {grid}, got {tuple(noise.shape)}"
        )
    device = noise.device
    unit_rank = noise.argsort(dim=1).argsort(dim=1)  # (B, U): 0 = the unit kept first
    token_unit = unit_of_token(mask_type, grid, cube).to(device)  # (N,)
    # Sort tokens by their unit's rank; the token index breaks ties, so a unit's tokens stay together.
    key = unit_rank[:, token_unit] * n_tokens + torch.arange(n_tokens, device=device)  # (B, N)
    ids_shuffle = key.argsort(dim=1)  # ascend: small is keep, large is remove
    ids_restore = ids_shuffle.argsort(dim=1)
    mask = (ids_restore >= n_keep).float()  # (B, N): 0 is keep, 1 is remove
    return Mask(ids_keep=ids_shuffle[:, :n_keep], ids_restore=ids_restore, mask=mask)


# --- dual masking: which masked tokens the decoder drops -----------------------------------------


def decoder_mask_units(decoder_mask_type: str, grid: Grid) -> int:
    """U_dec, the second dimension of the decoder's noise: one value per token to rank the tokens,
    and for `running_cell` one more (the last column) that picks the sample's cell phase."""
    n_tokens = grid[0] * grid[1] * grid[2]
    if decoder_mask_type not in DECODER_MASK_TYPES:
        raise ValueError(
            f"decoder_mask_type {decoder_mask_type!r} is not one of {', '.join(DECODER_MASK_TYPES)}"
        )
    return n_tokens + 1 if decoder_mask_type == "running_cell" else n_tokens


def num_decoder_dropped(decoder_mask_type: str, grid: Grid, decoder_mask_ratio: float, n_visible: int) -> int:
    """n_drop = int(N * ratio) tokens the decoder drops per sample (0: off); raises on a ratio that
    the type cannot follow or that leaves no masked token to reconstruct."""
    decoder_mask_units(decoder_mask_type, grid)  # validates the type
    r = decoder_mask_ratio
    if not 0.0 <= r < 1.0:
        raise ValueError(f"decoder_mask_ratio {r} is outside [0, 1) (0: the decoder sees every token)")
    if r == 0:
        return 0
    if decoder_mask_type == "running_cell" and not (
        (CELL_TOKENS * r).is_integer() and 1 <= CELL_TOKENS * r < CELL_TOKENS
    ):
        raise ValueError(
            f"decoder_mask_type 'running_cell' drops 1, 2 or 3 of the 4 tokens of each 2x2 cell: "
            f"decoder_mask_ratio must be 0.25, 0.5 or 0.75, got {r} (or use decoder_mask_type 'random')"
        )
    n_tokens = grid[0] * grid[1] * grid[2]
    n_masked = n_tokens - n_visible
    n_drop = int(n_tokens * r)  # truncation, as the encoder's count
    if n_drop >= n_masked:
        raise ValueError(
            f"decoder_mask_ratio {r} drops {n_drop} of {n_tokens} tokens but only {n_masked} are masked "
            f"({n_visible} visible): no masked token would be left to reconstruct; it must be below "
            f"{n_masked / n_tokens:.4g} (the masked share) with this encoder mask"
        )
    return n_drop


def running_cell_drops(grid: Grid, decoder_mask_ratio: float, phase: torch.Tensor) -> torch.Tensor:
    """(B, N) bool: the tokens VideoMAE V2's running-cell pattern drops, for phases (B,) in 0..3.

    A token's place in its 2x2 cell, c = 2 * (row % 2) + column % 2, is dropped in time slice t when
    (c + t + phase) % 4 < 4 * ratio: the dropped places move on by one from slice to slice.
    """
    ti, hi, wi = (
        g.flatten()
        for g in torch.meshgrid(*(torch.arange(n, device=phase.device) for n in grid), indexing="ij")
    )  # (N,) each
    cell = 2 * (hi % 2) + wi % 2  # (N,) place in the 2x2 cell, raster order
    dropped_places = round(CELL_TOKENS * decoder_mask_ratio)
    return (cell + ti + phase[:, None]) % CELL_TOKENS < dropped_places  # (B, N)


def make_decoder_mask(
    decoder_mask_type: str,
    grid: Grid,
    decoder_mask_ratio: float,
    mask: torch.Tensor,
    n_visible: int,
    *,
    noise: torch.Tensor | None = None,
) -> DecoderMask | None:
    """The decoder's tokens for an encoder `mask` (B, N) with `n_visible` visible tokens per sample;
    None when it drops none (ratio 0). `noise` (B, U_dec) fixes it; otherwise it is drawn from the
    same default generator as the encoder's noise, so checkpointed RNG states resume it exactly."""
    n_drop = num_decoder_dropped(decoder_mask_type, grid, decoder_mask_ratio, n_visible)
    if n_drop == 0:
        return None
    batch, n_tokens = mask.shape
    units = decoder_mask_units(decoder_mask_type, grid)
    if noise is None:
        noise = torch.rand(batch, units, device=mask.device)  # noise in [0, 1)
    elif tuple(noise.shape) != (batch, units):
        raise ValueError(
            f"decoder noise for decoder_mask_type {decoder_mask_type!r} must have shape (B, U_dec) = "
            f"({batch}, {units}) on the token grid {grid}, got {tuple(noise.shape)}"
        )
    # Drop order by class: 0 = masked and dropped by the pattern, 1 = other masked, 2 = visible (never
    # reached: n_drop < the masked count); the noise's rank orders the tokens within a class.
    masked = mask.bool()  # (B, N)
    if decoder_mask_type == "running_cell":
        phase = (noise[:, n_tokens] * CELL_TOKENS).long().clamp(max=CELL_TOKENS - 1)  # (B,) in 0..3
        kept_by_pattern = ~running_cell_drops(grid, decoder_mask_ratio, phase)  # (B, N)
        drop_class = torch.where(masked, kept_by_pattern.long(), 2)
    else:
        drop_class = torch.where(masked, 1, 2)
    noise_rank = noise[:, :n_tokens].argsort(dim=1).argsort(dim=1)  # (B, N) in 0..N-1
    order = (drop_class * n_tokens + noise_rank).argsort(dim=1)  # (B, N): dropped first
    ids_decode = order[:, n_drop:].sort(dim=1).values  # (B, N - n_drop)
    loss_mask = mask.scatter(1, order[:, :n_drop], 0.0)  # (B, N): the dropped ones leave the loss
    return DecoderMask(ids_decode=ids_decode, loss_mask=loss_mask)
