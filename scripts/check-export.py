#!/usr/bin/env python3
"""Checks that a model exported by `flotilla-server export` loads in PyTorch as it is.

    python3 scripts/check-export.py MODEL.safetensors cnn|2nn IO.json

IO.json holds {"inputs": [[784 floats], ...], "logits": [[10 floats], ...]}: images and the
logits Flotilla's Burn model computed for them. The script builds the equivalent PyTorch
module (McMahan et al.'s CNN or 2NN, with PyTorch's own layers), calls
`model.load_state_dict(safetensors.torch.load_file(path))` (strict: every name and shape
must match) and compares its logits with Flotilla's. Without PyTorch it runs the same forward
pass in NumPy, reading the weights with PyTorch's layouts ([out, in] for Linear,
[out, in, kh, kw] for Conv2d). Exit status 0 if they agree within 1e-3.
"""
import json
import struct
import sys

import numpy as np


def read_safetensors(path):
    """The tensors of a safetensors file as NumPy arrays (the format: an 8-byte header length,
    a JSON header, then the data)."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", (name, info["dtype"])
        a, b = info["data_offsets"]
        out[name] = np.frombuffer(data[a:b], dtype="<f4").reshape(info["shape"])
    return out


def torch_logits(path, model, inputs):
    import torch
    from torch import nn

    class Cnn(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
            self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
            self.fc1 = nn.Linear(64 * 7 * 7, 512)
            self.fc2 = nn.Linear(512, 10)

        def forward(self, x):
            x = x.reshape(-1, 1, 28, 28)
            x = torch.max_pool2d(torch.relu(self.conv1(x)), 2)
            x = torch.max_pool2d(torch.relu(self.conv2(x)), 2)
            x = torch.relu(self.fc1(x.flatten(1)))
            return self.fc2(x)

    class Mlp2nn(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(784, 200)
            self.fc2 = nn.Linear(200, 200)
            self.fc3 = nn.Linear(200, 10)

        def forward(self, x):
            x = torch.relu(self.fc1(x))
            x = torch.relu(self.fc2(x))
            return self.fc3(x)

    net = Cnn() if model == "cnn" else Mlp2nn()
    try:
        from safetensors.torch import load_file

        state = load_file(path)
        how = "safetensors.torch.load_file"
    except ImportError:
        state = {k: torch.from_numpy(v.copy()) for k, v in read_safetensors(path).items()}
        how = "this script's safetensors reader"
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        out = net(torch.tensor(inputs, dtype=torch.float32)).numpy()
    return out, f"PyTorch {torch.__version__}, load_state_dict(strict=True) of {how}"


def conv2d(x, w, b, pad):
    """PyTorch's Conv2d (cross-correlation): x [N, C, H, W], w [O, C, kh, kw]."""
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    cols = np.empty((n, c, kh, kw, h, wd), dtype=np.float32)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = xp[:, :, i : i + h, j : j + wd]
    out = np.einsum("ncijhw,ocij->nohw", cols, w, optimize=True)
    return out + b[None, :, None, None]


def maxpool2(x):
    n, c, h, w = x.shape
    return x.reshape(n, c, h // 2, 2, w // 2, 2).max(axis=(3, 5))


def numpy_logits(path, model, inputs):
    t = read_safetensors(path)
    relu = lambda v: np.maximum(v, 0)
    linear = lambda v, name: v @ t[name + ".weight"].T + t[name + ".bias"]
    x = np.asarray(inputs, dtype=np.float32)
    if model == "cnn":
        expect = {"conv1.weight": (32, 1, 5, 5), "conv2.weight": (64, 32, 5, 5),
                  "fc1.weight": (512, 3136), "fc2.weight": (10, 512)}
    else:
        expect = {"fc1.weight": (200, 784), "fc2.weight": (200, 200), "fc3.weight": (10, 200)}
    for name, shape in expect.items():
        assert tuple(t[name].shape) == shape, (name, t[name].shape, "expected", shape)
    if model == "cnn":
        x = x.reshape(-1, 1, 28, 28)
        x = maxpool2(relu(conv2d(x, t["conv1.weight"], t["conv1.bias"], 2)))
        x = maxpool2(relu(conv2d(x, t["conv2.weight"], t["conv2.bias"], 2)))
        x = relu(linear(x.reshape(x.shape[0], -1), "fc1"))
        out = linear(x, "fc2")
    else:
        x = relu(linear(x, "fc1"))
        x = relu(linear(x, "fc2"))
        out = linear(x, "fc3")
    return out, f"NumPy {np.__version__} forward pass with PyTorch's layouts"


def main():
    path, model, io = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(io) as f:
        expected = json.load(f)
    inputs, want = expected["inputs"], np.asarray(expected["logits"], dtype=np.float32)
    try:
        import torch  # noqa: F401

        got, how = torch_logits(path, model, inputs)
    except ImportError:
        got, how = numpy_logits(path, model, inputs)
    diff = float(np.abs(got - want).max())
    same_class = bool((got.argmax(1) == want.argmax(1)).all())
    print(f"{model}: {how}: max |logit difference| = {diff:.2e}, same predictions: {same_class}")
    sys.exit(0 if diff < 1e-3 and same_class else 1)


if __name__ == "__main__":
    main()
