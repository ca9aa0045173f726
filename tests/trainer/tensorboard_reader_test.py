#!/usr/bin/env python3
"""TensorBoard's own loaders read what diffuse's C++ writer wrote.

Runs tests/trainer/tensorboard_fixture.cpp (a fresh attempt that logs steps 10..50 and crashes
after its checkpoint at 30, then an attempt resumed from 30 that logs 40..70), then reads the
event directory with the `tensorboard` package:
  - its raw event file loader (which verifies both TFRecord checksums): file version, SessionLog;
  - EventAccumulator and the server's plugin_event_accumulator (purge_orphaned_data on, their
    default): tags, steps, values, the PNG bytes of every image, the text summary, and one
    continuous curve across the resume with nothing twice.

Usage: tensorboard_reader_test.py FIXTURE_EXE
Exit 77 (ctest: skipped) when `tensorboard` cannot be imported, except under CI=true or
DIFFUSE_REQUIRE_TENSORBOARD=1, where that is a failure: launch/setup.sh installs it.
"""
import os
import struct
import subprocess
import sys
import tempfile
import unittest

try:
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.backend.event_processing import plugin_event_accumulator as pea
    from tensorboard.compat.proto import event_pb2
    from tensorboard.util import tensor_util
except ImportError as error:
    required = os.environ.get("CI") == "true" or os.environ.get("DIFFUSE_REQUIRE_TENSORBOARD") == "1"
    print(f"{'FAILED' if required else 'SKIPPED'}: the tensorboard package cannot be imported ({error}) by "
          f"{sys.executable}; launch/setup.sh installs it into the LibTorch venv", file=sys.stderr)
    sys.exit(1 if required else 77)

FIXTURE = None
LOGDIR = None
EXPECTED = None

# Which attempt wrote each step that TensorBoard should show (see tensorboard_fixture.cpp).
SCALAR_STEPS = {10: 1, 20: 1, 30: 1, 40: 2, 50: 2, 60: 2, 70: 2}
IMAGE_STEPS = {20: 1, 40: 2, 60: 2}


def event_files():
    return sorted(os.path.join(LOGDIR, name) for name in os.listdir(LOGDIR))


def read_bytes(path):
    with open(path, "rb") as file:
        return file.read()


def expected_png(step):
    return read_bytes(os.path.join(EXPECTED, f"samples-{step}.png"))


def png_size(png):
    assert png[:8] == b"\x89PNG\r\n\x1a\n", png[:8]
    return struct.unpack(">II", png[16:24])  # width, height from IHDR


