"""captioned_shapes maker, Karpathy / COCO caption readers, neighbourhood sampling, bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from vislearn.config import ConfigError
from vislearn.data import DATASETS
from vislearn.data.captioned_shapes import COLOURS, JSON_NAME, make_captioned_shapes
from vislearn.data.captions import neighbourhood_batches, read_coco_captions, read_karpathy
from vislearn.data.make import MAKERS
from vislearn.data.shapes import SHAPE_CLASSES


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory):
    return make_captioned_shapes(tmp_path_factory.mktemp("captioned") / "set", n_train=24, n_val=4, n_test=8,
                                 image_size=32)


def test_maker_writes_karpathy_json_with_five_varied_captions(shapes_root):
    assert MAKERS["captioned_shapes"] is make_captioned_shapes
    records = json.loads((shapes_root / JSON_NAME).read_text())["images"]
    assert [sum(r["split"] == s for r in records) for s in ("train", "val", "test")] == [24, 4, 8]
    for record in records:
        assert (shapes_root / "images" / record["filename"]).is_file()
        raws = [s["raw"] for s in record["sentences"]]
        assert len(raws) == 5 and len(set(raws)) == 5
        for sentence in record["sentences"]:
            assert sentence["tokens"] == sentence["raw"].lower().replace(",", "").replace(":", "").split()
            assert any(c in sentence["tokens"] for c in COLOURS) and any(s in sentence["tokens"] for s in SHAPE_CLASSES)
        # Every caption names the same shapes.
        named = {tuple(sorted({w for w in s["tokens"] if w in SHAPE_CLASSES})) for s in record["sentences"]}
        assert len(named) == 1 and 1 <= len(next(iter(named))) <= 3
    with Image.open(shapes_root / "images" / records[0]["filename"]) as image:
        assert image.size == (32, 32)


def _indexed_set(root, count=12, captions=3):
    """Image i is a flat grey of value 10*i; its captions say `image i caption j`."""
    (root / "images").mkdir(parents=True)
    records = []
    for i in range(count):
        Image.fromarray(np.full((16, 16, 3), 10 * i, np.uint8)).save(root / "images" / f"{i}.png")
        records.append({"filename": f"{i}.png", "split": "train",
                        "sentences": [{"raw": f"image {i} caption {j}", "tokens": []} for j in range(captions)]})
    records[-1]["sentences"].append({"raw": f"image {count - 1} caption {captions}"})  # one image has more
    (root / "dataset_x.json").write_text(json.dumps({"images": records}))
    return root / "dataset_x.json"


def test_neighbourhood_batches_hold_distinct_images_with_their_own_captions(tmp_path):
    annotations = _indexed_set(tmp_path)
    records = read_karpathy(annotations, tmp_path / "images")["train"]
    stream = neighbourhood_batches(records, (16, 16), batch_size=4, captions_per_image=2, seed=0)
    seen_pairs = set()
    for batch in stream.take(36):  # 12 epochs: every caption of image 11 shows up (p > 0.999)
        identities = np.round(batch["image"].numpy()[:, 0, 0, 0] * 255 / 10).astype(int)
        assert len(set(identities)) == 4  # distinct images: negatives are other images
        for identity, captions in zip(identities, batch["captions"].numpy()):
            words = [c.decode().split() for c in captions]
            assert all(int(w[1]) == identity for w in words)           # row i describes image i
            assert len({w[3] for w in words}) == 2                      # drawn without replacement
            seen_pairs.update((identity, w[3]) for w in words)
    # Across epochs an image shows more than the 2 captions of one draw, the
    # 4-caption image included.
    assert {b for a, b in seen_pairs if a == 11} == {"0", "1", "2", "3"}


def test_builder_splits_and_counts(shapes_root):
    data = DATASETS["captioned_shapes"](root=shapes_root, image_size=(32, 32), batch_size=4, captions_per_image=2)
    batch = next(iter(data.train))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["captions"].shape == (4, 2)
    assert data.counts == {"train": 24, "val": 4, "test": 8, "test_captions": 40} and data.steps_per_epoch == 6
    assert len(data.test) == 8 and list(data.test.caption_image) == list(np.repeat(np.arange(8), 5))
    assert sum(b.shape[0] for b in data.test.images) == 8 and data.validation is not None
    with pytest.raises(ConfigError, match="data.batch_size"):
        DATASETS["captioned_shapes"](root=shapes_root, batch_size=100)
    with pytest.raises(ConfigError, match="eval_split.*'dev'"):
        DATASETS["captioned_shapes"](root=shapes_root, eval_split="dev")


def test_bad_karpathy_input_names_file_and_field(tmp_path):
    annotations = _indexed_set(tmp_path, count=3)
    content = json.loads(annotations.read_text())
    (tmp_path / "images" / "1.png").unlink()
    with pytest.raises(ConfigError, match=r"images\[1\] \(1.png\): image file .*1.png not found"):
        read_karpathy(annotations, tmp_path / "images")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "images" / "1.png")
    content["images"][2]["sentences"][1]["raw"] = "   "
    annotations.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=r"images\[2\] \(2.png\).sentences\[1\].raw: empty caption"):
        read_karpathy(annotations, tmp_path / "images")
    content["images"][2]["sentences"] = []
    annotations.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=r"images\[2\] \(2.png\).sentences: no captions"):
        read_karpathy(annotations, tmp_path / "images")
    annotations.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_karpathy(annotations, tmp_path / "images")
    with pytest.raises(ConfigError, match="file not found"):
        read_karpathy(tmp_path / "missing.json", tmp_path / "images")


def test_coco_captions_reader(tmp_path):
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"{i}.jpg")
    content = {"images": [{"id": 7, "file_name": "0.jpg"}, {"id": 9, "file_name": "1.jpg"}],
               "annotations": [{"id": 1, "image_id": 7, "caption": "a cat"}, {"id": 2, "image_id": 9, "caption": "a dog"},
                               {"id": 3, "image_id": 7, "caption": "a kitten "}]}
    (tmp_path / "captions.json").write_text(json.dumps(content))
    records = read_coco_captions(tmp_path / "captions.json", tmp_path)
    assert [(r[0].endswith("0.jpg"), r[1]) for r in records] == [(True, ["a cat", "a kitten"]), (False, ["a dog"])]
    content["annotations"][1]["caption"] = ""
    (tmp_path / "captions.json").write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=r"annotations\[1\] \(id 2\).caption: empty caption"):
        read_coco_captions(tmp_path / "captions.json", tmp_path)
