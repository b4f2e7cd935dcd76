"""Region-phrase grounding: the Flickr30K Entities reader, the grounding
variant of captioned shapes, the accuracy metric, the evaluation loop and
the `vislearn ground` command."""

import colorsys
import functools
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from helpers import run_cli, tiny_yolo_v1_overrides
from vislearn.cli import main
from vislearn.config import ConfigError
from vislearn.data.captioned_shapes import COLOURS, make_captioned_shapes
from vislearn.data.make import MAKERS
from vislearn.data.flickr30k_entities import parse_sentence, read_flickr30k_entities
from vislearn.evaluation.grounding import box_hits, detector_candidates, grounding_accuracy, grounding_metrics

SENTENCES = """\
[/EN#18/people A child] in [/EN#19/clothing/other a pink dress] is climbing up [/EN#20/other a set of stairs] .
[/EN#0/notvisual Someone] watches [/EN#18/people the girl] in [/EN#21/scene an entry way]

[/EN#22/people Two dogs] play .
"""
ANNOTATION = """<annotation>
  <filename>1000.jpg</filename>
  <size><width>500</width><height>375</height><depth>3</depth></size>
  <object><name>18</name><bndbox><xmin>1</xmin><ymin>11</ymin><xmax>100</xmax><ymax>210</ymax></bndbox></object>
  <object><name>19</name><name>20</name>
    <bndbox><xmin>51</xmin><ymin>61</ymin><xmax>70</xmax><ymax>80</ymax></bndbox></object>
  <object><name>22</name><bndbox><xmin>201</xmin><ymin>1</ymin><xmax>250</xmax><ymax>50</ymax></bndbox></object>
  <object><name>22</name><bndbox><xmin>301</xmin><ymin>1</ymin><xmax>350</xmax><ymax>50</ymax></bndbox></object>
  <object><name>21</name><nobndbox>1</nobndbox><scene>1</scene></object>
</annotation>
"""


@pytest.fixture
def entities_root(tmp_path):
    (tmp_path / "Sentences").mkdir()
    (tmp_path / "Annotations").mkdir()
    (tmp_path / "Sentences" / "1000.txt").write_text(SENTENCES)
    (tmp_path / "Annotations" / "1000.xml").write_text(ANNOTATION)
    return tmp_path


def test_reader_parses_markup_boxes_and_entities_without_boxes(entities_root):
    (image,) = read_flickr30k_entities(entities_root)
    assert (image.image_id, image.width, image.height) == ("1000", 500, 375)
    assert len(image.sentences) == 3  # the blank line is skipped
    first = image.sentences[0]
    assert first.text == "A child in a pink dress is climbing up a set of stairs ."
    assert [(p.text, p.entity, p.types, p.first_word) for p in first.phrases] == [
        ("A child", "18", ["people"], 0), ("a pink dress", "19", ["clothing", "other"], 3),
        ("a set of stairs", "20", ["other"], 9)]
    np.testing.assert_array_equal(image.boxes["18"], [[0, 10, 100, 210]])  # 1-based inclusive -> pixel edges
    np.testing.assert_array_equal(image.boxes["19"], image.boxes["20"])  # one box, two entities
    assert image.boxes["22"].shape == (2, 4)  # one entity, two boxes
    assert image.no_box == {"21"}  # the scene; entity 0 (notvisual) has no object at all
    second = image.sentences[1]
    assert [image.phrase_boxes(p).shape[0] for p in second.phrases] == [0, 1, 0]


