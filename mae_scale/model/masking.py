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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MASK_TYPES = ("random", "tube", "frame", "cube")
DEFAULT_CUBE = (2, 2, 2)  # (t, h, w) in tokens

Grid = tuple[int, int, int]  # token grid (t, h, w)


@dataclass
class Mask:
    ids_keep: torch.Tensor  # (B, n_keep) token indices the encoder sees, in noise order
    ids_restore: torch.Tensor  # (B, N) position of each token in the shuffled order (unshuffle index)
    mask: torch.Tensor  # (B, N) float, 1 = masked (removed), 0 = visible


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
