"""Procedurally drawn scenes for the synthetic dense-caption data set.

The project has no model hub and no GPU in CI, so it draws its own images. They are small and made of
flat shapes, yet a tiny vision model still has to *look* at the pixels to caption them: every object
class has its own shape and colour family, while the position, size, count and shade of each object
and the background vary from image to image.

Two kinds of scene carry the telecom use case:

* ``indoor``: a telecom equipment room, the fine-tuning domain (racks, BBUs, cables, patch panels,
  labels);
* ``outdoor``: a cell site seen from outside, out of domain and used to measure forgetting (sky,
  lattice towers, antennas, trees, buildings).

Three more families, all out of domain, widen the world the base model knows, so forgetting can be
measured on scenes that share nothing with the domain (``field`` is meant to be held out as far-OOD):

* ``kitchen``: a tiled kitchen over a chequered floor (fridges, stoves, cupboards, tables, kettles);
* ``street``: a city street under a blue sky (cars, buildings, lamp posts, traffic lights, trees);
* ``field``: a pasture under the sky (cows, fences, haystacks, flowers, the sun).

Every canonical object name is a key of the shipped object lexicon, so captions of any family are
scored by the same CHAIR / recall metrics.

All geometry is a fraction of the image side, so any side from ``MIN_IMAGE_SIZE`` to
``MAX_IMAGE_SIZE`` pixels works. Boxes are pixel *edge* coordinates ``(x1, y1, x2, y2)``: an object
that covers pixel columns 10 to 19 has ``x1 = 10`` and ``x2 = 20``. That is the convention of
``PIL.Image.getbbox`` and it turns normalisation to Qwen-VL's 0..1000 grid into a plain rescale.

Every random choice comes from the ``numpy.random.Generator`` passed in, so a scene is a pure
function of that generator's state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

INDOOR = "indoor"
OUTDOOR = "outdoor"
KITCHEN = "kitchen"
STREET = "street"
FIELD = "field"
SCENE_KINDS = (INDOOR, OUTDOOR, KITCHEN, STREET, FIELD)

INDOOR_OBJECTS = ("rack", "bbu", "cable", "patch_panel", "label")
OUTDOOR_OBJECTS = ("tower", "antenna", "tree", "sky", "building")
KITCHEN_OBJECTS = ("fridge", "stove", "cupboard", "table", "kettle")
STREET_OBJECTS = ("vehicle", "building", "pole", "traffic_light", "tree", "sky")
FIELD_OBJECTS = ("cow", "fence", "haystack", "flower", "sun", "sky")
OBJECTS_BY_KIND = {
    INDOOR: INDOOR_OBJECTS,
    OUTDOOR: OUTDOOR_OBJECTS,
    KITCHEN: KITCHEN_OBJECTS,
    STREET: STREET_OBJECTS,
    FIELD: FIELD_OBJECTS,
}

# Below 64 px the smallest parts (LEDs, patch-panel ports) vanish; above 1024 px a 2-pixel object
# could round to a zero-width box on the 0..1000 grid.
MIN_IMAGE_SIZE = 64
MAX_IMAGE_SIZE = 1024

# Smallest side, in pixels, an object must keep after clipping to the image to be listed at all.
MIN_OBJECT_SIDE = 2

Colour = tuple[int, int, int]
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class SceneObject:
    """One annotated object: its canonical class name and its pixel box (edge coordinates)."""

    name: str
    box: Box


@dataclass
class Scene:
    """A drawn image together with the ground truth of what was drawn on it."""

    kind: str
    image: Image.Image
    objects: list[SceneObject]

    @property
    def size(self) -> int:
        return self.image.width


# --------------------------------------------------------------------------------------------------
# Small helpers shared by all scene kinds
# --------------------------------------------------------------------------------------------------


def _jitter(rng: np.random.Generator, colour: Colour, spread: int) -> Colour:
    """Return ``colour`` with every channel moved by up to ``spread`` levels: the per-image shade."""
    shifted = np.asarray(colour) + rng.integers(-spread, spread + 1, size=3)
    return tuple(int(c) for c in np.clip(shifted, 0, 255))


def _darker(colour: Colour, amount: int) -> Colour:
    return tuple(max(0, c - amount) for c in colour)


def _lighter(colour: Colour, amount: int) -> Colour:
    return tuple(min(255, c + amount) for c in colour)


def _blend(a: Colour, b: Colour, t: float) -> Colour:
    return tuple(int(round(x + (y - x) * t)) for x, y in zip(a, b, strict=True))


def _frac(rng: np.random.Generator, size: int, low: float, high: float) -> int:
    """A random length between ``low`` and ``high`` times the image side, at least one pixel."""
    return max(1, int(round(size * rng.uniform(low, high))))


def _pick_count(rng: np.random.Generator, weights: Sequence[float]) -> int:
    """Draw a count ``k`` with probability ``weights[k]`` (weights need not sum to one)."""
    p = np.asarray(weights, dtype=float)
    return int(rng.choice(len(p), p=p / p.sum()))


def _claim_span(
    rng: np.random.Generator,
    length: int,
    low: int,
    high: int,
    taken: list[tuple[int, int]],
    gap: int,
    tries: int = 40,
) -> tuple[int, int] | None:
    """Find a free interval ``[start, start + length)`` inside ``[low, high)``.

    The interval keeps ``gap`` pixels away from every interval already in ``taken`` and is appended
    to it. Objects laid out this way never overlap, which keeps counts and boxes unambiguous. Returns
    None when no free place turns up, in which case the caller simply draws one object fewer.
    """
    if length <= 0 or high - low < length:
        return None
    for _ in range(tries):
        start = int(rng.integers(low, high - length + 1))
        end = start + length
        if all(end + gap <= a or start >= b + gap for a, b in taken):
            taken.append((start, end))
            return start, end
    return None


def _boxes_overlap(a: Box, b: Box, margin: int = 0) -> bool:
    return not (
        a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]
    )


class _Canvas:
    """An RGB image, its drawing context and the list of annotated objects drawn so far."""

    def __init__(self, size: int, background: Colour) -> None:
        self.size = size
        self.image = Image.new("RGB", (size, size), background)
        self.draw = ImageDraw.Draw(self.image)
        self.objects: list[SceneObject] = []

    def clip(self, box: Sequence[float]) -> Box:
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        return (max(0, x1), max(0, y1), min(self.size, x2), min(self.size, y2))

    def annotate(self, name: str, box: Sequence[float]) -> Box | None:
        """Record an object; returns its clipped box, or None if too little of it is in view."""
        clipped = self.clip(box)
        if clipped[2] - clipped[0] < MIN_OBJECT_SIDE or clipped[3] - clipped[1] < MIN_OBJECT_SIDE:
            return None
        self.objects.append(SceneObject(name, clipped))
        return clipped

    def fill_box(self, box: Box, fill: Colour, outline: Colour | None = None) -> None:
        """Fill the pixels covered by an edge-coordinate box (PIL rectangles include their end)."""
        x1, y1, x2, y2 = box
        self.draw.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill, outline=outline)

    def paint_mask(self, mask: Image.Image, colour: Colour) -> Box | None:
        """Paint ``colour`` through an L-mode mask and return the mask's exact pixel box."""
        self.image.paste(colour, (0, 0), mask)
        return mask.getbbox()

    def new_mask(self) -> tuple[Image.Image, ImageDraw.ImageDraw]:
        mask = Image.new("L", (self.size, self.size), 0)
        return mask, ImageDraw.Draw(mask)


