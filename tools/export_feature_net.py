#!/usr/bin/env python3
"""Write a feature network for `diffuse stats` / `diffuse eval --fid` as TorchScript.

A feature network maps float images [b, 3, H, W] in [0, 1] (grey repeated to 3 channels) to
features [b, D]; the file carries the TorchScript extra file `diffuse_features.json` that
trainer/feature_network.cpp reads: name, input_size [H, W], resizes_internally, resize_mode
(and informational keys diffuse ignores). Run it once, on any machine with Python and torch:

  # The FID Inception-v3 of pytorch-fid (and of the published FID numbers), pool3, 2048-d.
  # Needs `pip install pytorch-fid torchvision` and the weights file pytorch-fid downloads
  # (pt_inception-2015-12-05-6726825d.pth, from the pytorch-fid GitHub releases).
  python tools/export_feature_net.py inception --weights pt_inception-2015-12-05-6726825d.pth -o inception.pt

  # A small CNN classifier trained here on MNIST-like idx files (a few minutes on a CPU),
  # exported up to its penultimate layer (128-d), for 32x32 grey images such as mnist32.
  python tools/export_feature_net.py mnist-classifier --idx train-images-idx3-ubyte.gz \
      --labels train-labels-idx1-ubyte.gz --test-idx t10k-images-idx3-ubyte.gz \
      --test-labels t10k-labels-idx1-ubyte.gz --threads 1 -o mnist-features.pt

Both check after saving that the reloaded TorchScript file gives the eager module's features.
"""
import argparse
import gzip
import hashlib
import json
import os
import struct
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

METADATA_FILE = "diffuse_features.json"
# torch.hub names the file after the first 8 hex digits of its SHA-256.
PUBLISHED_INCEPTION_SHA256_PREFIX = "6726825d"


def sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checked(eager, scripted, metadata, out, probes):
    """Saves `scripted` with the metadata, reloads it and compares it with `eager` on each probe."""
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.jit.save(scripted, out, _extra_files={METADATA_FILE: json.dumps(metadata)})
    extra = {METADATA_FILE: ""}
    loaded = torch.jit.load(out, map_location="cpu", _extra_files=extra)
    if json.loads(extra[METADATA_FILE]) != metadata:
        sys.exit(f"{out}: the metadata did not survive the round trip")
    print(f"wrote {out}: {json.dumps(metadata)}")
    for probe in probes:
        with torch.no_grad():
            expected, got = eager(probe), loaded(probe)
        if got.dim() != 2 or got.shape != expected.shape:
            sys.exit(f"{out}: TorchScript output {tuple(got.shape)} differs from eager {tuple(expected.shape)}")
        difference = (got - expected).abs().max().item()
        scale = expected.abs().max().item()
        if difference > 1e-5 * max(scale, 1.0):
            sys.exit(f"{out}: TorchScript differs from the eager module by {difference:.3g} (scale {scale:.3g})")
        print(f"  output [b, {got.shape[1]}]; TorchScript vs eager on {probe.shape[0]} images of "
              f"{probe.shape[2]}x{probe.shape[3]}: max |diff| {difference:.3g} (features up to {scale:.3g})")
    print(f"  sha256 {sha256_file(out)}")


# --- inception ---------------------------------------------------------------------------------


class Pool3Features(nn.Module):
    """pytorch-fid's InceptionV3 (FID blocks, resize to 299 bilinear, [0, 1] -> [-1, 1]) as [b, 2048]."""

    def __init__(self, inception):
        super().__init__()
        self.inception = inception

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # pytorch-fid's get_activations squeezes the 1x1 pooled map the same way.
        return self.inception(x)[0].flatten(1)


