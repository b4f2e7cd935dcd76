"""Tensors in and out of the wire formats: TensorProto (gRPC) and TF Serving's JSON (REST).

The JSON rules are TF Serving's (`util/json_tensor.cc`): a request carries
row-format `instances` (a list, one element per batch row; objects when the
signature has several inputs) or columnar `inputs` (one value, or an object of
named values); binary strings are `{"b64": "..."}`; the response is
`{"predictions": ...}` for rows and `{"outputs": ...}` for columns, and string
outputs whose name ends in `_bytes` come back as `{"b64": ...}`.
"""

import base64
import binascii
import json

import grpc
import numpy as np
import tensorflow as tf

from vislearn.serving.errors import ServingError, invalid


def to_tensor_proto(array):
    """numpy / list / bytes -> TensorProto (via `tf.make_tensor_proto`)."""
    return tf.make_tensor_proto(array)


def from_tensor_proto(proto, name="input"):
    """TensorProto -> numpy; a malformed proto is INVALID_ARGUMENT (as TF Serving)."""
    if proto.dtype == 0:
        raise invalid(f"tensor parsing error: {name} (dtype is DT_INVALID)")
    try:
        return tf.make_ndarray(proto)
    except Exception:  # the proto came from a client: never a server error
        raise invalid(f"tensor parsing error: {name}") from None


def dtype_name(dtype):
    return tf.dtypes.as_dtype(dtype).name


# --- JSON -> numpy -----------------------------------------------------------------

def _json_str(value):
    text = json.dumps(value, allow_nan=True)
    return text if len(text) <= 200 else text[:197] + "..."


def _json_type(value):
    if value is None:
        return "Null"
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, dict):
        return "Object"
    if isinstance(value, list):
        return "Array"
    if isinstance(value, str):
        return "String"
    return "Number"


def is_b64(value):
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get("b64"), str)


def _scalar(value, dtype):
    """One JSON leaf -> a Python value of `dtype` (a tf.DType)."""
    if dtype == tf.string:
        if isinstance(value, str):
            return value.encode("utf-8")
        if isinstance(value, dict):
            if not is_b64(value):
                raise invalid(f"JSON Value: {_json_str(value)} not formatted correctly for base64 data")
            try:
                return base64.b64decode(value["b64"], validate=True)
            except (binascii.Error, ValueError):
                raise invalid("Unable to base64 decode") from None
    elif dtype == tf.bool:
        if isinstance(value, bool):
            return value
    elif dtype.is_floating:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    elif dtype.is_integer:
        if isinstance(value, int) and not isinstance(value, bool):
            if dtype.min <= value <= dtype.max:
                return value
    else:
        raise ServingError(grpc.StatusCode.UNIMPLEMENTED,
                           f"Conversion of JSON Value: {_json_str(value)} to type: {dtype.name}")
    raise invalid(f"JSON Value: {_json_str(value)} Type: {_json_type(value)} is not of expected type: "
                  f"{dtype.name}")


def _shape_of(value):
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        if not value:
            break
        value = value[0]
    return shape


def _fill(value, shape, level, dtype, out):
    if not isinstance(value, list):
        if level != len(shape):
            raise invalid(f"JSON Value: {_json_str(value)} found at incorrect level: {level + 1} in the JSON DOM. "
                          f"Expected at level: {len(shape)}")
        out.append(_scalar(value, dtype))
        return
    if level >= len(shape):
        raise invalid(f"Encountered list at unexpected level: {level} expected < {len(shape)}")
    if len(value) != shape[level]:
        raise invalid(f"Encountered list at unexpected size: {len(value)} at level: {level} "
                      f"expected size: {shape[level]}")
    for item in value:
        _fill(item, shape, level + 1, dtype, out)


def json_to_array(value, dtype):
    """A (nested list) JSON value -> numpy array of `dtype` (a tf.DType)."""
    dtype = tf.dtypes.as_dtype(dtype)
    shape = _shape_of(value)
    flat = []
    _fill(value, shape, 0, dtype, flat)
    if dtype == tf.string:
        array = np.empty(len(flat), dtype=object)
        array[:] = flat
        return array.reshape(shape)
    return np.array(flat, dtype=dtype.as_numpy_dtype).reshape(shape)


def parse_predict_json(body, input_dtypes):
    """Parse a REST predict body.

    Args:
        body: request bytes.
        input_dtypes: function `signature_name -> {input name: tf.DType}`
            (raises ServingError for an unknown signature).

    Returns:
        (signature_name or "", {input name: np.ndarray}, "row" | "columnar").
    """
    doc = parse_json_object(body)
    signature = doc.get("signature_name", "")
    if not isinstance(signature, str):
        raise invalid(f"JSON Value: {_json_str(doc)} not formatted correctly. "
                      "'signature_name' key must be a string value.")
    dtypes = input_dtypes(signature)
    if not dtypes:
        raise invalid(f"Failed to get input map for signature: {signature or 'DEFAULT'}")
    if "instances" in doc and "inputs" in doc:
        raise invalid("Not formatted correctly expecting only one of 'inputs' or 'instances' keys to exist")
    if "instances" in doc:
        instances = doc["instances"]
        if not isinstance(instances, list):
            raise invalid("Excepting 'instances' to be an list/array")
        if not instances:
            raise invalid("No values in 'instances' array")
        return signature, _from_instances(instances, dtypes), "row"
    if "inputs" in doc:
        return signature, _from_inputs(doc["inputs"], dtypes), "columnar"
    raise invalid("Missing 'inputs' or 'instances' key")


