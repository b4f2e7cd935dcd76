"""`vislearn predict`: run an exported SavedModel on image files."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vislearn.config import ConfigError


def load_export(export_dir):
    import tensorflow as tf

    export_dir = Path(export_dir)
    if not (export_dir / "saved_model.pb").exists():
        versions = sorted((p for p in export_dir.iterdir() if p.name.isdigit()), key=lambda p: int(p.name)) \
            if export_dir.is_dir() else []
        if not versions:
            raise ConfigError(f"{export_dir}: no saved_model.pb (expected BASE/NAME/VERSION or BASE/NAME)")
        export_dir = versions[-1]
    return export_dir, tf.saved_model.load(str(export_dir))


def read_image_bytes(path):
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: image file not found")
    data = path.read_bytes()
    try:
        with Image.open(path) as img:
            img.load()
    except Exception as error:
        raise ConfigError(f"{path}: cannot decode image ({type(error).__name__})") from None
    return data


def draw_label(image_path, text, out_png):
    image = Image.open(image_path).convert("RGB")
    scale = max(1, 256 // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    canvas = Image.new("RGB", (image.width, image.height + 16), "white")
    canvas.paste(image, (0, 16))
    ImageDraw.Draw(canvas).text((2, 2), text, fill="black")
    canvas.save(out_png)


def draw_detections(image_path, boxes, labels, scores, out_png):
    """Draw labelled boxes (normalised yxyx in the original image) on a copy of the image."""
    image = Image.open(image_path).convert("RGB")
    scale = max(1, 256 // max(image.size))
    image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    draw = ImageDraw.Draw(image)
    colours = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]
    for box, label, score in zip(boxes, labels, scores):
        ymin, xmin, ymax, xmax = (float(v) for v in box)
        colour = colours[sum(map(ord, label)) % len(colours)]
        corners = [xmin * image.width, ymin * image.height, xmax * image.width, ymax * image.height]
        draw.rectangle(corners, outline=colour, width=2)
        text = f"{label} {score:.2f}"
        top = max(corners[1] - 11, 0)
        draw.rectangle([corners[0], top, corners[0] + 6 * len(text) + 2, top + 11], fill=colour)
        draw.text((corners[0] + 1, top), text, fill="white")
    image.save(out_png)


def _detections(outputs, i):
    n = int(outputs["num_detections"][i])
    labels = [v.decode() for v in outputs["detection_labels"][i, :n]]
    return outputs["detection_boxes"][i, :n], labels, outputs["detection_scores"][i, :n]


def predict(export_dir, images, out=None):
    """Yield one line per image; with `out`, write an annotated PNG per image."""
    import tensorflow as tf

    from vislearn.export import read_metadata

    export_dir, loaded = load_export(export_dir)
    signature = loaded.signatures["serving_default"]
    metadata = read_metadata(export_dir)
    batch = tf.constant([read_image_bytes(p) for p in images])
    outputs = {k: v.numpy() for k, v in signature(images=batch).items()}
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(images):
        if "probabilities" in outputs:
            label = outputs["labels"][i].decode()
            score = float(np.max(outputs["probabilities"][i]))
            text = f"{label} ({score:.2f})"
            if out:
                png = Path(out) / f"{Path(path).stem}.png"
                draw_label(path, text, png)
                text += f" -> {png}"
            yield f"{path}: {text}"
        elif "detection_boxes" in outputs:
            boxes, labels, scores = _detections(outputs, i)
            found = ", ".join(f"{label} {score:.2f} [{', '.join(f'{v:.3f}' for v in box)}]"
                              for box, label, score in zip(boxes, labels, scores))
            text = f"{len(labels)} detection(s)" + (f": {found}" if found else "")
            if out:
                png = Path(out) / f"{Path(path).stem}.png"
                draw_detections(path, boxes, labels, scores, png)
                text += f" -> {png}"
            yield f"{path}: {text}"
        else:
            yield f"{path}: {metadata.get('kind', 'model')} outputs {sorted(outputs)}"