def fid_inception(weights_path):
    """pytorch-fid's own InceptionV3([pool3]) with the weights read from `weights_path`."""
    try:
        import pytorch_fid
        import pytorch_fid.inception as fid_inception_module
    except ImportError as error:
        sys.exit(f"inception needs pytorch-fid and torchvision (pip install pytorch-fid torchvision): {error}")

    def load_local(url, progress=True, **kwargs):
        return torch.load(weights_path, map_location="cpu", weights_only=True)

    # fid_inception_v3() fetches its state dict through this module-level name; no download.
    original = fid_inception_module.load_state_dict_from_url
    fid_inception_module.load_state_dict_from_url = load_local
    try:
        model = fid_inception_module.InceptionV3(
            [fid_inception_module.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True, normalize_input=True)
    finally:
        fid_inception_module.load_state_dict_from_url = original
    return model.eval(), getattr(pytorch_fid, "__version__", "unknown")


def export_inception(args):
    eager, version = fid_inception(args.weights)
    eager = Pool3Features(eager).eval()
    generator = torch.Generator().manual_seed(0)
    # pytorch-fid's forward breaks out of a loop over a ModuleList, which torch.jit.script
    # refuses, so trace it: nothing in it depends on the input's size or values (the resize has
    # a fixed output size), and save_checked compares the trace with the eager module on other
    # batch and image sizes than the one traced.
    with torch.no_grad():
        traced = torch.jit.trace(eager, torch.rand(2, 3, 32, 32, generator=generator))
    weights_sha256 = sha256_file(args.weights)
    metadata = {
        "name": "inception-v3-fid-pool3",
        "input_size": [299, 299],
        "resizes_internally": True,  # bilinear to 299x299, align_corners=False, as pytorch-fid
        "resize_mode": "bilinear",
        "output_dim": 2048,
        "source": f"pytorch_fid.inception.InceptionV3 (pytorch-fid {version}), block 3 (pool3)",
        "weights": os.path.basename(args.weights),
        "weights_sha256": weights_sha256,
        "published_weights": weights_sha256.startswith(PUBLISHED_INCEPTION_SHA256_PREFIX),
        "generated": "generated by tools/export_feature_net.py inception",
    }
    if not metadata["published_weights"]:
        print(f"note: {args.weights} is not pytorch-fid's published file (its SHA-256 does not start with "
              f"{PUBLISHED_INCEPTION_SHA256_PREFIX}); FID values will not be comparable with published ones")
    probes = [torch.rand(b, 3, h, h, generator=generator) for b, h in ((3, 28), (1, 64), (2, 299))]
    save_checked(eager, traced, metadata, args.out, probes)


# --- mnist-classifier --------------------------------------------------------------------------


def read_idx(path, magic):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or struct.unpack(">I", data[:4])[0] != magic:
        sys.exit(f"{path}: not an idx file with magic {magic}")
    dims = 3 if magic == 2051 else 1
    shape = struct.unpack(">" + "I" * dims, data[4:4 + 4 * dims])
    header = 4 + 4 * dims
    expected = header + int(torch.tensor(shape).prod())
    if len(data) != expected:
        sys.exit(f"{path}: {len(data)} bytes, expected {expected} for shape {shape}")
    return torch.frombuffer(bytearray(data[header:]), dtype=torch.uint8).reshape(shape)


def prep_like_resize(images_uint8, size):
    """[N, h, w] uint8 -> [N, size, size] uint8 as `diffuse prep --size` does for square images:
    bilinear with half-pixel centres when enlarging, area averaging when shrinking, rounded."""
    if images_uint8.shape[1] == size and images_uint8.shape[2] == size:
        return images_uint8
    x = images_uint8.unsqueeze(1).float()
    if size > images_uint8.shape[1]:
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    else:
        y = F.interpolate(x, size=(size, size), mode="area")
    return torch.floor(y + 0.5).clamp(0, 255).to(torch.uint8).squeeze(1)


class DigitClassifier(nn.Module):
    """[b, 3, 32, 32] in [0, 1] -> logits [b, classes]; features() is the penultimate layer."""

    def __init__(self, classes: int = 10, feature_dim: int = 128):
        super().__init__()

        def block(cin, cout):
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.MaxPool2d(2))

        self.body = nn.Sequential(block(1, 32), block(32, 64), block(64, 64))  # 32 -> 16 -> 8 -> 4
        self.penultimate = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Linear(feature_dim, classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        # diffuse repeats grey to 3 channels; their mean gives the grey image back (and a
        # grey version of a colour one).
        return self.penultimate(self.body(x.mean(dim=1, keepdim=True) * 2 - 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class PenultimateFeatures(nn.Module):
    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x)


def load_digits(images_path, labels_path, size):
    images = read_idx(images_path, 2051)
    labels = read_idx(labels_path, 2049).long()
    if images.shape[0] != labels.shape[0]:
        sys.exit(f"{images_path} has {images.shape[0]} images but {labels_path} has {labels.shape[0]} labels")
    return prep_like_resize(images, size), labels


def as_input(images_uint8):
    """[N, H, W] uint8 -> [N, 3, H, W] float in [0, 1], as diffuse feeds a grey dataset."""
    return (images_uint8.float() / 255.0).unsqueeze(1).expand(-1, 3, -1, -1)


def random_shift(x, pad, generator):
    """Shifts each image by up to `pad` pixels (zero fill): samples are not perfectly centred."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=generator)
    rows = (dy.view(b, 1) + torch.arange(h).view(1, h)).view(b, 1, h, 1).expand(b, x.shape[1], h, w + 2 * pad)
    shifted = padded.gather(2, rows)
    cols = (dx.view(b, 1) + torch.arange(w).view(1, w)).view(b, 1, 1, w).expand(b, x.shape[1], h, w)
    return shifted.gather(3, cols)


def accuracy(model, images, labels, batch=1000):
    model.eval()
    correct = 0
    with torch.no_grad():
        for begin in range(0, images.shape[0], batch):
            logits = model(as_input(images[begin:begin + batch]))
            correct += (logits.argmax(1) == labels[begin:begin + batch]).sum().item()
    return correct / images.shape[0]


def export_mnist_classifier(args):
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_images, train_labels = load_digits(args.idx, args.labels, args.size)
    classes = int(train_labels.max().item()) + 1
    test = None
    if args.test_idx or args.test_labels:
        if not (args.test_idx and args.test_labels):
            sys.exit("give both --test-idx and --test-labels")
        test = load_digits(args.test_idx, args.test_labels, args.size)
    if args.size != 32:
        sys.exit("the classifier's layout is for 32x32 inputs (--size 32); diffuse resizes other sizes to it")
    model = DigitClassifier(classes, args.feature_dim)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    n = train_images.shape[0]
    steps_per_epoch = (n + args.batch - 1) // args.batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    start = time.time()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(n, generator=generator)
        total_loss, seen = 0.0, 0
        for begin in range(0, n, args.batch):
            index = order[begin:begin + args.batch]
            x = random_shift(as_input(train_images[index]), 2, generator)
            loss = F.cross_entropy(model(x), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * index.numel()
            seen += index.numel()
        line = f"epoch {epoch + 1}/{args.epochs}: train loss {total_loss / seen:.4f}"
        if test is not None:
            line += f", test accuracy {accuracy(model, *test):.4f}"
        print(line + f" ({time.time() - start:.0f} s)", flush=True)
    model.eval()
    train_accuracy = accuracy(model, train_images, train_labels)
    test_accuracy = accuracy(model, *test) if test is not None else None
    print(f"train accuracy {train_accuracy:.4f}" +
          (f", test accuracy {test_accuracy:.4f} on {test[0].shape[0]} images" if test is not None else ""))

    eager = PenultimateFeatures(model).eval()
    scripted = torch.jit.script(eager)
    metadata = {
        "name": f"mnist-classifier-penultimate-{args.feature_dim}",
        "input_size": [args.size, args.size],
        "resizes_internally": False,  # diffuse resizes other sizes with resize_mode
        "resize_mode": "bilinear",
        "output_dim": args.feature_dim,
        "trained_on": {"idx": os.path.basename(args.idx), "labels": os.path.basename(args.labels),
                       "images": n, "epochs": args.epochs, "seed": args.seed,
                       "train_accuracy": round(train_accuracy, 5)},
        "generated": "generated by tools/export_feature_net.py mnist-classifier",
    }
    if test is not None:
        metadata["trained_on"]["test_accuracy"] = round(test_accuracy, 5)
        metadata["trained_on"]["test_idx"] = os.path.basename(args.test_idx)
    save_checked(eager, scripted, metadata, args.out, [as_input(train_images[:8]), as_input(train_images[8:9])])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    inception = commands.add_parser("inception", help="pytorch-fid's FID Inception-v3, pool3 features (2048-d)")
    inception.add_argument("--weights", required=True, help="pt_inception-2015-12-05-6726825d.pth (pytorch-fid's)")
    inception.add_argument("-o", "--out", required=True, help="output TorchScript file, e.g. inception.pt")
    inception.set_defaults(run=export_inception)

    mnist = commands.add_parser("mnist-classifier", help="train a small digit classifier, export its penultimate layer")
    mnist.add_argument("--idx", required=True, help="training images, idx3 (optionally .gz)")
    mnist.add_argument("--labels", required=True, help="training labels, idx1 (optionally .gz)")
    mnist.add_argument("--test-idx", help="test images, to report the test accuracy")
    mnist.add_argument("--test-labels", help="test labels")
    mnist.add_argument("-o", "--out", required=True, help="output TorchScript file, e.g. mnist-features.pt")
    mnist.add_argument("--size", type=int, default=32, help="input size (32: what mnist32 holds)")
    mnist.add_argument("--feature-dim", type=int, default=128, help="width of the penultimate layer")
    mnist.add_argument("--epochs", type=int, default=1, help="1 epoch: 99.2%% test accuracy on MNIST")
    mnist.add_argument("--batch", type=int, default=128)
    mnist.add_argument("--lr", type=float, default=3e-3)
    mnist.add_argument("--seed", type=int, default=0)
    mnist.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    mnist.set_defaults(run=export_mnist_classifier)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