def test_reader_bad_input_names_the_file(entities_root):
    (entities_root / "Sentences" / "2000.txt").write_text("[/EN#1/people A man] runs\n")
    with pytest.raises(ConfigError, match=r"Annotations/2000\.xml: annotation file not found"):
        read_flickr30k_entities(entities_root)
    (entities_root / "Annotations" / "2000.xml").write_text("<annotation><size>")
    with pytest.raises(ConfigError, match=r"2000\.xml: not a Flickr30K Entities annotation"):
        read_flickr30k_entities(entities_root)
    (entities_root / "Annotations" / "2000.xml").write_text(ANNOTATION)
    for bad in ("[/EN#1/people A man runs\n", "A man] runs\n", "[/EN#x/people A man] runs\n", "[EN#1 A man]\n"):
        (entities_root / "Sentences" / "2000.txt").write_text("fine line\n" + bad)
        with pytest.raises(ConfigError, match=r"Sentences/2000\.txt: line 2: malformed entity markup") as error:
            read_flickr30k_entities(entities_root)
        assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="nowhere/Sentences: not found"):
        read_flickr30k_entities(entities_root / "nowhere")
    assert parse_sentence("no phrases here").phrases == []


def test_accuracy_on_hand_made_cases():
    truth = np.array([[0, 0, 10, 10]])
    exactly_half = [0, 0, 10, 5]  # IoU 0.5: counts
    just_below = [0, 0, 10, 4.9]
    shifted = [5, 0, 15, 10]      # IoU 1/3
    np.testing.assert_array_equal(box_hits([exactly_half, just_below, shifted, [0, 0, 10, 10]], [truth] * 4),
                                  [True, False, False, True])
    assert grounding_accuracy([exactly_half, shifted], [truth, truth]) == 0.5
    two = np.array([[0, 0, 10, 10], [10, 0, 20, 10]])  # a phrase with two boxes ("two dogs")
    assert grounding_accuracy([[12, 0, 20, 10]], [two], protocol="any") == 1.0     # IoU 0.8 with the second
    assert grounding_accuracy([[12, 0, 20, 10]], [two], protocol="merged") == 0.0  # IoU 0.4 with their union
    assert grounding_accuracy([[0, 0, 20, 10]], [two], protocol="merged") == 1.0
    assert grounding_accuracy([], []) == 0.0
    with pytest.raises(ValueError, match="without a ground-truth box"):
        grounding_accuracy([[0, 0, 1, 1]], [np.zeros((0, 4))])
    with pytest.raises(ValueError, match="protocol: expected one of"):
        grounding_accuracy([[0, 0, 1, 1]], [truth], protocol="best")


class ColourModel:
    """A stand-in two-branch model: image = mean colour of the crop, text =
    the colour the phrase names (so grounding is right when crops are)."""

    image_shape = (16, 16, 3)

    def embed_image(self, crops, training=False):
        mean = np.asarray(crops).mean(axis=(1, 2))
        mean = mean - mean.mean(axis=1, keepdims=True)  # chroma only
        return mean / (np.linalg.norm(mean, axis=1, keepdims=True) + 1e-6)

    def embed_text(self, texts, training=False):
        out = []
        for text in np.asarray(texts).astype(str):
            hue = next(COLOURS[w] for w in text.split() if w in COLOURS)
            rgb = np.array(colorsys.hsv_to_rgb(hue / 360, 1, 1))
            out.append((rgb - rgb.mean()) / np.linalg.norm(rgb - rgb.mean()))
        return np.array(out)