def _bezier(start: tuple[float, float], control: tuple[float, float], end: tuple[float, float], steps: int):
    """Points along a quadratic Bezier curve: how a slack cable hangs between two ends."""
    t = np.linspace(0.0, 1.0, steps)[:, None]
    p0, p1, p2 = (np.asarray(p, dtype=float) for p in (start, control, end))
    curve = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2
    return [(float(x), float(y)) for x, y in curve]


# --------------------------------------------------------------------------------------------------
# Indoor: telecom equipment room
# --------------------------------------------------------------------------------------------------

CABLE_COLOURS: tuple[Colour, ...] = (
    (235, 200, 30),  # yellow fibre
    (240, 130, 30),  # orange multimode fibre
    (40, 110, 230),  # blue patch cord
    (220, 45, 45),  # red
    (50, 175, 70),  # green
    (150, 70, 200),  # purple
)
LED_COLOURS: tuple[Colour, ...] = ((40, 220, 70), (245, 170, 20), (60, 200, 255))


@dataclass
class _RackLayout:
    box: Box
    inner_left: int
    inner_right: int
    header: Box  # strip at the top of the rack where a label can go


def _draw_room(rng: np.random.Generator, canvas: _Canvas) -> int:
    """Grey wall with panel seams above a darker tiled floor; returns the y of the skirting line."""
    s = canvas.size
    wall_grey = int(rng.integers(150, 206))
    wall = _jitter(rng, (wall_grey, wall_grey, wall_grey), 8)
    floor_grey = int(rng.integers(90, 136))
    floor = _jitter(rng, (floor_grey + 6, floor_grey, floor_grey - 8), 8)
    floor_y = _frac(rng, s, 0.74, 0.86)

    canvas.fill_box((0, 0, s, floor_y), wall)
    seam = _darker(wall, 14)
    panel_width = _frac(rng, s, 0.18, 0.34)
    x = int(rng.integers(0, panel_width))
    while x < s:
        canvas.draw.line((x, 0, x, floor_y), fill=seam, width=1)
        x += panel_width

    canvas.fill_box((0, floor_y, s, s), floor)
    tile_line = _darker(floor, 12)
    tile = _frac(rng, s, 0.08, 0.14)
    y = floor_y + int(rng.integers(1, tile + 1))
    while y < s:
        canvas.draw.line((0, y, s, y), fill=tile_line, width=1)
        y += tile
    canvas.draw.line((0, floor_y, s, floor_y), fill=_darker(wall, 60), width=max(1, s // 96))
    return floor_y


def _draw_rack(rng: np.random.Generator, canvas: _Canvas, box: Box) -> _RackLayout:
    """A tall dark cabinet: lighter mounting posts left and right, an empty header strip on top."""
    s = canvas.size
    body = _jitter(rng, (34, 36, 44), 12)
    canvas.fill_box(box, body, outline=_darker(body, 20))
    post = max(2, round(s * 0.018))
    post_colour = _lighter(body, 28)
    x1, y1, x2, y2 = box
    canvas.fill_box((x1 + 1, y1 + 1, x1 + 1 + post, y2 - 1), post_colour)
    canvas.fill_box((x2 - 1 - post, y1 + 1, x2 - 1, y2 - 1), post_colour)
    header_bottom = y1 + max(4, round(s * 0.055))
    canvas.draw.line((x1 + 1, header_bottom, x2 - 2, header_bottom), fill=_lighter(body, 16), width=1)
    return _RackLayout(
        box, x1 + 1 + post, x2 - 1 - post, (x1 + 1 + post, y1 + 1, x2 - 1 - post, header_bottom)
    )


def _draw_bbu(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A silver baseband unit: status LEDs on the left, a dark vent grille on the right."""
    s = canvas.size
    shell = _jitter(rng, (188, 190, 196), 18)
    canvas.fill_box(box, shell, outline=_darker(shell, 60))
    x1, y1, x2, y2 = box
    led = max(1, round(s * 0.014))
    n_leds = int(rng.integers(2, 5))
    led_y = (y1 + y2) // 2 - led // 2
    for i in range(n_leds):
        lx = x1 + 2 + i * (led + max(1, led // 2 + 1))
        if lx + led >= (x1 + x2) // 2:
            break
        colour = LED_COLOURS[int(rng.integers(len(LED_COLOURS)))]
        canvas.fill_box((lx, led_y, lx + led, led_y + led), colour)
    grille_colour = _darker(shell, 80)
    for gx in range(x2 - 3, (x1 + x2) // 2 + 2, -max(2, round(s * 0.012))):
        canvas.draw.line((gx, y1 + 2, gx, y2 - 3), fill=grille_colour, width=1)


def _draw_patch_panel(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A thin mid-grey strip carrying an evenly spaced row of light port dots."""
    s = canvas.size
    strip = _jitter(rng, (100, 102, 108), 12)
    canvas.fill_box(box, strip, outline=_darker(strip, 40))
    x1, y1, x2, y2 = box
    port = max(1, round(s * 0.012))
    pitch = port + max(1, round(s * 0.012))
    port_colour = _jitter(rng, (225, 228, 232), 10)
    cy = (y1 + y2) // 2
    for px in range(x1 + 2, x2 - port - 1, pitch):
        canvas.draw.ellipse((px, cy - port // 2, px + port, cy - port // 2 + port), fill=port_colour)


def _draw_label(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A small white sticker with one or two dark strokes standing for printed text."""
    paper = _jitter(rng, (246, 246, 240), 8)
    canvas.fill_box(box, paper, outline=_darker(paper, 50))
    x1, y1, x2, y2 = box
    ink = _jitter(rng, (40, 40, 50), 10)
    lines = 1 if y2 - y1 < 7 else 2
    for i in range(lines):
        ly = y1 + (i + 1) * (y2 - y1) // (lines + 1)
        end = x2 - 2 - int(rng.integers(0, max(1, (x2 - x1) // 3)))
        canvas.draw.line((x1 + 2, ly, max(x1 + 3, end), ly), fill=ink, width=1)


def _fill_rack(rng: np.random.Generator, canvas: _Canvas, rack: _RackLayout) -> list[Box]:
    """Mount a random mix of BBUs and patch panels in a rack; returns the boxes of the units."""
    s = canvas.size
    top = rack.header[3] + 2
    bottom = rack.box[3] - max(2, round(s * 0.03))
    units = ["bbu"] * _pick_count(rng, (0.25, 0.45, 0.3)) + ["patch_panel"] * _pick_count(
        rng, (0.5, 0.4, 0.1)
    )
    rng.shuffle(units)
    taken: list[tuple[int, int]] = []
    boxes = []
    for name in units:
        height = _frac(rng, s, 0.05, 0.07) if name == "bbu" else _frac(rng, s, 0.026, 0.036)
        span = _claim_span(rng, height, top, bottom, taken, gap=2)
        if span is None:
            continue
        box = (rack.inner_left + 1, span[0], rack.inner_right - 1, span[1])
        if name == "bbu":
            _draw_bbu(rng, canvas, box)
        else:
            _draw_patch_panel(rng, canvas, box)
        if canvas.annotate(name, box) is not None:
            boxes.append(box)
    return boxes


def _draw_cable(
    rng: np.random.Generator,
    canvas: _Canvas,
    start: tuple[float, float],
    end: tuple[float, float],
    control: tuple[float, float],
) -> None:
    """Draw a cable as a thick Bezier curve and annotate it with the exact box of its pixels."""
    s = canvas.size
    mask, mask_draw = canvas.new_mask()
    mask_draw.line(
        _bezier(start, control, end, steps=18), fill=255, width=max(2, round(s / 80)), joint="curve"
    )
    colour = _jitter(rng, CABLE_COLOURS[int(rng.integers(len(CABLE_COLOURS)))], 20)
    box = canvas.paint_mask(mask, colour)
    if box is not None:
        canvas.annotate("cable", box)


def _route_cable(
    rng: np.random.Generator, canvas: _Canvas, units: list[Box], floor_y: int
) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """Choose where a cable runs: unit to unit, unit up to the ceiling tray, or along the wall."""
    s = canvas.size
    margin = 2.0

    def port(box: Box) -> tuple[float, float]:
        x = rng.uniform(box[0] + 2, box[2] - 2)
        return (x, (box[1] + box[3]) / 2)

    route = rng.choice(["link", "ceiling"]) if len(units) >= 2 else ("ceiling" if units else "wall")
    if route == "link":
        a, b = rng.choice(len(units), size=2, replace=False)
        start, end = port(units[int(a)]), port(units[int(b)])
        sag = max(start[1], end[1]) + s * rng.uniform(0.05, 0.2)
        control = ((start[0] + end[0]) / 2 + s * rng.uniform(-0.1, 0.1), min(s - margin, sag))
    elif route == "ceiling":
        start = port(units[int(rng.integers(len(units)))])
        end = (float(np.clip(start[0] + s * rng.uniform(-0.3, 0.3), margin, s - margin)), 0.0)
        control = ((start[0] + end[0]) / 2 + s * rng.uniform(-0.15, 0.15), start[1] * rng.uniform(0.2, 0.7))
    else:
        start = (s * rng.uniform(0.05, 0.95), 0.0)
        end = (s * rng.uniform(0.05, 0.95), floor_y + s * rng.uniform(0.0, 0.08))
        control = (s * rng.uniform(0.0, 1.0), (start[1] + end[1]) / 2)
    control = (float(np.clip(control[0], margin, s - margin)), float(np.clip(control[1], 0, s - margin)))
    return start, end, control


def draw_indoor_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw a telecom equipment room with a random subset of racks, BBUs, cables, panels and labels.

    Racks stand on the floor and hold the BBUs and patch panels; labels sit on rack headers or on the
    wall; cables are drawn last so they hang in front of the equipment, as they do in real rooms.
    """
    s = size
    canvas = _Canvas(s, (0, 0, 0))
    floor_y = _draw_room(rng, canvas)

    racks: list[_RackLayout] = []
    spans: list[tuple[int, int]] = []
    for _ in range(_pick_count(rng, (0.08, 0.32, 0.38, 0.22))):
        width = _frac(rng, s, 0.18, 0.26)
        span = _claim_span(rng, width, round(s * 0.03), round(s * 0.97), spans, gap=round(s * 0.03))
        if span is None:
            continue
        top = _frac(rng, s, 0.06, 0.3)
        bottom = min(s - 1, floor_y + _frac(rng, s, 0.02, 0.07))
        rack = _draw_rack(rng, canvas, (span[0], top, span[1], bottom))
        canvas.annotate("rack", rack.box)
        racks.append(rack)

    units: list[Box] = []
    for rack in racks:
        units.extend(_fill_rack(rng, canvas, rack))

    # A rack-less corner may still have a wall-mounted patch panel.
    if not racks and rng.random() < 0.7:
        width = _frac(rng, s, 0.22, 0.4)
        x1 = int(rng.integers(round(s * 0.05), s - width - round(s * 0.05)))
        y1 = int(rng.integers(round(s * 0.2), round(floor_y * 0.7)))
        box = (x1, y1, x1 + width, y1 + _frac(rng, s, 0.03, 0.04))
        _draw_patch_panel(rng, canvas, box)
        canvas.annotate("patch_panel", box)
        units.append(box)

    occupied = [rack.box for rack in racks] + units
    free_headers = list(racks)
    for _ in range(_pick_count(rng, (0.35, 0.4, 0.2, 0.05))):
        width, height = _frac(rng, s, 0.07, 0.11), _frac(rng, s, 0.03, 0.045)
        if free_headers and rng.random() < 0.7:
            rack = free_headers.pop(int(rng.integers(len(free_headers))))
            hx1, hy1, hx2, hy2 = rack.header
            width, height = min(width, hx2 - hx1 - 2), min(height, hy2 - hy1 - 1)
            x1 = int(rng.integers(hx1 + 1, max(hx1 + 2, hx2 - width)))
            box = (x1, hy1 + 1, x1 + width, hy1 + 1 + height)
        else:
            x1 = int(rng.integers(2, s - width - 2))
            y1 = int(rng.integers(2, max(3, floor_y - height - 4)))
            box = (x1, y1, x1 + width, y1 + height)
            if any(_boxes_overlap(box, other, margin=2) for other in occupied):
                continue
        _draw_label(rng, canvas, box)
        canvas.annotate("label", box)
        occupied.append(box)

    for _ in range(_pick_count(rng, (0.25, 0.35, 0.25, 0.15))):
        _draw_cable(rng, canvas, *_route_cable(rng, canvas, units, floor_y))

    return Scene(INDOOR, canvas.image, canvas.objects)


# --------------------------------------------------------------------------------------------------
# Outdoor: cell site under the sky
# --------------------------------------------------------------------------------------------------

GROUND_COLOURS: tuple[Colour, ...] = ((88, 150, 70), (160, 150, 100), (128, 128, 124))
BUILDING_COLOURS: tuple[Colour, ...] = ((205, 188, 150), (165, 82, 62), (152, 152, 158), (222, 212, 196))
STEEL_COLOURS: tuple[Colour, ...] = ((130, 134, 140), (200, 60, 50))


def _draw_sky(rng: np.random.Generator, canvas: _Canvas, horizon: int) -> None:
    """Vertical blue gradient, deep at the top and pale at the horizon, with a few soft clouds."""
    top = _jitter(rng, (60, 120, 215), 22)
    bottom = _jitter(rng, (170, 205, 240), 14)
    for y in range(horizon):
        canvas.draw.line((0, y, canvas.size, y), fill=_blend(top, bottom, y / max(1, horizon - 1)))
    s = canvas.size
    cloud = _jitter(rng, (245, 246, 250), 6)
    for _ in range(_pick_count(rng, (0.4, 0.35, 0.25))):
        cx, cy = s * rng.uniform(0.05, 0.95), horizon * rng.uniform(0.1, 0.6)
        for _puff in range(3):
            rx, ry = s * rng.uniform(0.04, 0.08), s * rng.uniform(0.02, 0.035)
            dx = s * rng.uniform(-0.05, 0.05)
            canvas.draw.ellipse((cx + dx - rx, cy - ry, cx + dx + rx, cy + ry), fill=cloud)


def _draw_ground(rng: np.random.Generator, canvas: _Canvas, horizon: int) -> None:
    """Grass, dry earth or pavement below the horizon, with a few faint streaks for texture."""
    s = canvas.size
    ground = _jitter(rng, GROUND_COLOURS[int(rng.integers(len(GROUND_COLOURS)))], 10)
    canvas.fill_box((0, horizon, s, s), ground)
    streak = _darker(ground, 16)
    for _ in range(int(rng.integers(2, 6))):
        y = int(rng.integers(horizon, s))
        x1 = int(rng.integers(0, s))
        canvas.draw.line((x1, y, x1 + _frac(rng, s, 0.1, 0.4), y), fill=streak, width=1)


def _draw_building(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A flat-roofed block with a regular grid of windows."""
    s = canvas.size
    wall = _jitter(rng, BUILDING_COLOURS[int(rng.integers(len(BUILDING_COLOURS)))], 14)
    canvas.fill_box(box, wall, outline=_darker(wall, 50))
    x1, y1, x2, y2 = box
    canvas.fill_box((x1, y1, x2, min(y2, y1 + max(2, round(s * 0.015)))), _darker(wall, 40))
    lit = rng.random() < 0.3
    window = _jitter(rng, (240, 220, 120) if lit else (60, 80, 110), 12)
    pane = max(2, round(s * 0.022))
    pitch = pane + max(2, round(s * 0.025))
    for wy in range(y1 + pitch // 2 + 2, y2 - pane - 2, pitch):
        for wx in range(x1 + (x2 - x1) % pitch // 2 + pitch // 4 + 1, x2 - pane - 1, pitch):
            canvas.fill_box((wx, wy, wx + pane, wy + pane), window)


def _draw_tower(rng: np.random.Generator, canvas: _Canvas, base: Box) -> tuple[Box | None, list]:
    """A tapering lattice mast: two legs joined by horizontal rungs and cross braces.

    ``base`` gives the legs' footprint (x1, x2) and the tower's top and foot (y1, y2). Returns the box
    of the drawn pixels and the leg lines, which the antennas are hung from.
    """
    s = canvas.size
    x1, top, x2, foot = base
    base_width = x2 - x1
    top_width = max(2, round(base_width * rng.uniform(0.25, 0.4)))
    centre = (x1 + x2) / 2
    left = ((x1, foot), (centre - top_width / 2, top))
    right = ((x2 - 1, foot), (centre + top_width / 2, top))
    mask, draw = canvas.new_mask()
    leg_width = max(2, round(s / 96))
    draw.line((*left[0], *left[1]), fill=255, width=leg_width)
    draw.line((*right[0], *right[1]), fill=255, width=leg_width)
    levels = int(rng.integers(5, 9))
    previous = None
    for i in range(levels + 1):
        t = i / levels
        lx = left[0][0] + (left[1][0] - left[0][0]) * t
        rx = right[0][0] + (right[1][0] - right[0][0]) * t
        y = foot + (top - foot) * t
        draw.line((lx, y, rx, y), fill=255, width=1)
        if previous is not None:
            draw.line((previous[0], previous[2], rx, y), fill=255, width=1)
            draw.line((previous[1], previous[2], lx, y), fill=255, width=1)
        previous = (lx, rx, y)
    colour = _jitter(rng, STEEL_COLOURS[int(rng.integers(len(STEEL_COLOURS)))], 12)
    return canvas.paint_mask(mask, colour), [left, right]


def _draw_antenna(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A pale sector-antenna panel: a tall narrow box with a dark rim and a dark centre seam."""
    shell = _jitter(rng, (226, 228, 230), 12)
    canvas.fill_box(box, shell, outline=_darker(shell, 70))
    x1, y1, x2, y2 = box
    if x2 - x1 >= 5:
        canvas.draw.line(((x1 + x2) // 2, y1 + 2, (x1 + x2) // 2, y2 - 3), fill=_darker(shell, 45), width=1)


def _draw_tree(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A brown trunk under a green canopy, either a round crown or a conifer triangle."""
    x1, y1, x2, y2 = box
    trunk_colour = _jitter(rng, (104, 70, 40), 12)
    leaves = _jitter(rng, (48, 132, 52), 18)
    trunk_w = max(2, (x2 - x1) // 5)
    canopy_bottom = y1 + round((y2 - y1) * rng.uniform(0.6, 0.75))
    cx = (x1 + x2) // 2
    canvas.fill_box((cx - trunk_w // 2, canopy_bottom - 2, cx - trunk_w // 2 + trunk_w, y2), trunk_colour)
    if rng.random() < 0.5:
        canvas.draw.ellipse((x1, y1, x2 - 1, canopy_bottom), fill=leaves, outline=_darker(leaves, 30))
    else:
        canvas.draw.polygon([(cx, y1), (x2 - 1, canopy_bottom), (x1, canopy_bottom)], fill=leaves)


def _antenna_boxes(rng: np.random.Generator, canvas: _Canvas, legs: list, tower_top: int, foot: int):
    """Place 0-3 antenna panels on the upper third of a tower, outside its legs."""
    s = canvas.size
    boxes: list[Box] = []
    height = foot - tower_top
    for _ in range(_pick_count(rng, (0.15, 0.35, 0.35, 0.15))):
        side = int(rng.integers(2))
        (bx, by), (tx, ty) = legs[side]
        w, h = _frac(rng, s, 0.03, 0.045), _frac(rng, s, 0.07, 0.1)
        y1 = tower_top + int(rng.integers(0, max(1, round(height * 0.3))))
        t = (y1 + h / 2 - by) / (ty - by)
        leg_x = bx + (tx - bx) * t
        x1 = round(leg_x + 1) if side == 1 else round(leg_x - 1 - w)
        box = (x1, y1, x1 + w, y1 + h)
        if any(_boxes_overlap(box, other, margin=1) for other in boxes):
            continue
        boxes.append(box)
    return boxes


def draw_outdoor_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw a cell site outdoors: a random subset of sky, towers, antennas, trees and buildings.

    The sky is present in almost every image; antennas hang on a tower or, when there is no tower,
    may stand on a building roof. Buildings, towers and trees get disjoint horizontal spans so every
    object stays countable.
    """
    s = size
    canvas = _Canvas(s, (0, 0, 0))
    has_sky = rng.random() < 0.95
    horizon = _frac(rng, s, 0.42, 0.68) if has_sky else 0
    if has_sky:
        _draw_sky(rng, canvas, horizon)
        canvas.annotate("sky", (0, 0, s, horizon))
    _draw_ground(rng, canvas, horizon)

    def foot_line() -> int:
        low = horizon + round(s * 0.05) if has_sky else round(s * 0.55)
        return min(s - 2, low + _frac(rng, s, 0.0, 0.2))

    spans: list[tuple[int, int]] = []
    gap = round(s * 0.02)
    edge = round(s * 0.02)

    buildings: list[Box] = []
    for _ in range(_pick_count(rng, (0.3, 0.35, 0.25, 0.1))):
        span = _claim_span(rng, _frac(rng, s, 0.16, 0.3), edge, s - edge, spans, gap)
        if span is None:
            continue
        foot = foot_line()
        box = (span[0], foot - _frac(rng, s, 0.18, 0.4), span[1], foot)
        _draw_building(rng, canvas, canvas.clip(box))
        if canvas.annotate("building", box) is not None:
            buildings.append(canvas.clip(box))

    n_towers = _pick_count(rng, (0.25, 0.65, 0.1))
    antennas: list[Box] = []
    for _ in range(n_towers):
        base_width = _frac(rng, s, 0.1, 0.16)
        reach = round(s * 0.05)  # room for the antennas that stick out beyond the legs
        span = _claim_span(rng, base_width + 2 * reach, edge, s - edge, spans, gap)
        if span is None:
            continue
        foot = foot_line()
        top = max(round(s * 0.03), foot - _frac(rng, s, 0.5, 0.8))
        tower_box, legs = _draw_tower(rng, canvas, (span[0] + reach, top, span[1] - reach, foot))
        if tower_box is None or canvas.annotate("tower", tower_box) is None:
            continue
        antennas.extend(_antenna_boxes(rng, canvas, legs, top, foot))

    if not antennas and n_towers == 0 and buildings and rng.random() < 0.5:
        roof = buildings[int(rng.integers(len(buildings)))]
        for _ in range(int(rng.integers(1, 3))):
            w, h = _frac(rng, s, 0.025, 0.04), _frac(rng, s, 0.06, 0.09)
            if roof[1] - h < 1 or roof[2] - roof[0] < w + 4:
                break
            x1 = int(rng.integers(roof[0] + 2, roof[2] - w - 1))
            box = (x1, roof[1] - h, x1 + w, roof[1])
            if all(not _boxes_overlap(box, other, margin=1) for other in antennas):
                antennas.append(box)

    for box in antennas:
        _draw_antenna(rng, canvas, box)
        canvas.annotate("antenna", box)

    for _ in range(_pick_count(rng, (0.25, 0.3, 0.25, 0.15, 0.05))):
        span = _claim_span(rng, _frac(rng, s, 0.09, 0.18), edge, s - edge, spans, gap)
        if span is None:
            continue
        foot = foot_line()
        box = (span[0], max(0, foot - _frac(rng, s, 0.14, 0.3)), span[1], foot)
        _draw_tree(rng, canvas, box)
        canvas.annotate("tree", box)

    return Scene(OUTDOOR, canvas.image, canvas.objects)


# --------------------------------------------------------------------------------------------------
# Kitchen: tiled walls, chequered floor
# --------------------------------------------------------------------------------------------------

TILE_COLOURS: tuple[Colour, ...] = ((236, 232, 220), (196, 222, 232), (222, 236, 204), (242, 222, 204))
FRIDGE_COLOURS: tuple[Colour, ...] = ((238, 240, 242), (192, 196, 202))
KETTLE_COLOURS: tuple[Colour, ...] = ((214, 40, 40), (28, 160, 164), (236, 196, 30))


def _draw_kitchen_room(rng: np.random.Generator, canvas: _Canvas) -> int:
    """A pale wall of square tiles above a chequered floor; returns the y where the floor starts."""
    s = canvas.size
    wall = _jitter(rng, TILE_COLOURS[int(rng.integers(len(TILE_COLOURS)))], 8)
    floor_y = _frac(rng, s, 0.7, 0.82)
    canvas.fill_box((0, 0, s, floor_y), wall)
    grout = _darker(wall, 34)
    tile = _frac(rng, s, 0.05, 0.08)
    for y in range(int(rng.integers(0, tile)), floor_y, tile):
        canvas.draw.line((0, y, s, y), fill=grout, width=1)
    for x in range(int(rng.integers(0, tile)), s, tile):
        canvas.draw.line((x, 0, x, floor_y), fill=grout, width=1)

    light = _jitter(rng, (226, 214, 190), 12)
    dark = _jitter(rng, (92, 78, 70), 12)
    canvas.fill_box((0, floor_y, s, s), light)
    check = _frac(rng, s, 0.07, 0.12)
    for row, y in enumerate(range(floor_y, s, check)):
        for col, x in enumerate(range(0, s, check)):
            if (row + col) % 2:
                canvas.fill_box((x, y, min(s, x + check), min(s, y + check)), dark)
    return floor_y


def _draw_fridge(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A tall white or steel box split into freezer and fridge doors, each with a dark handle."""
    s = canvas.size
    shell = _jitter(rng, FRIDGE_COLOURS[int(rng.integers(len(FRIDGE_COLOURS)))], 8)
    canvas.fill_box(box, shell, outline=_darker(shell, 70))
    x1, y1, x2, y2 = box
    split = y1 + round((y2 - y1) * rng.uniform(0.28, 0.4))
    canvas.draw.line((x1, split, x2 - 1, split), fill=_darker(shell, 70), width=1)
    handle = _darker(shell, 110)
    hx = x2 - 2 - max(2, round(s * 0.02))
    hw = max(1, round(s * 0.01))
    for top, bottom in ((y1 + 3, split - 3), (split + 3, split + 3 + (y2 - split) // 3)):
        if bottom > top:
            canvas.fill_box((hx, top, hx + hw, bottom), handle)


def _draw_stove(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A black cooker: glowing burners on its top edge, a row of knobs and a dark oven window."""
    s = canvas.size
    body = _jitter(rng, (46, 46, 50), 8)
    canvas.fill_box(box, body, outline=_darker(body, 20))
    x1, y1, x2, y2 = box
    height = y2 - y1
    top_strip = y1 + max(3, round(height * 0.14))
    canvas.fill_box((x1, y1, x2, top_strip), _lighter(body, 30))
    glow = _jitter(rng, (236, 96, 40), 16)
    burners = 2 if x2 - x1 < s * 0.2 else 3
    pitch = (x2 - x1) / burners
    for i in range(burners):
        bx1 = x1 + i * pitch + pitch * 0.18
        canvas.draw.ellipse((bx1, y1 + 1, x1 + (i + 1) * pitch - pitch * 0.18, top_strip - 2), fill=glow)
    knob = max(2, round(s * 0.014))
    knob_y = top_strip + max(2, round(height * 0.06))
    for kx in np.linspace(x1 + 3, x2 - 3 - knob, 4):
        canvas.draw.ellipse((kx, knob_y, kx + knob, knob_y + knob), fill=(225, 225, 225))
    window_top = knob_y + knob + max(2, round(height * 0.08))
    if y2 - 4 > window_top + 2:
        canvas.fill_box((x1 + 4, window_top, x2 - 4, y2 - 4), _jitter(rng, (70, 44, 30), 8))


def _draw_cupboard(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A light oak wall cupboard with two doors (a centre seam) and a small knob on each."""
    s = canvas.size
    wood = _jitter(rng, (208, 164, 104), 14)
    edge = _darker(wood, 70)
    canvas.fill_box(box, wood, outline=edge)
    x1, y1, x2, y2 = box
    cx = (x1 + x2) // 2
    canvas.draw.line((cx, y1, cx, y2 - 1), fill=edge, width=1)
    knob = max(2, round(s * 0.012))
    ky = y1 + (y2 - y1) * 2 // 3
    for kx in (cx - 2 - knob, cx + 3):
        canvas.fill_box((kx, ky, kx + knob, ky + knob), _darker(wood, 110))


def _draw_table(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A dark walnut table seen from the front: a thick top on two legs."""
    s = canvas.size
    wood = _jitter(rng, (112, 70, 38), 12)
    x1, y1, x2, y2 = box
    top = y1 + max(2, round(s * 0.025))
    leg = max(2, round(s * 0.022))
    inset = max(1, round((x2 - x1) * 0.08))
    canvas.fill_box((x1, y1, x2, top), wood, outline=_darker(wood, 30))
    canvas.fill_box((x1 + inset, top, x1 + inset + leg, y2), _darker(wood, 18))
    canvas.fill_box((x2 - inset - leg, top, x2 - inset, y2), _darker(wood, 18))


def _draw_kettle(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A brightly coloured kettle: a round body, a spout on one side and a handle loop on top."""
    colour = _jitter(rng, KETTLE_COLOURS[int(rng.integers(len(KETTLE_COLOURS)))], 16)
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    spout = max(2, round(w * 0.25))
    body_top = y1 + max(2, round(h * 0.3))
    canvas.draw.ellipse((x1 + spout - 1, body_top, x2 - 1, y2 - 1 + (y2 - body_top) // 2), fill=colour)
    canvas.fill_box((x1 + spout - 1, (body_top + y2) // 2, x2, y2), colour)
    canvas.draw.polygon(
        [(x1, body_top), (x1 + spout, (body_top + y2) // 2), (x1 + spout, y2 - 2)], fill=colour
    )
    canvas.draw.rectangle(
        (x1 + spout + w // 6, y1, x2 - 1 - w // 6, body_top + 1), outline=_darker(colour, 60), width=1
    )


def draw_kitchen_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw a kitchen: a random subset of fridges, stoves, tables, wall cupboards and kettles.

    Fridges, stoves and tables stand on the floor in disjoint horizontal spans; cupboards hang on the
    wall clear of the fridges; a kettle sits on a stove or a table top.
    """
    s = size
    canvas = _Canvas(s, (0, 0, 0))
    floor_y = _draw_kitchen_room(rng, canvas)
    edge, gap = round(s * 0.02), round(s * 0.025)

    spans: list[tuple[int, int]] = []
    tall: list[Box] = []
    surfaces: list[Box] = []
    units = (
        ["fridge"] * _pick_count(rng, (0.45, 0.55))
        + ["stove"] * _pick_count(rng, (0.4, 0.5, 0.1))
        + ["table"] * _pick_count(rng, (0.4, 0.5, 0.1))
    )
    rng.shuffle(units)
    for name in units:
        width = _frac(rng, s, 0.22, 0.34) if name == "table" else _frac(rng, s, 0.16, 0.24)
        span = _claim_span(rng, width, edge, s - edge, spans, gap)
        if span is None:
            continue
        if name == "table":
            foot = min(s - 1, floor_y + _frac(rng, s, 0.06, 0.14))
            height = _frac(rng, s, 0.16, 0.22)
        else:
            foot = min(s - 1, floor_y + _frac(rng, s, 0.01, 0.05))
            height = _frac(rng, s, 0.46, 0.62) if name == "fridge" else _frac(rng, s, 0.24, 0.3)
        box = (span[0], foot - height, span[1], foot)
        {"fridge": _draw_fridge, "stove": _draw_stove, "table": _draw_table}[name](rng, canvas, box)
        canvas.annotate(name, box)
        (tall if name == "fridge" else surfaces).append(box)

    cupboards: list[Box] = []
    wall_spans: list[tuple[int, int]] = []
    for _ in range(_pick_count(rng, (0.3, 0.35, 0.25, 0.1))):
        span = _claim_span(rng, _frac(rng, s, 0.16, 0.28), edge, s - edge, wall_spans, gap)
        if span is None:
            continue
        top = _frac(rng, s, 0.03, 0.12)
        box = (span[0], top, span[1], top + _frac(rng, s, 0.13, 0.2))
        if any(_boxes_overlap(box, other, margin=2) for other in tall):
            continue
        _draw_cupboard(rng, canvas, box)
        canvas.annotate("cupboard", box)
        cupboards.append(box)

    kettles = _pick_count(rng, (0.35, 0.45, 0.2))
    order = rng.permutation(len(surfaces))
    for index in order[:kettles]:
        sx1, sy1, sx2, _ = surfaces[int(index)]
        w, h = _frac(rng, s, 0.07, 0.09), _frac(rng, s, 0.06, 0.08)
        if sx2 - sx1 < w + 4 or sy1 - h < 1:
            continue
        x1 = int(rng.integers(sx1 + 2, sx2 - w - 1))
        box = (x1, sy1 - h, x1 + w, sy1)
        if any(_boxes_overlap(box, other, margin=1) for other in cupboards):
            continue
        _draw_kettle(rng, canvas, box)
        canvas.annotate("kettle", box)

    return Scene(KITCHEN, canvas.image, canvas.objects)


# --------------------------------------------------------------------------------------------------
# Street: road, brick pavement and city blocks under a blue sky
# --------------------------------------------------------------------------------------------------

CAR_COLOURS: tuple[Colour, ...] = (
    (200, 30, 36),
    (30, 80, 200),
    (240, 200, 20),
    (245, 245, 245),
    (30, 30, 34),
)


def _draw_street_ground(rng: np.random.Generator, canvas: _Canvas, horizon: int) -> tuple[int, int]:
    """Warm brick paving from the horizon down to an asphalt road with a dashed centre line.

    Returns the y of the kerb (top of the road) and of the road's lower edge.
    """
    s = canvas.size
    paving = _jitter(rng, (198, 128, 96), 10)
    canvas.fill_box((0, horizon, s, s), paving)
    joint = _darker(paving, 22)
    slab = _frac(rng, s, 0.06, 0.1)
    for x in range(int(rng.integers(0, slab)), s, slab):
        canvas.draw.line((x, horizon, x, s), fill=joint, width=1)
    road_top = _frac(rng, s, 0.64, 0.72)
    road_bottom = min(s, road_top + _frac(rng, s, 0.2, 0.26))
    asphalt = _jitter(rng, (66, 68, 72), 8)
    canvas.fill_box((0, road_top, s, road_bottom), asphalt)
    canvas.fill_box((0, road_top - max(2, round(s * 0.012)), s, road_top), _lighter(paving, 30))
    paint = _jitter(rng, (236, 226, 150), 10)
    mid = (road_top + road_bottom) // 2
    dash = _frac(rng, s, 0.06, 0.1)
    for x in range(int(rng.integers(1, 2 * dash + 1)) - dash, s, 2 * dash):
        canvas.fill_box((max(0, x), mid - 1, min(s, x + dash), mid + 1), paint)
    return road_top, road_bottom


def _draw_car(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A side view of a car: a coloured body, a narrower cabin with windows and two black wheels."""
    paint = _jitter(rng, CAR_COLOURS[int(rng.integers(len(CAR_COLOURS)))], 14)
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    wheel = max(3, round(h * 0.42))
    body_top = y1 + round(h * 0.4)
    body_bottom = y2 - wheel // 2
    cabin = (x1 + round(w * 0.22), y1, x2 - round(w * 0.18), body_top + 1)
    canvas.draw.rectangle((cabin[0], cabin[1], cabin[2] - 1, cabin[3]), fill=paint)
    glass = (150, 190, 215)
    if cabin[3] - cabin[1] > 4:
        mid = (cabin[0] + cabin[2]) // 2
        canvas.fill_box((cabin[0] + 2, cabin[1] + 2, mid - 1, body_top - 1), glass)
        canvas.fill_box((mid + 1, cabin[1] + 2, cabin[2] - 2, body_top - 1), glass)
    canvas.fill_box((x1, body_top, x2, body_bottom), paint, outline=_darker(paint, 40))
    tyre = (24, 24, 26)
    for cx in (x1 + round(w * 0.24), x2 - round(w * 0.24)):
        canvas.draw.ellipse((cx - wheel // 2, y2 - wheel, cx - wheel // 2 + wheel - 1, y2 - 1), fill=tyre)


def _draw_lamp_post(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A slim dark-green post with an arm at the top and a lamp hanging from the arm's end."""
    s = canvas.size
    metal = _jitter(rng, (44, 72, 60), 8)
    x1, y1, x2, y2 = box
    post = max(2, round(s * 0.012))
    lamp_h = max(2, round(s * 0.02))
    left = rng.random() < 0.5
    px = x2 - post if left else x1
    canvas.fill_box((px, y1, px + post, y2), metal)
    canvas.fill_box((x1, y1, x2, y1 + post), metal)
    lx = x1 if left else x2 - max(3, post + 2)
    canvas.fill_box(
        (lx, y1 + post, lx + max(3, post + 2), y1 + post + lamp_h), _jitter(rng, (250, 236, 160), 6)
    )


def _draw_traffic_light(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A grey post under a black signal head with red, amber and green lamps, one of them lit."""
    s = canvas.size
    x1, y1, x2, y2 = box
    w = x2 - x1
    head_bottom = y1 + round(w * 2.6)
    post = max(2, round(s * 0.012))
    cx = (x1 + x2) // 2
    canvas.fill_box(
        (cx - post // 2, head_bottom, cx - post // 2 + post, y2), _jitter(rng, (112, 114, 118), 8)
    )
    canvas.fill_box((x1, y1, x2, head_bottom), (26, 26, 28))
    lit = int(rng.integers(3))
    lamp = max(2, w - 4)
    pitch = (head_bottom - y1) / 3
    for i, colour in enumerate(((230, 40, 30), (245, 170, 20), (40, 210, 80))):
        ly = y1 + i * pitch + (pitch - lamp) / 2
        fill = colour if i == lit else _darker(colour, 130)
        canvas.draw.ellipse((x1 + 2, ly, x1 + 2 + lamp - 1, ly + lamp - 1), fill=fill)


def draw_street_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw a city street: buildings behind the pavement, lamp posts, traffic lights and trees on it,
    cars on the road, and the sky above.

    Buildings get disjoint spans among themselves, the things on the pavement among themselves and the
    cars among themselves, so every object stays countable.
    """
    s = size
    canvas = _Canvas(s, (0, 0, 0))
    # A tall blue sky and warm brick paving: a grey backdrop over a dark band reads as an equipment room's
    # wall and floor to a small model (the base called 65 % of such streets equipment rooms).
    horizon = _frac(rng, s, 0.3, 0.45)
    top, bottom = _jitter(rng, (70, 135, 220), 14), _jitter(rng, (175, 205, 238), 8)
    for y in range(horizon):
        canvas.draw.line((0, y, s, y), fill=_blend(top, bottom, y / max(1, horizon - 1)))
    canvas.annotate("sky", (0, 0, s, horizon))
    road_top, road_bottom = _draw_street_ground(rng, canvas, horizon)
    edge, gap = round(s * 0.02), round(s * 0.02)

    block_spans: list[tuple[int, int]] = []
    for _ in range(_pick_count(rng, (0.15, 0.3, 0.35, 0.2))):
        span = _claim_span(rng, _frac(rng, s, 0.2, 0.32), edge, s - edge, block_spans, gap)
        if span is None:
            continue
        foot = road_top - _frac(rng, s, 0.06, 0.12)
        box = canvas.clip((span[0], foot - _frac(rng, s, 0.3, 0.55), span[1], foot))
        _draw_building(rng, canvas, box)
        canvas.annotate("building", box)

    kerb_spans: list[tuple[int, int]] = []
    kerb_things = (
        ["pole"] * _pick_count(rng, (0.3, 0.4, 0.3))
        + ["traffic_light"] * _pick_count(rng, (0.4, 0.45, 0.15))
        + ["tree"] * _pick_count(rng, (0.4, 0.35, 0.25))
    )
    rng.shuffle(kerb_things)
    for name in kerb_things:
        width = {
            "pole": _frac(rng, s, 0.07, 0.1),
            "traffic_light": _frac(rng, s, 0.04, 0.055),
            "tree": _frac(rng, s, 0.1, 0.16),
        }[name]
        span = _claim_span(rng, width, edge, s - edge, kerb_spans, gap)
        if span is None:
            continue
        foot = road_top - _frac(rng, s, 0.015, 0.04)
        height = {
            "pole": _frac(rng, s, 0.36, 0.5),
            "traffic_light": _frac(rng, s, 0.3, 0.4),
            "tree": _frac(rng, s, 0.2, 0.3),
        }[name]
        box = (span[0], max(0, foot - height), span[1], foot)
        {"pole": _draw_lamp_post, "traffic_light": _draw_traffic_light, "tree": _draw_tree}[name](
            rng, canvas, box
        )
        canvas.annotate(name, box)

    car_spans: list[tuple[int, int]] = []
    for _ in range(_pick_count(rng, (0.2, 0.35, 0.3, 0.15))):
        span = _claim_span(rng, _frac(rng, s, 0.18, 0.26), 0, s, car_spans, gap)
        if span is None:
            continue
        height = _frac(rng, s, 0.08, 0.11)
        low, high = road_top + height + 1, max(road_top + height + 2, road_bottom - 1)
        foot = min(s, int(rng.integers(low, high)))
        box = (span[0], foot - height, span[1], foot)
        _draw_car(rng, canvas, box)
        canvas.annotate("vehicle", box)

    return Scene(STREET, canvas.image, canvas.objects)


# --------------------------------------------------------------------------------------------------
# Field: green pasture under the sky
# --------------------------------------------------------------------------------------------------

FLOWER_COLOURS: tuple[Colour, ...] = ((230, 50, 120), (150, 70, 210), (250, 250, 250), (240, 90, 40))


def _draw_pasture(rng: np.random.Generator, canvas: _Canvas, horizon: int) -> None:
    """Rolling dark-green hills on the horizon, then bright grass with tufts down to the bottom."""
    s = canvas.size
    hill = _jitter(rng, (62, 122, 58), 10)
    for _ in range(int(rng.integers(1, 4))):
        cx, rx, ry = s * rng.uniform(0, 1), s * rng.uniform(0.2, 0.45), s * rng.uniform(0.04, 0.09)
        canvas.draw.ellipse((cx - rx, horizon - ry, cx + rx, horizon + ry), fill=hill)
    grass = _jitter(rng, (112, 184, 64), 12)
    canvas.fill_box((0, horizon, s, s), grass)
    tuft = _darker(grass, 36)
    tuft_h = max(2, round(s * 0.02))
    for _ in range(int(rng.integers(20, 40))):
        x, y = int(rng.integers(0, s)), int(rng.integers(horizon + tuft_h, s))
        canvas.draw.line((x, y - tuft_h, x, y), fill=tuft, width=1)


def _draw_sun(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    canvas.draw.ellipse((box[0], box[1], box[2] - 1, box[3] - 1), fill=_jitter(rng, (252, 222, 64), 6))


def _draw_fence(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A grey-brown wooden fence run: evenly spaced posts joined by two rails."""
    s = canvas.size
    wood = _jitter(rng, (122, 98, 74), 10)
    x1, y1, x2, y2 = box
    rail = max(1, round(s * 0.01))
    for ry in (y1 + (y2 - y1) // 4, y1 + (y2 - y1) * 3 // 5):
        canvas.fill_box((x1, ry, x2, ry + rail), wood)
    post = max(2, round(s * 0.014))
    posts = max(2, round((x2 - x1) / (s * 0.07)) + 1)
    for px in np.linspace(x1, x2 - post, posts):
        canvas.fill_box((int(px), y1, int(px) + post, y2), _darker(wood, 16))


def _draw_cow(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A white cow with black patches seen from the side: body, head at one end and four legs."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    hide = _jitter(rng, (242, 240, 234), 8)
    dark = _jitter(rng, (30, 28, 28), 6)
    left = rng.random() < 0.5
    head_w = max(2, round(w * 0.26))
    body = (x1 + head_w - 2, y1 + round(h * 0.18), x2 - 1, y1 + round(h * 0.7))
    if not left:
        body = (x1, body[1], x2 - head_w + 1, body[3])
    leg = max(1, round(w * 0.05))
    for t in (0.08, 0.24, 0.7, 0.86):
        lx = body[0] + round((body[2] - body[0]) * t)
        canvas.fill_box((lx, (body[1] + body[3]) // 2, lx + leg, y2), dark)
    canvas.draw.ellipse(body, fill=hide, outline=_darker(hide, 60))
    for _ in range(int(rng.integers(1, 4))):
        px = body[0] + (body[2] - body[0]) * rng.uniform(0.2, 0.65)
        py = body[1] + (body[3] - body[1]) * rng.uniform(0.15, 0.5)
        rx, ry = w * rng.uniform(0.06, 0.12), h * rng.uniform(0.06, 0.12)
        canvas.draw.ellipse((px - rx, py - ry, px + rx, py + ry), fill=dark)
    hx1 = x1 if left else x2 - head_w
    canvas.draw.ellipse((hx1, y1, hx1 + head_w - 1, y1 + round(h * 0.42)), fill=hide, outline=dark)


def _draw_haystack(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A golden dome of hay with a few darker straw streaks."""
    x1, y1, x2, y2 = box
    hay = _jitter(rng, (226, 186, 72), 12)
    canvas.draw.pieslice((x1, y1, x2 - 1, y1 + 2 * (y2 - y1) - 1), 180, 360, fill=hay)
    streak = _darker(hay, 50)
    for t in (0.3, 0.5, 0.7):
        sx = x1 + round((x2 - x1) * t)
        canvas.draw.line(
            (sx, y1 + (y2 - y1) // 3, sx + int(rng.integers(-2, 3)), y2 - 2), fill=streak, width=1
        )


def _draw_flower(rng: np.random.Generator, canvas: _Canvas, box: Box) -> None:
    """A round bloom with a yellow heart on a green stem."""
    x1, y1, x2, y2 = box
    w = x2 - x1
    cx = (x1 + x2) // 2
    canvas.draw.line((cx, y1 + w // 2, cx, y2 - 1), fill=(40, 110, 36), width=max(1, w // 5))
    petals = _jitter(rng, FLOWER_COLOURS[int(rng.integers(len(FLOWER_COLOURS)))], 12)
    canvas.draw.ellipse((x1, y1, x2 - 1, y1 + w - 1), fill=petals)
    heart = max(1, w // 3)
    canvas.draw.ellipse(
        (
            cx - heart // 2,
            y1 + w // 2 - heart // 2,
            cx - heart // 2 + heart - 1,
            y1 + w // 2 - heart // 2 + heart - 1,
        ),
        fill=(250, 210, 40),
    )


def draw_field_scene(rng: np.random.Generator, size: int) -> Scene:
    """Draw a pasture: sky and sun, fences along the horizon, cows and haystacks in the grass and
    flowers in the foreground.

    Fences, the large animals and stacks, and the flowers each get disjoint spans of their own, so
    every object stays countable; the sun sits wholly inside the sky.
    """
    s = size
    canvas = _Canvas(s, (0, 0, 0))
    has_sky = rng.random() < 0.95
    horizon = _frac(rng, s, 0.3, 0.48) if has_sky else 0
    if has_sky:
        top, bottom = _jitter(rng, (96, 170, 232), 14), _jitter(rng, (214, 236, 246), 8)
        for y in range(horizon):
            canvas.draw.line((0, y, s, y), fill=_blend(top, bottom, y / max(1, horizon - 1)))
        canvas.annotate("sky", (0, 0, s, horizon))
        if rng.random() < 0.6:
            d = _frac(rng, s, 0.08, 0.13)
            if horizon - d - 4 > 2:
                x1 = int(rng.integers(2, s - d - 2))
                y1 = int(rng.integers(2, horizon - d - 4))
                box = (x1, y1, x1 + d, y1 + d)
                _draw_sun(rng, canvas, box)
                canvas.annotate("sun", box)
    _draw_pasture(rng, canvas, horizon)
    edge, gap = round(s * 0.02), round(s * 0.03)

    fence_spans: list[tuple[int, int]] = []
    for _ in range(_pick_count(rng, (0.4, 0.4, 0.2))):
        span = _claim_span(rng, _frac(rng, s, 0.25, 0.5), 0, s, fence_spans, gap)
        if span is None:
            continue
        foot = horizon + _frac(rng, s, 0.06, 0.12)
        box = (span[0], foot - _frac(rng, s, 0.07, 0.1), span[1], foot)
        _draw_fence(rng, canvas, box)
        canvas.annotate("fence", box)

    herd_spans: list[tuple[int, int]] = []
    herd = ["cow"] * _pick_count(rng, (0.25, 0.35, 0.25, 0.15)) + ["haystack"] * _pick_count(
        rng, (0.45, 0.4, 0.15)
    )
    rng.shuffle(herd)
    for name in herd:
        width = _frac(rng, s, 0.15, 0.22) if name == "cow" else _frac(rng, s, 0.12, 0.18)
        span = _claim_span(rng, width, edge, s - edge, herd_spans, gap)
        if span is None:
            continue
        height = round(width * (rng.uniform(0.62, 0.72) if name == "cow" else rng.uniform(0.55, 0.75)))
        foot = min(round(s * 0.86), horizon + height + _frac(rng, s, 0.12, 0.4))
        box = (span[0], foot - height, span[1], foot)
        (_draw_cow if name == "cow" else _draw_haystack)(rng, canvas, box)
        canvas.annotate(name, box)

    flower_spans: list[tuple[int, int]] = []
    for _ in range(_pick_count(rng, (0.3, 0.2, 0.2, 0.15, 0.1, 0.05))):
        width = _frac(rng, s, 0.035, 0.05)
        span = _claim_span(rng, width, edge, s - edge, flower_spans, gap)
        if span is None:
            continue
        foot = s - _frac(rng, s, 0.01, 0.06)
        box = (span[0], foot - _frac(rng, s, 0.07, 0.1), span[1], foot)
        _draw_flower(rng, canvas, box)
        canvas.annotate("flower", box)

    return Scene(FIELD, canvas.image, canvas.objects)


_DRAWERS = {
    INDOOR: draw_indoor_scene,
    OUTDOOR: draw_outdoor_scene,
    KITCHEN: draw_kitchen_scene,
    STREET: draw_street_scene,
    FIELD: draw_field_scene,
}


def draw_scene(kind: str, rng: np.random.Generator, size: int) -> Scene:
    """Draw a scene of ``kind`` that holds at least one object besides the sky.

    An image with nothing to caption teaches nothing, so an empty draw is simply redrawn; the
    generator keeps advancing, so the result is still a pure function of the generator's state.
    """
    if kind not in _DRAWERS:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {SCENE_KINDS}")
    if not MIN_IMAGE_SIZE <= size <= MAX_IMAGE_SIZE:
        raise ValueError(f"image size must be within {MIN_IMAGE_SIZE}..{MAX_IMAGE_SIZE} px, got {size}")
    while True:
        scene = _DRAWERS[kind](rng, size)
        if any(obj.name != "sky" for obj in scene.objects):
            return scene
