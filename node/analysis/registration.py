"""Rigid registration of a prior series onto the current one (SimpleITK), in patient space.

Both volumes go to SimpleITK as images with their exact LPS geometry, resampled to a coarse
isotropic grid (registration needs the anatomy, not the detail; it keeps this to seconds on a
CPU). Mattes mutual information works across CT and MR and across contrast; a moments-based
start handles large shifts, then a multi-resolution gradient descent refines a 6-parameter
rigid (Euler) transform.

The result is a 4x4 matrix mapping prior patient coordinates to current patient coordinates,
what :func:`node.analysis.longitudinal.compare` needs to bring prior lesions into the current space.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np

GRID_MM = 4.0


def _image(volume: hd.Volume, clip: tuple[float, float] | None):
    import SimpleITK as sitk

    a = volume.array.astype(np.float32)
    if clip:
        a = np.clip(a, *clip)
    # highdicom's array is (slices, rows, cols) along affine columns 0, 1, 2; SimpleITK indexes
    # (x, y, z) = the reverse, so the direction/spacing columns are reversed as well
    img = sitk.GetImageFromArray(a)
    spacing = np.linalg.norm(volume.affine[:3, :3], axis=0)
    direction = volume.affine[:3, :3] / spacing
    img.SetSpacing([float(s) for s in spacing[::-1]])
    img.SetDirection([float(v) for v in direction[:, ::-1].ravel()])
    img.SetOrigin([float(v) for v in volume.affine[:3, 3]])
    # onto a coarse grid in the image's own orientation, with a blur against aliasing
    size = [max(8, int(round(n * s / GRID_MM))) for n, s in zip(img.GetSize(), img.GetSpacing(), strict=True)]
    sigma = [max(0.01, (GRID_MM - s) / 2) for s in img.GetSpacing()]  # ITK wants every sigma > 0
    img = sitk.SmoothingRecursiveGaussian(img, sigma)
    return sitk.Resample(
        img,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        img.GetOrigin(),
        [GRID_MM] * 3,
        img.GetDirection(),
        float(a.min()),
        sitk.sitkFloat32,
    )


def register_rigid(prior: hd.Volume, current: hd.Volume, modality: str = "CT") -> tuple[np.ndarray, float]:
    """4x4 prior->current patient transform and the final metric value (lower is better)."""
    import SimpleITK as sitk

    clip = (-1000.0, 1500.0) if modality == "CT" else None
    fixed, moving = _image(current, clip), _image(prior, clip)
    start = sitk.CenteredTransformInitializer(
        fixed, moving, sitk.Euler3DTransform(), sitk.CenteredTransformInitializerFilter.MOMENTS
    )
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.25, seed=1)  # a fixed seed: the same input gives the same result
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0, minStep=1e-3, numberOfIterations=200, relaxationFactor=0.6
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([2, 1])
    reg.SetSmoothingSigmasPerLevel([1.0, 0.0])
    reg.SetInitialTransform(start, inPlace=False)
    fitted = reg.Execute(fixed, moving)
    # SimpleITK's transform maps fixed (current) points to moving (prior) points: invert it
    euler = sitk.Euler3DTransform(sitk.CompositeTransform(fitted).GetNthTransform(0))
    m = np.eye(4)
    m[:3, :3] = np.asarray(euler.GetMatrix()).reshape(3, 3)
    center = np.asarray(euler.GetCenter())
    m[:3, 3] = np.asarray(euler.GetTranslation()) + center - m[:3, :3] @ center
    return np.linalg.inv(m), float(reg.GetMetricValue())
