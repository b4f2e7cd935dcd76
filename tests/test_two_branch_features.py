"""two_branch on precomputed features: `vislearn features extract`, a fit with
`data.features` + `model.backbone: features`, retrieval metrics, the export's
`embed_image` on bytes (backbone rebuilt from the manifest + trained MLP), the
same for COCO captions files (`coco_captions` with `train_features` +
`test_features`), and one test per user mistake (one `error:` line, exit code 2)."""

import json
import math
import shutil

import keras
import numpy as np
import pytest
import tensorflow as tf
import yaml
from click.testing import CliRunner

from vislearn import recipes
from vislearn.cli import main
from vislearn.data.captioned_shapes import JSON_NAME, make_captioned_shapes
from vislearn.data.folders import decode_image
from vislearn.features import FeatureCache, build_extractor, sha256
from vislearn.index import build_index

SPEC = {"name": "small_cnn", "width": 4, "depth": 2}
TINY = ["data.image_size=[32, 32]", "data.batch_size=8", "train.epochs=1", "train.steps_per_epoch=3",
        "model.hidden_units=32", "model.embed_dim=16", "model.word_dim=16", "model.backbone=features"]
DESIGN_KEYS = {"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "rsum", "i2t_medr", "t2i_medr"}


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and all(f in lines[-1] for f in fragments), result.output


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("two_branch_features")


@pytest.fixture(scope="module")
def shapes(root):
    return make_captioned_shapes(root / "data", n_train=40, n_val=8, n_test=16, image_size=32)


@pytest.fixture(scope="module")
def weights(root):
    """A local weights file of the tiny backbone (what a user brings)."""
    keras.utils.set_random_seed(1)
    backbone = build_extractor(SPEC, [32, 32])
    backbone.save_weights(str(root / "small_cnn.weights.h5"))
    return root / "small_cnn.weights.h5"


@pytest.fixture(scope="module")
def extracted(root, shapes, weights):
    result = cli("features", "extract", "--captions", shapes / JSON_NAME, "--images", shapes / "images",
                 "--backbone", "{name: small_cnn, width: 4, depth: 2}", "--weights", weights,
                 "--image-size", 32, "--batch-size", 16, "--out", root / "features")
    assert result.exit_code == 0, result.output
    assert "64/64" in result.output  # the progress bar reached every image
    return root / "features"


def fit(shapes, features, run_dir, *overrides):
    recipe, source = recipes.load_recipe("two_branch_shapes", [*map(str, [f"data.root={shapes}",
                                                                           f"data.features={features}"]),
                                                               *TINY, *overrides])
    return recipes.fit(recipe, source, run_dir, verbose=0)


@pytest.fixture(scope="module")
def run(root, shapes, extracted):
    fit(shapes, extracted, root / "run")
    return root / "run"


@pytest.fixture(scope="module")
def trained(run):
    return recipes.load_trained(run, image_input=False)


def test_extract_writes_features_and_manifest(shapes, extracted, weights):
    manifest = json.loads((extracted / "manifest.json").read_text())
    assert manifest["backbone"] == SPEC and manifest["image_size"] == [32, 32] and manifest["feature_dim"] == 8
    assert manifest["weights"] == {"path": str(weights.resolve()), "sha256": sha256(weights)}
    records = json.loads((shapes / JSON_NAME).read_text())["images"]
    for split, count in (("train", 40), ("val", 8), ("test", 16)):
        features = np.load(extracted / f"{split}.npy")
        assert features.shape == (count, 8) and features.dtype == np.float32 and np.isfinite(features).all()
        assert manifest["splits"][split]["ids"] == [r["filename"] for r in records if r["split"] == split]
    # Row i is the backbone (with the user's weights) on image i.
    backbone = build_extractor(SPEC, [32, 32], weights)
    ids = manifest["splits"]["test"]["ids"][:4]
    images = tf.stack([decode_image(tf.io.read_file(str(shapes / "images" / i)), [32, 32]) for i in ids])
    np.testing.assert_allclose(np.load(extracted / "test.npy")[:4], backbone(images, training=False), atol=1e-5)


def test_fit_from_features_gives_finite_retrieval_metrics(run, trained):
    metrics = json.loads((run / "metrics.json").read_text())
    assert DESIGN_KEYS <= set(metrics) and all(math.isfinite(metrics[k]) for k in DESIGN_KEYS)
    assert 0.0 <= metrics["t2i_r1"] <= 1.0 and 1.0 <= metrics["t2i_medr"] <= 16
    resolved = (run / "recipe.yaml").read_text()
    assert "name: features" in resolved and "dim: 8" in resolved  # the width came from the manifest
    recipe, model, data = trained
    assert model.encoder is None and model.image_mlp.layers[0].kernel.shape[0] == 8  # no CNN: MLP on features
    evaluated = recipes.method_of(recipe).metrics(model, data)  # `vislearn evaluate`
    for key in DESIGN_KEYS:
        assert evaluated[key] == pytest.approx(metrics[key], abs=1e-6)


def test_batches_and_metrics_use_the_cached_features(extracted, shapes, trained):
    _, model, data = trained
    cached = np.load(extracted / "train.npy")
    records = json.loads((shapes / JSON_NAME).read_text())["images"]
    captions = [[s["raw"] for s in r["sentences"]] for r in records if r["split"] == "train"]
    batch = next(iter(data.train))
    assert "image" not in batch and batch["features"].shape == (8, 8)
    for vector, sampled in zip(batch["features"].numpy(), batch["captions"].numpy()):
        row = int(np.flatnonzero((cached == vector).all(axis=1))[0])  # the row of a cached image...
        assert {c.decode() for c in sampled} <= set(captions[row])    # ...with its own captions
    # Evaluation embeds the cached test rows, and only them: identical rows give identical image embeddings.
    from vislearn.evaluation.retrieval import embed_split

    images, _ = embed_split(model, data.test)
    test = np.load(extracted / "test.npy")
    np.testing.assert_allclose(images, model.embed_image(tf.constant(test)), atol=1e-6)
    assert np.ptp(images, axis=0).max() > 1e-3
    same = data.test.__class__(**{**data.test.__dict__, "images": tf.data.Dataset.from_tensor_slices(
        np.repeat(test[:1], len(test), axis=0)).batch(8)})
    images, _ = embed_split(model, same)
    assert np.ptp(images, axis=0).max() < 1e-5


def test_export_embed_image_on_bytes_is_backbone_then_mlp(root, run, trained, shapes, weights):
    _, model, _ = trained
    path = recipes.export(run, root / "models", "tb_features", 1)
    loaded = tf.saved_model.load(str(path))
    files = sorted((shapes / "images").glob("test_*.jpg"))[:5]
    encoded = [f.read_bytes() for f in files]
    out = loaded.signatures["embed_image"](images=tf.constant(encoded))["embeddings"].numpy()
    backbone = build_extractor(SPEC, [32, 32], weights)
    pixels = tf.stack([decode_image(e, [32, 32]) for e in encoded])
    expected = model.embed_image(backbone(pixels, training=False))
    np.testing.assert_allclose(out, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    texts = loaded.signatures["embed_text"](texts=tf.constant(["a red circle"]))["embeddings"].numpy()
    np.testing.assert_allclose(texts, model.embed_text(tf.constant(["a red circle"])), atol=1e-5)
    # `index build --images` embeds a gallery through the same composition.
    gallery = root / "gallery"
    gallery.mkdir()
    for f in files:
        shutil.copy(f, gallery / f.name)
    lookup = tf.saved_model.load(str(build_index(run, root / "lookups", "by_text", images=gallery, chunk_size=2)))
    found = lookup.signatures["lookup_text"](texts=tf.constant(["a red circle"]), k=tf.constant(5))
    np.testing.assert_allclose(found["scores"].numpy()[0], np.sort(out @ texts[0])[::-1], atol=1e-5)


# ---------------------------------------------------------------- user mistakes


def extract(shapes, out, **options):
    args = {"captions": shapes / JSON_NAME, "images": shapes / "images", "backbone": "small_cnn",
            "image-size": 32, "out": out, **options}
    return cli("features", "extract", *[x for k, v in args.items() if v is not None for x in (f"--{k}", v)])


def test_extract_missing_image_folder(root, shapes):
    assert_user_error(extract(shapes, root / "e1", images=root / "nowhere"), "--images", "nowhere", "not a folder")


def test_extract_missing_caption_file(root, shapes):
    assert_user_error(extract(shapes, root / "e2", captions=root / "none.json"), "none.json", "file not found")


def test_extract_unknown_backbone(root, shapes):
    assert_user_error(extract(shapes, root / "e3", backbone="MobileNetV3Smal"), "--backbone",
                      "unknown backbone 'MobileNetV3Smal'", "did you mean 'MobileNetV3Small'")


def test_extract_weights_that_do_not_fit(root, shapes, weights):
    assert_user_error(extract(shapes, root / "e4", backbone="{name: small_cnn, width: 8, depth: 2}",
                              weights=weights), "--weights", "small_cnn.weights.h5", "does not fit backbone")


def test_extract_missing_weights_file(root, shapes):
    assert_user_error(extract(shapes, root / "e5", weights=root / "gone.weights.h5"), "--weights",
                      "gone.weights.h5", "file not found")


def test_features_of_another_caption_file(root, shapes, extracted):
    other = root / "renamed"
    shutil.copytree(extracted, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["splits"]["test"]["ids"][3] = "elsewhere.jpg"
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"renamed/manifest.json: no features of image 'test_00003.jpg'"):
        fit(shapes, other, root / "r1")


def test_features_of_the_wrong_width(root, shapes, extracted):
    with pytest.raises(ValueError, match=r"model.backbone.dim: 5 does not match the 8-wide features of .*manifest"):
        fit(shapes, extracted, root / "r2", "model.backbone={name: features, dim: 5}")
    bad = root / "short"
    shutil.copytree(extracted, bad)
    np.save(bad / "val.npy", np.zeros((8, 7), np.float32))
    with pytest.raises(ValueError, match=r"short/val.npy: features of shape \[8, 7\]"):
        fit(shapes, bad, root / "r3")


def test_features_at_another_image_size_or_without_features_backbone(root, shapes, extracted):
    with pytest.raises(ValueError, match=r"data.image_size: \[64, 64\] does not match the \[32, 32\]"):
        fit(shapes, extracted, root / "r4", "data.image_size=[64, 64]")
    with pytest.raises(ValueError, match="model.backbone: .*image backbone, but data.features"):
        fit(shapes, extracted, root / "r5", "model.backbone=small_cnn")
    with pytest.raises(ValueError, match="data.features: .* holds no manifest.json"):
        fit(shapes, root, root / "r6")


def test_fit_cli_reports_feature_errors_in_one_line(root, shapes, extracted):
    result = cli("fit", "two_branch_shapes", "--run-dir", root / "r7", "--set", f"data.root={shapes}",
                 *[x for o in TINY[:-1] for x in ("--set", o)], "--set", "model.backbone=features")
    assert_user_error(result, "model.backbone: 'features' trains on cached features", "data.features")


def test_export_when_the_weights_file_changed(root, run, weights):
    original = weights.read_bytes()
    try:
        weights.write_bytes(original + b"\0")
        assert_user_error(cli("export", run, "--out", root / "models2"), "manifest.json",
                          "changed since the extraction")
    finally:
        weights.write_bytes(original)


# ---------------------------------------------------------------- COCO captions files


def write_coco_captions(shapes, folder, split, count, first_id):
    """A COCO captions JSON (captions_train2014.json style) of the first `count`
    `split` images of the captioned shapes, copied to their own image folder
    (as COCO ships train2014/ and val2014/); annotations in another order than
    the images, as in COCO's files."""
    records = [r for r in json.loads((shapes / JSON_NAME).read_text())["images"] if r["split"] == split][:count]
    (folder / split).mkdir(parents=True)
    images, annotations = [], []
    for i, record in enumerate(records):
        shutil.copy(shapes / "images" / record["filename"], folder / split / record["filename"])
        images.append({"id": first_id + i, "file_name": record["filename"], "height": 32, "width": 32})
        annotations += [{"id": 10 * (first_id + i) + j, "image_id": first_id + i, "caption": s["raw"]}
                        for j, s in enumerate(record["sentences"])]
    file = folder / f"captions_{split}.json"
    file.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations[::-1]}))
    return file, folder / split, [r["filename"] for r in records]


