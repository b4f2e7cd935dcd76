"""Serving: TF Serving deployment helpers, an embedded TF-Serving-compatible server, clients.

`Client` and `Server` are imported on first use so that `import vislearn.serving`
stays light (the CLI imports its commands without loading TensorFlow or gRPC).
"""

__all__ = ["Client", "Server"]


def __getattr__(name):
    if name == "Client":
        from vislearn.serving.client import Client

        return Client
    if name == "Server":
        from vislearn.serving.server import Server

        return Server
    raise AttributeError(f"module 'vislearn.serving' has no attribute {name!r}")
