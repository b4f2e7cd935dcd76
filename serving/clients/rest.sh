#!/usr/bin/env bash
# TF Serving's REST API with curl: status, metadata, predict (b64 image), metrics.
#   bash serving/clients/rest.sh image.png [host:port] [model]
set -euo pipefail
IMAGE=${1:?image file}; HOST=${2:-localhost:8501}; MODEL=${3:-classifier}
curl -s "http://$HOST/v1/models/$MODEL"
curl -s "http://$HOST/v1/models/$MODEL/metadata" | head -c 400; echo
printf '{"instances": [{"b64": "%s"}]}' "$(base64 -w0 "$IMAGE")" |
  curl -s -X POST -H 'Content-Type: application/json' --data @- "http://$HOST/v1/models/$MODEL:predict"
curl -s "http://$HOST/monitoring/prometheus/metrics" | grep request_count | head -5