@pytest.fixture(scope="module")
def coco(root, shapes):
    return {split: write_coco_captions(shapes, root / "coco", split, count, first_id)
            for split, count, first_id in (("train", 24, 1000), ("test", 12, 5000))}


def extract_coco(coco, split, out, weights):
    annotations, images, _ = coco[split]
    weights = ["--weights", weights] if weights else []
    return cli("features", "extract", "--captions", annotations, "--images", images, "--backbone",
               "{name: small_cnn, width: 4, depth: 2}", *weights, "--image-size", 32, "--out", out)


@pytest.fixture(scope="module")
def coco_extracted(root, coco, weights):
    folders = {split: root / f"coco_features_{split}" for split in coco}
    for split, folder in folders.items():
        result = extract_coco(coco, split, folder, weights)
        assert result.exit_code == 0, result.output
    return folders


def coco_recipe(root, coco, name="coco.yaml", **data):
    """two_branch_shapes with its data section on the COCO files (a recipe file:
    `--set` cannot drop captioned_shapes' `root` key)."""
    recipe = recipes.read_yaml(recipes.resolve_recipe("two_branch_shapes"))
    (train, train_images, _), (test, test_images, _) = coco["train"], coco["test"]
    recipe["data"] = {"name": "coco_captions", "train_annotations": str(train), "train_images": str(train_images),
                      "test_annotations": str(test), "test_images": str(test_images), "captions_per_image": 2,
                      **{k: str(v) for k, v in data.items()}}
    (root / name).write_text(yaml.safe_dump(recipe))
    return root / name