def test_grounding_variant_and_evaluation(tmp_path, monkeypatch):
    small = functools.partial(make_captioned_shapes, n_train=2, n_val=0, n_test=40)
    monkeypatch.setitem(MAKERS, "captioned_shapes", small)  # the CLI path, at a test's size
    result = CliRunner().invoke(main, ["data", "make", "captioned_shapes", "--out", str(tmp_path / "s"),
                                       "--grounding"])
    assert result.exit_code == 0, result.output
    images = read_flickr30k_entities(tmp_path / "s", [f"test_{i:05d}" for i in range(40)])
    phrases = [p for image in images for s in image.sentences for p in s.phrases]
    assert {p.types[0] for p in phrases} == {"shape", "scene"}
    assert all(len(s.phrases) >= 1 for image in images for s in image.sentences)
    assert all(image.no_box and len(image.boxes) >= 1 for image in images)  # the photo behind: no box

    metrics = grounding_metrics(ColourModel(), images, tmp_path / "s" / "images")
    assert metrics["grounding_phrases"] == sum(p.entity in image.boxes for image in images
                                               for s in image.sentences for p in s.phrases)
    assert metrics["grounding_phrases_without_box"] == len(phrases) - metrics["grounding_phrases"]
    assert metrics["grounding_upper_bound"] == 1.0  # ground-truth candidates
    assert metrics["grounding_accuracy"] > max(0.9, metrics["grounding_chance"])

    # A detector's boxes: one image gets no candidate, another only a box far off.
    candidates = {image.image_id: np.concatenate(list(image.boxes.values())) for image in images}
    candidates[images[0].image_id] = np.zeros((0, 4))
    candidates[images[1].image_id] = np.array([[0, 0, 2, 2]])
    shifted = grounding_metrics(ColourModel(), images, tmp_path / "s" / "images", candidates=candidates)
    assert shifted["grounding_upper_bound"] < 1.0
    assert shifted["grounding_accuracy"] < metrics["grounding_accuracy"]

    class Detector:  # a detector's `detect` output: padded rel_yxyx boxes and a count
        def detect(self, images, score_threshold, max_detections):
            assert images.shape == (1, 32, 32, 3)
            return {"detection_boxes": np.array([[[0.5, 0.25, 1.0, 0.5], [0, 0, 0, 0]]]), "num_detections": [1]}

    found = detector_candidates(Detector(), images[:2], tmp_path / "s" / "images", (32, 32, 3))
    np.testing.assert_allclose(found[images[0].image_id], [[16, 32, 32, 64]])  # xyxy pixels of the 64x64 image
    assert set(found) == {images[0].image_id, images[1].image_id}

    result = CliRunner().invoke(main, ["data", "make", "digits_m", "--out", str(tmp_path / "d"), "--grounding"])
    assert result.exit_code != 0 and "--grounding: dataset 'digits_m' has no grounding annotations" in result.output


# ---------------------------------------------------------------- `vislearn ground`

TINY_TWO_BRANCH = ["data.image_size=[32, 32]", "data.batch_size=8", "train.epochs=1", "train.steps_per_epoch=2",
                   "model.hidden_units=32", "model.embed_dim=16", "model.word_dim=8",
                   "model.backbone={name: small_cnn, width: 4, depth: 2}"]


@pytest.fixture(scope="module")
def grounding_run(tmp_path_factory, data_home):
    """A seconds-long two_branch run on the grounding variant of captioned
    shapes (in this process: a fresh one costs TensorFlow's start-up)."""
    from vislearn import recipes

    root = tmp_path_factory.mktemp("ground")
    shapes = make_captioned_shapes(root / "shapes", n_train=24, n_val=0, n_test=8, image_size=32, grounding=True)
    recipe, source = recipes.load_recipe("two_branch_shapes", [f"data.root={shapes}", *TINY_TWO_BRANCH])
    recipes.fit(recipe, source, root / "run", verbose=0)
    _, model, _ = recipes.load_trained(root / "run")
    return {"shapes": shapes, "run": root / "run", "model": model}


