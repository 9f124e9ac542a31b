"""Synthetic demo datasets: small BIDS trees shaped like the real ones the procedure used.

``write_demo_datasets(out)`` (CLI: ``sacrum-masks demo-data OUT``) writes five datasets and the true
sacrum masks::

    OUT/goldatlas/              sub-XX_T1w, sub-XX_T2w, sub-XX_CT  + derivatives/labels/..._CT_seg (TotalSegmentator v1)
    OUT/synthrad2023/           sub-XX_T1w, sub-XX_CT              + derivatives/labels/..._CT_seg (TotalSegmentator v2)
    OUT/mrspineseg/             sub-XX_T2w                         + derivatives/labels/..._T2w_seg (MRI multilabel)
    OUT/whole-spine/            sub-XX_T1w, sub-XX_T2w             (test dataset, images only)
    OUT/spider-challenge-2023/  sub-NNN[_ses-XX]_acq-lowresSag_T1w|T2w (test dataset, images only)
    OUT/truth/<dataset>/<sub-*/[ses-*/]anat>/<image stem>_label-sacrum_seg.nii.gz  (every MRI image)

Anatomy
-------
Each subject's anatomy is drawn analytically in millimetres and sampled at the voxel centres of each
grid (voxel index -> world through the grid's affine), so every grid of a subject (T1w, T2w, CT) sees the
same anatomy in the same world space: a CT label carried to an MRI grid through the affines lands on the
MRI's sacrum. World space is nibabel's RAS+ (x to the subject's right, y anterior, z superior); the
subject's *left* hip is at negative x. The anatomy, in a subject frame then rotated (tilt of up to 7 degrees
in the sagittal plane, 2-3 degrees otherwise), scaled (0.9-1.1) and shifted (up to 8 mm):

* body: an elliptic cylinder along z with a subcutaneous fat ring;
* sacrum: a curved wedge (a band along a circular arc, concave anteriorly, its tip curving forward),
  wide (alae) and thick at the top, tapering inferiorly; its upper quarter is "S1" for TotalSegmentator v2;
* lumbar column above it: L5, L4, L3, L2 vertebral bodies (elliptic cylinders, with pedicles, a posterior
  arch and a spinous process) and intervertebral discs between them (L5-S1 at the sacrum's top);
* spinal canal (CSF) behind the bodies, ending at the sacrum;
* hip bones: ellipsoids lateral to the sacrum, a few millimetres from it.

Contrasts: T1w (fat bright, bone marrow bright-ish, discs and CSF dark), T2w (CSF and discs bright),
CT in HU (bone +700 / +650 hips, discs 90, soft tissue 40, fat -100, air -1000). MRI gets partial volume
along thick slices (3 sub-samples), a slight blur, a smooth multiplicative bias field, a per-image gain
and Gaussian noise; CT gets Gaussian noise. MRI is float32, CT int16, labels uint8; qform and sform are set
(code 1) on every file. Truth masks are binary (voxel centre inside the sacrum, S1 included).

Layout of the default set (``demo_plan()`` gives it as rows; subject number n = index + 1)
------------------------------------------------------------------------------------------
* MRI orientation (nibabel axis codes) cycles RAS, LPS, PIR, LAS over subjects, starting at an offset per
  dataset (goldatlas 0, synthrad2023 1, mrspineseg 2, whole-spine 3, spider-challenge-2023 0); all MRI
  images of one subject share it. PIR is a sagittal storage order (axis 0 posterior, 1 inferior, 2 right).
* Thick sagittal slices (4 mm in x): subjects 3 and 6 of every dataset (index % 3 == 2).
* Oblique MRI grids (rotated 5 degrees about x and 3 about z): subject 4 of every dataset (index % 4 == 3).
* CT orientation: goldatlas LPS for odd subject numbers (01, 03, 05), RAS for even; synthrad2023 the
  opposite. Oblique CT grids (rotated 6 degrees about x, -4 about y): subjects 2 and 5 (index % 3 == 1).
* spider-challenge-2023: subjects sub-002 and sub-005 have two sessions (ses-01, ses-02: same anatomy,
  another position), the others none.

So by default::

    goldatlas     sub-01 RAS / CT LPS        synthrad2023  sub-01 LPS / CT RAS
                  sub-02 LPS / CT RAS obl                  sub-02 PIR / CT LPS obl
                  sub-03 PIR thick / CT LPS                sub-03 LAS thick / CT RAS
                  sub-04 LAS obl / CT RAS                  sub-04 RAS obl / CT LPS
                  sub-05 RAS / CT LPS obl                  sub-05 LPS / CT RAS obl
                  sub-06 LPS thick / CT RAS                sub-06 PIR thick / CT LPS
    mrspineseg    sub-01 PIR, 02 LAS, 03 RAS thick, 04 LPS obl, 05 PIR, 06 LAS thick
    whole-spine   sub-01 LAS, 02 RAS, 03 LPS thick, 04 PIR obl
    spider        sub-001 RAS, 002 LPS (ses-01, ses-02), 003 PIR thick, 004 LAS obl, 005 RAS (ses-01,
                  ses-02), 006 LPS thick

Determinism: every random draw comes from ``numpy.random.default_rng`` seeded with
``(seed, dataset, subject, purpose, ...)``, so identical arguments give identical files (nibabel writes
gzip without a time stamp or file name), and ``subjects=N`` gives the same first N subjects as the default.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import click
import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from . import __version__
from .errors import InputError
from .nifti import mask_like, save_nifti_atomic, write_json_atomic, write_text_atomic

# ----------------------------------------------------------------------------------------------------------
# structures (codes of the internal structure map) and look-up tables
# ----------------------------------------------------------------------------------------------------------
AIR, FAT, SOFT, CSF, SACRUM_S1, SACRUM, HIP_L, HIP_R = range(8)
VERTEBRAE = (8, 9, 10, 11)  # L5, L4, L3, L2
DISCS = (12, 13, 14, 15)  # L5-S1, L4-L5, L3-L4, L2-L3
N_STRUCTURES = 16
VERTEBRA_NAMES = ("L5", "L4", "L3", "L2")
DISC_NAMES = ("L5-S1", "L4-L5", "L3-L4", "L2-L3")


def _lut(default, pairs) -> np.ndarray:
    lut = np.full(N_STRUCTURES, default, dtype=np.float64)
    for codes, value in pairs:
        lut[list(np.atleast_1d(codes))] = value
    return lut


#: mean intensity of each structure (MRI: arbitrary units before gain; CT: HU)
CONTRAST_LUT = {
    "T1w": _lut(0, [(FAT, 900), (SOFT, 330), (CSF, 120), ((SACRUM_S1, SACRUM), 620), ((HIP_L, HIP_R), 580),
                    (VERTEBRAE, 600), (DISCS, 250)]),
    "T2w": _lut(0, [(FAT, 720), (SOFT, 240), (CSF, 1000), ((SACRUM_S1, SACRUM), 380), ((HIP_L, HIP_R), 350),
                    (VERTEBRAE, 400), (DISCS, 850)]),
    "CT": _lut(-1000, [(FAT, -100), (SOFT, 40), (CSF, 10), ((SACRUM_S1, SACRUM), 700), ((HIP_L, HIP_R), 650),
                       (VERTEBRAE, 700), (DISCS, 90)]),
}


@dataclass(frozen=True)
class LabelScheme:
    """How a label file numbers the structures (``values[code]``) and what its sidecar says."""

    order: str
    values: tuple[int, ...]
    names: dict[int, str]
    sacrum: tuple[int, ...]


def _scheme(order, mapping, sacrum):
    values = [0] * N_STRUCTURES
    names = {}
    for codes, value, name in mapping:
        for c in np.atleast_1d(codes):
            values[int(c)] = value
        names[value] = name
    return LabelScheme(order, tuple(values), dict(sorted(names.items())), tuple(sacrum))


#: TotalSegmentator v1 ("total", 104 classes): vertebrae_L5 18 ... L2 21, hip_left 90, hip_right 91, sacrum 92
TOTALSEG_V1 = _scheme("totalsegmentator-v1", [((SACRUM_S1, SACRUM), 92, "sacrum"), (HIP_L, 90, "hip_left"),
                                              (HIP_R, 91, "hip_right")]
                      + [(v, 18 + k, f"vertebrae_{n}") for k, (v, n) in enumerate(zip(VERTEBRAE, VERTEBRA_NAMES))],
                      [92])
#: TotalSegmentator v2 ("total", 117 classes): sacrum 25, vertebrae_S1 26, L5 27 ... L2 30, hips 77/78
TOTALSEG_V2 = _scheme("totalsegmentator-v2", [(SACRUM, 25, "sacrum"), (SACRUM_S1, 26, "vertebrae_S1"),
                                              (HIP_L, 77, "hip_left"), (HIP_R, 78, "hip_right")]
                      + [(v, 27 + k, f"vertebrae_{n}") for k, (v, n) in enumerate(zip(VERTEBRAE, VERTEBRA_NAMES))],
                      [25, 26])
#: MRSpineSeg-like MRI labels: sacrum 1, L5 2 ... L2 5, discs L5-S1 11 ... L2-L3 14
MRSPINESEG = _scheme("mrspineseg", [((SACRUM_S1, SACRUM), 1, "sacrum")]
                     + [(v, 2 + k, n) for k, (v, n) in enumerate(zip(VERTEBRAE, VERTEBRA_NAMES))]
                     + [(d, 11 + k, f"disc_{n}") for k, (d, n) in enumerate(zip(DISCS, DISC_NAMES))],
                     [1])


# ----------------------------------------------------------------------------------------------------------
# anatomy
# ----------------------------------------------------------------------------------------------------------
def _rot(axis: int, degrees: float) -> np.ndarray:
    a = np.deg2rad(degrees)
    c, s = np.cos(a), np.sin(a)
    i, j = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


@dataclass(frozen=True)
class Anatomy:
    """One subject's anatomy (subject frame, mm) and its pose in world space.

    ``world = rotation @ (scale * subject) + translation``. Subject frame: x right, y anterior, z superior;
    the sacrum's top (S1 endplate) is at y = 0, z = ``Z_TOP``.
    """

    scale: float
    radius: float  # sacral arc radius
    phi_top: float  # degrees
    phi_bottom: float  # degrees (negative: the tip curves anteriorly)
    half_width: float  # sacrum half-width at the top (alae)
    thickness: float  # sacrum antero-posterior thickness at the top
    vert_height: float
    disc_height: float
    body_ax: float
    body_ay: float
    fat: float
    hip_dx: float
    rotation: tuple  # 3x3 as nested tuples
    translation: tuple

    Z_TOP = 8.0

    @classmethod
    def draw(cls, rng: np.random.Generator) -> "Anatomy":
        """A random subject (sizes, curvature, position, tilt)."""
        u = rng.uniform
        half_width = u(42, 50)
        rotation = _rot(2, u(-3, 3)) @ _rot(1, u(-2, 2)) @ _rot(0, u(-7, 7))
        return cls(scale=u(0.9, 1.1), radius=u(50, 64), phi_top=25 + u(-4, 4), phi_bottom=-u(30, 38),
                   half_width=half_width, thickness=u(26, 32), vert_height=u(21, 25), disc_height=u(7, 10),
                   body_ax=u(100, 125), body_ay=u(62, 75), fat=u(8, 16), hip_dx=half_width + u(11, 14),
                   rotation=tuple(map(tuple, rotation)), translation=tuple(u(-8, 8, size=3)))

    def moved(self, rng: np.random.Generator) -> "Anatomy":
        """The same subject in another session: another position and tilt, same anatomy."""
        rotation = _rot(2, rng.uniform(-3, 3)) @ _rot(0, rng.uniform(-7, 7))
        return Anatomy(**{**self.__dict__, "rotation": tuple(map(tuple, rotation)),
                          "translation": tuple(rng.uniform(-8, 8, size=3))})

    def to_world(self, point_subject) -> np.ndarray:
        """World coordinates (mm) of a point given in the subject frame."""
        scaled = self.scale * np.asarray(point_subject, float)
        return np.asarray(self.rotation) @ scaled + np.asarray(self.translation)

    def structures(self, affine: np.ndarray, shape: tuple[int, int, int], offset=(0.0, 0.0, 0.0)) -> np.ndarray:
        """Structure codes (uint8) at the voxel centres (+ ``offset`` in voxels) of a grid."""
        rot = np.asarray(self.rotation)
        m = rot.T @ affine[:3, :3] / self.scale
        origin = affine[:3, :3] @ np.asarray(offset, float) + affine[:3, 3]
        b = rot.T @ (origin - np.asarray(self.translation)) / self.scale
        ijk = np.indices(shape, dtype=np.float32)
        x, y, z = (np.tensordot(m.astype(np.float32), ijk, axes=1) + b.astype(np.float32)[:, None, None, None])
        return self.structures_at(x, y, z)

    def structures_at(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Structure codes (uint8) at points given in the subject frame (mm).

        Later structures overwrite earlier ones: body < fat ring < hips < discs < vertebrae < CSF < sacrum.
        Each structure is evaluated only on the points of its bounding box.
        """
        shape = x.shape
        x, y, z = x.ravel(), y.ravel(), z.ravel()
        out = np.full(x.shape, AIR, dtype=np.uint8)
        # body and fat ring
        yb = 8.0
        out[(x / self.body_ax) ** 2 + ((y - yb) / self.body_ay) ** 2 <= 1] = FAT
        out[(x / (self.body_ax - self.fat)) ** 2 + ((y - yb) / (self.body_ay - self.fat)) ** 2 <= 1] = SOFT
        zt = self.Z_TOP

        def box(lo, hi):
            idx = np.flatnonzero((x >= lo[0]) & (x <= hi[0]) & (y >= lo[1]) & (y <= hi[1])
                                 & (z >= lo[2]) & (z <= hi[2]))
            return idx, x[idx], y[idx], z[idx]

        # hips
        for sign, code in ((-1, HIP_L), (1, HIP_R)):
            cx, cy, cz, a, b, c = sign * self.hip_dx, 4.0, zt - 20, 10.0, 30.0, 36.0
            idx, px, py, pz = box((cx - a, cy - b, cz - c), (cx + a, cy + b, cz + c))
            out[idx[((px - cx) / a) ** 2 + ((py - cy) / b) ** 2 + ((pz - cz) / c) ** 2 <= 1]] = code
        # lumbar column: discs, bodies, pedicles, arch, spinous process; spinal canal (CSF)
        rx, ry = 21.0 * self.thickness / 30, 15.0 * self.thickness / 30
        yc, rc = -ry - 8.0, 6.5
        idx, px, py, pz = box((-rx - 1, yc - 33, zt - 5), (rx + 1, ry + 1, np.inf))
        col = out[idx]
        rho2 = px ** 2 + (py - yc) ** 2
        cross = (px / rx) ** 2 + (py / ry) ** 2
        disc_cross = (px / (rx + 1)) ** 2 + (py / (ry + 1)) ** 2 <= 1
        for k in range(4):
            z0 = zt + self.disc_height + k * (self.vert_height + self.disc_height)
            col[(pz >= z0 - self.disc_height) & (pz < z0) & disc_cross] = DISCS[k]
            zin = (pz >= z0) & (pz <= z0 + self.vert_height)
            zarch = (pz >= z0 + 2) & (pz <= z0 + self.vert_height - 2)
            arch = zarch & (rho2 > rc ** 2) & (rho2 <= 10.5 ** 2) & (py <= yc + 3)
            pedicle = zarch & (np.abs(px) >= 4) & (np.abs(px) <= 9) & (py >= yc) & (py <= -ry + 2)
            spinous = ((pz >= z0 + 4) & (pz <= z0 + self.vert_height - 4) & (np.abs(px) <= 3.5)
                       & (py >= yc - 32) & (py <= yc - 8))
            col[(zin & (cross <= 1)) | arch | pedicle | spinous] = VERTEBRAE[k]
        col[(pz >= zt - 4) & (rho2 <= rc ** 2)] = CSF
        out[idx] = col
        # sacrum: band along a circular arc (centre anterior), clipped at the S1 endplate
        pt, pb = np.deg2rad(self.phi_top), np.deg2rad(self.phi_bottom)
        cy, cz = self.radius * np.cos(pt), zt - self.radius * np.sin(pt)
        reach = self.radius + self.thickness
        idx, px, py, pz = box((-self.half_width, cy - reach, cz - reach), (self.half_width, cy, zt))
        vy, vz = py - cy, pz - cz
        r = np.sqrt(vy ** 2 + vz ** 2)
        s = (pt - np.arctan2(vz, -vy)) / (pt - pb)
        sc = np.clip(s, 0, 1)
        w = self.half_width * (1 - 0.72 * sc)
        t = self.thickness * (1 - 0.5 * sc)
        sacrum = (s >= -0.3) & (s <= 1) & ((px / w) ** 2 + ((r - self.radius) / (t / 2)) ** 2 <= 1)
        out[idx[sacrum]] = SACRUM
        out[idx[sacrum & (s < 0.25)]] = SACRUM_S1
        return out.reshape(shape)


