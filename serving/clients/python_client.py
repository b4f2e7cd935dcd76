"""Query TF Serving (or `vislearn serve`) from Python with vislearn's client.

    python serving/clients/python_client.py --server localhost:8500 --model classifier image.png
"""

import argparse

from vislearn.serving import Client

parser = argparse.ArgumentParser()
parser.add_argument("images", nargs="+")
parser.add_argument("--server", default="localhost:8500")
parser.add_argument("--model", default="classifier")
args = parser.parse_args()

with Client(args.server) as client:
    print(client.status(args.model))
    for path, result in zip(args.images, client.classify(args.images, model=args.model)):
        print(path, result["label"], round(result["score"], 3))
