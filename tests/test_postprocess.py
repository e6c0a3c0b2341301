"""The h-maxima of the distance-watershed split, computed blob by blob, against skimage over the whole image."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage import feature, morphology

from sppnet_monai.data.instances import binary_to_instances
from sppnet_monai.postprocess import _h_maxima, instances_from_semantic


def _blobby_mask(seed: int) -> np.ndarray:
    """Touching, holed, border-crossing blobs (smoothed noise above a threshold) and, apart, single round nuclei."""
    rng = np.random.default_rng(seed)
    mask = ndimage.gaussian_filter(rng.random((120, 160)), 2.5 + seed % 3) > 0.5 + 0.02 * (seed % 4)
    mask[:, 130:] = False
    rows, cols = np.mgrid[:120, :160]
    for y in (15, 55, 95):
        mask |= (rows - y) ** 2 + (cols - 146) ** 2 < 36
    return mask


@pytest.mark.parametrize("seed", range(6))
def test_blob_wise_h_maxima_equal_the_whole_image_ones_where_they_matter(seed):
    mask = _blobby_mask(seed)
    distance = ndimage.distance_transform_edt(mask)
    peaks = feature.peak_local_max(distance, min_distance=3, labels=binary_to_instances(mask), exclude_border=False)
    whole = morphology.local_maxima(morphology.reconstruction(distance - 0.5, distance, method="dilation"), connectivity=2, allow_borders=True) & mask
    blob_wise = _h_maxima(distance, mask, peaks, 0.5)
    blobs, _ = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    peaks_per_blob = np.bincount(blobs[tuple(peaks.T)], minlength=int(blobs.max()) + 1)
    several = peaks_per_blob[blobs] > 1
    assert several.any() and (~several & mask).any()  # both kinds of blob are tested
    np.testing.assert_array_equal(blob_wise[several], whole[several])
    # A blob with one peak keeps just that peak: it is the blob's one centre either way.
    single = blobs[tuple(peaks.T)][peaks_per_blob[blobs[tuple(peaks.T)]] == 1]
    assert blob_wise[~several].sum() == len(single)
    for blob in single:
        assert whole[blobs == blob].any() and blob_wise[blobs == blob].sum() == 1


@pytest.mark.parametrize("seed", range(6))
def test_nuclei_are_the_same_as_with_the_whole_image_h_maxima(seed, monkeypatch):
    """The same nuclei; only watershed ties between touching nuclei may fall the other way (a few pixels)."""
    import sppnet_monai.postprocess as postprocess

    mask = _blobby_mask(seed)
    blob_wise = instances_from_semantic(mask)

    def whole_image(distance, mask, peaks, depth):
        flattened = morphology.reconstruction(distance - depth, distance, method="dilation")
        return morphology.local_maxima(flattened, connectivity=2, allow_borders=True) & mask

    monkeypatch.setattr(postprocess, "_h_maxima", whole_image)
    reference = instances_from_semantic(mask)
    assert abs(int(blob_wise.max()) - int(reference.max())) <= 1 and reference.max() > 5
    np.testing.assert_array_equal(blob_wise > 0, reference > 0)
    # Nuclei pixels that change hands (a reference nucleus's pixels outside its best-matching nucleus of ours): at most 1%.
    matched = [np.bincount(blob_wise[reference == label]).max() for label in range(1, reference.max() + 1)]
    sizes = np.bincount(reference.ravel())[1:]
    assert sizes.sum() - sum(matched) <= 0.01 * sizes.sum()
