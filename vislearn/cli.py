"""The `vislearn` command line (click).

Every user mistake (a bad recipe key, a missing dataset, a corrupt image, a
run dir of another recipe, ...) ends as one `error:` line and exit code 2.
TensorFlow is imported lazily so `vislearn --help` and recipe errors are fast.
"""

import functools
import json
import logging
import os
import sys
from pathlib import Path

import click

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class UserError(click.ClickException):
    exit_code = 2

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def user_errors(fn):
    """Turn ConfigError/ValueError/FileNotFoundError from vislearn into one line."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from vislearn.config import ConfigError

        try:
            return fn(*args, **kwargs)
        except ConfigError as error:
            raise UserError(str(error).splitlines()[0]) from None
        except FileNotFoundError as error:
            raise UserError(f"{error.filename or ''}: {error.strerror or error}") from None

    return wrapper


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log debugging detail.")
def main(verbose):
    """vislearn: landmark methods of visual learning as Keras models."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")


@main.command("recipes")
@user_errors
def recipes_command():
    """List bundled recipes with a one-line description."""
    from vislearn.recipes import bundled_recipes, read_yaml

    for name, path in bundled_recipes().items():
        click.echo(f"{name:28s} {read_yaml(path).get('description', '')}")


@main.command("fit")
@click.argument("recipe")
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run dir (default runs/<recipe>); "
              "an interrupted run there is resumed.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe value.")
@click.option("--strategy", help="auto|default|one_device|mirrored|multi_worker|tpu (default: the recipe's).")
@user_errors
def fit_command(recipe, run_dir, overrides, strategy):
    """Train RECIPE (a path or a bundled recipe name)."""
    from vislearn import recipes
    from vislearn.config import pick
    from vislearn.distribute import STRATEGIES

    config, source = recipes.load_recipe(recipe, overrides)
    if strategy is not None:
        pick(dict.fromkeys(STRATEGIES), strategy, "--strategy")
    metrics = recipes.fit(config, source, run_dir, strategy)
    click.echo(json.dumps(metrics, indent=2))


@main.command("evaluate")
@click.argument("run_dir", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--protocol", type=click.Choice(["linear", "knn"]), help="Only the linear probe's or the weighted "
              "kNN's top-1 on frozen features (runs scored by the representation protocol).")
@user_errors
def evaluate_command(run_dir, as_json, protocol):
    """Metrics of a trained run (same keys as metrics.json)."""
    from vislearn import recipes
    from vislearn.config import ConfigError

    metrics = recipes.evaluate(run_dir)
    if protocol is not None:
        key = f"{protocol}_top1"
        if key not in metrics:
            raise ConfigError(f"{run_dir}: --protocol {protocol} expected a run scored by the representation "
                              f"protocol ({key}); this run's metrics are {sorted(metrics)}")
        metrics = {key: metrics[key]}
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            click.echo(f"{key:20s} {value:.4f}" if isinstance(value, float) else f"{key:20s} {value}")


@main.command("ground")
@click.argument("run_dir", type=click.Path())
@click.option("--entities", "entities_root", required=True, type=click.Path(), help="Flickr30K Entities style "
              "folder: Sentences/*.txt, Annotations/*.xml (e.g. `vislearn data make captioned_shapes --grounding`).")
@click.option("--images", "image_dir", type=click.Path(), help="Folder of <image id>.jpg (default: ENTITIES/images).")
@click.option("--split-file", type=click.Path(), help="Image ids to ground, one a line (e.g. Flickr30K Entities' "
              "test.txt; default: every sentence file's).")
@click.option("--detector", "detector_run", type=click.Path(), help="A yolo_v1 or yolo_anchor_free run dir whose "
              "detections are the candidate boxes (default: each image's ground-truth boxes).")
@click.option("--score-threshold", default=0.25, show_default=True, type=click.FloatRange(0, 1),
              help="Score a detection needs to be a candidate (with --detector).")
@click.option("--iou", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="IoU with the truth a chosen box needs to count as found.")
@click.option("--protocol", default="any", show_default=True, type=click.Choice(["any", "merged"]),
              help="A phrase with several boxes is found by matching any of them, or their union box (merged).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--out", type=click.Path(file_okay=False), help="Write grounding.json (the metrics) and "
              "grounding.png (8 images: each phrase's chosen and true boxes) here.")
@user_errors
def ground_command(run_dir, entities_root, image_dir, split_file, detector_run, score_threshold, iou, protocol,
                   as_json, out):
    """Region-phrase grounding with RUN_DIR's two-branch model: per phrase, the candidate box whose crop
    scores best against it; prints grounding_accuracy, chance, upper bound and phrase counts."""
    from vislearn.evaluation.grounding import ground_run

    metrics = ground_run(run_dir, entities_root, image_dir, detector_run, split_file, score_threshold, iou, protocol,
                         out)
    if as_json:
        click.echo(json.dumps(metrics))
    else:
        for key, value in metrics.items():
            click.echo(f"{key:30s} {value:.4f}" if isinstance(value, float) else f"{key:30s} {value}")
        if out is not None:
            click.echo(f"wrote {Path(out) / 'grounding.json'} and {Path(out) / 'grounding.png'}")


