#!/usr/bin/env python3
"""How often a conditional model's samples are the class asked for.

Reads HDF5 files written by `diffuse sample --classes ... --out-h5 FILE.h5` (datasets `images`
uint8 [n, H, W, C] and `labels` [n]) and classifies every image with the classifier inside a
network made by `export_feature_net.py mnist-classifier` (its penultimate-layer TorchScript keeps
the whole classifier, head included). Prints the share classified as the requested class,
overall and per class. Never needed by the C++ build or tests.

  python tools/classify_samples.py --classifier mnist-features.pt guided.h5 unguided.h5
"""
import argparse

import h5py
import torch


def load_classifier(path):
    net = torch.jit.load(path).eval()
    try:
        head = dict(net.classifier.head.named_parameters())
        weight, bias = head["1.weight"], head["1.bias"]
    except (AttributeError, KeyError, RuntimeError) as error:
        raise SystemExit(f"{path}: no classifier head (classifier.head.1) in it; make it with "
                         f"export_feature_net.py mnist-classifier ({error})")

    def classify(images_uint8):
        x = torch.from_numpy(images_uint8).float().permute(0, 3, 1, 2) / 255.0
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        with torch.no_grad():
            return (net(x) @ weight.T + bias).argmax(1)

    return classify, weight.shape[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--classifier", required=True, help="TorchScript from export_feature_net.py mnist-classifier")
    parser.add_argument("samples", nargs="+", help="HDF5 files from diffuse sample --out-h5 (with labels)")
    args = parser.parse_args(argv)
    classify, classes = load_classifier(args.classifier)
    for path in args.samples:
        with h5py.File(path, "r") as f:
            if "labels" not in f:
                raise SystemExit(f"{path}: no 'labels' dataset; sample a conditional model with --classes")
            images, labels = f["images"][:], torch.from_numpy(f["labels"][:].astype("int64"))
        predicted = classify(images)
        hits = predicted == labels
        per_class = " ".join(f"{k}:{hits[labels == k].float().mean().item() * 100:.0f}%"
                             for k in range(classes) if (labels == k).any())
        print(f"{path}: {hits.float().mean().item() * 100:.1f}% of {len(labels)} classified as requested ({per_class})")


if __name__ == "__main__":
    main()