class RawEvents(unittest.TestCase):
    def test_each_attempt_has_its_own_file_with_version_and_session_start(self):
        files = event_files()
        self.assertEqual(len(files), 2, files)
        for path, start_step in zip(files, (0, 31)):
            name = os.path.basename(path)
            self.assertRegex(name, r"^events\.out\.tfevents\.\d{10}\.[^.]+\.\d+\.\d+$")
            events = list(event_file_loader.RawEventFileLoader(path).Load())  # checks both CRCs
            first, second = (event_pb2.Event.FromString(e) for e in events[:2])
            self.assertEqual(first.file_version, "brain.Event:2")
            self.assertEqual(second.session_log.status, event_pb2.SessionLog.START)
            self.assertEqual(second.step, start_step)

    def test_a_damaged_byte_is_refused_by_tensorboards_reader(self):
        # Guards the test itself: the loader really checks what we framed.
        path = event_files()[0]
        data = bytearray(read_bytes(path))
        data[len(data) // 2] ^= 0x40
        damaged = os.path.join(tempfile.mkdtemp(), "events.out.tfevents.damaged")
        with open(damaged, "wb") as file:
            file.write(bytes(data))
        loaded = list(event_file_loader.RawEventFileLoader(damaged).Load())
        self.assertLess(len(loaded), len(list(event_file_loader.RawEventFileLoader(path).Load())))


class Accumulator(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.acc = ea.EventAccumulator(LOGDIR, size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE).Reload()

    def test_tags(self):
        tags = self.acc.Tags()
        self.assertEqual(sorted(tags["scalars"]), ["loss", "loss/q0", "lr"])
        self.assertEqual(tags["images"], ["samples"])
        self.assertEqual(tags["tensors"], ["config"])

    def test_scalars_form_one_curve_across_the_resume(self):
        for tag, value in (("loss", lambda step, attempt: attempt + step / 1000.0),
                           ("lr", lambda step, attempt: 1e-4 / attempt),
                           ("loss/q0", lambda step, attempt: 0.5)):
            points = self.acc.Scalars(tag)
            self.assertEqual([p.step for p in points], sorted(SCALAR_STEPS), tag)
            for p in points:
                self.assertAlmostEqual(p.value, value(p.step, SCALAR_STEPS[p.step]), places=6,
                                       msg=f"{tag} at step {p.step}")

    def test_images_are_the_png_bytes_written(self):
        images = self.acc.Images("samples")
        self.assertEqual([i.step for i in images], sorted(IMAGE_STEPS))
        for image in images:
            expected = expected_png(image.step)
            self.assertEqual(image.encoded_image_string, expected, f"step {image.step}")
            self.assertEqual((image.width, image.height), png_size(expected))
            self.assertEqual((image.width, image.height), (24, 16))

    def test_config_is_a_text_summary(self):
        self.assertEqual(self.acc.SummaryMetadata("config").plugin_data.plugin_name, "text")
        texts = {t.step: tensor_util.make_ndarray(t.tensor_proto).item().decode() for t in self.acc.Tensors("config")}
        self.assertEqual(texts, {0: "```\nattempt: 1\nmodel:\n  dim: 64\n```\n",
                                 30: "```\nattempt: 2\nmodel:\n  dim: 64\n```\n"})

    def test_without_the_session_start_the_orphans_would_show_twice(self):
        # The control: the same files read with purging off keep attempt 1's steps 40 and 50.
        raw = ea.EventAccumulator(LOGDIR, size_guidance=ea.STORE_EVERYTHING_SIZE_GUIDANCE,
                                  purge_orphaned_data=False).Reload()
        self.assertEqual([p.step for p in raw.Scalars("loss")], [10, 20, 30, 40, 50, 40, 50, 60, 70])


class ServerAccumulator(unittest.TestCase):
    """plugin_event_accumulator: what `tensorboard --load_fast=false` serves from."""

    def test_scalars_images_and_text(self):
        acc = pea.EventAccumulator(LOGDIR, size_guidance={pea.TENSORS: 0}).Reload()
        self.assertEqual(acc.PluginTagToContent("scalars").keys(), {"loss", "loss/q0", "lr"})
        self.assertEqual(set(acc.PluginTagToContent("images")), {"samples"})
        self.assertEqual(set(acc.PluginTagToContent("text")), {"config"})
        loss = acc.Tensors("loss")
        self.assertEqual([t.step for t in loss], sorted(SCALAR_STEPS))
        for t in loss:
            self.assertAlmostEqual(tensor_util.make_ndarray(t.tensor_proto).item(),
                                   SCALAR_STEPS[t.step] + t.step / 1000.0, places=6)
        images = acc.Tensors("samples")  # migrated to [width, height, png] string tensors
        self.assertEqual([t.step for t in images], sorted(IMAGE_STEPS))
        for t in images:
            width, height, png = tensor_util.make_ndarray(t.tensor_proto).tolist()
            self.assertEqual(png, expected_png(t.step))
            self.assertEqual((int(width), int(height)), (24, 16))


def main():
    global FIXTURE, LOGDIR, EXPECTED
    if len(sys.argv) != 2:
        sys.exit("usage: tensorboard_reader_test.py FIXTURE_EXE")
    FIXTURE = sys.argv[1]
    with tempfile.TemporaryDirectory(prefix="diffuse-tb-") as root:
        subprocess.run([FIXTURE, root], check=True)
        LOGDIR = os.path.join(root, "tensorboard")
        EXPECTED = os.path.join(root, "expected")
        result = unittest.main(argv=[sys.argv[0], "-v"], exit=False).result
    sys.exit(0 if result.wasSuccessful() else 1)


if __name__ == "__main__":
    main()
