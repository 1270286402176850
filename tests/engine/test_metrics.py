"""Image-quality metrics against analytic values and scikit-image's SSIM."""
import numpy as np
import pytest
import torch

from napari_petdiff.engine.metrics import (
    background_cov, bias_variance, contrast_recovery, nrmse, psnr, ssim, ssim_map,
)
from napari_petdiff.engine.phantoms import shepp_logan


@pytest.fixture(scope="module")
def phantom():
    return shepp_logan(shape=(1, 64, 64)).activity


def _skimage_ssim(x, ref, data_range, full=False):
    metrics = pytest.importorskip("skimage.metrics")
    return metrics.structural_similarity(x, ref, data_range=data_range, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, full=full)


def test_identical_images(phantom):
    assert nrmse(phantom, phantom) == 0.0
    assert psnr(phantom, phantom) == float("inf")
    assert ssim(phantom, phantom) == pytest.approx(1.0)
    vol = np.random.default_rng(0).random((3, 32, 32))
    assert ssim(vol, vol) == pytest.approx(1.0)


@pytest.mark.parametrize("a", [0.5, 1.2])
def test_scaled_image(phantom, a):
    assert nrmse(a * phantom, phantom) == pytest.approx(abs(a - 1.0), rel=1e-6)
    mse = (a - 1.0) ** 2 * np.mean(phantom.astype(np.float64) ** 2)
    rng = float(phantom.max() - phantom.min())
    assert psnr(a * phantom, phantom) == pytest.approx(10 * np.log10(rng**2 / mse), rel=1e-6)
    assert psnr(a * phantom, phantom, data_range=2.0) == pytest.approx(10 * np.log10(4.0 / mse), rel=1e-6)


def test_masks_restrict_the_comparison():
    ref = np.ones((1, 8, 8))
    x = ref.copy()
    x[0, :4] = 3.0  # wrong only in the top half
    top = np.zeros(ref.shape, bool)
    top[0, :4] = True
    assert nrmse(x, ref, mask=~top) == 0.0
    assert nrmse(x, ref, mask=top) == pytest.approx(2.0)
    assert nrmse(x, ref) == pytest.approx(2.0 / np.sqrt(2.0))
    # data range from the reference inside the mask: a constant reference needs an explicit one
    with pytest.raises(ValueError, match="data_range"):
        psnr(x, ref)
    assert psnr(x, ref, data_range=1.0) == pytest.approx(10 * np.log10(1.0 / 2.0))


def test_ssim_matches_skimage_on_random_images():
    rng = np.random.default_rng(1)
    ref = rng.random((48, 40))
    for noise in (0.05, 0.3, 1.0):
        x = ref + noise * rng.standard_normal(ref.shape)
        assert ssim(x, ref, data_range=1.0) == pytest.approx(_skimage_ssim(x, ref, 1.0), abs=1e-10)


def test_ssim_matches_skimage_on_structured_images(phantom):
    ref = phantom[0].astype(np.float64)
    rng = np.random.default_rng(2)
    blurred = np.convolve(ref.ravel(), np.ones(5) / 5, mode="same").reshape(ref.shape)
    for x in (blurred, ref + 0.05 * rng.standard_normal(ref.shape), 0.7 * ref + 0.1):
        dr = float(ref.max() - ref.min())
        assert ssim(x, ref) == pytest.approx(_skimage_ssim(x, ref, dr), abs=1e-10)
        # with a mask: the mean of skimage's SSIM map over the mask
        mask = ref > 0.1
        _, smap = _skimage_ssim(x, ref, dr, full=True)
        assert ssim(x, ref, mask=mask, data_range=dr) == pytest.approx(smap[mask].mean(), abs=1e-10)
        assert np.allclose(ssim_map(x, ref, dr), smap)


def test_ssim_3d_is_the_mean_over_slices():
    rng = np.random.default_rng(3)
    ref = rng.random((4, 24, 24))
    x = ref + 0.2 * rng.standard_normal(ref.shape)
    per_slice = [_skimage_ssim(x[k], ref[k], 1.0) for k in range(4)]
    assert ssim(x, ref, data_range=1.0) == pytest.approx(np.mean(per_slice), abs=1e-10)