# ----------------------------------------------------------------------------------------------------------
# grids and rendering
# ----------------------------------------------------------------------------------------------------------
_AXIS = {"R": (0, 1), "L": (0, -1), "A": (1, 1), "P": (1, -1), "S": (2, 1), "I": (2, -1)}


def grid_affine(axcodes: str, spacing_xyz, shape_xyz, center, rotation=None) -> tuple[np.ndarray, tuple]:
    """Affine and shape of a grid stored in ``axcodes`` order, centred on ``center`` (world mm).

    ``spacing_xyz`` and ``shape_xyz`` are given per *world* axis (x, y, z) and permuted to the storage
    order; ``rotation`` (3x3) turns the whole grid (an oblique acquisition).

    >>> aff, shape = grid_affine("PIR", (4, 2, 2), (30, 64, 60), (0, 0, 0))
    >>> shape, nib.aff2axcodes(aff)
    ((64, 60, 30), ('P', 'I', 'R'))
    >>> np.allclose(aff @ [31.5, 29.5, 14.5, 1], [0, 0, 0, 1])
    True
    """
    axes = [_AXIS[c] for c in axcodes]
    if sorted(a for a, _ in axes) != [0, 1, 2]:
        raise ValueError(f"axis codes {axcodes!r} do not name three different axes")
    cols = np.zeros((3, 3))
    shape = []
    for j, (a, sign) in enumerate(axes):
        cols[a, j] = sign * spacing_xyz[a]
        shape.append(int(shape_xyz[a]))
    if rotation is not None:
        cols = np.asarray(rotation) @ cols
    aff = np.eye(4)
    aff[:3, :3] = cols
    aff[:3, 3] = np.asarray(center, float) - cols @ ((np.asarray(shape) - 1) / 2)
    return aff, tuple(shape)


