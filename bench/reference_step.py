#!/usr/bin/env python3
"""bench/reference_step.py: the Python reference's training step, timed, for the same setup as a
diffuse config, so launch/device-check.sh can report diffuse's images/s as a ratio to it.

The step is what denoising_diffusion_pytorch's Trainer.train() does per step (2.3.1), without its
data loader: Unet + GaussianDiffusion forward under autocast (the Trainer's `amp` through
accelerate), backward, clip_grad_norm_(1.0), Adam(lr, betas=(0.9, 0.99)), zero_grad, and
EMA(beta=0.995, update_every=10).update(); like the Trainer it reads the loss with .item() every
step. The batch is random pixels already on the device (diffuse's step_bench also excludes
decoding). Modes: eager, and the same step with the Unet under torch.compile.

    python3 bench/reference_step.py --device cuda --dim 64 --dim-mults 1,2,4,8 --image-size 128 \
        --batch 32 --precision bf16 --mode eager --json ref-eager.json
    python3 bench/reference_step.py --check-export model.safetensors --dim 8 --dim-mults 1,2 ...

--check-export loads a `diffuse export` file into the reference Unet on the CPU (strict) and runs
one forward: the exported names, shapes and values are the reference's.

Only the package's core module is imported (denoising_diffusion_pytorch.denoising_diffusion_pytorch):
its __init__ also imports every other model in the package. The core module imports torchvision,
accelerate, scipy, PIL, tqdm and numpy at the top but the step never calls them; --allow-stubs
(the CPU rehearsal, on a machine whose torch venv lacks them) replaces a missing one by an empty
module and the JSON lists it under "stubbed". On the GPU machine nothing is stubbed.
Takes a few seconds on a CPU with the tiny setup; eager on the H200 about 20 s, compile 1-3 min.
"""
import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import time
import types

# Imported at the top of the reference's core module but not used by the step. (numpy is not stubbed:
# torch._dynamo probes it; nothing imported here needs it once ema_pytorch's __init__ is bypassed.)
UNUSED_BY_THE_STEP = ["torchvision", "torchvision.transforms", "torchvision.utils", "scipy",
                      "scipy.optimize", "PIL", "PIL.Image", "tqdm", "tqdm.auto", "accelerate"]


def stub_missing_modules():
    """Empty modules for UNUSED_BY_THE_STEP names that are not installed; returns their names."""
    stubbed = []
    for name in UNUSED_BY_THE_STEP:
        parent = name.split(".")[0]
        if parent in sys.modules and not getattr(sys.modules[parent], "__diffuse_stub__", False):
            continue
        if parent == name and importlib.util.find_spec(name) is not None:
            continue
        if parent != name and parent not in stubbed:
            continue

        def unavailable(attribute, module=name):
            if attribute.startswith("__"):
                raise AttributeError(attribute)  # introspection (inspect, pickle) must see a plain module

            def fail(*args, **kwargs):
                raise RuntimeError(f"{module}.{attribute} is a stand-in (--allow-stubs): install {module}")
            return fail

        module = types.ModuleType(name)
        module.__diffuse_stub__ = True
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        module.__getattr__ = unavailable  # from X import Y gets a function that fails if called
        sys.modules[name] = module
        if parent != name:
            setattr(sys.modules[parent], name.split(".", 1)[1], module)
        stubbed.append(name)
    return stubbed


def import_submodule(package_name, module):
    """package_name.module without running the package's __init__ (which imports every other model)."""
    spec = importlib.util.find_spec(package_name)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"reference_step.py: {package_name} is not installed: pip install --no-index --no-deps "
                 "--target DIR .device-pack/wheels/*.whl and put DIR on PYTHONPATH")
    package = types.ModuleType(package_name)
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules[package_name] = package
    return importlib.import_module(f"{package_name}.{module}")


def import_reference():
    """The reference's core module, its version, and ema_pytorch's EMA class."""
    # The core module does `from ema_pytorch import EMA`: give the bare package that one name
    # (ema_pytorch's __init__ would import numpy for its post-hoc EMA).
    EMA = import_submodule("ema_pytorch", "ema_pytorch").EMA
    sys.modules["ema_pytorch"].EMA = EMA
    core = import_submodule("denoising_diffusion_pytorch", "denoising_diffusion_pytorch")
    version = importlib.import_module("denoising_diffusion_pytorch.version").__version__
    return core, EMA, version


def build(core, args):
    unet = core.Unet(dim=args.dim, dim_mults=tuple(args.dim_mults), channels=args.channels,
                     attn_heads=args.attn_heads, attn_dim_head=args.attn_dim_head, flash_attn=False)
    diffusion = core.GaussianDiffusion(unet, image_size=args.image_size, timesteps=args.timesteps,
                                       objective="pred_v", beta_schedule="sigmoid")
    return unet, diffusion


