"""anyres arithmetic, written once for the processor and the model.

An image is resized into the best of the grid pinpoints, padded, cut into tiles of the tower's input
size, and encoded along with a downsized copy of the whole image (the base). The model then stitches
the tiles' feature maps back together, crops off the padding (unpadding), shrinks maps larger than
about ``max_num_patches`` tiles (anyres_max_N) and ends every feature row with a newline embedding.

The processor must put exactly as many image tokens in the prompt as the model produces features;
both sides call the functions here, so the two counts cannot drift apart. All sizes are (height, width).
"""

import math

from ...errors import InputError

Size = tuple[int, int]


def select_best_resolution(image_size: Size, pinpoints) -> Size:
    """The pinpoint that keeps the most of the image's pixels once it is fitted inside, and among
    those the one that wastes the least area (the reference's rule, ties to the first)."""
    height, width = image_size
    if height <= 0 or width <= 0:  # the reference divides by zero here
        raise InputError(f"an image of {width}x{height} pixels has no pixels to tile; give a non-empty image")
    best, best_effective, best_wasted = None, 0, float("inf")
    for target_height, target_width in pinpoints:
        scale = min(target_width / width, target_height / height)
        fitted_width, fitted_height = int(width * scale), int(height * scale)
        effective = min(fitted_width * fitted_height, width * height)
        wasted = target_width * target_height - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (target_height, target_width), effective, wasted
    return best


def fitted_size(image_size: Size, target: Size) -> Size:
    """The size an image is resized to so it fits ``target`` with its aspect ratio kept (one side
    touches the target, the other is rounded up)."""
    height, width = image_size
    target_height, target_width = target
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        return min(math.ceil(height * scale_width), target_height), target_width
    return target_height, min(math.ceil(width * scale_height), target_width)


def centered_padding(size: Size, target: Size) -> tuple[Size, Size]:
    """((top, bottom), (left, right)) zero padding that centres ``size`` in ``target``; odd extra
    pixels go to the bottom/right."""
    top, extra_rows = divmod(target[0] - size[0], 2)
    left, extra_cols = divmod(target[1] - size[1], 2)
    return (top, top + extra_rows), (left, left + extra_cols)


def tile_grid(image_size: Size, pinpoints, tile_size: int | Size) -> Size:
    """(rows, cols) of tiles an anyres image is cut into. ``tile_size``: the tower's square input side, or
    (height, width) when a call resized the tower inputs to a non-square size: the reference's processor
    then counts tokens with best pinpoint // (height, width), although it cut square tiles."""
    tile_height, tile_width = (tile_size, tile_size) if isinstance(tile_size, int) else tile_size
    height, width = select_best_resolution(image_size, pinpoints)
    return height // tile_height, width // tile_width


def num_anyres_patches(image_size: Size, pinpoints, tile_size: int) -> int:
    """Vision-tower inputs for one anyres image: the tiles plus the base image."""
    rows, cols = tile_grid(image_size, pinpoints, tile_size)
    return rows * cols + 1


def unpadded_region(image_size: Size, feature_size: Size) -> tuple[slice, slice]:
    """(row slice, column slice) of a stitched feature map of ``feature_size`` that covers the image
    rather than its padding. The padding was added in pixels; here it is removed in feature cells,
    with the reference's rounding (scale by the fitted side, round to 7 digits, halve the rest)."""
    height, width = image_size
    rows, cols = feature_size
    if width / height > cols / rows:
        fitted_rows = int(round(height * (cols / width), 7))
        pad = (rows - fitted_rows) // 2
        return slice(pad, rows - pad), slice(0, cols)
    fitted_cols = int(round(width * (rows / height), 7))
    pad = (cols - fitted_cols) // 2
    return slice(0, rows), slice(pad, cols - pad)


def downsampled_size(feature_size: Size, grid_size: int, max_num_patches: int) -> Size | None:
    """The size anyres_max_N shrinks an unpadded feature map to, or None when it is small enough
    (at most 1.1 times the side of ``max_num_patches`` tiles' worth of features)."""
    rows, cols = feature_size
    ratio = math.sqrt(rows * cols / (max_num_patches * grid_size ** 2))
    if ratio > 1.1:
        return int(rows // ratio), int(cols // ratio)
    return None


def packed_feature_size(image_size: Size, pinpoints, tile_size: int | Size, grid_size: int,
                        max_num_patches: int) -> Size:
    """(rows, cols) of an anyres image's final tile feature map, before the newline column."""
    tile_rows, tile_cols = tile_grid(image_size, pinpoints, tile_size)
    if tile_rows == 0:  # the reference divides by zero here
        tile_height = tile_size if isinstance(tile_size, int) else tile_size[0]
        raise InputError(f"tower inputs {tile_height} pixels high are taller than the grid pinpoint picked for the "
                         f"{image_size[1]}x{image_size[0]} image, so it makes no tile rows; pass a smaller size "
                         f"(at most the checkpoint's own)")
    stitched = (tile_rows * grid_size, tile_cols * grid_size)
    row_slice, col_slice = unpadded_region(image_size, stitched)
    size = (row_slice.stop - row_slice.start, col_slice.stop - col_slice.start)
    return downsampled_size(size, grid_size, max_num_patches) or size


def image_token_count(image_size: Size, pinpoints, tile_size: int | Size, grid_size: int, max_num_patches: int,
                      anyres: bool = True) -> int:
    """Features (= prompt tokens) of one image with the "full" feature strategy.

    anyres: the base image's grid, then each row of the packed tile map plus its newline. Not anyres
    (images of a multi-image prompt): the base image's grid plus one newline."""
    base = grid_size * grid_size
    if not anyres:
        return base + 1
    rows, cols = packed_feature_size(image_size, pinpoints, tile_size, grid_size, max_num_patches)
    return base + rows * (cols + 1)


def video_token_count(num_frames: int, grid_size: int) -> int:
    """Features of one video: each frame's grid pooled 2x (rounding up), then one newline."""
    pooled = math.ceil(grid_size / 2)
    return num_frames * pooled * pooled + 1