@main.command("export")
@click.argument("run_dir", type=click.Path())
@click.option("--out", "base", required=True, type=click.Path(file_okay=False), help="Export base dir.")
@click.option("--name", help="Model name (default: the recipe's export.name).")
@click.option("--version", type=int, help="Version number (default: next free).")
@user_errors
def export_command(run_dir, base, name, version):
    """Write RUN_DIR's model as a SavedModel in TF Serving layout BASE/NAME/VERSION."""
    from vislearn import recipes

    path = recipes.export(run_dir, base, name, version)
    click.echo(str(path))


@main.command("predict")
@click.argument("export_dir", type=click.Path())
@click.argument("images", nargs=-1, required=True)
@click.option("--out", type=click.Path(file_okay=False), help="Write annotated PNGs here.")
@user_errors
def predict_command(export_dir, images, out):
    """Run an exported model on IMAGE files; print results, optionally draw them."""
    from vislearn.predict import predict

    for line in predict(export_dir, images, out):
        click.echo(line)


@main.group("data")
def data_group():
    """Datasets made from real pixels that installed packages ship."""


@data_group.command("make")
@click.argument("name")
@click.option("--out", required=True, type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--format", "file_format", help="On-disk format, for sets that offer several (e.g. coco|voc|yolo).")
@click.option("--grounding", is_flag=True, help="Also write phrase -> box annotations (Flickr30K Entities format; "
              "captioned_shapes).")
@user_errors
def data_make_command(name, out, seed, file_format, grounding):
    """Write dataset NAME to OUT in its standard on-disk format."""
    import inspect

    from vislearn.config import ConfigError, pick
    from vislearn.data.make import MAKERS

    maker = pick(MAKERS, name, "NAME")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out}: not empty; choose an empty or new folder")
    options = {}
    if file_format is not None:
        if "file_format" not in inspect.signature(maker).parameters:
            raise ConfigError(f"--format: dataset {name!r} has one format; drop --format")
        options["file_format"] = file_format
    if grounding:
        if "grounding" not in inspect.signature(maker).parameters:
            raise ConfigError(f"--grounding: dataset {name!r} has no grounding annotations; drop --grounding")
        options["grounding"] = True
    maker(out, seed=seed, **options)
    click.echo(str(out))


@main.group("index")
def index_group():
    """Embedding lookups: a gallery's vectors baked into a servable model."""


@index_group.command("build")
@click.argument("run_dir", type=click.Path())
@click.option("--images", type=click.Path(), help="Gallery folder of images (answers lookup_text).")
@click.option("--captions", type=click.Path(), help="Gallery of captions: .txt, one per line, or Karpathy "
              ".json (answers lookup_image).")
@click.option("--out", "base", required=True, type=click.Path(file_okay=False), help="Export base dir.")
@click.option("--name", required=True, help="Model name.")
@click.option("--version", type=int, help="Version number (default: next free).")
@click.option("--chunk-size", default=32768, show_default=True, type=int, help="Index rows per matmul chunk.")
@user_errors
def index_build_command(run_dir, images, captions, base, name, version, chunk_size):
    """Embed a gallery with RUN_DIR's image-text model; write a lookup SavedModel BASE/NAME/VERSION."""
    from vislearn.index import build_index

    if chunk_size < 1:
        raise click.BadParameter(f"expected a positive integer, received {chunk_size}", param_hint="--chunk-size")
    click.echo(str(build_index(run_dir, base, name, images, captions, version, chunk_size)))


@main.group("features")
def features_group():
    """Precomputed image features (two_branch recipes: data.features, model.backbone: features)."""


@features_group.command("extract")
@click.option("--captions", required=True, type=click.Path(), help="Karpathy-split or COCO captions JSON, "
              "told apart by structure (captioned_shapes: DIR/dataset_captioned_shapes.json; a COCO file such "
              "as captions_train2014.json has no splits: its images are the one split 'all').")
@click.option("--images", required=True, type=click.Path(), help="Folder the JSON's file names are relative to "
              "(captioned_shapes: DIR/images).")
@click.option("--backbone", required=True, help="A vislearn backbone name, a YAML/JSON spec such as "
              "'{name: small_cnn, width: 16}' (or a file holding one), or a keras.applications model name "
              "(e.g. MobileNetV3Small; built with include_top=False, pooling='avg').")
@click.option("--weights", type=click.Path(), help="Local .weights.h5/.keras/.h5 file of the backbone (nothing "
              "is downloaded; without it the backbone is freshly initialised and its weights are saved to OUT).")
@click.option("--image-size", default=(64,), show_default=True, type=int, multiple=True,
              help="Side images are resized to; give twice for HEIGHT WIDTH.")
@click.option("--batch-size", default=64, show_default=True, type=int, help="Images per forward pass.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder (new or empty).")
@user_errors
def features_extract_command(captions, images, backbone, weights, image_size, batch_size, out):
    """Cache a frozen backbone's feature vectors of every image of a caption set:
    OUT/<split>.npy (float32, rows in the caption file's order) + OUT/manifest.json."""
    from vislearn.config import ConfigError
    from vislearn.features import extract_features, parse_backbone

    if len(image_size) > 2:
        raise ConfigError(f"--image-size: give it once (a side) or twice (height, width), received {list(image_size)}")
    size = list(image_size) * (2 // len(image_size))
    spec = parse_backbone(backbone)
    click.echo(str(extract_features(captions, images, spec, out, weights, size, batch_size)))


from vislearn.serving.commands import query_group, serve_command, serving_group  # noqa: E402
main.add_command(serve_command, "serve")
main.add_command(query_group, "query")
main.add_command(serving_group, "serving")


if __name__ == "__main__":
    sys.exit(main())