def _image(data: np.ndarray, affine: np.ndarray, dtype) -> nib.Nifti1Image:
    img = nib.Nifti1Image(np.asarray(data, dtype=dtype), affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    img.set_data_dtype(dtype)
    return img


def render_mri(anatomy: Anatomy, affine: np.ndarray, shape, contrast: str, rng: np.random.Generator):
    """A synthetic MRI (float32) and its structure map (at voxel centres) on one grid.

    Partial volume: voxels thicker than 3 mm along an axis average 3 sub-samples along it.
    """
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    lut = CONTRAST_LUT[contrast]
    struct = anatomy.structures(affine, shape)
    thick = [j for j in range(3) if spacing[j] > 3]
    if thick:
        j = thick[0]
        acc = np.zeros(shape, np.float64)
        for f in (-1 / 3, 0.0, 1 / 3):
            off = np.zeros(3)
            off[j] = f
            acc += lut[struct if f == 0 else anatomy.structures(affine, shape, off)]
        data = acc / 3
    else:
        data = lut[struct]
    data = gaussian_filter(data, sigma=0.5)
    # smooth multiplicative bias field (low-order polynomial in world dm, centred) and a per-image gain
    axes = [np.arange(n, dtype=np.float32) - (n - 1) / 2 for n in shape]
    lin, quad = rng.normal(0, 0.3, 3), rng.normal(0, 0.2, 3)
    log_bias = np.zeros(shape, np.float32)
    for a in range(3):
        w = sum(np.float32(affine[a, j] / 100.0) * axes[j].reshape([-1 if d == j else 1 for d in range(3)])
                for j in range(3))
        log_bias += np.float32(lin[a]) * w + np.float32(quad[a]) * w * w
    gain = rng.uniform(0.7, 1.4)
    data = data * np.exp(log_bias) * gain + rng.normal(0, 20, shape)
    # whole numbers (still float32): smaller, faster to compress files, like scanner integer data
    return np.rint(np.abs(data)).astype(np.float32), struct


def render_ct(anatomy: Anatomy, affine: np.ndarray, shape, rng: np.random.Generator):
    """A synthetic CT (int16, HU) and its structure map on one grid."""
    struct = anatomy.structures(affine, shape)
    data = CONTRAST_LUT["CT"][struct] + rng.normal(0, 15, shape)
    return np.clip(np.rint(data), -1024, 3000).astype(np.int16), struct


def sacrum_truth(struct: np.ndarray) -> np.ndarray:
    """Binary uint8 sacrum mask (S1 included) from a structure map."""
    return np.isin(struct, (SACRUM, SACRUM_S1)).astype(np.uint8)


def label_map(struct: np.ndarray, scheme: LabelScheme) -> np.ndarray:
    """Multilabel uint8 map of a structure map in a label scheme's numbering."""
    return np.asarray(scheme.values, np.uint8)[struct]


# ----------------------------------------------------------------------------------------------------------
# datasets and subject plan
# ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DatasetSpec:
    name: str
    index: int  # part of the random seed
    default_subjects: int
    contrasts: tuple[str, ...]
    orient_offset: int
    ct_scheme: LabelScheme | None = None
    ct_first: str = "LPS"  # CT orientation of subject 01 (alternates with the other one)
    mri_scheme: LabelScheme | None = None
    sub_digits: int = 2
    acq: str | None = None
    sessions_for: tuple[int, ...] = ()  # subject indices with ses-01 and ses-02
    description: str = ""


DATASETS = (
    DatasetSpec("goldatlas", 0, 6, ("T1w", "T2w"), 0, ct_scheme=TOTALSEG_V1, ct_first="LPS",
                description="Gold Atlas-like pelvis MRI + CT; CT labels in TotalSegmentator v1 order"),
    DatasetSpec("synthrad2023", 1, 6, ("T1w",), 1, ct_scheme=TOTALSEG_V2, ct_first="RAS",
                description="SynthRAD2023-like pelvis MRI + CT; CT labels in TotalSegmentator v2 order"),
    DatasetSpec("mrspineseg", 2, 6, ("T2w",), 2, mri_scheme=MRSPINESEG,
                description="MRSpineSeg-like lumbar T2w MRI with multilabel masks (sacrum 1)"),
    DatasetSpec("whole-spine", 3, 4, ("T1w", "T2w"), 3, description="whole-spine-like test dataset (images only)"),
    DatasetSpec("spider-challenge-2023", 4, 6, ("T1w", "T2w"), 0, sub_digits=3, acq="lowresSag",
                sessions_for=(1, 4), description="SPIDER-like lumbar test dataset (images only)"),
)
MRI_ORIENTATIONS = ("RAS", "LPS", "PIR", "LAS")
MRI_OBLIQUE = _rot(2, 3) @ _rot(0, 5)
CT_OBLIQUE = _rot(1, -4) @ _rot(0, 6)
MRI_FOV = (120.0, 115.0, 140.0)  # mm, world x, y, z
CT_FOV = (170.0, 160.0, 150.0)


def _rng(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), *map(int, keys)])