def fit_coco(root, coco, run_dir, *overrides, **data):
    recipe, source = recipes.load_recipe(coco_recipe(root, coco, **data), [*TINY, *overrides])
    return recipes.fit(recipe, source, run_dir, verbose=0)


@pytest.fixture(scope="module")
def coco_run(root, coco, coco_extracted):
    fit_coco(root, coco, root / "coco_run", train_features=coco_extracted["train"],
             test_features=coco_extracted["test"])
    return root / "coco_run"


def test_extract_coco_captions_as_one_split(coco, coco_extracted, weights):
    for split, count in (("train", 24), ("test", 12)):
        annotations, images, filenames = coco[split]
        manifest = json.loads((coco_extracted[split] / "manifest.json").read_text())
        assert list(manifest["splits"]) == ["all"] and manifest["splits"]["all"]["ids"] == filenames
        assert manifest["captions"] == {"path": str(annotations.resolve()), "sha256": sha256(annotations),
                                        "format": "coco"}
        features = np.load(coco_extracted[split] / "all.npy")
        assert features.shape == (count, 8) and np.isfinite(features).all()
    # Row i is the backbone on image i of the file.
    pixels = tf.stack([decode_image(tf.io.read_file(str(coco["test"][1] / f)), [32, 32]) for f in coco["test"][2][:3]])
    np.testing.assert_allclose(np.load(coco_extracted["test"] / "all.npy")[:3],
                               build_extractor(SPEC, [32, 32], weights)(pixels, training=False), atol=1e-5)


