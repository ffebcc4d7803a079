"""Draw a Grayscale Softcopy Presentation State over its source image, as a viewer would, into a PNG.

Used for README screenshots and to check our GSPS by eye: OHIF does not display
GSPS, and DCMTK's dcmp2pgm ignores its graphics. Deliberately small, and honest
about what it leaves out.

Applied: the grayscale pipeline (PS3.4 N.2): Modality LUT, VOI LUT (window or
table), Presentation LUT shape; then graphic objects (POINT, POLYLINE,
INTERPOLATED drawn as a polyline, CIRCLE, ELLIPSE) and text objects in PIXEL or
DISPLAY units, coloured by their line/text style, else their layer's
recommended colour, else yellow. Not applied: spatial transformation
(rotation, flip), zoom and displayed-area cropping, shutters, overlays, masks.

Coordinates (PS3.3 C.10.5, Graphic Annotation Units): PIXEL values are
(column, row) with sub-pixel resolution, the top left corner of the top left
pixel at 0.0\\0.0, its bottom right corner at 1.0\\1.0 and the bottom right
corner of the image at Columns\\Rows. So the centre of pixel (row r, column c)
is (c + 0.5, r + 0.5), and a point (x, y) lies in pixel (floor(y), floor(x)).

Where the presentation state leaves a step out, the standard says identity
(PS3.4 N.2); like most viewers this renderer falls back to the image's own
Modality LUT and window instead, then to the frame's min/max.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut

from node.errors import InputError

Frame = tuple[str, int | None]  # (SOP Instance UID, 1-based frame number or None)
RGB = tuple[int, int, int]
_YELLOW: RGB = (255, 255, 0)


def annotated_images(gsps: Dataset) -> list[Frame]:
    """(SOP Instance UID, frame number or None) of every image that carries graphics or text, in order."""
    return _keys(gsps, ("GraphicObjectSequence", "TextObjectSequence"))


def render(gsps: Dataset, image: Dataset, frame: int | None = None, scale: int = 2) -> Image.Image:
    """``image`` (frame ``frame`` of a multi-frame one) as ``gsps`` presents it, ``scale`` times larger, RGB.

    Each source pixel becomes a ``scale`` x ``scale`` block (no interpolation, so what is
    shown is what is stored); the upsampling is what leaves room for legible labels.
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, not {scale}")
    if int(image.get("SamplesPerPixel", 1)) != 1:
        raise ValueError(f"image {image.SOPInstanceUID} is not grayscale; a GSPS applies to grayscale images")
    uid = str(image.SOPInstanceUID)
    n_frames = int(image.get("NumberOfFrames", 1) or 1)
    if frame is None and n_frames > 1:
        frame = next((f for u, f in annotated_images(gsps) if u == uid and f is not None), 1)
    if frame is not None and not 1 <= frame <= n_frames:
        raise ValueError(f"frame {frame} is out of range for image {uid} ({n_frames} frames)")

    grey = np.round(_grey(gsps, image, frame) * 255.0).astype(np.uint8)
    grey = np.repeat(np.repeat(grey, scale, axis=0), scale, axis=1)
    canvas = Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    draw = ImageDraw.Draw(canvas)
    to_pixel = _unit_mappers(gsps, image, uid, frame)
    colours = _layer_colours(gsps)
    order = _layer_order(gsps)
    anns = [a for a in gsps.get("GraphicAnnotationSequence", []) if _applies(a, uid, frame)]
    # lower Graphic Layer Order is drawn first (underneath); text above graphics within a layer
    for ann in sorted(anns, key=lambda a: order.get(str(a.get("GraphicLayer", "")), 0)):
        layer_colour = colours.get(str(ann.get("GraphicLayer", "")), _YELLOW)
        for obj in ann.get("GraphicObjectSequence", []):
            _draw_graphic(draw, obj, to_pixel, scale, _style_colour(obj, "LineStyleSequence", layer_colour))
        for obj in ann.get("TextObjectSequence", []):
            _draw_text(draw, obj, to_pixel, scale, _style_colour(obj, "TextStyleSequence", layer_colour))
    return canvas


