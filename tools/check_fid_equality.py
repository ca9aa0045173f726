#!/usr/bin/env python3
"""Checks that diffuse's FID with the exported Inception equals pytorch-fid's on the same images.

Never needed by the C++ tests; run it by hand in a venv with torch, torchvision, pytorch-fid,
numpy, scipy, pillow and h5py, with a built diffuse:

  python tools/check_fid_equality.py --diffuse build/bin/diffuse \
      --idx-a train-images-idx3-ubyte.gz --idx-b t10k-images-idx3-ubyte.gz --n 300 --work /tmp/fid-check \
      [--weights pt_inception-2015-12-05-6726825d.pth]

What it does:
  1. Writes the first N images of each idx file, resized to 32x32 as `diffuse prep --size 32`
     does, as PNG folders A/ and B/, and makes A.h5, B.h5 from those folders with `diffuse prep`
     (it checks that the HDF5 pixels are the PNG pixels).
  2. Without --weights (the published file cannot be downloaded everywhere), makes a stand-in:
     the FID Inception-v3's layout with a fixed random initialisation (seed 0), its batch-norm
     statistics set from 32 other images so that every layer's activations are of unit scale,
     saved in the published file's format (the state dict of pytorch-fid's fid_inception_v3()).
  3. Exports it with tools/export_feature_net.py inception, and runs `diffuse stats` on A.h5 and
     B.h5 with it.
  4. Runs pytorch-fid itself on the PNG folders, with the same weights file placed where
     torch.hub looks for it (TORCH_HOME/hub/checkpoints/pt_inception-2015-12-05-6726825d.pth):
     its get_activations on its own image loading (PIL -> RGB -> ToTensor), mean and np.cov as
     its calculate_activation_statistics, and its calculate_frechet_distance.
  5. Compares per-image features, means, covariances and FIDs: pytorch-fid's FID, the Frechet
     distance diffuse computes (eigendecompositions in float64, as trainer/quality_metrics.cpp)
     from the two .stats.h5 files, and pytorch-fid's formula on diffuse's statistics.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import export_feature_net  # noqa: E402

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"


def run(command, **kwargs):
    print("$", " ".join(command), flush=True)
    return subprocess.run(command, check=True, **kwargs)


def write_png_folder(images_uint8, folder):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images_uint8.numpy()):
        Image.fromarray(image, mode="L").save(os.path.join(folder, f"{i:05d}.png"))


def random_fid_inception_weights(path, calibration_images):
    """The published weights' format (fid_inception_v3()'s state dict) with seeded random values."""
    import pytorch_fid.inception as fid

    torch.manual_seed(0)
    # fid_inception_v3() without its download: the same layout, patched blocks included.
    inception = fid._inception_v3(num_classes=1008, aux_logits=False, weights=None)
    inception.Mixed_5b = fid.FIDInceptionA(192, pool_features=32)
    inception.Mixed_5c = fid.FIDInceptionA(256, pool_features=64)
    inception.Mixed_5d = fid.FIDInceptionA(288, pool_features=64)
    inception.Mixed_6b = fid.FIDInceptionC(768, channels_7x7=128)
    inception.Mixed_6c = fid.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6d = fid.FIDInceptionC(768, channels_7x7=160)
    inception.Mixed_6e = fid.FIDInceptionC(768, channels_7x7=192)
    inception.Mixed_7b = fid.FIDInceptionE_1(1280)
    inception.Mixed_7c = fid.FIDInceptionE_2(2048)
    # Random convolutions shrink or blow up activations layer by layer; batch norm with running
    # statistics from real images keeps every layer at unit scale, as trained weights do.
    for module in inception.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average over the calibration batches
            module.reset_running_stats()
    inception.train()
    with torch.no_grad():
        x = export_feature_net.as_input(calibration_images)
        x = 2 * F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) - 1
        for batch in x.split(16):
            inception(batch)
    torch.save(inception.state_dict(), path)


def pytorch_fid_statistics(folder, batch_size, device):
    from pytorch_fid.fid_score import IMAGE_EXTENSIONS, get_activations
    from pytorch_fid.inception import InceptionV3

    model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).to(device)  # loads TORCH_HOME's weights
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS)
    activations = get_activations(files, model, batch_size, 2048, device, num_workers=0)
    # As pytorch_fid.fid_score.calculate_activation_statistics.
    return activations, np.mean(activations, axis=0), np.cov(activations, rowvar=False)


def diffuse_frechet_distance(mu1, s1, mu2, s2):
    """trainer/quality_metrics.cpp's frechet_distance, in numpy float64."""
    def symmetric_sqrt(m):
        values, vectors = np.linalg.eigh((m + m.T) / 2)
        return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T

    root1 = symmetric_sqrt(s1)
    m = root1 @ s2 @ root1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt)


def torch_extra(network):
    extra = {export_feature_net.METADATA_FILE: ""}
    torch.jit.load(network, map_location="cpu", _extra_files=extra)
    return extra[export_feature_net.METADATA_FILE]


