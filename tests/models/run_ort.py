"""Runs an ONNX model in ONNX Runtime (CPU) on an NCHW float32 .npy batch and writes its first
output as .npy: the reference the engine's exports are checked against.

usage: run_ort.py MODEL.onnx IN.npy OUT.npy
"""
import sys

import numpy as np
import onnx
import onnxruntime as ort


def main():
    model, inp, out = sys.argv[1:4]
    onnx.checker.check_model(onnx.load(model), full_check=True)
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    np.save(out, session.run(None, {name: np.load(inp)})[0].astype(np.float32))


if __name__ == "__main__":
    main()