def demo_plan(subjects: int | None = None) -> list[dict]:
    """One row per image of the demo set: dataset, subject, session, contrast, axcodes, thick, oblique.

    Orientation and obliquity depend only on the subject index (see the module docstring), not on the seed.
    """
    rows = []
    for spec in DATASETS:
        for i in range(spec.default_subjects if subjects is None else subjects):
            sub = f"{i + 1:0{spec.sub_digits}d}"
            sessions = ("01", "02") if i in spec.sessions_for else (None,)
            for ses in sessions:
                for c in spec.contrasts:
                    rows.append(dict(dataset=spec.name, subject=sub, session=ses, contrast=c,
                                     axcodes=MRI_ORIENTATIONS[(i + spec.orient_offset) % 4],
                                     thick=i % 3 == 2, oblique=i % 4 == 3))
                if spec.ct_scheme is not None:
                    other = "RAS" if spec.ct_first == "LPS" else "LPS"
                    rows.append(dict(dataset=spec.name, subject=sub, session=ses, contrast="CT",
                                     axcodes=spec.ct_first if i % 2 == 0 else other, thick=False,
                                     oblique=i % 3 == 1))
    return rows


def _bids_name(spec: DatasetSpec, sub: str, ses: str | None, suffix: str) -> tuple[str, str]:
    """(folder relative to the dataset, file stem) of one image."""
    parts = [f"sub-{sub}"] + ([f"ses-{ses}"] if ses else []) + ([f"acq-{spec.acq}"] if spec.acq else []) + [suffix]
    folder = f"sub-{sub}/" + (f"ses-{ses}/" if ses else "") + "anat"
    return folder, "_".join(parts)


