#!/usr/bin/env bash
# The main job end to end on embedded defaults (called by `make demo`):
# make data -> fit a bundled recipe -> evaluate -> export -> predict -> picture.
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
EPOCHS=${DEMO_EPOCHS:-15}
rm -rf "$OUT"   # the demo's own scratch folder, remade each time
mkdir -p "$OUT"
export VISLEARN_DATA="$OUT/data_home"

echo "== 1/5 make digits -> digits-M (real handwritten digits, MNIST-M construction)"
vislearn data make digits_m --out "$OUT/digits_m"

echo "== 2/5 fit DANN ($EPOCHS epochs)"
vislearn fit dann_digits --run-dir "$OUT/run" --set data.root="$OUT/digits_m" --set train.epochs="$EPOCHS"

echo "== 3/5 evaluate"
vislearn evaluate "$OUT/run" --json

echo "== 4/5 export (TF Serving layout)"
vislearn export "$OUT/run" --out "$OUT/models" --version 1

echo "== 5/5 predict on target-domain images"
vislearn predict "$OUT/models/dann_digits/1" $(ls "$OUT"/digits_m/target/test/*/*.png | head -n 6) --out "$OUT/predictions"

echo
echo "training curves: $OUT/run/plots/history.png"
echo "predictions:     $OUT/predictions/*.png"
