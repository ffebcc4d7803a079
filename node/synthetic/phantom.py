"""Synthetic CT/MR torso phantoms with known ground truth.

A phantom is an analytic object in patient coordinates (DICOM LPS, mm): an
elliptic body with a fat rim, lungs, liver, spleen, kidneys, a spine and a
few spherical lesions. Because it is analytic it can be sampled on *any*
grid (axial, sagittal, oblique, any spacing), which is what lets the tests
prove that geometry handling is exact: the same phantom stored in many ways
must give the same segmentation in patient coordinates.

The phantom serves three users: training the reference model (sampled
directly on the model grid), the tests, and the demo (written as DICOM by
:mod:`node.synthetic.dicom`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Ground-truth organ labels; the reference model's organ head uses the same indices.
ORGANS: dict[int, str] = {1: "liver", 2: "spleen", 3: "kidney", 4: "lung", 5: "bone"}
_FAT, _SOFT = 6, 7  # tissue classes that are not segmented
# A structure the reference model was never taught (only phantoms made with ``aorta=True`` have it):
# what a department teaches the node with its own labels (``pacs-node heads train``).
AORTA = 8

# (CT HU, MR arbitrary units) per tissue class; 0 is air.
_TISSUE_VALUES: dict[int, tuple[float, float]] = {
    0: (-1000.0, 0.0),
    1: (60.0, 520.0),
    2: (100.0, 380.0),
    3: (170.0, 430.0),
    4: (-850.0, 40.0),
    5: (650.0, 160.0),
    _FAT: (-100.0, 900.0),
    _SOFT: (40.0, 300.0),
    AORTA: (260.0, 820.0),  # contrast-enhanced (arterial phase) CT; bright blood on MR
}


@dataclass(frozen=True)
class Ellipsoid:
    center: tuple[float, float, float]
    radii: tuple[float, float, float]

    def contains(self, p: np.ndarray) -> np.ndarray:
        d = (p - np.asarray(self.center)) / np.asarray(self.radii)
        return np.einsum("ij,ij->i", d, d) <= 1.0


@dataclass(frozen=True)
class Lesion:
    center: tuple[float, float, float]
    radius_mm: float
    host: int  # organ label the lesion sits in
    ct_value: float  # HU
    mr_value: float  # arbitrary units before the per-study gain

    @property
    def diameter_mm(self) -> float:
        return 2.0 * self.radius_mm


@dataclass(frozen=True)
class Phantom:
    """One synthetic patient. Build with :meth:`random`; sample with :meth:`sample`."""

    body_axes: tuple[float, float]  # semi-axes of the elliptic body in x and y (mm)
    z_extent: tuple[float, float]  # body from .. to (mm, patient z)
    organs: tuple[tuple[int, Ellipsoid], ...]
    spine_center: tuple[float, float]
    spine_radius: float
    lesions: tuple[Lesion, ...] = field(default=())
    fat_rim_mm: float = 12.0
    aorta: tuple[float, float, float] | None = None  # centre x, y and radius (mm) of a tube along z

    @classmethod
    def random(cls, seed: int, *, n_lesions: int | None = None, aorta: bool = False) -> Phantom:
        """``aorta``: add a descending aorta in front of the spine, left of the midline; drawn from its
        own generator, so every other structure is the same as the phantom's without it."""
        rng = np.random.default_rng(seed)

        def jitter(c, r, dc=8.0, dr=0.15):
            c = tuple(float(v + rng.uniform(-dc, dc)) for v in c)
            r = tuple(float(v * rng.uniform(1 - dr, 1 + dr)) for v in r)
            return Ellipsoid(c, r)

        ax = float(rng.uniform(140, 175))
        ay = float(rng.uniform(100, 125))
        organs = (
            (4, jitter((-75, -5, 85), (55, 60, 85))),  # right lung
            (4, jitter((75, -5, 85), (50, 60, 85))),  # left lung
            (1, jitter((-55, -10, -20), (75, 62, 55))),  # liver (patient right = -x)
            (2, jitter((80, 30, -10), (30, 35, 45))),  # spleen
            (3, jitter((-62, 55, -75), (24, 26, 45))),  # kidneys
            (3, jitter((62, 55, -75), (24, 26, 45))),
        )
        n = int(rng.integers(0, 5)) if n_lesions is None else n_lesions
        lesions = []
        for _ in range(n):
            host, e = organs[int(rng.choice([0, 1, 2, 2, 2, 4]))]
            radius = float(rng.uniform(4.0, 14.0))
            # a centre deep enough inside the host organ that the sphere stays mostly in it
            for _try in range(50):
                u = rng.normal(size=3)
                u *= rng.uniform(0, 0.6) / np.linalg.norm(u)
                c = np.asarray(e.center) + u * np.asarray(e.radii)
                if all(
                    np.linalg.norm(c - np.asarray(les.center)) > radius + les.radius_mm + 4 for les in lesions
                ):
                    break
            if host == 4:  # lung nodule: solid tissue in air
                ct, mr = float(rng.uniform(10, 60)), float(rng.uniform(250, 450))
            else:  # hypo- or hyper-dense/intense with at least 35 HU contrast
                sign = rng.choice([-1.0, 1.0], p=[0.7, 0.3])
                base_ct, base_mr = _TISSUE_VALUES[host]
                ct = base_ct + sign * float(rng.uniform(35, 70))
                mr = base_mr * (1 + sign * float(rng.uniform(0.35, 0.6)))
            lesions.append(Lesion(tuple(float(v) for v in c), radius, host, ct, mr))
        spine_center = (float(rng.uniform(-4, 4)), float(ay - rng.uniform(25, 35)))
        spine_radius = float(rng.uniform(14, 20))
        tube = None
        if aorta:
            a = np.random.default_rng([seed, 8])
            radius = float(a.uniform(9, 14))
            gap = float(a.uniform(2, 6))  # between the aorta's wall and the vertebra
            tube = (
                float(spine_center[0] + a.uniform(12, 22)),
                spine_center[1] - spine_radius - radius - gap,
                radius,
            )
        return cls(
            body_axes=(ax, ay),
            z_extent=(-170.0, 170.0),
            organs=organs,
            spine_center=spine_center,
            spine_radius=spine_radius,
            lesions=tuple(lesions),
            aorta=tube,
        )

    # -- ground truth -------------------------------------------------------
    def labels(self, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tissue class and lesion index (1-based, 0 = none) at LPS points (N, 3)."""
        x, y, z = points[:, 0], points[:, 1], points[:, 2]
        ax, ay = self.body_axes
        inz = (z >= self.z_extent[0]) & (z <= self.z_extent[1])
        r = (x / ax) ** 2 + (y / ay) ** 2
        tissue = np.zeros(len(points), np.uint8)
        tissue[inz & (r <= 1.0)] = _FAT
        inner = 1.0 - self.fat_rim_mm / min(ax, ay)
        tissue[inz & (r <= inner**2)] = _SOFT
        body = tissue == _SOFT
        for label, e in self.organs:
            tissue[body & e.contains(points)] = label
        sx, sy = self.spine_center
        tissue[inz & (((x - sx) ** 2 + (y - sy) ** 2) <= self.spine_radius**2)] = 5
        if self.aorta is not None:  # drawn over the organs it passes, as a vessel displaces them
            cx, cy, r = self.aorta
            tissue[(tissue != 0) & (((x - cx) ** 2 + (y - cy) ** 2) <= r**2)] = AORTA
        lesion = np.zeros(len(points), np.uint8)
        for i, les in enumerate(self.lesions, start=1):
            d = points - np.asarray(les.center)
            inside = np.einsum("ij,ij->i", d, d) <= les.radius_mm**2
            lesion[inside & (tissue == les.host)] = i
        return tissue, lesion

    def values(self, tissue: np.ndarray, lesion: np.ndarray, modality: str) -> np.ndarray:
        """Noise-free intensities (HU for CT, arbitrary units for MR)."""
        col = 0 if modality == "CT" else 1
        lut = np.zeros(max(_TISSUE_VALUES) + 1, np.float32)
        for k, v in _TISSUE_VALUES.items():
            lut[k] = v[col]
        out = lut[tissue]
        for i, les in enumerate(self.lesions, start=1):
            out[lesion == i] = les.ct_value if modality == "CT" else les.mr_value
        return out

    # -- sampling -----------------------------------------------------------
    def sample(
        self,
        affine: np.ndarray,
        shape: tuple[int, int, int],
        modality: str = "CT",
        *,
        noise: float = 12.0,
        seed: int = 0,
        mr_gain: float = 1.0,
    ) -> SampledPhantom:
        """Sample on a grid given by a 4x4 index->LPS affine (highdicom convention).

        ``noise`` is the Gaussian sigma in HU for CT, or a fraction of the soft
        tissue value for MR (x 0.01). MR also gets a smooth bias field.
        """
        rng = np.random.default_rng(seed)
        n0, n1, n2 = shape
        jj, kk = np.meshgrid(np.arange(n1), np.arange(n2), indexing="ij")
        plane = np.stack([np.zeros(jj.size), jj.ravel(), kk.ravel(), np.ones(jj.size)])
        image = np.empty(shape, np.float32)
        tissue = np.empty(shape, np.uint8)
        lesion = np.empty(shape, np.uint8)
        for i in range(n0):
            plane[0] = i
            pts = (affine @ plane)[:3].T
            t, les = self.labels(pts)
            v = self.values(t, les, modality)
            if modality == "CT":
                v = v + rng.normal(0.0, noise, v.shape).astype(np.float32)
            else:
                bias = 1.0 + 0.15 * np.tanh(pts[:, 1] / 150.0) + 0.1 * np.tanh(pts[:, 2] / 200.0)
                v = v * bias * mr_gain
                v = np.abs(v + rng.normal(0.0, noise * 3.0 * mr_gain, v.shape)).astype(np.float32)
            image[i] = v.reshape(n1, n2)
            tissue[i] = t.reshape(n1, n2)
            lesion[i] = les.reshape(n1, n2)
        return SampledPhantom(image=image, tissue=tissue, lesion=lesion)


@dataclass
class SampledPhantom:
    image: np.ndarray  # float32, modality units
    tissue: np.ndarray  # uint8 tissue class (organ labels 1..5, 6 fat, 7 soft tissue, 8 aorta)
    lesion: np.ndarray  # uint8 lesion index, 0 = none

    @property
    def organs(self) -> np.ndarray:
        """Organ label map as the model's organ head sees it (fat/soft tissue -> 0)."""
        return np.where(self.tissue <= max(ORGANS), self.tissue, 0).astype(np.uint8)


def axial_affine(
    shape: tuple[int, int, int],
    pixel_spacing: float,
    slice_spacing: float,
    z_center: float = 0.0,
) -> np.ndarray:
    """Index->LPS affine of a standard axial stack centred on the body.

    Array axes are (slice, row, column); rows run anterior->posterior, columns
    right->left, slices head->feet (highdicom's 'FPL' orientation).
    """
    n0, n1, n2 = shape
    a = np.eye(4)
    a[:3, 0] = (0, 0, -slice_spacing)
    a[:3, 1] = (0, pixel_spacing, 0)
    a[:3, 2] = (pixel_spacing, 0, 0)
    a[:3, 3] = (
        -pixel_spacing * (n2 - 1) / 2,
        -pixel_spacing * (n1 - 1) / 2,
        z_center + slice_spacing * (n0 - 1) / 2,
    )
    return a


def rotated(affine: np.ndarray, shape: tuple[int, int, int], about_x: float, about_y: float) -> np.ndarray:
    """The grid of ``affine`` rotated about its own centre (first about patient x, then y)."""
    ax, ay = np.radians(about_x), np.radians(about_y)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rot = ry @ rx
    centre = affine @ np.array([*((np.array(shape) - 1) / 2.0), 1.0])
    out = np.eye(4)
    out[:3, :3] = rot @ affine[:3, :3]
    out[:3, 3] = centre[:3] - out[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return out