def _mri_grid(rng, anatomy: Anatomy, row: dict):
    u = rng.uniform
    inplane = round(u(1.7, 2.1), 2)
    sx = 4.0 if row["thick"] else round(u(2.2, 2.8), 2)
    spacing = (sx, inplane, inplane)
    shape = tuple(int(round(f / s)) for f, s in zip(MRI_FOV, spacing))
    center = anatomy.to_world((0.0, -10.0, -10.0)) + u(-5, 5, size=3)
    return grid_affine(row["axcodes"], spacing, shape, center, MRI_OBLIQUE if row["oblique"] else None)


def _ct_grid(rng, anatomy: Anatomy, row: dict):
    u = rng.uniform
    sxy = round(u(1.5, 1.9), 2)
    spacing = (sxy, sxy, round(u(2.0, 3.0), 1))
    shape = tuple(int(round(f / s)) for f, s in zip(CT_FOV, spacing))
    center = anatomy.to_world((0.0, 5.0, -12.0)) + u(-8, 8, size=3)
    return grid_affine(row["axcodes"], spacing, shape, center, CT_OBLIQUE if row["oblique"] else None)


def _perturbed_header(img: nib.Nifti1Image, data: np.ndarray, rng) -> nib.Nifti1Image:
    """A label image on ``img``'s grid whose qform and sform translations differ by 1e-4..9e-3 mm."""
    aff = img.affine
    out = nib.Nifti1Image(data, aff)
    for setter in (out.set_qform, out.set_sform):
        shifted = aff.copy()
        shifted[:3, 3] += rng.choice([-1, 1], 3) * rng.uniform(1e-4, 9e-3, 3)
        setter(shifted, code=1)
    out.header.set_xyzt_units("mm", "sec")
    out.set_data_dtype(np.uint8)
    return out