def test_fit_coco_captions_on_features_and_export(root, coco, coco_extracted, coco_run, weights):
    metrics = json.loads((coco_run / "metrics.json").read_text())
    assert DESIGN_KEYS <= set(metrics) and all(math.isfinite(metrics[k]) for k in DESIGN_KEYS)
    assert 1.0 <= metrics["t2i_medr"] <= 12
    recipe, model, data = recipes.load_trained(coco_run, image_input=False)
    assert recipe["model"]["backbone"] == {"name": "features", "dim": 8}
    assert data.features.folder == coco_extracted["train"]  # exports rebuild the train extraction's backbone
    batch = next(iter(data.train))
    assert "image" not in batch and batch["features"].shape == (8, 8)
    train_rows = np.load(coco_extracted["train"] / "all.npy")
    assert all((train_rows == vector).all(axis=1).any() for vector in batch["features"].numpy())
    test_rows = np.concatenate(list(data.test.images.as_numpy_iterator()))
    np.testing.assert_array_equal(test_rows, np.load(coco_extracted["test"] / "all.npy"))  # the test cache, in order

    path = recipes.export(coco_run, root / "coco_models", "tb_coco", 1)
    embed_image = tf.saved_model.load(str(path)).signatures["embed_image"]
    encoded = [(coco["test"][1] / f).read_bytes() for f in coco["test"][2][:4]]
    out = embed_image(images=tf.constant(encoded))["embeddings"].numpy()
    pixels = tf.stack([decode_image(e, [32, 32]) for e in encoded])
    expected = model.embed_image(build_extractor(SPEC, [32, 32], weights)(pixels, training=False))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_coco_captions_needs_both_feature_folders(root, coco, coco_extracted):
    with pytest.raises(ValueError, match=r"data.test_features: missing; coco_captions takes train_features and "
                                         "test_features together"):
        fit_coco(root, coco, root / "c1", train_features=coco_extracted["train"])
    result = cli("fit", coco_recipe(root, coco, "coco_test_only.yaml", test_features=coco_extracted["test"]),
                 "--run-dir", root / "c2", *[x for o in TINY for x in ("--set", o)])
    assert_user_error(result, "data.train_features: missing")
    # Without either, model.backbone: features names the coco keys.
    with pytest.raises(ValueError, match=r"model.backbone: 'features' trains on cached features.*"
                                         r"coco_captions: data.train_features and data.test_features"):
        fit_coco(root, coco, root / "c3")
    with pytest.raises(ValueError, match=r"data.train_features: method 'icmlm' trains on images"):
        recipes.load_recipe(coco_recipe(root, coco, "coco_icmlm.yaml", train_features=coco_extracted["train"],
                                        test_features=coco_extracted["test"]), ["model={name: icmlm}"])
    with pytest.raises(ValueError, match=r"data.test_featurs: unknown key \(did you mean 'test_features'\?\)"):
        recipes.load_recipe(coco_recipe(root, coco, "coco_typo.yaml", test_featurs=coco_extracted["test"]))