def read_stats(path):
    with h5py.File(path, "r") as f:
        return f["mean"][()], f["covariance"][()], f["features"][()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffuse", help="the diffuse binary (without it: only the pytorch-fid side, kept for --reuse)")
    parser.add_argument("--idx-a", required=True, help="idx3 images for set A (first --n)")
    parser.add_argument("--idx-b", required=True, help="idx3 images for set B (first --n)")
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--work", required=True, help="scratch folder (recreated unless --reuse)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep --work's weights and pytorch-fid activations from an earlier run with the same options")
    parser.add_argument("--weights", help=f"{WEIGHTS_NAME}; default: a seeded random stand-in")
    parser.add_argument("--batch", type=int, default=50, help="pytorch-fid's and diffuse's batch size")
    parser.add_argument("--device", default="cpu", help="pytorch-fid's device")
    args = parser.parse_args()

    work = os.path.abspath(args.work)
    if not args.reuse:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work, exist_ok=True)
    images = {}
    for name, idx in (("A", args.idx_a), ("B", args.idx_b)):
        images[name] = export_feature_net.prep_like_resize(export_feature_net.read_idx(idx, 2051)[:args.n], 32)
        shutil.rmtree(os.path.join(work, name), ignore_errors=True)
        write_png_folder(images[name], os.path.join(work, name))

    torch_home = os.path.join(work, "torch-home")
    weights = os.path.join(torch_home, "hub", "checkpoints", WEIGHTS_NAME)
    os.makedirs(os.path.dirname(weights), exist_ok=True)
    if args.weights:
        shutil.copyfile(args.weights, weights)
    elif not (args.reuse and os.path.exists(weights)):
        calibration = export_feature_net.prep_like_resize(export_feature_net.read_idx(args.idx_a, 2051)[-32:], 32)
        random_fid_inception_weights(weights, calibration)
    weights_sha256 = export_feature_net.sha256_file(weights)
    os.environ["TORCH_HOME"] = torch_home  # where pytorch-fid's load_state_dict_from_url looks first

    reference = {}
    for name in ("A", "B"):
        saved = os.path.join(work, f"{name}.pytorch-fid.npz")
        if args.reuse and os.path.exists(saved):
            kept = np.load(saved)
            if str(kept["weights_sha256"]) == weights_sha256 and kept["activations"].shape[0] == args.n:
                reference[name] = (kept["activations"], kept["mu"], kept["sigma"])
                print(f"reusing {saved}")
                continue
        reference[name] = pytorch_fid_statistics(os.path.join(work, name), args.batch, args.device)
        activations, mu, sigma = reference[name]
        np.savez(saved, activations=activations, mu=mu, sigma=sigma, weights_sha256=weights_sha256)
    if not args.diffuse:
        print("pytorch-fid side done; rerun with --diffuse BINARY --reuse for the comparison")
        return

    network = os.path.join(work, "inception.pt")
    if not (args.reuse and os.path.exists(network) and
            json.loads(torch_extra(network))["weights_sha256"] == weights_sha256):
        run([sys.executable, os.path.join(HERE, "export_feature_net.py"), "inception", "--weights", weights,
             "-o", network])
    diffuse_stats = {}
    for name in ("A", "B"):
        data = os.path.join(work, name + ".h5")
        run([args.diffuse, "prep", os.path.join(work, name), "-o", data, "--overwrite"])
        with h5py.File(data, "r") as f:
            stored = f["images"][()]
        if stored.shape != (args.n, 32, 32, 1) or not np.array_equal(stored[..., 0], images[name].numpy()):
            sys.exit(f"{data} does not hold the PNG pixels (shape {stored.shape})")
        out = os.path.join(work, name + ".stats.h5")
        run([args.diffuse, "stats", "--data", data, "--features", network, "--batch", str(args.batch), "-o", out,
             "--overwrite"])
        diffuse_stats[name] = read_stats(out)

    from pytorch_fid.fid_score import calculate_frechet_distance

    (_, mu_a, s_a), (_, mu_b, s_b) = reference["A"], reference["B"]
    fid_pytorch_fid = float(calculate_frechet_distance(mu_a, s_a, mu_b, s_b))
    (dmu_a, ds_a, _), (dmu_b, ds_b, _) = diffuse_stats["A"], diffuse_stats["B"]
    fid_diffuse = diffuse_frechet_distance(dmu_a, ds_a, dmu_b, ds_b)
    fid_pytorch_fid_formula_on_diffuse_stats = float(calculate_frechet_distance(dmu_a, ds_a, dmu_b, ds_b))
    fid_diffuse_formula_on_pytorch_fid_stats = diffuse_frechet_distance(mu_a, s_a, mu_b, s_b)

    report = {"n": args.n, "weights": "given" if args.weights else "seeded random stand-in",
              "weights_sha256": weights_sha256}
    for name in ("A", "B"):
        activations, mu, sigma = reference[name]
        d_mu, d_sigma, d_features = diffuse_stats[name]
        report[name] = {
            "feature_max_abs": float(np.abs(activations).max()),
            "features_max_abs_diff": float(np.abs(d_features - activations).max()),
            "mean_max_abs_diff": float(np.abs(d_mu - mu).max()),
            # pytorch-fid's np.mean of float32 activations is float32; diffuse's mean is float64.
            "mean_max_abs_diff_vs_float64_mean": float(np.abs(d_mu - activations.astype(np.float64).mean(0)).max()),
            "cov_max_abs": float(np.abs(sigma).max()),
            "cov_max_abs_diff": float(np.abs(d_sigma - sigma).max()),
        }
    report["fid_pytorch_fid"] = fid_pytorch_fid
    report["fid_diffuse"] = fid_diffuse
    report["fid_relative_difference"] = abs(fid_diffuse - fid_pytorch_fid) / abs(fid_pytorch_fid)
    report["fid_pytorch_fid_formula_on_diffuse_stats"] = fid_pytorch_fid_formula_on_diffuse_stats
    report["fid_diffuse_formula_on_pytorch_fid_stats"] = fid_diffuse_formula_on_pytorch_fid_stats
    print(json.dumps(report, indent=1))
    if report["fid_relative_difference"] > 1e-3:
        sys.exit("FAIL: diffuse's FID differs from pytorch-fid's by more than 0.1%")
    print("OK: diffuse's FID equals pytorch-fid's to {:.2g} relative".format(report["fid_relative_difference"]))


if __name__ == "__main__":
    main()