def _generated_by():
    return [{"Name": "sacrum-masks demo-data", "Version": __version__,
             "Description": "synthetic data (sacrum_masks.synth)"}]


def _label_sidecar(scheme: LabelScheme, seed: int) -> dict:
    return {"LabelOrder": scheme.order, "SacrumIndices": list(scheme.sacrum),
            "Labels": {str(k): v for k, v in scheme.names.items()},
            "Description": "synthetic label map (sacrum-masks demo-data)", "Seed": seed}


TRUTH_README = """\
True sacrum masks of the synthetic demo datasets (sacrum-masks demo-data, seed {seed}).

truth/<dataset>/<sub-*/[ses-*/]anat>/<image stem>_label-sacrum_seg.nii.gz is, for every MRI image of every
dataset, the binary (uint8, 0/1) mask of the voxels whose centre lies inside the drawn sacrum (S1 included),
on the image's own grid (same shape and affine). They are for evaluation only and are kept outside the BIDS
datasets on purpose: the training datasets get their labels from CT (goldatlas, synthrad2023) or from
their own multilabel masks (mrspineseg); the test datasets (whole-spine, spider-challenge-2023) have none.
"""


def write_demo_datasets(out: str | Path, seed: int = 0, subjects: int | None = None) -> dict[str, Path]:
    """Write the five synthetic BIDS datasets and their true sacrum masks under ``out``.

    Parameters
    ----------
    out : path-like
        Destination folder (created; existing files with the same names are replaced).
    seed : int
        Seed of every random draw: same arguments, same bytes.
    subjects : int, optional
        Subjects per dataset; default 6 (goldatlas, synthrad2023, mrspineseg, spider-challenge-2023) and
        4 (whole-spine). The first N subjects are the same whatever N.

    Returns
    -------
    dict
        Dataset name -> dataset folder. The truth masks are under ``out / "truth"``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(out, "exists and is not a folder")
    if subjects is not None and subjects < 1:
        raise InputError("--subjects", f"must be at least 1 (got {subjects})")
    plan = demo_plan(subjects)
    folders = {}
    for spec in DATASETS:
        root = out / spec.name
        folders[spec.name] = root
        write_json_atomic({"Name": f"{spec.name} (synthetic demo)", "BIDSVersion": "1.9.0", "DatasetType": "raw",
                           "Description": spec.description, "GeneratedBy": _generated_by(), "Seed": seed},
                          root / "dataset_description.json")
        # as the real datasets do: a README, and CT (not a BIDS 1.x anat suffix) declared in .bidsignore,
        # so the BIDS validator passes the demo (docs/DESIGN.md, "Derivatives")
        write_text_atomic(f"# {spec.name} (synthetic demo)\n\n{spec.description}\n", root / "README")
        write_text_atomic("*_CT.nii.gz\n*_CT.json\n", root / ".bidsignore")
        if spec.ct_scheme or spec.mri_scheme:
            labels = root / "derivatives" / "labels"
            write_json_atomic({"Name": f"{spec.name} labels (synthetic demo)", "BIDSVersion": "1.9.0",
                               "DatasetType": "derivative", "GeneratedBy": _generated_by()},
                              labels / "dataset_description.json")
            write_text_atomic(f"# {spec.name} labels (synthetic demo)\n\nSacrum labels (NeuroPoly names `*_seg`, "
                              "declared in .bidsignore).\n", labels / "README")
            write_text_atomic("*_seg.nii.gz\n*_seg.json\n", labels / ".bidsignore")
        rows = [r for r in plan if r["dataset"] == spec.name]
        subs = sorted({r["subject"] for r in rows})
        for sub in subs:
            i = int(sub) - 1
            base = Anatomy.draw(_rng(seed, spec.index, i, 0))
            for ses in sorted({r["session"] or "" for r in rows if r["subject"] == sub}):
                ses = ses or None
                anatomy = base if ses in (None, "01") else base.moved(_rng(seed, spec.index, i, 1, int(ses)))
                for k, row in enumerate(r for r in rows if r["subject"] == sub and r["session"] == ses):
                    rng = _rng(seed, spec.index, i, 2, int(ses or 0), k)
                    folder, stem = _bids_name(spec, sub, ses, row["contrast"])
                    if row["contrast"] == "CT":
                        aff, shape = _ct_grid(rng, anatomy, row)
                        data, struct = render_ct(anatomy, aff, shape, rng)
                        save_nifti_atomic(_image(data, aff, np.int16), root / folder / f"{stem}.nii.gz")
                        lab_dir = root / "derivatives" / "labels" / folder
                        save_nifti_atomic(_image(label_map(struct, spec.ct_scheme), aff, np.uint8),
                                          lab_dir / f"{stem}_seg.nii.gz")
                        write_json_atomic(_label_sidecar(spec.ct_scheme, seed), lab_dir / f"{stem}_seg.json")
                        continue
                    aff, shape = _mri_grid(rng, anatomy, row)
                    data, struct = render_mri(anatomy, aff, shape, row["contrast"], rng)
                    img = _image(data, aff, np.float32)
                    save_nifti_atomic(img, root / folder / f"{stem}.nii.gz")
                    save_nifti_atomic(mask_like(sacrum_truth(struct), img),
                                      out / "truth" / spec.name / folder / f"{stem}_label-sacrum_seg.nii.gz")
                    if spec.mri_scheme is not None:
                        lab_dir = root / "derivatives" / "labels" / folder
                        save_nifti_atomic(_perturbed_header(img, label_map(struct, spec.mri_scheme), rng),
                                          lab_dir / f"{stem}_seg.nii.gz")
                        write_json_atomic(_label_sidecar(spec.mri_scheme, seed), lab_dir / f"{stem}_seg.json")
    (out / "truth").mkdir(parents=True, exist_ok=True)
    readme = out / "truth" / "README"
    tmp = readme.with_name(".README.tmp")
    tmp.write_text(TRUTH_README.format(seed=seed), encoding="utf-8")
    tmp.replace(readme)
    return folders


@click.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every random draw.")
@click.option("--subjects", type=click.IntRange(min=1), default=None,
              help="Subjects per dataset (default: 6, whole-spine 4).")
def demo_data_command(out: Path, seed: int, subjects: int | None):
    """Write synthetic demo BIDS datasets (and their true sacrum masks under OUT/truth)."""
    start = time.perf_counter()
    folders = write_demo_datasets(out, seed=seed, subjects=subjects)
    for name, folder in folders.items():
        n_mri = sum(1 for p in folder.glob("sub-*/**/anat/*.nii.gz") if "_CT" not in p.name)
        n_ct = sum(1 for p in folder.glob("sub-*/**/anat/*_CT.nii.gz"))
        click.echo(f"{name}: {n_mri} MRI" + (f", {n_ct} CT" if n_ct else "") + f" -> {folder}")
    click.echo(f"truth masks -> {out / 'truth'} ({time.perf_counter() - start:.1f} s)")
