"""Find the newest ONNX opset and IR version the board's onnxruntime loads, by trying.

The board has no ``onnx`` package, so the probe models (one Identity node) are encoded here
as raw protobuf bytes. A version table would go stale; asking the runtime does not."""


def _varint(n):
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(num, wire, payload):
    key = _varint((num << 3) | wire)
    if wire == 0:
        return key + _varint(payload)
    return key + _varint(len(payload)) + payload


def _str(num, s):
    return _field(num, 2, s.encode() if isinstance(s, str) else s)


def _value_info(name):
    dim = _field(1, 0, 1)  # dim_value = 1
    shape = _field(1, 2, dim)  # TensorShapeProto.dim
    tensor = _field(1, 0, 1) + _field(2, 2, shape)  # elem_type FLOAT, shape
    type_proto = _field(1, 2, tensor)  # TypeProto.tensor_type
    return _str(1, name) + _field(2, 2, type_proto)


def identity_model(opset, ir_version):
    node = _str(1, "x") + _str(2, "y") + _str(3, "n") + _str(4, "Identity")
    graph = _field(1, 2, node) + _str(2, "probe") + _field(11, 2, _value_info("x")) + _field(12, 2, _value_info("y"))
    opset_id = _str(1, "") + _field(2, 0, opset)
    return _field(1, 0, ir_version) + _str(2, "edgenas-probe") + _field(7, 2, graph) + _field(8, 2, opset_id)


def _loads(ort, data):
    try:
        so = ort.SessionOptions()
        so.log_severity_level = 4
        ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
        return True
    except Exception:
        return False


def probe(ort, max_opset=30, max_ir=20):
    """(highest opset, highest IR version) that ``ort`` loads; (None, None) if none."""
    best_op = None
    for op in range(max_opset, 6, -1):
        if _loads(ort, identity_model(op, 7)) or _loads(ort, identity_model(op, 10)):
            best_op = op
            break
    if best_op is None:
        return None, None
    best_ir = None
    for ir in range(max_ir, 2, -1):
        if _loads(ort, identity_model(min(best_op, 13), ir)):
            best_ir = ir
            break
    return best_op, best_ir


def weight_precisions(ort):
    """The weight precisions of edgenas graphs this onnxruntime has operators for: fp32 and
    fp16 always; int8 with DynamicQuantizeLinear and MatMulInteger; int4 with com.microsoft's
    MatMulNBits (contrib operators, onnxruntime 1.17+). None when the build does not list its
    operators (the host then lets the first job say)."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        names = set((s.domain, s.name) for s in C.get_all_operator_schema())
    except Exception:
        return None
    out = ["fp32", "fp16"]  # fp16: native kernels where the CPU has them, casts around fp32 ones elsewhere
    if ("", "DynamicQuantizeLinear") in names and ("", "MatMulInteger") in names:
        out.append("int8")
    if ("com.microsoft", "MatMulNBits") in names:
        out.append("int4")
    return out


def graph_variants(ort):
    """The edgenas graph variants this onnxruntime runs: "plain" always; "fused" with
    com.microsoft's GroupQueryAttention and SkipSimplifiedLayerNormalization and the
    SimplifiedLayerNormalization contrib operator. None when the build does not list them."""
    try:
        from onnxruntime.capi import onnxruntime_pybind11_state as C

        names = set((s.domain, s.name) for s in C.get_all_operator_schema())
    except Exception:
        return None
    fused = {("com.microsoft", "GroupQueryAttention"), ("com.microsoft", "SkipSimplifiedLayerNormalization"),
             ("", "SimplifiedLayerNormalization")}
    return ["plain", "fused", "fused-shared"] if fused <= names else ["plain"]