def test_ssim_decreases_with_noise(phantom):
    rng = np.random.default_rng(4)
    values = [ssim(phantom + s * rng.standard_normal(phantom.shape), phantom) for s in (0.01, 0.05, 0.2)]
    assert values[0] > values[1] > values[2] and values[0] < 1.0


def test_contrast_recovery_and_cov():
    ref = np.ones((1, 10, 10))
    lesion = np.zeros(ref.shape, bool)
    lesion[0, 2:4, 2:4] = True
    background = ~lesion
    ref[lesion] = 5.0
    assert contrast_recovery(ref, ref, lesion, background) == pytest.approx(1.0)
    x = np.ones(ref.shape)
    x[lesion] = 3.0
    assert contrast_recovery(x, ref, lesion, background) == pytest.approx(0.5)  # (3/1 - 1)/(5/1 - 1)
    cold = np.where(lesion, 0.5, 1.0)
    assert contrast_recovery(np.where(lesion, 0.75, 1.0), cold, lesion, background) == pytest.approx(0.5)
    y = np.ones((1, 2, 2))
    y[0, 0] = [1.0, 3.0]
    y[0, 1] = [1.0, 3.0]
    assert background_cov(y, np.ones(y.shape, bool)) == pytest.approx(0.5)  # std 1, mean 2
    with pytest.raises(ValueError, match="undefined"):
        contrast_recovery(x, np.ones(ref.shape), lesion, background)


def test_bias_variance_analytic():
    ref = np.arange(1.0, 7.0).reshape(1, 2, 3)
    c, s = 0.5, 0.2
    reals = np.stack([ref + c + s, ref + c - s])
    out = bias_variance(reals, ref)
    assert np.allclose(out["mean_map"], ref + c) and np.allclose(out["bias_map"], c)
    assert np.allclose(out["variance_map"], 2 * s**2) and np.allclose(out["std_map"], np.sqrt(2) * s)
    norm = np.linalg.norm(ref)
    assert out["bias"] == pytest.approx(c * np.sqrt(6) / norm)
    assert out["std"] == pytest.approx(np.sqrt(6 * 2 * s**2) / norm)
    assert out["mean_bias"] == pytest.approx(c) and out["mean_variance"] == pytest.approx(2 * s**2)
    assert out["n_realisations"] == 2
    mask = np.zeros(ref.shape, bool)
    mask[0, 0, :2] = True
    assert bias_variance(list(reals), ref, mask)["bias"] == pytest.approx(c * np.sqrt(2) / np.linalg.norm([1, 2]))
    with pytest.raises(ValueError, match="at least 2"):
        bias_variance(reals[:1], ref)


def test_torch_inputs_match_numpy(phantom):
    x = phantom * 1.1 + 0.01
    t, tr = torch.from_numpy(x), torch.from_numpy(phantom)
    assert nrmse(t, tr) == pytest.approx(nrmse(x, phantom))
    assert psnr(t, tr) == pytest.approx(psnr(x, phantom))
    assert ssim(t, tr) == pytest.approx(ssim(x, phantom))
    assert isinstance(ssim(t, tr), float)
    m = torch.from_numpy(phantom > 0.1)
    assert background_cov(t, m) == pytest.approx(background_cov(x, phantom > 0.1))
    assert bias_variance(torch.stack([t, tr]), tr)["n_realisations"] == 2


def test_clear_errors():
    a, b = np.ones((1, 16, 16)), np.ones((1, 16, 15))
    for fn in (nrmse, psnr, ssim):
        with pytest.raises(ValueError, match="shape"):
            fn(a, b)
    with pytest.raises(ValueError, match="shape"):
        contrast_recovery(a, b, a > 0, a > 0)
    with pytest.raises(ValueError, match="mask has shape"):
        nrmse(a, a, mask=np.ones((16, 16), bool))
    with pytest.raises(ValueError, match="no voxel"):
        nrmse(a, a, mask=np.zeros(a.shape, bool))
    with pytest.raises(ValueError, match="reference is zero"):
        nrmse(a, np.zeros(a.shape))
    with pytest.raises(ValueError, match=r"\(R, 1, 16, 16\)"):
        bias_variance(np.ones((3, 1, 16, 15)), a)
    with pytest.raises(ValueError, match="larger than"):
        ssim(np.ones((1, 8, 8)), np.ones((1, 8, 8)), data_range=1.0)
