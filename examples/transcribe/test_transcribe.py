#!/usr/bin/env python3
"""Unit tests of transcribe.py's audio path and wer.py, without Kafka (python -m unittest).

Speech comes from make_speech.py (espeak-ng + sox, installed by setup.sh), made once per run in
a temporary directory.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import transcribe as T  # noqa: E402
import wer as W  # noqa: E402

_tmp = None
_clip = None


def setUpModule():
    global _tmp, _clip
    _tmp = tempfile.TemporaryDirectory(prefix="transcribe-test-")
    subprocess.run(
        [
            sys.executable,
            os.path.join(HERE, "make_speech.py"),
            "--out",
            _tmp.name,
            "--voices",
            "en-us+klatt3",
        ],
        check=True,
        stderr=subprocess.DEVNULL,
    )
    with open(os.path.join(_tmp.name, "manifest.json"), encoding="utf-8") as f:
        _clip = json.load(f)[0]


def tearDownModule():
    _tmp.cleanup()


def pcm(rate: int) -> bytes:
    with open(_clip["s16le_16k" if rate == 16000 else "s16le_8k"], "rb") as f:
        return f.read()


def run(
    data: bytes,
    rate: int,
    chunk_ms: int = 20,
    start_ms: int = 0,
    jumps=(),
    dups=(),
    opts: T.SegmenterOptions | None = None,
):
    """Feeds `data` as records of `chunk_ms`; `jumps` = [(record index, ms)] shifts that record
    and every later one; `dups` = record indices sent twice."""
    tt = T.TrackTranscriber(rate, "pcm_s16le", opts or T.SegmenterOptions())
    n = rate * chunk_ms // 1000 * 2
    out = []
    for k, i in enumerate(range(0, len(data), n)):
        ts = start_ms + k * chunk_ms + sum(ms for at, ms in jumps if k >= at)
        out += tt.add(ts, data[i : i + n])
        if k in dups:
            out += tt.add(ts, data[i : i + n])
    out += tt.finish()
    return out, tt


class Encodings(unittest.TestCase):
    def test_s16le_passthrough_and_odd_length(self):
        self.assertEqual(T.to_s16le(b"\x01\x02\x03\x04", "pcm_s16le"), b"\x01\x02\x03\x04")
        with self.assertRaises(T.BadRecord):
            T.to_s16le(b"\x01\x02\x03", "pcm_s16le")

    def test_f32le(self):
        f = np.array([0.0, 0.5, -0.5, 1.0, -1.0, 2.0, np.nan], dtype="<f4").tobytes()
        got = np.frombuffer(T.to_s16le(f, "pcm_f32le"), dtype="<i2").tolist()
        self.assertEqual(got, [0, 16384, -16384, 32767, -32768, 32767, 0])
        with self.assertRaises(T.BadRecord):
            T.to_s16le(b"\x00" * 6, "pcm_f32le")

    def test_mulaw_g711(self):
        got = np.frombuffer(T.to_s16le(bytes([0xFF, 0x7F, 0x00, 0x80, 0xFE]), "mulaw"), "<i2")
        self.assertEqual(got.tolist(), [0, 0, -32124, 32124, 8])

    def test_mulaw_matches_sox(self):
        with open(_clip["mulaw_8k"], "rb") as f:
            self.assertEqual(T.to_s16le(f.read(), "mulaw"), pcm(8000))

    def test_unknown_encoding(self):
        with self.assertRaises(T.BadRecord):
            T.to_s16le(b"\x00\x00", "opus")


class Timeline(unittest.TestCase):
    def assertSameUtterances(self, a, b, shift_ms=0.0):
        self.assertEqual(len(a), len(b))
        for x, y in zip(a, b, strict=False):
            self.assertAlmostEqual(x.start_ms + shift_ms, y.start_ms, places=3)
            self.assertAlmostEqual(x.end_ms + shift_ms, y.end_ms, places=3)
            self.assertEqual(x.pcm, y.pcm)

    def test_utterances_cut_at_pauses(self):
        for rate in (16000, 8000):
            utts, _ = run(pcm(rate), rate)
            self.assertGreaterEqual(len(utts), 3, rate)  # four sentences, 800 ms pauses
            for u in utts:
                self.assertAlmostEqual((u.end_ms - u.start_ms) * rate / 1000, len(u.pcm) / 2)
            for a, b in zip(utts, utts[1:], strict=False):
                self.assertGreater(b.start_ms - a.end_ms, 300)

    def test_record_size_does_not_matter(self):
        data = pcm(16000)
        base, _ = run(data, 16000, chunk_ms=20)
        for chunk_ms in (100, 1000, 60):
            other, _ = run(data, 16000, chunk_ms=chunk_ms)
            self.assertSameUtterances(base, other)

    def test_origin_is_first_record(self):
        data = pcm(16000)
        base, _ = run(data, 16000)
        later, _ = run(data, 16000, start_ms=60_000)
        self.assertSameUtterances(base, later, shift_ms=60_000)

    def test_gap_is_silence(self):
        data = pcm(16000)
        base, _ = run(data, 16000)
        at = int(base[1].start_ms // 60 * 60 // 20)  # just before the second utterance
        shifted, tt = run(data, 16000, jumps=[(at, 2040)])
        self.assertEqual(tt.silence_inserted, 2040 * 16)
        self.assertSameUtterances(base[:1], shifted[:1])
        self.assertSameUtterances(base[1:], shifted[1:], shift_ms=2040)

    def test_duplicates_dropped(self):
        data = pcm(16000)
        base, _ = run(data, 16000)
        dup, tt = run(data, 16000, dups={10, 11, 200})
        self.assertEqual(tt.samples_dropped, 3 * 320)
        self.assertSameUtterances(base, dup)

    def test_partial_overlap_keeps_new_samples(self):
        tt = T.TrackTranscriber(16000, "pcm_s16le", T.SegmenterOptions())
        tt.add(0, bytes(640))  # 0–20 ms
        tt.add(10, bytes(640))  # 10–30 ms: first 10 ms overlap
        self.assertEqual(tt.samples_dropped, 160)
        self.assertEqual(tt.next_sample, 480)

    def test_long_gap_restarts_segmentation(self):
        data = pcm(16000)
        opts = T.SegmenterOptions(max_gap_s=1.0)
        base, _ = run(data, 16000, opts=opts)
        at = int(base[1].start_ms // 60 * 60 // 20)
        utts, tt = run(data, 16000, jumps=[(at, 30_000)], opts=opts)
        self.assertEqual(tt.silence_inserted, 0)  # not 30 s of zeros: a new segment
        self.assertEqual(len(utts), len(base))
        self.assertSameUtterances(base[:1], utts[:1])
        for b, u in zip(base[1:], utts[1:], strict=False):
            # A fresh endpointer starts at the new position, so frame boundaries move by up to
            # one 30 ms frame.
            self.assertAlmostEqual(u.start_ms, b.start_ms + 30_000, delta=60)
            self.assertAlmostEqual(u.end_ms, b.end_ms + 30_000, delta=60)

    def test_max_utterance_cut(self):
        utts, _ = run(pcm(16000), 16000, opts=T.SegmenterOptions(max_utterance_s=1.0))
        self.assertTrue(all(len(u.pcm) <= 2 * 16000 * 1.0 + 960 for u in utts))
        contiguous = sum(
            1 for a, b in zip(utts, utts[1:], strict=False) if abs(b.start_ms - a.end_ms) < 1e-6
        )
        self.assertGreater(contiguous, 3)  # long sentences were cut, and continue seamlessly

    def test_finish_mid_speech_with_empty_pending(self):
        # The stream ends mid-sentence on a frame boundary (30 ms frames, 20 ms records): the
        # endpointer is in speech with nothing pending, and pocketsphinx's end_stream() fails
        # on an empty buffer unless worked around.
        data = pcm(16000)
        base, _ = run(data, 16000)
        cut_ms = int((base[0].start_ms + 1200) // 60 * 60)
        tt = T.TrackTranscriber(16000, "pcm_s16le", T.SegmenterOptions())
        utts = []
        for k, i in enumerate(range(0, cut_ms * 32, 640)):
            utts += tt.add(k * 20, data[i : i + 640])
        self.assertEqual(utts, [])
        self.assertTrue(tt.ep.in_speech)
        self.assertEqual(len(tt.pending), 0)
        utts = tt.finish()
        self.assertEqual(len(utts), 1)
        self.assertAlmostEqual(utts[0].start_ms, base[0].start_ms)
        self.assertAlmostEqual(utts[0].end_ms, cut_ms, delta=1)


class RecognizerConfig(unittest.TestCase):
    def test_narrowband_config(self):
        r = T.Recognizer()
        try:
            d8 = r.decoder(8000)
            self.assertEqual((d8.config["nfft"], d8.config["upperf"]), (256, 3500.0))
            d16 = r.decoder(16000)
            self.assertEqual((d16.config["nfft"], d16.config["upperf"]), (512, 6800.0))
        finally:
            r.close()

    def test_decode_is_independent_of_history(self):
        utts, _ = run(pcm(16000), 16000)
        r = T.Recognizer()
        try:
            first = r.decode(utts[1].pcm, 16000)
            r.decode(utts[0].pcm, 16000)
            r.decode(utts[2].pcm, 16000)
            self.assertEqual(r.decode(utts[1].pcm, 16000), first)
            self.assertTrue(first)
        finally:
            r.close()


class Wer(unittest.TestCase):
    def test_selfcheck(self):
        W._selfcheck()

    def test_counts(self):
        r = W.wer("Thank you very much.", "thank you so much for")
        self.assertEqual((r.substitutions, r.deletions, r.insertions), (1, 0, 1))
        self.assertAlmostEqual(r.wer, 0.5)
        self.assertEqual((W.wer("a b", "a b") + W.wer("c", "d")).wer, 1 / 3)


if __name__ == "__main__":
    unittest.main()
