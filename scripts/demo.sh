#!/usr/bin/env bash
# The main job end to end on embedded defaults (called by `make demo`):
# make data -> fit a bundled recipe -> evaluate -> export -> predict -> picture.
set -euo pipefail
OUT=${DEMO_OUT:-demo_out}
EPOCHS=${DEMO_EPOCHS:-15}
rm -rf "$OUT"   # the demo's own scratch folder, remade each time
mkdir -p "$OUT"
export VISLEARN_DATA="$OUT/data_home"

echo "== 1/7 make digits -> digits-M (real handwritten digits, MNIST-M construction)"
vislearn data make digits_m --out "$OUT/digits_m"

echo "== 2/7 fit DANN ($EPOCHS epochs)"
vislearn fit dann_digits --run-dir "$OUT/run" --set data.root="$OUT/digits_m" --set train.epochs="$EPOCHS"

echo "== 3/7 evaluate"
vislearn evaluate "$OUT/run" --json

echo "== 4/7 export (TF Serving layout)"
vislearn export "$OUT/run" --out "$OUT/models" --version 1

echo "== 5/7 predict on target-domain images"
vislearn predict "$OUT/models/dann_digits/1" $(ls "$OUT"/digits_m/target/test/*/*.png | head -n 6) --out "$OUT/predictions"

PORT=$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "== 6/7 serve the export with the embedded TF-Serving-compatible server (gRPC 127.0.0.1:$PORT)"
vislearn serve --model dann_digits="$OUT/models/dann_digits" --port "$PORT" --rest-port 0 > "$OUT/server.log" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  vislearn query status --server "127.0.0.1:$PORT" --model dann_digits 2>/dev/null | grep -q AVAILABLE && break
  sleep 1
done

echo "== 7/7 query it with the gRPC client (official tensorflow-serving-api stubs)"
vislearn query classify --server "127.0.0.1:$PORT" --model dann_digits \
  $(ls "$OUT"/digits_m/target/test/*/*.png | head -n 6) | tee "$OUT/served_predictions.jsonl"
kill -TERM $SERVER; wait $SERVER || true
trap - EXIT

echo
echo "training curves: $OUT/run/plots/history.png"
echo "predictions:     $OUT/predictions/*.png"