def render_to_png(
    gsps_path: Path, source_dir: Path, out_png: Path, sop_instance_uid: str | None = None
) -> Path:
    """Render ``gsps_path`` over its image found under ``source_dir`` into ``out_png``.

    Without ``sop_instance_uid`` the first annotated image that carries a label (text
    object) is shown, else the first annotated image: the slice a reader would look at.
    """
    gsps_path, source_dir, out_png = Path(gsps_path), Path(source_dir), Path(out_png)
    gsps = _read(gsps_path)
    targets = annotated_images(gsps)
    if not targets:
        raise InputError(f"{gsps_path}: no graphic annotations to render (is it a presentation state?)")
    if sop_instance_uid is None:
        labels = _keys(gsps, ("TextObjectSequence",))
        uid, frame = ([k for k in targets if k in labels] or targets)[0]
    else:
        uid = sop_instance_uid
        frames = [f for u, f in targets if u == uid]
        if not frames and uid not in _all_images(gsps):
            raise InputError(f"{gsps_path}: image {uid} is not referenced by this presentation state")
        frame = frames[0] if frames else None
    path = _find_image(source_dir, uid)
    if path is None:
        raise InputError(f"{gsps_path}: its image {uid} is not among the DICOM files under {source_dir}")
    image = _read(path)
    if "PixelData" not in image or int(image.get("SamplesPerPixel", 1)) != 1:
        raise InputError(f"{path}: not a grayscale image, so a GSPS cannot be shown over it")
    out_png.parent.mkdir(parents=True, exist_ok=True)
    render(gsps, image, frame).save(out_png, format="PNG")
    return out_png


# -- references -----------------------------------------------------------------------------------


def _as_list(value) -> list:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else [value]


def _image_refs(item: Dataset) -> list[tuple[str, list[int]]]:
    """(SOP Instance UID, frame numbers; empty = all frames) of an item's Referenced Image Sequence."""
    return [
        (str(ref.ReferencedSOPInstanceUID), [int(f) for f in _as_list(ref.get("ReferencedFrameNumber"))])
        for ref in item.get("ReferencedImageSequence", [])
    ]


def _all_images(gsps: Dataset) -> list[str]:
    """Every image the presentation state applies to (Presentation State Relationship Module)."""
    return [
        str(ref.ReferencedSOPInstanceUID)
        for series in gsps.get("ReferencedSeriesSequence", [])
        for ref in series.get("ReferencedImageSequence", [])
    ]


def _applies(item: Dataset, uid: str, frame: int | None) -> bool:
    """Whether an item with an optional Referenced Image Sequence applies to this image and frame.

    Without the sequence it applies to all images of the presentation state (it is Type 1C).
    """
    refs = _image_refs(item)
    return not refs or any(u == uid and (not frames or (frame or 1) in frames) for u, frames in refs)


def _keys(gsps: Dataset, kinds: tuple[str, ...]) -> list[Frame]:
    """The images and frames of the Graphic Annotation items that hold any of ``kinds``, in order."""
    out: list[Frame] = []
    for ann in gsps.get("GraphicAnnotationSequence", []):
        if not any(ann.get(kind) for kind in kinds):
            continue
        for uid, frames in _image_refs(ann) or [(uid, []) for uid in _all_images(gsps)]:
            for key in [(uid, f) for f in frames] or [(uid, None)]:
                if key not in out:
                    out.append(key)
    return out