def test_coco_feature_folders_of_different_extractions(root, coco, coco_extracted):
    other = root / "coco_features_other"
    result = extract_coco(coco, "test", other, None)  # freshly initialised weights: another backbone
    assert result.exit_code == 0, result.output
    result = cli("fit", coco_recipe(root, coco, "coco_mismatch.yaml", train_features=coco_extracted["train"],
                                    test_features=other), "--run-dir", root / "c4",
                 *[x for o in TINY for x in ("--set", o)])
    assert_user_error(result, f"data.test_features: {other / 'manifest.json'} and data.train_features "
                      f"{coco_extracted['train'] / 'manifest.json'} come from different extractions",
                      "weights sha256", "--weights")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest.update(weights=json.loads((coco_extracted["test"] / "manifest.json").read_text())["weights"],
                    image_size=[32, 32], backbone={"name": "small_cnn", "width": 4, "depth": 3})
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match=r"different extractions \(backbone .*'depth': 2.* vs .*'depth': 3"):
        fit_coco(root, coco, root / "c5", train_features=coco_extracted["train"], test_features=other)


def test_extract_unrecognised_caption_json(root, shapes):
    for content in ({"images": [{"id": 1, "file_name": "a.jpg"}]}, {"annotations": []}, [1, 2],
                    {"images": [], "annotations": {}}):
        (root / "odd.json").write_text(json.dumps(content))
        result = extract(shapes, root / "e6", captions=root / "odd.json")
        assert_user_error(result, "odd.json: unrecognised caption JSON", "expected Karpathy-split",
                          "or COCO captions {'images': [{'id', 'file_name'}], 'annotations'")
        assert not (root / "e6").exists()