def load_safetensors(path):
    """A safetensors file as {name: tensor}: 8-byte little-endian header size, JSON header, raw data.
    Read here rather than with the safetensors package, which the rehearsal's torch venv lacks."""
    import struct
    import torch
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    with open(path, "rb") as f:
        blob = f.read()
    (size,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + size])
    data = bytearray(blob[8 + size:])
    state = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        flat = torch.frombuffer(data, dtype=dtypes[info["dtype"]], count=(end - begin) // dtypes[info["dtype"]].itemsize,
                                offset=begin) if end > begin else torch.empty(0, dtype=dtypes[info["dtype"]])
        state[name] = flat.reshape(info["shape"]).clone()
    return state


def check_export(core, args):
    import torch
    unet, _ = build(core, args)
    state = load_safetensors(args.check_export)
    unet.load_state_dict(state, strict=True)
    unet.eval()
    with torch.no_grad():
        x = torch.randn(2, args.channels, args.image_size, args.image_size)
        out = unet(x, torch.tensor([1, args.timesteps - 1]))
    finite = bool(torch.isfinite(out).all())
    result = {"export": args.check_export, "tensors": len(state), "forward_finite": finite,
              "output_shape": list(out.shape)}
    print(f"export {args.check_export}: {len(state)} tensors load strictly into the reference Unet on CPU; "
          f"forward {'finite' if finite else 'NOT finite'}")
    return result, finite


def time_step(core, EMA, args):
    import torch
    torch.manual_seed(0)
    device = torch.device(args.device)
    unet, diffusion = build(core, args)
    diffusion.to(device)
    ema = EMA(diffusion, beta=0.995, update_every=10)  # of the plain model, as the Trainer makes it
    ema.to(device)
    if args.mode == "compile":
        # The Unet's forward is where the time goes; GaussianDiffusion's loss around it stays eager.
        diffusion.model = torch.compile(unet, backend=args.compile_backend)
    opt = torch.optim.Adam(diffusion.parameters(), lr=args.lr, betas=(0.9, 0.99))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.precision]
    data = torch.rand(args.batch, args.channels, args.image_size, args.image_size, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def step():
        diffusion.train()
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype is not None):
            loss = diffusion(data)
        loss_value = loss.item()  # the Trainer's `total_loss += loss.item()`
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        ema.update()
        return loss_value

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    losses = [step() for _ in range(args.warmup)]
    sync()
    warmup_seconds = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        sync()
        times.append(time.perf_counter() - t0)
    times.sort()
    median = times[len(times) // 2] if len(times) % 2 else 0.5 * (times[len(times) // 2 - 1] + times[len(times) // 2])
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    result = {"mode": args.mode, "compile_backend": args.compile_backend if args.mode == "compile" else None,
              "step_seconds_median": median, "images_per_second": args.batch / median,
              "warmup_seconds": warmup_seconds, "steps_timed": args.steps, "losses_finite":
              all(map(lambda v: v == v and abs(v) != float("inf"), losses)), "last_loss": losses[-1],
              "cuda_peak_allocated_bytes": peak}
    print(f"reference {args.mode}{'/' + args.compile_backend if args.mode == 'compile' else ''} on {device}, "
          f"{args.precision}, batch {args.batch}, {args.image_size}x{args.image_size}: "
          f"{result['images_per_second']:.1f} images/s (step {median * 1e3:.1f} ms, median of {args.steps}; "
          f"warm-up {warmup_seconds:.1f} s)")
    return result, result["losses_finite"]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--dim-mults", default="1,2,4,8", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--attn-heads", type=int, default=4)
    p.add_argument("--attn-dim-head", type=int, default=32)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=8e-5)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="bf16")
    p.add_argument("--mode", choices=["eager", "compile"], default="eager")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (the rehearsal: aot_eager)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--check-export", help="a `diffuse export` safetensors file to load instead of timing")
    p.add_argument("--allow-stubs", action="store_true", help="stand in for missing modules the step never calls")
    p.add_argument("--json", help="write the result here")
    args = p.parse_args()
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")

    import torch  # before any stand-in: torch probes numpy when it is imported
    stubbed = stub_missing_modules() if args.allow_stubs else []
    if args.threads:
        torch.set_num_threads(args.threads)
    core, EMA, version = import_reference()
    if args.check_export:
        result, ok = check_export(core, args)
    else:
        result, ok = time_step(core, EMA, args)
    result.update({"program": "reference_step", "reference_version": version, "torch": torch.__version__,
                   "device": args.device, "precision": args.precision, "batch": args.batch,
                   "image_size": args.image_size, "dim": args.dim, "dim_mults": args.dim_mults,
                   "stubbed": stubbed})
    if args.device.startswith("cuda"):
        result["gpu"] = torch.cuda.get_device_name(0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
