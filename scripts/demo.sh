#!/usr/bin/env bash
# The serving loop end to end on embedded defaults (called by `make demo`):
# make shapes_on_photos -> fit a small anchor-free YOLO (+ test metrics) -> export
# (TF Serving layout) -> `vislearn serve` in the background -> query it over
# gRPC (official tensorflow-serving-api stubs) -> annotated PNGs -> SIGTERM.
#
# Settings keep it to a few minutes on 2 CPU cores: the bundled recipe's model
# at 128x128 input, batch 8, the recipe's learning rate (0.004) with a short
# warm-up, no augmentation (it pays off only over the recipe's 38 epochs):
# 3 epochs reach map50 0.21 (4 epochs: 0.22; 3 at lr 0.002: 0.17).
# DEMO_EPOCHS / DEMO_STEPS shorten it further.
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
EPOCHS=${DEMO_EPOCHS:-3}
STEPS=${DEMO_STEPS:-null}   # steps per epoch; null: the whole training split (100 batches)
IMAGES=${DEMO_IMAGES:-4}    # test images sent to the server
rm -rf "$OUT"   # the demo's own scratch folder, remade each time
mkdir -p "$OUT"
export VISLEARN_DATA="$OUT/data_home"
START=$SECONDS

echo "== 1/6 make shapes_on_photos (shapes drawn on real photos, COCO layout) [$((SECONDS - START)) s]"
vislearn data make shapes_on_photos --out "$OUT/shapes"

echo "== 2/6 fit the anchor-free YOLO recipe yolo_af_shapes ($EPOCHS epochs) [$((SECONDS - START)) s]"
vislearn fit yolo_af_shapes --run-dir "$OUT/run" --set data.root="$OUT/shapes" \
  --set train.epochs="$EPOCHS" --set train.steps_per_epoch="$STEPS" \
  --set data.image_size='[128, 128]' --set data.batch_size=8 --set data.augment=false \
  --set optimizer.learning_rate=0.004 --set optimizer.schedule.warmup_steps=30 | tee "$OUT/fit.log"

echo "== 3/6 test-split metrics written by fit (VOC map50, COCO map on the 200 test images) [$((SECONDS - START)) s]"
# `vislearn evaluate "$OUT/run" --json` recomputes them from the best checkpoint.
cp "$OUT/run/metrics.json" "$OUT/metrics.json" && cat "$OUT/metrics.json"

echo "== 4/6 export (TF Serving layout: $OUT/models/yolo_af_shapes/1) [$((SECONDS - START)) s]"
vislearn export "$OUT/run" --out "$OUT/models" --version 1

PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== 5/6 serve it with the embedded TF-Serving-compatible server (gRPC 127.0.0.1:$PORT) [$((SECONDS - START)) s]"
vislearn serve --model yolo_af_shapes="$OUT/models/yolo_af_shapes" --port "$PORT" --rest-port 0 \
  --poll-seconds 0 > "$OUT/server.out" 2> "$OUT/server.log" &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
# The server prints one JSON line (its ports) once the model is loaded.
for _ in $(seq 1 240); do
  grep -q '"grpc"' "$OUT/server.out" 2>/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "error: the server exited; see $OUT/server.log" >&2; exit 1; }
  sleep 0.5
done
cat "$OUT/server.out"

echo "== 6/6 query it over gRPC; draw the detections [$((SECONDS - START)) s]"
vislearn query detect --server "127.0.0.1:$PORT" --model yolo_af_shapes --score-threshold 0.25 \
  --out "$OUT/detections" $(ls "$OUT"/shapes/test/*.jpg | head -n "$IMAGES") | tee "$OUT/served_detections.jsonl"
kill -TERM $SERVER
wait $SERVER || true
trap - EXIT
echo "server stopped (SIGTERM, drained)"

echo
echo "done in $((SECONDS - START)) s"
echo "training curves:      $OUT/run/plots/history.png"
echo "served detections:    $OUT/served_detections.jsonl"
echo "annotated pictures:   $OUT/detections/*_detections.png"