def _find_image(source_dir: Path, uid: str) -> Path | None:
    if not source_dir.is_dir():
        raise InputError(f"{source_dir}: not a folder")
    for path in sorted(p for p in source_dir.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue  # not DICOM: source folders hold other files too
        if str(ds.get("SOPInstanceUID", "")) == uid:
            return path
    return None


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except (InvalidDicomError, OSError, ValueError, EOFError) as e:
        raise InputError(f"{path}: not a DICOM file ({type(e).__name__})") from None


# -- grayscale pipeline ---------------------------------------------------------------------------


def _frame_item(image: Dataset, frame: int | None, sequence: str) -> Dataset | None:
    """The ``sequence`` functional group of a multi-frame image's frame (per-frame, then shared)."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in image:
        groups.append(image.PerFrameFunctionalGroupsSequence[frame - 1])
    if "SharedFunctionalGroupsSequence" in image:
        groups.append(image.SharedFunctionalGroupsSequence[0])
    for group in groups:
        if group.get(sequence):
            return group[sequence][0]
    return None


def _grey(gsps: Dataset, image: Dataset, frame: int | None) -> np.ndarray:
    """The frame after Modality, VOI and Presentation LUT, as floats in [0, 1]."""
    pixels = image.pixel_array
    if int(image.get("NumberOfFrames", 1) or 1) > 1:
        pixels = pixels[(frame or 1) - 1]
    values = _modality(gsps, image, frame, pixels.astype(np.float64))
    out = _voi(gsps, image, frame, values)
    shape = str(gsps.get("PresentationLUTShape", ""))
    if shape == "INVERSE" or (not shape and image.get("PhotometricInterpretation") == "MONOCHROME1"):
        out = 1.0 - out
    return out


def _modality(gsps: Dataset, image: Dataset, frame: int | None, stored: np.ndarray) -> np.ndarray:
    # The presentation state's Modality LUT replaces the image's (PS3.4 N.2.1.1)
    if "ModalityLUTSequence" in gsps or "RescaleSlope" in gsps:
        return np.asarray(apply_modality_lut(stored, gsps), np.float64)
    source = image
    if "ModalityLUTSequence" not in image:  # enhanced multi-frame: the frame's own rescale
        source = _frame_item(image, frame, "PixelValueTransformationSequence") or image
    return np.asarray(apply_modality_lut(stored, source), np.float64)


def _voi(gsps: Dataset, image: Dataset, frame: int | None, values: np.ndarray) -> np.ndarray:
    uid = str(image.SOPInstanceUID)
    for item in gsps.get("SoftcopyVOILUTSequence", []):
        if _applies(item, uid, frame):
            return _apply_voi_item(item, values)
    own = _frame_item(image, frame, "FrameVOILUTSequence") or image
    if "WindowCenter" in own or "VOILUTSequence" in own:
        return _apply_voi_item(own, values)
    lo, hi = float(values.min()), float(values.max())
    return (values - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _apply_voi_item(item: Dataset, x: np.ndarray) -> np.ndarray:
    """Window (LINEAR, LINEAR_EXACT, SIGMOID; PS3.3 C.11.2.1.2) or LUT table, the first one, to [0, 1]."""
    if "WindowCenter" in item and "WindowWidth" in item:
        c = float(_as_list(item.WindowCenter)[0])
        w = float(_as_list(item.WindowWidth)[0])
        function = str(item.get("VOILUTFunction", "LINEAR") or "LINEAR")
        if function == "SIGMOID":
            return 1.0 / (1.0 + np.exp(-4.0 * (x - c) / w))
        if function == "LINEAR_EXACT":
            return np.clip((x - c) / w + 0.5, 0.0, 1.0)
        lo, hi = c - 0.5 - (w - 1.0) / 2.0, c - 0.5 + (w - 1.0) / 2.0
        ramp = (x - (c - 0.5)) / max(w - 1.0, 1e-9) + 0.5
        return np.where(x <= lo, 0.0, np.where(x > hi, 1.0, np.clip(ramp, 0.0, 1.0)))
    lut = item.VOILUTSequence[0]
    n, first, bits = (int(v) for v in lut.LUTDescriptor)
    data = lut.LUTData
    table = np.frombuffer(data, "<u2") if isinstance(data, bytes) else np.asarray(_as_list(data))
    table = table[: n or 65536].astype(np.float64)
    index = np.clip(np.round(x) - first, 0, len(table) - 1).astype(np.int64)
    return table[index] / float(2**bits - 1)


# -- graphics -------------------------------------------------------------------------------------


def _lab(value) -> RGB:
    """A DICOM CIELab triplet (L*·65535/100, (a*+128)·65535/255, (b*+128)·65535/255) as sRGB."""
    return hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in value)).to_rgb(clip=True)


def _layer_colours(gsps: Dataset) -> dict[str, RGB]:
    out = {}
    for layer in gsps.get("GraphicLayerSequence", []):
        if "GraphicLayerRecommendedDisplayCIELabValue" in layer:
            out[str(layer.GraphicLayer)] = _lab(layer.GraphicLayerRecommendedDisplayCIELabValue)
        elif "GraphicLayerRecommendedDisplayGrayscaleValue" in layer:
            g = round(int(layer.GraphicLayerRecommendedDisplayGrayscaleValue) * 255 / 65535)
            out[str(layer.GraphicLayer)] = (g, g, g)
    return out


def _layer_order(gsps: Dataset) -> dict[str, int]:
    return {
        str(x.GraphicLayer): int(x.get("GraphicLayerOrder", 0)) for x in gsps.get("GraphicLayerSequence", [])
    }


def _style_colour(obj: Dataset, sequence: str, default: RGB) -> RGB:
    attr = "PatternOnColorCIELabValue" if sequence == "LineStyleSequence" else "TextColorCIELabValue"
    style = obj.get(sequence)
    return _lab(style[0].get(attr)) if style and attr in style[0] else default


def _unit_mappers(gsps: Dataset, image: Dataset, uid: str, frame: int | None) -> dict[str, np.ndarray]:
    """Per unit, (origin, size) in PIXEL coordinates: PIXEL is itself; DISPLAY is a fraction of the
    displayed area, whose corners are 1-based pixel indices (TLHC 1\\1 starts at coordinate 0.0)."""
    area = (np.zeros(2), np.array([int(image.Columns), int(image.Rows)], float))
    for item in gsps.get("DisplayedAreaSelectionSequence", []):
        if _applies(item, uid, frame) and "DisplayedAreaTopLeftHandCorner" in item:
            tl = np.array([float(v) for v in item.DisplayedAreaTopLeftHandCorner])
            br = np.array([float(v) for v in item.DisplayedAreaBottomRightHandCorner])
            area = (tl - 1.0, br - tl + 1.0)
            break
    return {"PIXEL": np.stack([np.zeros(2), np.ones(2)]), "DISPLAY": np.stack(area)}


def _points(data, units: str, to_pixel: dict[str, np.ndarray], scale: int) -> np.ndarray:
    """(column, row) pairs in ``units`` -> continuous canvas coordinates (PIXEL coordinates x scale)."""
    origin, size = to_pixel.get(str(units), to_pixel["PIXEL"])
    return (origin + np.asarray(_as_list(data), float).reshape(-1, 2) * size) * scale


def _width(scale: int) -> int:
    return max(1, (scale // 2) | 1)  # odd, so a line is centred on the pixel it passes through


def _xy(points: np.ndarray, width: int) -> list[tuple[float, float]]:
    """Continuous canvas coordinates -> what Pillow draws at.

    Pillow's 1-pixel lines truncate, so a point u lands in pixel floor(u), the one that
    contains it; wider lines and fills put pixel i's centre at i, hence u - 0.5.
    """
    pts = np.floor(points) if width == 1 else points - 0.5
    return [(float(x), float(y)) for x, y in pts]


def _draw_graphic(
    draw: ImageDraw.ImageDraw, obj: Dataset, to_pixel: dict[str, np.ndarray], scale: int, colour: RGB
) -> None:
    kind = str(obj.get("GraphicType", ""))
    pts = _points(obj.get("GraphicData"), obj.get("GraphicAnnotationUnits", "PIXEL"), to_pixel, scale)
    if not len(pts):
        return
    width = _width(scale)
    filled = obj.get("GraphicFilled") == "Y"
    if kind == "POINT":
        arm = max(2, scale)
        for cx, cy in np.floor(pts):  # a cross centred on the pixel that holds the point
            draw.line([(cx - arm, cy), (cx + arm, cy)], fill=colour, width=1)
            draw.line([(cx, cy - arm), (cx, cy + arm)], fill=colour, width=1)
        return
    if kind in ("POLYLINE", "INTERPOLATED"):  # INTERPOLATED: the curve through the points, shown as lines
        closed = len(pts) > 2 and np.array_equal(pts[0], pts[-1])
        outline = pts
    elif kind == "CIRCLE" and len(pts) >= 2:
        outline, closed = _ellipse(pts[0], pts[1] - pts[0], np.linalg.norm(pts[1] - pts[0])), True
    elif kind == "ELLIPSE" and len(pts) >= 4:
        outline, closed = (
            _ellipse((pts[0] + pts[1]) / 2, (pts[1] - pts[0]) / 2, np.linalg.norm(pts[3] - pts[2]) / 2),
            True,
        )
    else:
        return
    if filled and closed:
        draw.polygon(_xy(outline, 3), fill=colour)
    if len(outline) == 1:
        draw.point(_xy(outline, 1), fill=colour)
    else:
        draw.line(_xy(outline, width), fill=colour, width=width, joint="curve" if width > 1 else None)


def _ellipse(centre: np.ndarray, major: np.ndarray, minor_length: float, n: int = 72) -> np.ndarray:
    """Closed polygon of an ellipse given its centre, semi-major axis vector and semi-minor length."""
    length = float(np.linalg.norm(major))
    minor = np.array([-major[1], major[0]]) / length * minor_length if length else np.zeros(2)
    t = np.linspace(0.0, 2.0 * np.pi, n + 1)
    return centre + np.outer(np.cos(t), major) + np.outer(np.sin(t), minor)


def _font(scale: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=max(10, 6 * scale))
    except TypeError:  # Pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _draw_text(
    draw: ImageDraw.ImageDraw, obj: Dataset, to_pixel: dict[str, np.ndarray], scale: int, colour: RGB
) -> None:
    text = str(obj.get("UnformattedTextValue", "")).replace("\r\n", "\n")
    if not text:
        return
    font = _font(scale)
    stroke = 1  # a dark rim: legible on bright and dark tissue alike
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font, stroke_width=stroke)
    w, h = right - left, bottom - top
    width, height = draw.im.size
    if "BoundingBoxTopLeftHandCorner" in obj:
        units = obj.get("BoundingBoxAnnotationUnits", "PIXEL")
        (x0, y0), (x1, _) = _points(
            [*obj.BoundingBoxTopLeftHandCorner, *obj.BoundingBoxBottomRightHandCorner], units, to_pixel, scale
        )
        justify = str(obj.get("BoundingBoxTextHorizontalJustification", "LEFT"))
        x = {"RIGHT": x1 - w, "CENTER": (x0 + x1 - w) / 2}.get(justify, x0)
        y, anchor = y0, None
    elif "AnchorPoint" in obj:
        ((ax, ay),) = _points(
            obj.AnchorPoint, obj.get("AnchorPointAnnotationUnits", "PIXEL"), to_pixel, scale
        )
        gap = 3 * scale  # above and to the right of the anchor, clear of what it points at
        x, y, anchor = ax + gap, ay - gap - h, (ax, ay)
    else:
        return
    x = float(np.clip(x, 1, max(1, width - w - 1)))
    y = float(np.clip(y, 1, max(1, height - h - 1)))
    if anchor is not None and obj.get("AnchorPointVisibility") == "Y":
        corner = (x, y + h) if anchor[1] >= y + h else (x, y)  # the box corner nearest the anchor's row
        draw.line(_xy(np.array([anchor, corner]), 1), fill=colour, width=1)
    draw.multiline_text(
        (x - left, y - top), text, font=font, fill=colour, stroke_width=stroke, stroke_fill=(0, 0, 0)
    )
