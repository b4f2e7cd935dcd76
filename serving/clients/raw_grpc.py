"""The same Predict call with nothing but the official tensorflow-serving-api stubs.

    python serving/clients/raw_grpc.py --server localhost:8500 --model classifier image.png
"""

import argparse

import grpc
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

parser = argparse.ArgumentParser()
parser.add_argument("images", nargs="+")
parser.add_argument("--server", default="localhost:8500")
parser.add_argument("--model", default="classifier")
args = parser.parse_args()

request = predict_pb2.PredictRequest()
request.model_spec.name = args.model
request.model_spec.signature_name = "serving_default"
request.inputs["images"].CopyFrom(tf.make_tensor_proto([open(p, "rb").read() for p in args.images]))
with grpc.insecure_channel(args.server) as channel:
    response = prediction_service_pb2_grpc.PredictionServiceStub(channel).Predict(request, timeout=10)
print({name: tf.make_ndarray(proto) for name, proto in response.outputs.items()})
