"""Large synthetic slides for seed 001's Table 2: tiles of synthetic CLE frames, lesions of diagnostic frames, masks
and FROC evaluation regions that agree with the pixels. Tiny slides (128 px of 32 px tiles)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from core.data.synth_slides import make_slide, make_slides


@pytest.fixture(scope="module")
def tumour():
    return make_slide(5, 128, 32, tumor=True, lesions=(2, 2), lesion_tiles=(1, 2))


def test_a_tumour_slide_has_labelled_lesions_that_cover_its_tumour_pixels(tumour):
    assert tumour.image.shape == tumour.mask.shape == tumour.regions.shape == (128, 128)
    assert tumour.image.dtype == np.uint8 and tumour.label == 1 and tumour.lesions == 2
    assert set(np.unique(tumour.regions)) == {0, 1, 2}
    tumour_pixels = tumour.mask == 255
    assert tumour_pixels.any() and (tumour.regions[tumour_pixels] > 0).all()
    # the evaluation regions are the tumour pixels dilated by the tolerance (a quarter tile, 8 px), no more
    near = ndimage.binary_dilation(tumour_pixels, iterations=8)
    assert not (tumour.regions[~near] > 0).any()


def test_tumour_lies_in_the_lesion_tiles_one_label_each_lesions_a_tile_apart(tumour):
    tiles = (tumour.mask == 255).reshape(4, 32, 4, 32).any(axis=(1, 3))
    assert 2 <= tiles.sum() <= 4  # two lesions of one or two diagnostic frames
    lesion_of = np.zeros((4, 4), dtype=int)
    for r, c in np.argwhere(tiles):
        labels = np.unique(
            tumour.regions[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32][
                tumour.mask[r * 32 : (r + 1) * 32, c * 32 : (c + 1) * 32] == 255
            ]
        )
        assert labels.size == 1
        lesion_of[r, c] = labels[0]
    for number in (1, 2):
        own = lesion_of == number
        grown = ndimage.binary_dilation(own, structure=np.ones((3, 3), dtype=bool))
        assert own.any() and not (grown & (lesion_of > 0) & ~own).any()


def test_a_normal_slide_has_no_tumour_and_slides_are_reproducible():
    normal = make_slide(6, 128, 32, tumor=False)
    assert normal.label == 0 and normal.lesions == 0
    assert not (normal.mask == 255).any() and not normal.regions.any()
    again = make_slide(6, 128, 32, tumor=False)
    assert np.array_equal(again.image, normal.image)
    slides = make_slides(4, 64, 32, seed=1, tumor_fraction=0.5)
    assert [s.label for s in slides] == [1, 1, 0, 0]
    assert not np.array_equal(slides[0].image, slides[1].image)


def test_bad_geometry_is_refused():
    with pytest.raises(ValueError, match="multiple of tile"):
        make_slide(0, 100, 32, tumor=True)
    with pytest.raises(ValueError, match="multiple of tile"):
        make_slide(0, 64, 16, tumor=True)