def parse_json_object(body):
    if not body:
        raise invalid("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise invalid(f"JSON Parse error: {getattr(error, 'msg', error)} at offset: "
                      f"{getattr(error, 'pos', 0)}") from None
    if not isinstance(doc, dict):
        raise invalid(f"JSON Value: {_json_str(doc)} Is not object")
    return doc


def _is_named(value):
    return isinstance(value, dict) and not is_b64(value)


def _from_instances(instances, dtypes):
    named = _is_named(instances[0])
    if not named and len(dtypes) > 1:
        raise invalid("instances is a plain list, but expecting list of objects as multiple input tensors "
                      "required as per tensorinfo_map")
    rows = {name: [] for name in dtypes}
    shapes = {}
    for index, item in enumerate(instances):
        if named:
            if not _is_named(item):
                raise invalid(f"Expecting object but got list at item {index} of input list")
            if set(item) != set(dtypes):
                raise invalid(f"Failed to process element: {index} of 'instances' list. JSON object: "
                              f"{_json_str(item)} keys must be equal to: {','.join(sorted(dtypes))}")
            pairs = item.items()
        else:
            if _is_named(item):
                raise invalid(f"Expecting value/list but got object at item {index} of input list")
            pairs = [(next(iter(dtypes)), item)]
        for name, value in pairs:
            try:
                array = json_to_array(value, dtypes[name])
            except Exception as error:
                message = getattr(error, "message", str(error))
                raise invalid(f"Failed to process element: {index} key: {name} of 'instances' list. "
                              f"Error: {message}") from None
            if name in shapes and shapes[name] != array.shape:
                raise invalid(f"Expecting shape {list(shapes[name])} but got: {list(array.shape)}")
            shapes[name] = array.shape
            rows[name].append(array)
    return {name: np.stack(values) for name, values in rows.items()}


def _from_inputs(value, dtypes):
    if not _is_named(value):
        if len(dtypes) > 1:
            raise invalid("inputs is a plain value/list, but expecting an object as multiple input tensors "
                          "required as per tensorinfo_map")
        name = next(iter(dtypes))
        return {name: json_to_array(value, dtypes[name])}
    arrays = {}
    for name, dtype in dtypes.items():
        if name not in value:
            raise invalid(f"Missing named input: {name} in 'inputs' object.")
        arrays[name] = json_to_array(value[name], dtype)
    return arrays


# --- numpy -> JSON -----------------------------------------------------------------

def _jsonable(name, array):
    array = np.asarray(array)
    if array.dtype == object or array.dtype.kind in "SU":
        as_b64 = name.endswith("_bytes")

        def convert(item):
            data = item if isinstance(item, bytes) else str(item).encode()
            if as_b64:
                return {"b64": base64.b64encode(data).decode()}
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError:  # JSON cannot carry it raw; b64 keeps it intact
                return {"b64": base64.b64encode(data).decode()}

        flat = [convert(item) for item in array.reshape(-1)]
        return _nest(flat, array.shape)
    if array.dtype == np.float32 or array.dtype == np.float16:
        # Shortest text that round-trips the float32 (0.2, not 0.200000003), as TF Serving writes.
        return array.astype(str).astype(np.float64).tolist()
    return array.tolist()


def _nest(flat, shape):
    if not shape:
        return flat[0]
    if len(shape) == 1:
        return flat
    step = int(np.prod(shape[1:])) if shape[1:] else 1
    return [_nest(flat[i * step:(i + 1) * step], shape[1:]) for i in range(shape[0])]


def outputs_to_json(outputs, form):
    """{name: np.ndarray} -> TF Serving's response text (`predictions` or `outputs`)."""
    if not outputs:
        raise invalid("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    values = {name: _jsonable(name, outputs[name]) for name in names}
    if form == "columnar":
        body = {"outputs": values[names[0]] if len(names) == 1 else values}
    else:
        batch = None
        for name in names:
            shape = np.shape(outputs[name])
            if not shape:
                raise invalid(f"Tensor name: {name} has no shape information ")
            if batch is not None and batch != shape[0]:
                raise invalid(f"Tensor name: {name} has inconsistent batch size: {shape[0]} expecting: {batch}")
            batch = shape[0]
        if len(names) == 1:
            body = {"predictions": values[names[0]]}
        else:
            body = {"predictions": [{name: values[name][i] for name in names} for i in range(batch)]}
    return json.dumps(body, allow_nan=True)
