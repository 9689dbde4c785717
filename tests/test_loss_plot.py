"""The motion-loss chart: lines where the values are, a message when there is nothing to plot."""

from __future__ import annotations

import numpy as np

from motionclone.motion_core.loss_plot import as_comfy_image, draw_loss_plot, format_curve


def test_curves_are_drawn_in_their_colours_and_empty_input_says_so():
    rising = [(s, 0.1 * s) for s in range(10)]
    falling = [(s, 1.0 - 0.05 * s) for s in range(10)]
    rgb = draw_loss_plot({"a": rising, "b": falling}, "title", size=(400, 240))
    assert rgb.shape == (240, 400, 3) and rgb.dtype == np.uint8
    red = (rgb[..., 0] > 200) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)
    blue = (rgb[..., 2] > 200) & (rgb[..., 0] < 80)
    assert red.sum() > 50 and blue.sum() > 50
    # The rising curve ends high on the right, the falling one low on the right (image y grows down).
    right = slice(300, 370)
    red_rows = np.nonzero(red[:, right].any(axis=1))[0]
    blue_rows = np.nonzero(blue[:, right].any(axis=1))[0]
    assert red_rows.min() < blue_rows.max()
    empty = draw_loss_plot({"a": []}, "title", size=(400, 240))
    assert not ((empty[..., 0] > 200) & (empty[..., 1] < 90)).any()  # no line drawn
    image = as_comfy_image(rgb)
    assert tuple(image.shape) == (1, 240, 400, 3) and float(image.max()) <= 1.0
    assert format_curve([(0, 0.5), (1, 0.25)]) == "0:0.5 1:0.25"