def test_ground_command_matches_grounding_metrics(grounding_run, tmp_path):
    shapes, model = grounding_run["shapes"], grounding_run["model"]
    test_ids = [f"test_{i:05d}" for i in range(8)]
    (tmp_path / "test.txt").write_text("\n".join(test_ids) + "\n")
    result = run_cli("ground", grounding_run["run"], "--entities", shapes, "--split-file", tmp_path / "test.txt",
                     "--json", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    expected = grounding_metrics(model, read_flickr30k_entities(shapes, test_ids), shapes / "images")
    assert printed == pytest.approx(expected)
    assert printed["grounding_phrases"] > 0 and printed["grounding_upper_bound"] == 1.0
    assert json.loads((tmp_path / "out" / "grounding.json").read_text()) == printed
    with Image.open(tmp_path / "out" / "grounding.png") as picture:
        assert picture.format == "PNG" and picture.width > 300 and picture.height > 300

    # Human-readable, every image, another IoU and protocol: the same numbers as the API's.
    result = run_cli("ground", grounding_run["run"], "--entities", shapes, "--iou", 0.7, "--protocol", "merged")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = dict(line.split() for line in result.stdout.splitlines())
    expected = grounding_metrics(model, read_flickr30k_entities(shapes), shapes / "images", threshold=0.7,
                                 protocol="merged")
    assert set(printed) == set(expected)
    for key, value in expected.items():
        assert float(printed[key]) == pytest.approx(value, abs=1e-4)


def test_ground_command_with_detector_candidates(grounding_run, tmp_path):
    """--detector: a real (seconds-long) yolo_v1 run's detections are the candidates."""
    from vislearn import recipes

    recipe, source = recipes.load_recipe("yolo_shapes", tiny_yolo_v1_overrides())
    recipes.fit(recipe, source, tmp_path / "detector", verbose=0)
    _, detector, data = recipes.load_trained(tmp_path / "detector")
    shapes = grounding_run["shapes"]
    # An untrained detector's scores are low: threshold 0 keeps its top boxes as candidates.
    result = run_cli("ground", grounding_run["run"], "--entities", shapes, "--detector", tmp_path / "detector",
                     "--score-threshold", 0.0, "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    images = read_flickr30k_entities(shapes)
    candidates = detector_candidates(detector, images, shapes / "images", data.image_shape, score_threshold=0.0)
    assert sum(len(boxes) for boxes in candidates.values()) > 0
    expected = grounding_metrics(grounding_run["model"], images, shapes / "images", candidates=candidates)
    assert json.loads(result.stdout) == pytest.approx(expected)


def test_ground_command_bad_input_is_one_line(grounding_run, tmp_path):
    run, shapes = grounding_run["run"], grounding_run["shapes"]
    (tmp_path / "dann").mkdir()
    (tmp_path / "dann" / "recipe.yaml").write_text("model: {name: dann}\n")
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "recipe.yaml").write_text((run / "recipe.yaml").read_text())
    (tmp_path / "no_annotations" / "Sentences").mkdir(parents=True)
    (tmp_path / "no_image").mkdir()
    for folder in ("Sentences", "Annotations"):
        (tmp_path / "no_image" / folder).symlink_to(shapes / folder)
    (tmp_path / "no_image" / "images").mkdir()
    cases = [
        ([tmp_path / "dann", "--entities", shapes], f"{tmp_path / 'dann'}: method 'dann' cannot ground phrases"),
        ([run, "--entities", tmp_path / "nowhere"], f"{tmp_path / 'nowhere' / 'Sentences'}: not found"),
        ([run, "--entities", tmp_path / "no_annotations"],
         f"{tmp_path / 'no_annotations' / 'Annotations'}: not found"),
        ([run, "--entities", tmp_path / "no_image"],
         f"{tmp_path / 'no_image' / 'images' / 'test_00000.jpg'}: image file not found"),
        ([run, "--entities", shapes, "--images", tmp_path / "nowhere"],
         f"--images {tmp_path / 'nowhere'}: not a folder"),
        ([run, "--entities", shapes, "--split-file", tmp_path / "none.txt"], f"{tmp_path / 'none.txt'}: split file"),
        ([tmp_path / "unfinished", "--entities", shapes], f"{tmp_path / 'unfinished'}: no checkpoint"),
        ([tmp_path / "nowhere", "--entities", shapes], f"{tmp_path / 'nowhere'}: not a run dir"),
        ([run, "--entities", shapes, "--detector", run], f"--detector {run}: method 'two_branch' is not a detector"),
    ]
    for args, message in cases:
        result = run_cli("ground", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr[-3000:])
        assert "Traceback" not in result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
        assert result.stderr.startswith(f"error: {message}"), (message, result.stderr)
