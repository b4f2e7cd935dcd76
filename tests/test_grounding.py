"""Region-phrase grounding: the Flickr30K Entities reader, the grounding
variant of captioned shapes, the accuracy metric and the evaluation loop."""

import colorsys
import functools

import numpy as np
import pytest
from click.testing import CliRunner

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
